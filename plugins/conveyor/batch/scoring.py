"""The local batch transform: score a table in chunks on threads sharing one model, into Parquet parts.

The input is read as :mod:`conveyor.batch.readers` says (CSV or Parquet files, only the model's
columns), streamed: no file is ever held whole. The model is loaded once, in this process, through
its own ``code/inference.py``, and ``workers`` threads score chunks with it (predict releases the
GIL in its native part - LightGBM, XGBoost, CatBoost, torch - so the threads overlap one chunk's
pandas work with another's native predict, and the model's memory is held once). Rows per chunk
come from a memory budget (:func:`chunk_rows_for`: ``memory_bytes`` over the row width measured
on each file's first rows, capped by ``chunk_rows``); at most ``2 × workers`` chunks are in
flight, so peak memory is the model plus the budget whatever the input size, and results are
written in input order.

Each output row holds the input's id column (``row_number``, the 0-based input position, when the
model has none), ``prediction``, one ``proba_<class>`` per class for classifiers, ``model_name``,
``model_version``, ``run_id`` and ``scored_at`` (one timestamp for the whole run). The output
folder's layout (staged parts, ``_SUCCESS.json`` last) is :mod:`conveyor.batch.parts`'.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.batch.parts import BatchResult, fresh_staging, part_name, publish, remove, write_part
from conveyor.batch.readers import BatchInputError, Columns, file_chunks, lake_path, local_copies, measured_files

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

ROW_NUMBER = "row_number"
PROBA_PREFIX = "proba_"
MEMORY_BYTES = 256 << 20
"""The default bytes the chunks in flight may take together (besides the model)."""
PREDICT_COPIES = 4
"""A chunk in predict costs about this many times its input frame (feature copies, output)."""


def utc(stamp: datetime) -> datetime:
    """A timestamp in UTC (naive means UTC).

    :param stamp: the timestamp.
    """
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).astimezone(UTC)


def score_file(
    source: str | Path | ObjectStoragePath,
    model_dir: Path,
    out: str | Path | ObjectStoragePath,
    *,
    run_id: str,
    model_name: str,
    model_version: str,
    scored_at: datetime,
    chunk_rows: int = 100_000,
    workers: int = 2,
    conn_id: str | None = None,
    memory_bytes: int = MEMORY_BYTES,
) -> BatchResult:
    """Score a CSV or Parquet file (or a folder of them) and write Parquet parts and ``_SUCCESS.json``.

    :param source: the input file or folder: a local path or an ObjectStoragePath URI.
    :param model_dir: the extracted ``model.tar.gz`` (``artifacts.fetch``).
    :param out: the run's output folder, e.g. ``Lake.predictions(pipeline, run_id)``.
    :param run_id: the run that scores (written on every row).
    :param model_name: the registered model's name (written on every row).
    :param model_version: the registered model's version (written on every row).
    :param scored_at: the run's one timestamp (naive means UTC), not a clock read per row.
    :param chunk_rows: the most rows per chunk and per part file (fewer when the budget says so).
    :param workers: scoring threads, all sharing the one loaded model.
    :param conn_id: the Airflow connection for non-local ``source`` and ``out``.
    :param memory_bytes: the bytes the chunks in flight may take together (sizes the chunks).
    :raises BatchInputError: the input broke a rule (see the module docstring).
    """
    from conveyor.model.artifacts import LoadedModel
    from conveyor.model.metadata import read

    if chunk_rows < 1 or workers < 1 or memory_bytes < 1:
        raise ValueError(
            f"chunk_rows, workers and memory_bytes must be at least 1, got {chunk_rows}, {workers}, {memory_bytes}"
        )
    started = time.monotonic()
    columns = Columns.of(read(Path(model_dir)))
    with local_copies():  # a remote file is fetched once, for its check and its read
        measured = measured_files(lake_path(source, conn_id), columns, chunk_rows)  # every file, before any work
        files = [(file, chunk_rows_for(width, memory_bytes, 2 * workers, chunk_rows)) for file, width in measured]
        target = lake_path(out, conn_id)
        staging = fresh_staging(target)
        stamp = utc(scored_at)
        constants = {"model_name": model_name, "model_version": model_version, "run_id": run_id, "scored_at": stamp}
        try:
            model = LoadedModel(Path(model_dir))
            names, rows = _score(files, columns, model, staging, constants, workers)
            if rows == 0:
                raise BatchInputError(f"{source}: no rows to score (every input file is empty)")
            manifest = {
                "rows": rows,
                "parts": names,
                "model": model_name,
                "version": model_version,
                "run_id": run_id,
                "scored_at": stamp.isoformat(),
                "source": str(source),
            }
            publish(target, staging, names, manifest)
        except BaseException:
            remove(staging, quiet=True)
            raise
    seconds = time.monotonic() - started
    log.info(
        "scored %s rows into %s parts at %s in %.1fs (%.0f rows/s)",
        rows,
        len(names),
        target,
        seconds,
        rows / max(seconds, 1e-9),
    )
    return BatchResult(str(target), [str(target / name) for name in names], rows, round(seconds, 3))


def _score(
    files: list[tuple[ObjectStoragePath, int]],
    columns: Columns,
    model: Any,
    staging: ObjectStoragePath,
    constants: dict[str, Any],
    workers: int,
) -> tuple[list[str], int]:
    """Stream chunks to ``workers`` threads sharing one model (bounded in flight), write results in order.

    :param files: the input files, each with its rows per chunk (:func:`chunk_rows_for`).
    :param columns: the columns to read.
    :param model: the loaded model (``LoadedModel``), shared by every thread.
    :param staging: where the parts go.
    :param constants: the run's columns (model, version, run id, timestamp).
    :param workers: scoring threads.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    pending: deque[tuple[Future[pa.Table], ObjectStoragePath, int, int]] = deque()
    names: list[str] = []
    state: dict[str, Any] = {"rows": 0, "schema": None, "clock": time.monotonic()}

    def write_next() -> None:
        future, file, first, count = pending.popleft()
        try:
            table = future.result()
        except BatchInputError:
            raise
        except ValueError as error:
            raise BatchInputError(
                f"{file}: rows {first + 1}-{first + count} were rejected by the model: {error}"
            ) from error
        if state["schema"] is None:
            state["schema"] = table.schema
        table = table.cast(state["schema"])
        name = part_name(len(names))
        write_part(staging, name, table)
        names.append(name)
        state["rows"] += table.num_rows
        elapsed = time.monotonic() - state["clock"]
        log.info(
            "wrote %s (%s rows, %s in all, %.0f rows/s)",
            name,
            table.num_rows,
            state["rows"],
            state["rows"] / max(elapsed, 1e-9),
        )

    context = {"id_column": columns.id_column, **constants}
    start = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conveyor-score") as pool:
        try:
            for file, rows in files:
                first = 0
                for chunk in file_chunks(file, columns, rows):
                    future = pool.submit(score_chunk, model, chunk, start, context)
                    pending.append((future, file, first, chunk.num_rows))
                    start, first = start + chunk.num_rows, first + chunk.num_rows
                    if len(pending) >= 2 * workers:
                        write_next()
            while pending:
                write_next()
        finally:
            for future, *_ in pending:
                future.cancel()
    return names, state["rows"]


def chunk_rows_for(row_bytes: float, budget_bytes: int, in_flight: int, cap: int) -> int:
    """Rows per chunk so that ``in_flight`` chunks, as predict sees them, fit in ``budget_bytes``.

    A chunk costs its pandas frame (``row_bytes`` a row) times :data:`PREDICT_COPIES` (the copies a
    predict makes while transforming features, plus the output); the result is at least 1 row and
    at most ``cap``.

    :param row_bytes: bytes a row takes as a pandas frame (``conveyor.batch.readers.measured_files``).
    :param budget_bytes: the bytes the chunks in flight may take together.
    :param in_flight: the chunks held at once (read, being scored, waiting to be written).
    :param cap: the most rows per chunk (the pipeline's ``deploy.batch.chunk_rows``).
    """
    if budget_bytes < 1 or in_flight < 1 or cap < 1:
        raise ValueError(f"budget_bytes, in_flight and cap must be at least 1, got {budget_bytes}, {in_flight}, {cap}")
    per_row = max(float(row_bytes), 1.0) * PREDICT_COPIES * in_flight
    return max(1, min(cap, int(budget_bytes // per_row)))


def score_chunk(model: Any, chunk: pa.Table, start: int, context: dict[str, Any]) -> pa.Table:
    """Score one chunk (in a scoring thread): the output columns, ready to write.

    :param model: the loaded model (``LoadedModel``).
    :param chunk: the chunk's input columns.
    :param start: the 0-based input position of its first row (for ``row_number``).
    :param context: the id column and the run's constant columns.
    """
    frame = chunk.to_pandas()
    return output_table(frame, model.predict_frame(frame), start, context)


def output_table(frame: Any, predicted: Any, start: int, context: dict[str, Any]) -> pa.Table:
    """The output rows of one chunk: id (or ``row_number``), prediction, probabilities, the run's columns.

    Shared by the local transform and the SageMaker transform (``conveyor.aws.transform``).

    :param frame: the chunk's input rows (pandas; holds the id column when the model has one).
    :param predicted: ``predict_fn``'s frame for them: ``prediction`` and ``proba_<class>`` columns.
    :param start: the 0-based input position of the chunk's first row (for ``row_number``).
    :param context: ``id_column`` and the run's constant columns (model_name, model_version, run_id, scored_at).
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    if "prediction" not in predicted.columns or len(predicted) != len(frame):
        raise RuntimeError(
            f"predict_fn returned {len(predicted)} rows without a prediction column for {len(frame)} rows"
        )
    id_column = context["id_column"]
    out: dict[str, Any] = {}
    if id_column:
        out[id_column] = frame[id_column].to_numpy()
    else:
        out[ROW_NUMBER] = np.arange(start, start + len(frame), dtype="int64")
    out["prediction"] = predicted["prediction"].to_numpy()
    for name in predicted.columns:
        if str(name).startswith(PROBA_PREFIX):
            out[str(name)] = predicted[name].to_numpy(dtype="float64")
    table = pa.Table.from_pandas(pd.DataFrame(out), preserve_index=False).replace_schema_metadata(None)
    n = len(frame)
    for name in ("model_name", "model_version", "run_id"):
        table = table.append_column(name, pa.repeat(pa.scalar(context[name], pa.string()), n))
    stamp = pa.scalar(context["scored_at"], pa.timestamp("us", tz="UTC"))
    return table.append_column("scored_at", pa.repeat(stamp, n))
