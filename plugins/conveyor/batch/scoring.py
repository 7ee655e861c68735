"""The local batch transform: score a table in chunks in worker processes, into Parquet parts.

The input is read as :mod:`conveyor.batch.readers` says (CSV or Parquet files, only the model's
columns). Chunks of ``chunk_rows`` rows go to ``workers`` spawned processes that each load the
model once through its own ``code/inference.py``; at most ``2 × workers`` chunks are in flight, so
memory stays bounded whatever the input size, and results are written in input order.

Each output row holds the input's id column (``row_number``, the 0-based input position, when the
model has none), ``prediction``, one ``proba_<class>`` per class for classifiers, ``model_name``,
``model_version``, ``run_id`` and ``scored_at`` (one timestamp for the whole run). The output
folder's layout (staged parts, ``_SUCCESS.json`` last) is :mod:`conveyor.batch.parts`'.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.batch.parts import BatchResult, fresh_staging, part_name, publish, remove, write_part
from conveyor.batch.readers import BatchInputError, Columns, checked_files, file_chunks, lake_path

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

ROW_NUMBER = "row_number"
PROBA_PREFIX = "proba_"
_WORKER: dict[str, Any] = {}


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
    chunk_rows: int = 50_000,
    workers: int = 2,
    conn_id: str | None = None,
) -> BatchResult:
    """Score a CSV or Parquet file (or a folder of them) and write Parquet parts and ``_SUCCESS.json``.

    :param source: the input file or folder: a local path or an ObjectStoragePath URI.
    :param model_dir: the extracted ``model.tar.gz`` (``artifacts.fetch``).
    :param out: the run's output folder, e.g. ``Lake.predictions(pipeline, run_id)``.
    :param run_id: the run that scores (written on every row).
    :param model_name: the registered model's name (written on every row).
    :param model_version: the registered model's version (written on every row).
    :param scored_at: the run's one timestamp (naive means UTC), not a clock read per row.
    :param chunk_rows: rows per chunk and per part file.
    :param workers: worker processes, each holding the model once.
    :param conn_id: the Airflow connection for non-local ``source`` and ``out``.
    :raises BatchInputError: the input broke a rule (see the module docstring).
    """
    from conveyor.model.metadata import read

    if chunk_rows < 1 or workers < 1:
        raise ValueError(f"chunk_rows and workers must be at least 1, got {chunk_rows} and {workers}")
    started = time.monotonic()
    columns = Columns.of(read(Path(model_dir)))
    files = checked_files(lake_path(source, conn_id), columns, chunk_rows)  # every file, before any work starts
    target = lake_path(out, conn_id)
    staging = fresh_staging(target)
    stamp = utc(scored_at)
    constants = {"model_name": model_name, "model_version": model_version, "run_id": run_id, "scored_at": stamp}
    try:
        names, rows = _score(files, columns, Path(model_dir), staging, constants, chunk_rows, workers)
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
    files: list[ObjectStoragePath],
    columns: Columns,
    model_dir: Path,
    staging: ObjectStoragePath,
    constants: dict[str, Any],
    chunk_rows: int,
    workers: int,
) -> tuple[list[str], int]:
    """Feed chunks to a lazily started pool (bounded in flight) and write their results in order.

    :param files: the input files.
    :param columns: the columns to read.
    :param model_dir: the extracted model.
    :param staging: where the parts go.
    :param constants: the run's columns (model, version, run id, timestamp).
    :param chunk_rows: rows per chunk.
    :param workers: worker processes.
    """
    from concurrent.futures import ProcessPoolExecutor

    pool: ProcessPoolExecutor | None = None
    pending: deque[tuple[Any, ObjectStoragePath, int, int]] = deque()
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
    restore_daemon = _allow_child_processes()
    try:
        for file in files:
            first = 0
            for chunk in file_chunks(file, columns, chunk_rows):
                if pool is None:
                    threads = max(1, (os.cpu_count() or 1) // workers)
                    pool = ProcessPoolExecutor(
                        max_workers=workers,
                        mp_context=multiprocessing.get_context("spawn"),
                        initializer=_start_worker,
                        initargs=(str(model_dir), threads),
                    )
                pending.append((pool.submit(_score_chunk, _to_ipc(chunk), start, context), file, first, chunk.num_rows))
                start, first = start + chunk.num_rows, first + chunk.num_rows
                if len(pending) >= 2 * workers:
                    write_next()
        while pending:
            write_next()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        restore_daemon()
    return names, state["rows"]


def _allow_child_processes() -> Any:
    """Let this process start the scoring processes wherever it runs; returns the undo.

    Two things stand in the way inside Airflow's workers, and both are lifted only while the
    scoring pool runs (it is always shut down and waited for):

    * a task process forked from a Celery prefork worker (CeleryExecutor) inherits billiard's pool
      process as multiprocessing's current process: a daemon ("daemonic processes are not allowed
      to have children") with billiard's authentication key, which the standard library refuses to
      pickle for spawned children;
    * a spawned child first re-runs its parent's ``__main__`` script: in a task process that is the
      ``airflow`` command, whose import needs the metadata database settings Airflow keeps from task
      processes. The scoring processes need nothing but this module, so the script is not offered.
    """
    import sys
    from multiprocessing import process as _process

    process: Any = _process  # its private parts: _config, AuthenticationString
    undo: list[Any] = []
    current = process.current_process()
    inherited = dict(current._config)
    if inherited.get("daemon") or not isinstance(inherited.get("authkey"), process.AuthenticationString):
        current._config.update(daemon=False, authkey=process.AuthenticationString(bytes(current.authkey)))
        undo.append(lambda: (current._config.clear(), current._config.update(inherited)))
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if main is not None and script and getattr(main, "__spec__", None) is None:
        del main.__file__
        undo.append(lambda: setattr(main, "__file__", script))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def _start_worker(model_dir: str, threads: int) -> None:
    """Worker initializer: load the model once for every chunk this process will score.

    :param model_dir: the extracted model.
    :param threads: the default native thread count, so workers do not oversubscribe the cores.
    """
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(threads))
    from conveyor.model.artifacts import LoadedModel

    _WORKER["model"] = LoadedModel(Path(model_dir))


def _score_chunk(payload: bytes, start: int, context: dict[str, Any]) -> pa.Table:
    """Score one chunk in a worker: the output columns, ready to write.

    :param payload: the chunk as an Arrow IPC stream.
    :param start: the 0-based input position of its first row (for ``row_number``).
    :param context: the id column and the run's constant columns.
    """
    import pyarrow as pa

    frame = pa.ipc.open_stream(payload).read_all().to_pandas()
    return output_table(frame, _WORKER["model"].predict_frame(frame), start, context)


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


def _to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC bytes: only the rows of a slice travel (pickling a slice sends its whole buffers).

    :param table: the chunk.
    """
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
