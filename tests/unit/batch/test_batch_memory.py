"""Batch scoring's memory: chunks sized from a bytes budget, the input streamed, one model shared by the threads."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pandas as pd
import pytest

from conveyor.batch import scoring as batch
from conveyor.batch.parts import completed_parts
from conveyor.batch.readers import Columns, lake_path, measured_files
from conveyor.demo import churn_frame

SCORED_AT = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)


class RecordingModel:
    """A stand-in for ``LoadedModel``: records every batch it is asked to score and how many load."""

    loads = 0
    lock = threading.Lock()

    def __init__(self, model_dir):
        with RecordingModel.lock:
            RecordingModel.loads += 1
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        RecordingModel.last = self

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        with RecordingModel.lock:
            self.sizes.append(len(frame))
            self.threads.add(threading.current_thread().name)
        return pd.DataFrame(
            {
                "customer_id": frame["customer_id"].to_numpy(),
                "prediction": ["yes"] * len(frame),
                "proba_no": [0.25] * len(frame),
                "proba_yes": [0.75] * len(frame),
            }
        )


@pytest.fixture
def recording(monkeypatch):
    """Score with :class:`RecordingModel` in place of the real model."""
    from conveyor.model import artifacts

    RecordingModel.loads = 0
    monkeypatch.setattr(artifacts, "LoadedModel", RecordingModel)
    return RecordingModel


def test_chunk_rows_come_from_the_memory_budget():
    # 100 bytes a row, 4 copies in predict, 4 chunks in flight: 1,600 bytes a row held
    assert batch.chunk_rows_for(100.0, 16_000_000, 4, 50_000) == 10_000
    assert batch.chunk_rows_for(100.0, 16_000_000, 4, 5_000) == 5_000  # capped by the pipeline's chunk_rows
    assert batch.chunk_rows_for(1e9, 1_000, 4, 5_000) == 1  # a huge row still makes progress
    assert batch.chunk_rows_for(0.0, 1_600, 1, 5_000) == 400  # an empty sample counts 1 byte a row
    with pytest.raises(ValueError, match="budget_bytes"):
        batch.chunk_rows_for(100.0, 0, 4, 5_000)


def test_row_width_is_measured_on_each_files_head(churn_model, tmp_path):
    from conveyor.model.metadata import read

    columns = Columns.of(read(churn_model["dir"]))
    frame = churn_frame(3000, seed=1)
    frame.to_parquet(tmp_path / "a.parquet", index=False)
    frame.to_csv(tmp_path / "b.csv", index=False)

    measured = measured_files(lake_path(tmp_path, None), columns, 50_000)

    expected = frame[columns.required].memory_usage(deep=True, index=False).sum() / len(frame)
    assert [file.name for file, _ in measured] == ["a.parquet", "b.csv"]
    for _, width in measured:
        assert width == pytest.approx(expected, rel=0.2)


def test_scoring_streams_bounded_chunks_through_one_shared_model(churn_model, recording, lake, tmp_path):
    frame = churn_frame(20_000, seed=2)
    frame.to_parquet(tmp_path / "big.parquet", index=False, row_group_size=20_000)  # one row group: no help
    columns = Columns(_dtypes(churn_model), "customer_id")
    width = measured_files(lake_path(tmp_path / "big.parquet", None), columns, 50_000)
    budget = int(width[0][1] * batch.PREDICT_COPIES * 4 * 1500)  # 1,500 rows a chunk with 2 threads (4 in flight)
    out = lake.predictions("churn", "manual__1")

    result = batch.score_file(
        tmp_path / "big.parquet",
        churn_model["dir"],
        out,
        run_id="manual__1",
        model_name="churn",
        model_version="3",
        scored_at=SCORED_AT,
        chunk_rows=50_000,
        workers=2,
        memory_bytes=budget,
    )

    model = recording.last
    assert recording.loads == 1  # loaded once, shared by both threads
    assert sum(model.sizes) == 20_000 and result.rows == 20_000
    rows = batch.chunk_rows_for(width[0][1], budget, 4, 50_000)
    assert 1400 <= rows <= 1500  # never the whole file, though chunk_rows allows it
    assert model.sizes == [rows] * (20_000 // rows) + [20_000 % rows]
    assert len(model.threads) <= 2 and len(completed_parts(out)) == len(model.sizes)
    got = pd.concat(pd.read_parquet(part.path) for part in completed_parts(out))
    assert list(got["customer_id"]) == list(frame["customer_id"])  # written in input order


def _dtypes(churn_model) -> dict[str, str]:
    from conveyor.model.metadata import read

    return read(churn_model["dir"]).dtypes
