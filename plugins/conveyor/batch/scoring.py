"""The local batch transform: score a table in chunks in worker processes, write Parquet and SQL.

Input: a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file, or a folder of them
(files in name order; names starting with ``_`` or ``.`` are markers and skipped), on local disk
or at an ``ObjectStoragePath`` URI (a remote file is copied to a temporary file first). Only the
model's features and id column are read; CSV numeric features are read as float64, text features
and the id as text.
Chunks of ``chunk_rows`` rows go to ``workers`` spawned processes that each load the model once
through its own ``code/inference.py``; at most ``2 × workers`` chunks are in flight, so memory stays
bounded whatever the input size, and results are written in input order.

Each output row holds the input's id column (``row_number``, the 0-based input position, when the
model has none), ``prediction``, one ``proba_<class>`` per class for classifiers, ``model_name``,
``model_version``, ``run_id`` and ``scored_at`` (one timestamp for the whole run).

Output under ``out``: ``part-00000.parquet``… then ``_SUCCESS.json`` (rows, parts, model, version,
run id), written last; readers go through :func:`completed_parts`. Parts are written to
``out/_staging/`` and moved into place only when every chunk is scored, replacing the run's old
parts (``_SUCCESS.json`` is removed first), so a re-run writes the same names, never duplicates,
and a run that fails half-way leaves the last complete output (or nothing) and no staging behind.

Bad input raises :class:`BatchInputError` naming the file and the rule: an unsupported or
unreadable file, missing feature or id columns, rows the model rejects, and an empty input (no
rows in any file): an empty result would look like a successful run of nothing, so it is an error.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
STAGING = "_staging"
ROW_NUMBER = "row_number"
PROBA_PREFIX = "proba_"
CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,52}")
_WORKER: dict[str, Any] = {}


class BatchInputError(ValueError):
    """The input cannot be scored (names the file and the rule it broke); a retry will not help."""


@dataclass(frozen=True)
class BatchResult:
    """What a batch run wrote (small and JSON-serialisable through :meth:`to_dict`).

    :param uri: the output folder.
    :param parts: the URIs of the Parquet part files, in input order.
    :param rows: the rows scored.
    :param seconds: the run's wall time.
    """

    uri: str
    parts: list[str]
    rows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The result as a dict (for XCom)."""
        return asdict(self)


@dataclass(frozen=True)
class _Columns:
    """What the input must hold.

    :param dtypes: the model's features and their training dtypes, in training order.
    :param id_column: the model's id column, if it has one.
    """

    dtypes: dict[str, str]
    id_column: str | None

    @property
    def required(self) -> list[str]:
        """The columns read from every input file."""
        return [*self.dtypes, *([self.id_column] if self.id_column else [])]


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
    if chunk_rows < 1 or workers < 1:
        raise ValueError(f"chunk_rows and workers must be at least 1, got {chunk_rows} and {workers}")
    started = time.monotonic()
    metadata = json.loads((Path(model_dir) / "metadata.json").read_text())
    columns = _Columns({f["name"]: f["dtype"] for f in metadata["features"]}, metadata.get("id_column"))
    files = _input_files(_path(source, conn_id))
    for file in files:  # every file checked before any work starts
        for _ in _read(file, columns, chunk_rows, check_only=True):
            pass
    target = _path(out, conn_id)
    staging = target / STAGING
    _remove(staging)
    staging.mkdir(parents=True, exist_ok=True)
    stamp = (scored_at if scored_at.tzinfo else scored_at.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    constants = {"model_name": model_name, "model_version": model_version, "run_id": run_id, "scored_at": stamp}
    try:
        names, rows = _score(files, columns, Path(model_dir), staging, constants, chunk_rows, workers)
        if rows == 0:
            raise BatchInputError(f"{source}: no rows to score (every input file is empty)")
        manifest = {"rows": rows, "parts": names, "model": model_name, "version": model_version,
                    "run_id": run_id, "scored_at": stamp.isoformat(), "source": str(source)}
        _publish(target, staging, names, manifest)
    except BaseException:
        _remove(staging, quiet=True)
        raise
    seconds = time.monotonic() - started
    log.info("scored %s rows into %s parts at %s in %.1fs (%.0f rows/s)", rows, len(names), target, seconds,
             rows / max(seconds, 1e-9))
    return BatchResult(str(target), [str(target / name) for name in names], rows, round(seconds, 3))


def completed_parts(out: str | Path | ObjectStoragePath, conn_id: str | None = None) -> list[ObjectStoragePath]:
    """The part files of a finished run, from its ``_SUCCESS.json`` (the only safe way to read a run).

    :param out: the run's output folder.
    :param conn_id: the Airflow connection for a non-local folder.
    :raises FileNotFoundError: the run has not finished (or failed).
    """
    from conveyor.lake import read_json

    target = _path(out, conn_id)
    if not (target / SUCCESS).exists():
        raise FileNotFoundError(f"{target}: no {SUCCESS}: the batch run has not finished")
    return [target / name for name in read_json(target / SUCCESS)["parts"]]


def read_chunks(source: str | Path | ObjectStoragePath, metadata: dict[str, Any], chunk_rows: int,
                conn_id: str | None = None) -> Iterator[pa.Table]:
    """The model's feature and id columns of an input file or folder, in tables of ``chunk_rows`` rows.

    Every file is checked (readable, has the columns) before the first table is yielded; the same
    reading rules as :func:`score_file`.

    :param source: the input file or folder: a local path or an ObjectStoragePath URI.
    :param metadata: the model's ``metadata.json`` (features and their dtypes, id column).
    :param chunk_rows: rows per table.
    :param conn_id: the Airflow connection for a non-local ``source``.
    :raises BatchInputError: the input broke a rule (see the module docstring).
    """
    columns = _Columns({f["name"]: f["dtype"] for f in metadata["features"]}, metadata.get("id_column"))
    files = _input_files(_path(source, conn_id))
    for file in files:
        for _ in _read(file, columns, chunk_rows, check_only=True):
            pass
    for file in files:
        yield from _rebatch(_read(file, columns, chunk_rows, check_only=False), chunk_rows)


def write_parts(out: str | Path | ObjectStoragePath, tables: Iterator[pa.Table], manifest: dict[str, Any],
                conn_id: str | None = None) -> BatchResult:
    """Write output tables as the run's parts and ``_SUCCESS.json``, with :func:`score_file`'s layout and rules.

    Parts are staged and replace the run's old ones only once every table is written; a failure
    leaves the last complete output (or nothing) and no staging behind.

    :param out: the run's output folder.
    :param tables: the output rows (:func:`output_table`), in input order.
    :param manifest: ``_SUCCESS.json``'s content besides ``rows`` and ``parts``.
    :param conn_id: the Airflow connection for a non-local ``out``.
    """
    import pyarrow.parquet as pq

    started = time.monotonic()
    target = _path(out, conn_id)
    staging = target / STAGING
    _remove(staging)
    staging.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    rows, schema = 0, None
    try:
        for table in tables:
            schema = schema or table.schema
            name = f"part-{len(names):05d}.parquet"
            with (staging / name).open("wb") as handle:
                pq.write_table(table.cast(schema), handle)
            names.append(name)
            rows += table.num_rows
        if rows == 0:
            raise BatchInputError(f"{target}: no rows to write")
        _publish(target, staging, names, {**manifest, "rows": rows, "parts": names})
    except BaseException:
        _remove(staging, quiet=True)
        raise
    return BatchResult(str(target), [str(target / name) for name in names], rows, round(time.monotonic() - started, 3))


# ------------------------------------------------------------------------------------------ scoring


def _score(files: list[ObjectStoragePath], columns: _Columns, model_dir: Path, staging: ObjectStoragePath,
           constants: dict[str, Any], chunk_rows: int, workers: int) -> tuple[list[str], int]:
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

    import pyarrow.parquet as pq

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
            raise BatchInputError(f"{file}: rows {first + 1}-{first + count} were rejected by the model: {error}") from error
        if state["schema"] is None:
            state["schema"] = table.schema
        table = table.cast(state["schema"])
        name = f"part-{len(names):05d}.parquet"
        with (staging / name).open("wb") as handle:
            pq.write_table(table, handle)
        names.append(name)
        state["rows"] += table.num_rows
        elapsed = time.monotonic() - state["clock"]
        log.info("wrote %s (%s rows, %s in all, %.0f rows/s)", name, table.num_rows, state["rows"],
                 state["rows"] / max(elapsed, 1e-9))

    context = {"id_column": columns.id_column, **constants}
    start = 0
    restore_daemon = _allow_child_processes()
    try:
        for file in files:
            first = 0
            for chunk in _rebatch(_read(file, columns, chunk_rows, check_only=False), chunk_rows):
                if pool is None:
                    threads = max(1, (os.cpu_count() or 1) // workers)
                    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_start_worker, initargs=(str(model_dir), threads))
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
    from multiprocessing import process

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
        raise RuntimeError(f"predict_fn returned {len(predicted)} rows without a prediction column for {len(frame)} rows")
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


def _publish(target: ObjectStoragePath, staging: ObjectStoragePath, names: list[str], manifest: dict[str, Any]) -> None:
    """Replace the run's old output with the staged parts, then write ``_SUCCESS.json`` last.

    :param target: the run's output folder.
    :param staging: the folder holding the new parts.
    :param names: the new parts' names.
    :param manifest: the content of ``_SUCCESS.json``.
    """
    from conveyor.lake import write_json

    if (target / SUCCESS).exists():
        (target / SUCCESS).unlink()
    for old in target.iterdir():
        if old.is_file() and old.name.startswith("part-") and old.name.endswith(".parquet"):
            old.unlink()
    for name in names:
        source = staging / name
        source.fs.mv(source.path, (target / name).path)
    _remove(staging)
    write_json(target / SUCCESS, manifest)


# ------------------------------------------------------------------------------------------ reading


def _path(location: str | Path | ObjectStoragePath, conn_id: str | None) -> ObjectStoragePath:
    """An ObjectStoragePath for a local path, a URI or an ObjectStoragePath.

    :param location: the place.
    :param conn_id: the Airflow connection for a non-local URI.
    """
    from airflow.sdk import ObjectStoragePath

    if isinstance(location, ObjectStoragePath):
        return location
    text = str(location)
    if "://" not in text:
        return ObjectStoragePath(Path(text).resolve().as_uri())
    return ObjectStoragePath(text, conn_id=None if text.startswith("file://") else conn_id)


def _remove(path: ObjectStoragePath, quiet: bool = False) -> None:
    """Delete a folder if it exists.

    :param path: the folder.
    :param quiet: log instead of raising (clean-up after another error).
    """
    from conveyor.lake import remove_tree

    try:
        remove_tree(path)
    except Exception:
        if not quiet:
            raise
        log.warning("could not remove %s", path, exc_info=True)


def _input_files(source: ObjectStoragePath) -> list[ObjectStoragePath]:
    """The data files of an input file or folder, in name order.

    :param source: the input.
    """
    if not source.exists():
        raise BatchInputError(f"{source}: no such file or folder")
    if source.is_dir():
        files = sorted((p for p in source.iterdir() if p.is_file() and not p.name.startswith(("_", "."))),
                       key=lambda p: p.name)
        if not files:
            raise BatchInputError(f"{source}: no rows to score (the folder holds no data files)")
    else:
        files = [source]
    for file in files:
        if not file.name.lower().endswith(CSV_SUFFIXES + PARQUET_SUFFIXES):
            raise BatchInputError(f"{file}: unsupported file type: expected {', '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}")
    return files


@contextmanager
def _opened(file: ObjectStoragePath) -> Iterator[str]:
    """A local path pyarrow can read: the file itself, or a temporary copy of a remote one.

    :param file: the file.
    """
    if file.protocol in ("file", "local", ""):
        yield file.path
        return
    import tempfile

    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified

    with tempfile.TemporaryDirectory(prefix="conveyor-batch-") as scratch:
        local = Path(scratch) / file.name
        copy_verified(file, ObjectStoragePath(local.as_uri()), 1 << 20)
        yield str(local)


def _read(file: ObjectStoragePath, columns: _Columns, chunk_rows: int, check_only: bool) -> Iterator[pa.RecordBatch]:
    """Record batches of the required columns of one file, after checking it can be read and has them.

    :param file: the file.
    :param columns: the columns to read.
    :param chunk_rows: the wanted rows per batch.
    :param check_only: stop after the checks (for CSV, after reading the first block).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    is_csv = file.name.lower().endswith(CSV_SUFFIXES)
    with _opened(file) as source:
        names: list[str] = []
        try:
            if is_csv:
                names, row_bytes = _csv_header(source, file.name)
            else:
                names = pq.read_schema(source).names
            if not names:
                return  # an empty CSV file: no header, no rows
            missing = [name for name in columns.required if name not in names]
            if missing:
                raise BatchInputError(f"{file}: missing required columns: {', '.join(missing)} "
                                      f"(the model reads {', '.join(columns.required)})")
            if is_csv:
                batches = _csv_batches(source, file.name, columns, int(row_bytes * chunk_rows * 1.05))
            else:
                batches = pq.ParquetFile(source).iter_batches(batch_size=chunk_rows, columns=columns.required)
            if not check_only:
                yield from batches
        except (pa.ArrowException, OSError) as error:
            raise BatchInputError(f"{file}: cannot be read as {'CSV' if is_csv else 'Parquet'}: "
                                  f"{_describe(error, names)}") from None


def _describe(error: Exception, names: list[str]) -> str:
    """An Arrow read error, with the name of the CSV column it numbers.

    :param error: the error.
    :param names: the file's column names.
    """
    match = re.search(r"In CSV column #(\d+)", str(error))
    if match and int(match.group(1)) < len(names):
        return f"column '{names[int(match.group(1))]}': {error}"
    return str(error)


def _csv_header(source: str, name: str) -> tuple[list[str], float]:
    """The column names of a CSV file (none when it is empty) and its bytes per row, from its head.

    :param source: a local path.
    :param name: the file name (``.gz`` means gzip).
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    with pa.input_stream(source, compression="gzip" if name.lower().endswith(".gz") else None) as stream:
        head = stream.read(1 << 18)
    if not head.strip():
        return [], 0.0
    names = pcsv.read_csv(pa.BufferReader(head.split(b"\n", 1)[0] + b"\n")).column_names
    return names, len(head) / max(head.count(b"\n"), 1)


def _csv_batches(source: str, name: str, columns: _Columns, block_bytes: int) -> Iterator[pa.RecordBatch]:
    """A streaming reader of the required columns of a CSV file (it reads the first block at once).

    :param source: a local path.
    :param name: the file name (``.gz`` means gzip).
    :param columns: the columns to read: numeric features as float64, text features and the id as text.
    :param block_bytes: the read block size, sized for about one chunk of rows.
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    types = {column: _csv_type(dtype) for column, dtype in columns.dtypes.items()}
    if columns.id_column:
        types[columns.id_column] = pa.string()
    return pcsv.open_csv(
        pa.input_stream(source, compression="gzip" if name.lower().endswith(".gz") else None),
        read_options=pcsv.ReadOptions(block_size=min(max(block_bytes, 1 << 16), 1 << 28)),
        convert_options=pcsv.ConvertOptions(
            column_types={k: v for k, v in types.items() if v is not None},
            include_columns=columns.required, strings_can_be_null=True,
        ),
    )


def _csv_type(dtype: str) -> pa.DataType | None:
    """The Arrow type a CSV column of a feature is read as: float64, bool, text, or inferred.

    :param dtype: the feature's training dtype.
    """
    import pyarrow as pa

    if dtype.startswith("bool"):
        return pa.bool_()
    if dtype.lower().startswith(("int", "uint", "float")):
        return pa.float64()
    if dtype.startswith("datetime"):
        return None
    return pa.string()


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one shorter), whatever sizes the reader yields.

    :param batches: the record batches of one file.
    :param rows: rows per table.
    """
    import pyarrow as pa

    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        held.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(held)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            held, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(held)


def _to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC bytes: only the rows of a slice travel (pickling a slice sends its whole buffers).

    :param table: the chunk.
    """
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------------- SQL


def write_table(
    engine_or_url: Engine | str | None,
    table: str,
    parts: Sequence[str | Path | ObjectStoragePath],
    run_id: str,
    *,
    batch_rows: int = 10_000,
    conn_id: str | None = None,
) -> int:
    """Replace a run's rows in a SQL table with the rows of its part files, in one transaction.

    The table is created when missing (columns from the first part, an index on ``run_id``); an
    existing table must have every column of the parts. ``DELETE … WHERE run_id`` and the inserts
    commit together, so a re-run replaces its own rows and a failure leaves the old rows as they were.

    :param engine_or_url: a SQLAlchemy engine or URL; None for ``settings.default_warehouse_url()``.
    :param table: the table name (letters, digits, underscores).
    :param parts: the run's Parquet part files (:func:`completed_parts` or ``BatchResult.parts``).
    :param run_id: the run whose rows are replaced; every row of the parts must carry it.
    :param batch_rows: rows per ``executemany``.
    :param conn_id: the Airflow connection for non-local parts.
    :return: the rows written.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import sqlalchemy as sa

    if not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"table name {table!r} is not allowed: use letters, digits and underscores (53 at most)")
    if not parts:
        raise ValueError(f"no part files to write to table {table!r}")
    files = [_path(part, conn_id) for part in parts]
    with _opened(files[0]) as source:
        schema = pq.read_schema(source)
    if "run_id" not in schema.names:
        raise ValueError(f"{files[0]}: has no run_id column")
    if engine_or_url is None:
        from conveyor import settings

        settings.state_dir().mkdir(parents=True, exist_ok=True)
        engine_or_url = settings.default_warehouse_url()
    engine = sa.create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    rows = 0
    try:
        with engine.begin() as conn:
            target = _ensure_table(conn, table, schema)
            conn.execute(sa.delete(target).where(target.c.run_id == run_id))
            for file in files:
                with _opened(file) as source:
                    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=schema.names):
                        if not pc.all(pc.equal(batch.column("run_id"), run_id)).as_py():
                            raise ValueError(f"{file}: holds rows of another run than {run_id!r}; nothing was written")
                        conn.execute(target.insert(), batch.to_pylist())
                        rows += batch.num_rows
    finally:
        if engine is not engine_or_url:
            engine.dispose()
    log.info("replaced the rows of run %s in table %s: %s rows", run_id, table, rows)
    return rows


def _ensure_table(conn: Connection, name: str, schema: pa.Schema) -> Any:
    """The table, created from the parts' schema when missing; checked when it exists.

    :param conn: the open transaction.
    :param name: the table name.
    :param schema: the parts' Arrow schema.
    """
    import sqlalchemy as sa

    metadata = sa.MetaData()
    if sa.inspect(conn).has_table(name):
        existing = sa.Table(name, metadata, autoload_with=conn)
        missing = [column for column in schema.names if column not in existing.c]
        if missing:
            raise ValueError(f"table {name!r} lacks the columns {', '.join(missing)} of these parts: "
                             "write a model with another output to another table")
        return existing
    created = sa.Table(name, metadata, *(sa.Column(f.name, _sql_type(f.name, f.type)) for f in schema),
                       sa.Index(f"ix_{name}_run_id", "run_id"))
    created.create(conn, checkfirst=True)
    return created


def _sql_type(name: str, arrow_type: pa.DataType) -> Any:
    """The SQL type of a part column: text, double, big integer, boolean, timestamp or date.

    :param name: the column, for messages.
    :param arrow_type: its Arrow type.
    """
    import pyarrow.types as t
    import sqlalchemy as sa

    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return sa.Text()
    if t.is_floating(arrow_type):
        return sa.Double()
    if t.is_integer(arrow_type):
        return sa.BigInteger()
    if t.is_boolean(arrow_type):
        return sa.Boolean()
    if t.is_timestamp(arrow_type):
        return sa.DateTime(timezone=arrow_type.tz is not None)
    if t.is_date(arrow_type):
        return sa.Date()
    raise ValueError(f"column {name!r} has Arrow type {arrow_type}, which has no SQL column type here")


# ------------------------------------------------------------------------------------------ summary


def summarize(parts: Sequence[str | Path | ObjectStoragePath], conn_id: str | None = None) -> dict[str, Any]:
    """The analysts' summary of a run: rows, the prediction distribution, mean probability per class.

    Returns ``{"rows", "predictions": {label: {"count", "share"}}, "mean_probability": {class: p}}``;
    for a regression (floating predictions) ``predictions`` is ``{"mean", "min", "max"}`` instead.

    :param parts: the run's Parquet part files.
    :param conn_id: the Airflow connection for non-local parts.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import pyarrow.types as t

    rows, counts = 0, Counter()
    sums: dict[str, float] = {}
    present: dict[str, int] = {}
    numeric: dict[str, float] | None = None
    for part in parts:
        with _opened(_path(part, conn_id)) as source:
            parquet = pq.ParquetFile(source)
            proba = [name for name in parquet.schema_arrow.names if name.startswith(PROBA_PREFIX)]
            for batch in parquet.iter_batches(columns=["prediction", *proba]):
                rows += batch.num_rows
                prediction = batch.column("prediction")
                if t.is_floating(prediction.type) and not proba:
                    low, high = pc.min_max(prediction).values()
                    total = pc.sum(prediction).as_py() or 0.0
                    numeric = numeric or {"sum": 0.0, "min": float("inf"), "max": float("-inf"), "n": 0}
                    numeric["sum"] += total
                    numeric["n"] += len(prediction) - prediction.null_count
                    if low.is_valid:
                        numeric["min"], numeric["max"] = min(numeric["min"], low.as_py()), max(numeric["max"], high.as_py())
                else:
                    for item in pc.value_counts(prediction).to_pylist():
                        counts["null" if item["values"] is None else str(item["values"])] += item["counts"]
                for name in proba:
                    column = batch.column(name)
                    sums[name] = sums.get(name, 0.0) + (pc.sum(column).as_py() or 0.0)
                    present[name] = present.get(name, 0) + len(column) - column.null_count
    if numeric is not None:
        n = numeric["n"]
        predictions: dict[str, Any] = {"mean": numeric["sum"] / n if n else None,
                                       "min": numeric["min"] if n else None, "max": numeric["max"] if n else None}
    else:
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        predictions = {label: {"count": count, "share": count / rows} for label, count in ordered}
    means = {name[len(PROBA_PREFIX):]: (sums[name] / present[name] if present[name] else None) for name in sums}
    return {"rows": rows, "predictions": predictions, "mean_probability": means}
