"""The local batch transform: scoring on threads sharing one model, Parquet parts, SQL writes, the summary, bad input.

Every bad-input case fails before the model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from conveyor.batch import scoring as batch
from conveyor.batch.parts import completed_parts
from conveyor.batch.readers import BatchInputError, lake_path
from conveyor.batch.runs import summarize
from conveyor.batch.scoring import score_file
from conveyor.batch.warehouse import write_table
from conveyor.demo import churn_frame
from conveyor.errors import ConveyorError

SCORED_AT = datetime(2026, 3, 1, 6, 0, tzinfo=UTC)
OUTPUT = ["customer_id", "prediction", "proba_no", "proba_yes", "model_name", "model_version", "run_id", "scored_at"]
PG_URL = os.environ.get("CONVEYOR_TEST_POSTGRES_URL", "postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="module")
def loaded(churn_model):
    """The churn model loaded in the test process: what every worker must reproduce."""
    from conveyor.model.artifacts import LoadedModel

    return LoadedModel(churn_model["dir"])


def score(source, model, out, run_id, **options):
    """``score_file`` with the test's model name, version and timestamp."""
    options = {"chunk_rows": 1000, "workers": 1, **options}
    return score_file(
        source, model["dir"], out, run_id=run_id, model_name="churn", model_version="3", scored_at=SCORED_AT, **options
    )


def read_parts(parts) -> pd.DataFrame:
    """The rows of part files (paths, URIs or ObjectStoragePaths), in order."""
    frames = []
    for part in parts:
        with lake_path(part, None).open("rb") as handle:
            frames.append(pd.read_parquet(handle))
    return pd.concat(frames, ignore_index=True)


def assert_matches(got: pd.DataFrame, frame: pd.DataFrame, loaded) -> None:
    """The scored rows are the model's predictions for ``frame``, in its order."""
    expected = loaded.predict_frame(frame)
    assert list(got["customer_id"]) == list(frame["customer_id"])
    assert list(got["prediction"]) == list(expected["prediction"])
    np.testing.assert_allclose(got[["proba_no", "proba_yes"]], expected[["proba_no", "proba_yes"]], rtol=1e-9)


def names(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def table_rows(url: str, table: str, run_id: str | None = None) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = f"SELECT COUNT(*) FROM {table}" + (" WHERE run_id = :run_id" if run_id else "")
            return conn.execute(sa.text(query), {"run_id": run_id} if run_id else {}).scalar_one()
    finally:
        engine.dispose()


def fake_parts(
    folder: Path, run_id: str, sizes: list[int], predictions: str = "yyn", extra: bool = False
) -> list[Path]:
    """Part files as a batch run writes them, with known predictions and probabilities."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, offset = [], 0
    for i, size in enumerate(sizes):
        labels = [{"y": "yes", "n": "no"}[predictions[(offset + k) % len(predictions)]] for k in range(size)]
        frame = pd.DataFrame(
            {
                "customer_id": [f"C{offset + k:05d}" for k in range(size)],
                "prediction": labels,
                "proba_no": [0.25 if label == "yes" else 0.75 for label in labels],
                "proba_yes": [0.75 if label == "yes" else 0.25 for label in labels],
                "model_name": "churn",
                "model_version": "3",
                "run_id": run_id,
                "scored_at": pd.Timestamp(SCORED_AT),
            }
        )
        if extra:
            frame["proba_maybe"] = 0.0
        paths.append(folder / f"part-{i:05d}.parquet")
        frame.to_parquet(paths[-1], index=False)
        offset += size
    return paths


# --- scoring ---------------------------------------------------------------------------------------


def test_csv_scores_like_the_model_and_a_rerun_replaces_its_output(churn_model, loaded, lake, tmp_path):
    frame = churn_frame(5000, seed=11)
    source = tmp_path / "customers.csv"
    frame.to_csv(source, index=False)
    out = lake.predictions("churn", "manual__1")
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"

    result = score(source, churn_model, out, "manual__1", workers=2)

    parts = [f"part-{i:05d}.parquet" for i in range(5)]
    assert names(out) == ["_SUCCESS.json", *parts]
    assert result.rows == 5000 and result.parts == [str(out / name) for name in parts]
    manifest = json.loads((out / "_SUCCESS.json").read_text())
    assert {k: manifest[k] for k in ("rows", "parts", "model", "version", "run_id")} == {
        "rows": 5000,
        "parts": parts,
        "model": "churn",
        "version": "3",
        "run_id": "manual__1",
    }
    assert [str(p) for p in completed_parts(out)] == result.parts
    got = read_parts(result.parts)
    assert list(got.columns) == OUTPUT
    assert_matches(got, frame, loaded)
    assert set(got["model_name"]) == {"churn"} and set(got["model_version"]) == {"3"}
    assert set(got["run_id"]) == {"manual__1"} and set(got["scored_at"]) == {pd.Timestamp(SCORED_AT)}
    assert write_table(url, "churn_predictions", result.parts, "manual__1", pipeline="churn") == 5000

    summary = summarize(result.parts)
    counts = got["prediction"].value_counts()
    assert summary["rows"] == 5000
    assert {k: v["count"] for k, v in summary["predictions"].items()} == counts.to_dict()
    # Every predicted class with its share (the quick model may predict one class only on a loaded machine).
    assert {k: v["share"] for k, v in summary["predictions"].items()} == pytest.approx((counts / 5000).to_dict())
    assert summary["mean_probability"] == pytest.approx({"no": got["proba_no"].mean(), "yes": got["proba_yes"].mean()})

    # The same run again (another worker count): the same names and rows, no duplicates anywhere.
    again = score(source, churn_model, out, "manual__1", workers=1)
    assert again.parts == result.parts and names(out) == ["_SUCCESS.json", *parts]
    pd.testing.assert_frame_equal(read_parts(again.parts), got)
    assert write_table(url, "churn_predictions", again.parts, "manual__1", pipeline="churn") == 5000
    assert table_rows(url, "churn_predictions") == 5000

    # A re-run that fails (here: nothing to score) keeps the last complete output and leaves no staging.
    empty = tmp_path / "empty.csv"
    frame.iloc[:0].to_csv(empty, index=False)
    with pytest.raises(BatchInputError, match="no rows to score"):
        score(empty, churn_model, out, "manual__1")
    assert names(out) == ["_SUCCESS.json", *parts]


def test_a_chunk_the_model_rejects_fails_the_run_without_output_and_a_rerun_works(
    churn_model, loaded, s3_lake, tmp_path
):
    """On an S3 lake (moto): remote input, staging and publishing on an object store, remote parts to SQL."""
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    write_table(
        url, "churn_predictions", fake_parts(tmp_path / "other", "other_run", [20]), "other_run", pipeline="churn"
    )
    bad = churn_frame(3000, seed=21)
    bad["tenure_months"] = bad["tenure_months"].astype(str)
    bad.loc[1500, "tenure_months"] = "garbage"  # in the second chunk (rows 1001-2000)
    bad.to_parquet(tmp_path / "bad.parquet", index=False, row_group_size=1000)
    out = s3_lake.predictions("churn", "scheduled__2")

    rejected = r"bad\.parquet: rows 1001-2000 were rejected by the model: .*tenure_months"
    with pytest.raises(BatchInputError, match=rejected):
        score(tmp_path / "bad.parquet", churn_model, out, "scheduled__2")

    assert names(out) == []  # no parts, no staging, no _SUCCESS.json
    with pytest.raises(FileNotFoundError, match="has not finished"):
        completed_parts(out)
    assert table_rows(url, "churn_predictions", "scheduled__2") == 0

    # The fixed input, now a folder of Parquet files on S3 (its marker is skipped), scores in order.
    folder = s3_lake.landing("churn", "inference")
    first, second = churn_frame(1500, seed=22), churn_frame(800, seed=23)
    for name, frame in (("a.parquet", first), ("b.parquet", second)):
        with (folder / name).open("wb") as handle:
            frame.to_parquet(handle, index=False)
    (folder / "_SUCCESS").write_bytes(b"")
    result = score(
        s3_lake.uri("landing", "churn", "inference"),
        churn_model,
        out,
        "scheduled__2",
        chunk_rows=700,
        conn_id=s3_lake.conn_id,
    )

    # 3 + 2 parts: parts never span files
    assert names(out) == ["_SUCCESS.json", *(f"part-{i:05d}.parquet" for i in range(5))]
    assert result.parts[0].startswith("s3://") and [str(p) for p in completed_parts(out)] == result.parts
    assert_matches(read_parts(completed_parts(out)), pd.concat([first, second], ignore_index=True), loaded)
    assert (
        write_table(url, "churn_predictions", result.parts, "scheduled__2", pipeline="churn", conn_id=s3_lake.conn_id)
        == 2300
    )
    assert table_rows(url, "churn_predictions", "scheduled__2") == 2300
    assert table_rows(url, "churn_predictions", "other_run") == 20
    assert summarize(result.parts, conn_id=s3_lake.conn_id)["rows"] == 2300


def test_a_model_without_id_column_numbers_the_rows(loaded, monkeypatch):
    import pyarrow as pa

    frame = churn_frame(5, seed=4).drop(columns=["customer_id"])
    context = {"id_column": None, "model_name": "m", "model_version": "1", "run_id": "r", "scored_at": SCORED_AT}

    table = batch.score_chunk(loaded, pa.Table.from_pandas(frame), 2000, context)

    assert table.column_names[:2] == ["row_number", "prediction"]
    assert table.column("row_number").to_pylist() == [2000, 2001, 2002, 2003, 2004]


# --- bad input: each fails before a worker starts ---------------------------------------------------


def test_missing_columns_are_named(churn_model, lake, tmp_path):
    frame = churn_frame(50, seed=5)
    frame.drop(columns=["tenure_months", "age"]).to_csv(tmp_path / "in.csv", index=False)
    out = lake.predictions("churn", "r")
    with pytest.raises(BatchInputError, match=r"in\.csv: missing required columns: tenure_months, age"):
        score(tmp_path / "in.csv", churn_model, out, "r")
    frame.drop(columns=["customer_id"]).to_parquet(tmp_path / "in.parquet")
    with pytest.raises(BatchInputError, match=r"in\.parquet: missing required columns: customer_id"):
        score(tmp_path / "in.parquet", churn_model, out, "r")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["header only", "zero bytes", "empty parquet", "empty folder", "marker only"])
def test_empty_input_is_an_error(churn_model, lake, tmp_path, kind):
    frame = churn_frame(10, seed=5).iloc[:0]
    source = tmp_path / "in"
    if kind == "header only":
        source = tmp_path / "in.csv"
        frame.to_csv(source, index=False)
    elif kind == "zero bytes":
        source = tmp_path / "in.csv"
        source.write_bytes(b"")
    elif kind == "empty parquet":
        source = tmp_path / "in.parquet"
        frame.to_parquet(source)
    else:
        source.mkdir()
        if kind == "marker only":
            (source / "_SUCCESS").write_bytes(b"")
    out = lake.predictions("churn", "r")
    with pytest.raises(BatchInputError, match="no rows to score"):
        score(source, churn_model, out, "r")
    assert not out.exists() or names(out) == []


def test_unreadable_input_is_named(churn_model, lake, tmp_path):
    out = lake.predictions("churn", "r")
    (tmp_path / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(BatchInputError, match=r"x\.parquet: cannot be read as Parquet"):
        score(tmp_path / "x.parquet", churn_model, out, "r")
    (tmp_path / "x.txt").write_text("a,b\n")
    with pytest.raises(BatchInputError, match=r"x\.txt: unsupported file type"):
        score(tmp_path / "x.txt", churn_model, out, "r")
    with pytest.raises(BatchInputError, match="no such file or folder"):
        score(tmp_path / "absent.csv", churn_model, out, "r")
    frame = churn_frame(20, seed=5).astype({"support_calls": object})
    frame.loc[3, "support_calls"] = "lots"
    frame.to_csv(tmp_path / "x.csv.gz", index=False)
    with pytest.raises(BatchInputError, match=r"x\.csv\.gz: cannot be read as CSV: column 'support_calls': .*'lots'"):
        score(tmp_path / "x.csv.gz", churn_model, out, "r")


# --- SQL ---------------------------------------------------------------------------------------------


def postgres_url() -> str:
    """The local test server's URL with an installed driver, or skip."""
    for module, dialect in (
        ("psycopg", "postgresql+psycopg"),
        ("psycopg2", "postgresql+psycopg2"),
        ("pg8000", "postgresql+pg8000"),
    ):
        if importlib.util.find_spec(module):
            url = f"{dialect}://{PG_URL}"
            break
    else:
        pytest.skip("no PostgreSQL driver (psycopg, psycopg2 or pg8000) is installed in the virtualenv")
    engine = sa.create_engine(url)
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        pytest.skip(f"PostgreSQL at {PG_URL} is not reachable: {error}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse(request, tmp_path):
    """A database URL and a table name of its own (dropped afterwards on Postgres)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'warehouse.db'}", "predictions"
        return
    url, table = postgres_url(), f"batch_test_{uuid.uuid4().hex[:12]}"
    yield url, table
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def test_write_table_replaces_a_runs_rows_in_one_transaction(warehouse, tmp_path):
    url, table = warehouse
    run_a = fake_parts(tmp_path / "a", "run_a", [20, 10])
    run_b = fake_parts(tmp_path / "b", "run_b", [10])

    assert write_table(url, table, run_a, "run_a", pipeline="churn", batch_rows=7) == 30
    assert write_table(url, table, run_b, "run_b", pipeline="churn") == 10
    assert write_table(url, table, run_a, "run_a", pipeline="churn") == 30  # a re-run replaces, never duplicates
    assert (table_rows(url, table), table_rows(url, table, "run_a")) == (40, 30)

    # The second part holds another run's rows: found after the first part's rows went in, all rolled back.
    mixed = [fake_parts(tmp_path / "a2", "run_a", [5], predictions="n")[0], run_b[0]]
    with pytest.raises(ValueError, match="holds rows of another run than 'run_a'"):
        write_table(url, table, mixed, "run_a", pipeline="churn")
    assert (table_rows(url, table), table_rows(url, table, "run_a")) == (40, 30)

    with pytest.raises(ValueError, match="lacks the columns proba_maybe"):
        write_table(url, table, fake_parts(tmp_path / "c", "run_c", [3], extra=True), "run_c", pipeline="churn")

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        query = f"SELECT * FROM {table} WHERE run_id = 'run_a' AND customer_id = 'C00000'"
        row = conn.execute(sa.text(query)).mappings().one()
        columns = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns(table)}
    engine.dispose()
    assert (row["prediction"], row["proba_yes"], row["model_version"]) == ("yes", 0.75, "3")
    assert row["scored_at"] is not None
    assert isinstance(columns["proba_yes"], sa.Float) and isinstance(columns["scored_at"], sa.DateTime)


def test_write_table_refuses_unsafe_names(tmp_path):
    parts = fake_parts(tmp_path, "r", [1])
    with pytest.raises(ValueError, match="not allowed"):
        write_table(f"sqlite:///{tmp_path / 'w.db'}", "predictions; DROP TABLE x", parts, "r", pipeline="churn")


# --- summary -----------------------------------------------------------------------------------------


def test_summarize_counts_shares_and_mean_probabilities(tmp_path):
    parts = fake_parts(tmp_path, "r", [4, 5])  # yes, yes, no repeating: 6 yes, 3 no
    assert summarize(parts) == {
        "rows": 9,
        "predictions": {"yes": {"count": 6, "share": 6 / 9}, "no": {"count": 3, "share": 3 / 9}},
        "mean_probability": {
            "no": pytest.approx((3 * 0.75 + 6 * 0.25) / 9),
            "yes": pytest.approx((6 * 0.75 + 3 * 0.25) / 9),
        },
    }
    pd.DataFrame({"row_number": [0, 1, 2], "prediction": [1.0, 2.0, 6.0]}).to_parquet(tmp_path / "reg.parquet")
    assert summarize([tmp_path / "reg.parquet"]) == {
        "rows": 3,
        "predictions": {"mean": 3.0, "min": 1.0, "max": 6.0},
        "mean_probability": {},
    }


# --- the run around the scoring -----------------------------------------------------------------------


def test_bad_input_is_a_deterministic_conveyor_error():
    assert issubclass(BatchInputError, ConveyorError) and not BatchInputError.retryable


def test_batch_input_is_the_given_input_else_the_oldest_unscored_drop_else_none(lake):
    from types import SimpleNamespace

    from conveyor.batch.runs import SCORED_MARKER, batch_input, mark_scored, run_timestamp

    given = lake.uri("landing", "churn", "in.csv")
    assert batch_input(lake, "churn", "_SUCCESS", given) == (given, None)
    assert batch_input(lake, "churn", "_SUCCESS", "landing/churn/in.csv") == (given, None)  # relative to the root
    assert batch_input(lake, "churn", "_SUCCESS", "") is None  # nothing pending: the operator skips
    for name, complete in (("d-1", True), ("d-2", True), ("d-0", False)):
        folder = lake.landing("churn", "inference", name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rows.csv").write_bytes(b"a\n1\n")
        if complete:
            (folder / "_SUCCESS").write_bytes(b"")
    assert batch_input(lake, "churn", "_SUCCESS", None) == (lake.uri("landing", "churn", "inference", "d-1"), "d-1")
    mark_scored(lake, "churn", "d-1", "run-1", 1)
    assert json.loads((lake.landing("churn", "inference", "d-1") / SCORED_MARKER).read_text()) == {
        "run_id": "run-1",
        "rows": 1,
    }
    assert batch_input(lake, "churn", "_SUCCESS", None)[1] == "d-2"

    run = SimpleNamespace(run_after=SCORED_AT)
    assert run_timestamp({"logical_date": None, "data_interval_end": None, "dag_run": run}) == SCORED_AT
    assert run_timestamp({"logical_date": datetime(2026, 1, 1, tzinfo=UTC), "dag_run": run}).year == 2026
