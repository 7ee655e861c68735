"""The batch input: CSV and Parquet files (or folders of them), read in chunks of the model's columns.

Input: a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) file, or a folder of them
(files in name order; names starting with ``_`` or ``.`` are markers and skipped), on local disk
or at an ``ObjectStoragePath`` URI (a remote file is copied to a temporary file first). Only the
model's features and id column are read; CSV numeric features are read as float64, text features
and the id as text.

Bad input raises :class:`BatchInputError` naming the file and the rule: an unsupported or
unreadable file, missing feature or id columns, rows the model rejects, and an empty input (no
rows in any file): an empty result would look like a successful run of nothing, so it is an error.
A storage or network failure while reading (``conveyor.lake.is_transient``: an I/O or network errno,
a timeout, a store's 5xx) is not the input's fault: it propagates as it is, so the task is retried.
"""

from __future__ import annotations

import itertools
import posixpath
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError
from conveyor.lake import is_transient

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath

    from conveyor.model.metadata import ModelMetadata

CSV_SUFFIXES = (".csv", ".csv.gz")
SAMPLE_ROWS = 2048
"""Rows read from the head of each file to measure its row width (bytes a row takes as pandas)."""
PARQUET_SUFFIXES = (".parquet", ".pq")


class BatchInputError(ConveyorError):
    """The input cannot be scored (names the file and the rule it broke); a retry will not help."""


@dataclass(frozen=True)
class Columns:
    """What the input must hold.

    :param dtypes: the model's features and their training dtypes, in training order.
    :param id_column: the model's id column, if it has one.
    """

    dtypes: dict[str, str]
    id_column: str | None

    @classmethod
    def of(cls, metadata: ModelMetadata) -> Columns:
        """The columns a model reads.

        :param metadata: the model's metadata (features and their dtypes, id column).
        """
        return cls(metadata.dtypes, metadata.id_column)

    @property
    def required(self) -> list[str]:
        """The columns read from every input file."""
        return [*self.dtypes, *([self.id_column] if self.id_column else [])]


def lake_path(location: str | Path | ObjectStoragePath, conn_id: str | None) -> ObjectStoragePath:
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


def read_chunks(
    source: str | Path | ObjectStoragePath, metadata: ModelMetadata, chunk_rows: int, conn_id: str | None = None
) -> Iterator[pa.Table]:
    """The model's feature and id columns of an input file or folder, in tables of ``chunk_rows`` rows.

    Every file is checked (readable, has the columns) before the first table is yielded; the same
    reading rules as ``conveyor.batch.scoring.score_file``.

    :param source: the input file or folder: a local path or an ObjectStoragePath URI.
    :param metadata: the model's metadata (features and their dtypes, id column).
    :param chunk_rows: rows per table.
    :param conn_id: the Airflow connection for a non-local ``source``.
    :raises BatchInputError: the input broke a rule (see the module docstring).
    """
    columns = Columns.of(metadata)
    with local_copies():  # a remote file is fetched once for its check and its read
        files = checked_files(lake_path(source, conn_id), columns, chunk_rows)
        for file in files:
            yield from file_chunks(file, columns, chunk_rows)


def checked_files(source: ObjectStoragePath, columns: Columns, chunk_rows: int) -> list[ObjectStoragePath]:
    """The data files of an input, each checked (readable, has the columns) before any work starts.

    :param source: the input file or folder.
    :param columns: the columns to read.
    :param chunk_rows: rows per chunk (sizes the CSV block read by the check).
    :raises BatchInputError: the input broke a rule (see the module docstring).
    """
    return [file for file, _ in measured_files(source, columns, chunk_rows)]


def measured_files(
    source: ObjectStoragePath, columns: Columns, chunk_rows: int
) -> list[tuple[ObjectStoragePath, float]]:
    """The data files of an input, each checked as :func:`checked_files` does, with its row width.

    The width is the bytes a row of the required columns takes as a pandas frame (strings counted
    deeply), measured on the file's first :data:`SAMPLE_ROWS` rows (0 for an empty file).

    :param source: the input file or folder.
    :param columns: the columns to read.
    :param chunk_rows: rows per chunk (sizes the CSV block read by the check).
    :raises BatchInputError: the input broke a rule (see the module docstring).
    """
    measured = []
    for file in input_files(source):
        width = 0.0
        for sample in _read(file, columns, chunk_rows, check_only=True):
            if sample.num_rows:
                width = float(sample.to_pandas().memory_usage(deep=True, index=False).sum()) / sample.num_rows
        measured.append((file, width))
    return measured


def file_chunks(file: ObjectStoragePath, columns: Columns, chunk_rows: int) -> Iterator[pa.Table]:
    """The required columns of one file, in tables of exactly ``chunk_rows`` rows (the last one shorter).

    :param file: the file (checked by :func:`checked_files`).
    :param columns: the columns to read.
    :param chunk_rows: rows per table.
    """
    return _rebatch(_read(file, columns, chunk_rows, check_only=False), chunk_rows)


def input_files(source: ObjectStoragePath) -> list[ObjectStoragePath]:
    """The data files of an input file or folder, in name order.

    :param source: the input.
    :raises BatchInputError: no such input, an empty folder, or a file of another type.
    """
    if source.protocol in ("file", "local", ""):
        if not source.exists():
            raise BatchInputError(f"{source}: no such file or folder")
        is_dir = source.is_dir()
        found = [(p.name, p.is_file()) for p in source.iterdir()] if is_dir else []
    else:  # an object store: one HEAD for a file; a folder is told by its listing (no request per entry)
        try:
            is_dir = source.fs.info(source.path)["type"] == "directory"
        except FileNotFoundError:
            raise BatchInputError(f"{source}: no such file or folder") from None
        entries = source.fs.ls(source.path, detail=True) if is_dir else []
        found = [(posixpath.basename(e["name"].rstrip("/")), e["type"] == "file") for e in entries]
    if is_dir:
        names = sorted(name for name, is_file in found if is_file and not name.startswith(("_", ".")))
        if not names:
            raise BatchInputError(f"{source}: no rows to score (the folder holds no data files)")
        files = [source / name for name in names]
    else:
        files = [source]
    for file in files:
        if not file.name.lower().endswith(CSV_SUFFIXES + PARQUET_SUFFIXES):
            expected = ", ".join(CSV_SUFFIXES + PARQUET_SUFFIXES)
            raise BatchInputError(f"{file}: unsupported file type: expected {expected}")
    return files


# The open local_copies() blocks, innermost last: their folder, their copies, and whether they keep writes.
_COPIES: list[tuple[str, dict[str, str], bool]] = []


@contextmanager
def local_copies(keep_writes: bool = False) -> Iterator[None]:
    """Keep the local copies :func:`opened` makes of remote files until the block ends (fetch each once).

    Without it every :func:`opened` of a remote file fetches it again (the check, then the read).

    :param keep_writes: also keep what :func:`keep_local` is handed (files this block writes and reads
        back, e.g. a run's parts loaded into SQL next); off, nothing written is copied to disk.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="conveyor-batch-") as scratch:
        _COPIES.append((scratch, {}, keep_writes))
        try:
            yield
        finally:
            _COPIES.pop()


def keep_local(file: ObjectStoragePath, data: Any) -> None:
    """Keep the bytes just written to a remote file as its copy in the innermost ``local_copies(keep_writes=True)``
    block, so reading it back there sends no GET (e.g. a run's Parquet parts, loaded into SQL next).

    :param file: the remote file that was written (nothing is kept for a local one, or outside such a block).
    :param data: its whole content (bytes or a buffer).
    """
    if file.protocol in ("file", "local", ""):
        return
    for scratch, copies, keep in reversed(_COPIES):
        if keep:
            local = Path(scratch) / f"{len(copies):05d}-{file.name}"
            local.write_bytes(data)
            copies[str(file)] = str(local)
            return


def kept_as(old: ObjectStoragePath, new: ObjectStoragePath) -> None:
    """A kept copy now stands for the file it was moved to (a staged part published under its final name).

    :param old: where the file was written.
    :param new: where it is now.
    """
    for _, copies, _ in _COPIES:
        if str(old) in copies:
            copies[str(new)] = copies.pop(str(old))


@contextmanager
def opened(file: ObjectStoragePath) -> Iterator[str]:
    """A local path pyarrow can read: the file itself, or a copy of a remote one (kept by :func:`local_copies`;
    a copy made in an outer block is used too).

    :param file: the file.
    """
    if file.protocol in ("file", "local", ""):
        yield file.path
        return
    import tempfile

    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified

    for _, kept, _ in reversed(_COPIES):
        if str(file) in kept:
            yield kept[str(file)]
            return
    if _COPIES:
        scratch, copies, _ = _COPIES[-1]
        if str(file) not in copies:
            local = Path(scratch) / f"{len(copies):05d}-{file.name}"
            copy_verified(file, ObjectStoragePath(local.as_uri()), 1 << 20)
            copies[str(file)] = str(local)
        yield copies[str(file)]
        return
    with tempfile.TemporaryDirectory(prefix="conveyor-batch-") as folder:
        local = Path(folder) / file.name
        copy_verified(file, ObjectStoragePath(local.as_uri()), 1 << 20)
        yield str(local)


def _read(file: ObjectStoragePath, columns: Columns, chunk_rows: int, check_only: bool) -> Iterator[pa.RecordBatch]:
    """Record batches of the required columns of one file, after checking it can be read and has them.

    :param file: the file.
    :param columns: the columns to read.
    :param chunk_rows: the wanted rows per batch.
    :param check_only: stop after the checks and the first batch (at most :data:`SAMPLE_ROWS` rows
        of Parquet, the first block of CSV), yielded as the file's sample.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    is_csv = file.name.lower().endswith(CSV_SUFFIXES)
    with opened(file) as source:
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
                raise BatchInputError(
                    f"{file}: missing required columns: {', '.join(missing)} "
                    f"(the model reads {', '.join(columns.required)})"
                )
            if is_csv:
                batches = _csv_batches(source, file.name, columns, int(row_bytes * chunk_rows * 1.05))
            else:
                size = min(chunk_rows, SAMPLE_ROWS) if check_only else chunk_rows
                batches = pq.ParquetFile(source).iter_batches(batch_size=size, columns=columns.required)
            if check_only:
                yield from itertools.islice(batches, 1)
            else:
                yield from batches
        except (pa.ArrowException, OSError) as error:
            if is_transient(error):
                raise  # the disk or store failed, not the file: the task's retries apply
            raise BatchInputError(
                f"{file}: cannot be read as {'CSV' if is_csv else 'Parquet'}: {_describe(error, names)}"
            ) from None


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


def _csv_batches(source: str, name: str, columns: Columns, block_bytes: int) -> Iterator[pa.RecordBatch]:
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
            include_columns=columns.required,
            strings_can_be_null=True,
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
