"""Tabular files of a drop: which names hold a table, compressed CSV, and the one-pass profile.

A data file is one whose name ends in the format's suffix (``.csv``, ``.parquet``/``.pq``), a
compressed CSV (``.csv.gz``, ``.csv.bz2``, ``.csv.zst``), or a part file of a folder as Spark
and Hive write them: any file in a folder whose name ends in the suffix (``customers.csv/part-00000``)
or a file named ``part-<n>…``. Compressed CSV is inflated as it streams, counting the bytes, and
refused past ``CONVEYOR_MAX_DECOMPRESSED_BYTES``; it is never inflated whole in memory.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

from conveyor.errors import DropRejected

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.spec import PipelineSpec

SUFFIXES = {"csv": (".csv",), "parquet": (".parquet", ".pq")}
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\x28\xb5\x2f\xfd", "zstd"))
_PART = re.compile(r"^part-\d+")
_READ = 1 << 20


def compression_suffix(name: str) -> str | None:
    """The codec a file name's last suffix names (``gzip``, ``bz2``, ``zstd``), or None.

    :param name: the file name.
    """
    lower = name.lower()
    return next((codec for suffix, codec in COMPRESSIONS.items() if lower.endswith(suffix)), None)


def is_part_file(rel: str, fmt: str) -> bool:
    """Whether a file is a part of a table written as a folder (Spark, Hive): in ``<name>.csv/`` or ``part-<n>``.

    :param rel: the file's path relative to the drop.
    :param fmt: the pipeline's data format.
    """
    parts = rel.split("/")
    in_folder = len(parts) > 1 and parts[-2].lower().endswith(SUFFIXES.get(fmt, ()))
    return in_folder or bool(_PART.match(parts[-1].lower()))


def is_table_file(rel: str, fmt: str) -> bool:
    """Whether a file holds (part of) a table of the pipeline's format.

    :param rel: the file's path relative to the drop.
    :param fmt: ``csv`` or ``parquet``.
    """
    name = rel.rsplit("/", 1)[-1].lower()
    if fmt == "csv" and compression_suffix(name):
        name = name.rsplit(".", 1)[0]
    return name.endswith(SUFFIXES[fmt]) or is_part_file(rel, fmt)


class _Inflating(io.RawIOBase):
    """A read-only stream of a compressed file's inflated bytes, refused once they pass a cap."""

    def __init__(self, source: Any, codec: str, rel: str, cap: int):
        import pyarrow as pa

        super().__init__()
        self._stream = pa.CompressedInputStream(pa.PythonFile(source, mode="r"), codec)
        self._codec, self._rel, self._cap = codec, rel, cap
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from conveyor.data.failures import is_transient

        try:
            chunk = self._stream.read(len(buffer))
        except OSError as exc:
            if is_transient(exc):
                raise
            raise DropRejected(f"{self._rel}: rule 'readable {self._codec}': {exc}") from None
        self.size += len(chunk)
        if self.size > self._cap:
            raise DropRejected(
                f"{self._rel}: rule 'at most {self._cap} bytes once decompressed' (CONVEYOR_MAX_DECOMPRESSED_BYTES): "
                f"it inflates past the cap; refused after {self.size} bytes"
            )
        buffer[: len(chunk)] = chunk
        return len(chunk)


def inflating(source: Any, codec: str, rel: str, cap: int) -> io.BufferedReader:
    """A buffered stream of a compressed file's inflated bytes (a file object pandas and pyarrow read).

    :param source: the compressed byte stream.
    :param codec: ``gzip``, ``bz2`` or ``zstd``.
    :param rel: the file's path relative to the drop (named in errors).
    :param cap: the most bytes it may inflate to (``DropRejected`` past it).
    """
    return io.BufferedReader(_Inflating(source, codec, rel, cap), buffer_size=_READ)


class Peeked:
    """A stream whose first bytes were read ahead (to sniff a compression's magic number)."""

    def __init__(self, head: bytes, rest: Any):
        self._head, self._rest = head, rest
        self.closed = False

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            out, self._head = self._head + self._rest.read(), b""
            return bytes(out)
        out, self._head = self._head[:size], self._head[size:]
        return out + (self._rest.read(size - len(out)) if len(out) < size else b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def open_table_stream(raw: Any, rel: str, compression: str | None, cap: int) -> tuple[Any, str | None]:
    """A stream of a CSV file's text bytes: inflated when it is compressed (by its suffix, else its magic).

    :param raw: the file's byte stream.
    :param rel: the file's path relative to the drop (named in errors).
    :param compression: the codec its name says, or None to sniff the first bytes.
    :param cap: the most bytes the file may inflate to.
    :return: the stream and the codec found (None: not compressed).
    """
    if compression is None:
        head = raw.read(4)
        compression = next((codec for magic, codec in MAGIC if head.startswith(magic)), None)
        raw = Peeked(head, raw)
    if compression is None:
        return raw, None
    return inflating(raw, compression, rel, cap), compression


def schema_of(arrow_schema: Any) -> dict[str, str]:
    """Column name -> Arrow type name.

    :param arrow_schema: a ``pyarrow.Schema``.
    """
    return {field.name: str(field.type) for field in arrow_schema}


def profile_csv(rel: str, handle: Any, spec: PipelineSpec, cap: int) -> dict[str, Any]:
    """Row count, schema and codec of a (possibly compressed) CSV file, streamed once.

    :param rel: the file's path relative to the drop.
    :param handle: its byte stream (hashed by the caller).
    :param spec: the pipeline, for the CSV options.
    :param cap: the most bytes a compressed file may inflate to.
    :raises DropRejected: naming the file and the rule it broke.
    """
    import pyarrow as pa
    from pyarrow import csv

    options = spec.data.csv
    stream, codec = open_table_stream(handle, rel, compression_suffix(rel), cap)
    try:
        reader = csv.open_csv(
            stream,
            read_options=csv.ReadOptions(
                block_size=_READ, encoding=options.encoding, autogenerate_column_names=not options.header
            ),
            parse_options=csv.ParseOptions(delimiter=options.delimiter),
        )
        schema = schema_of(reader.schema)
        rows = sum(batch.num_rows for batch in reader)
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "Empty CSV file" in message:
            raise DropRejected(f"{rel}: rule 'not empty': the file has no {'text' if codec else 'bytes'}") from None
        if "UTF8" in message or "utf8" in message.lower():
            raise DropRejected(f"{rel}: rule 'encoding {options.encoding}': {message}") from None
        raise DropRejected(f"{rel}: rule 'readable CSV (delimiter {options.delimiter!r})': {message}") from None
    _check_text(rel, schema, options.encoding, options.delimiter)
    return {"rows": rows, "schema": schema, **({"compression": codec} if codec else {})}


def _check_text(rel: str, schema: dict[str, str], encoding: str, delimiter: str) -> None:
    # Arrow types a column whose bytes are not valid text as binary instead of failing.
    not_text = [name for name, kind in schema.items() if "binary" in kind]
    if not_text:
        raise DropRejected(
            f"{rel}: rule 'encoding {encoding}': column(s) {not_text} hold bytes that are not valid {encoding}"
        )
    if len(schema) == 1:
        only = next(iter(schema))
        for other in (";", "\t", "|", ","):
            if other != delimiter and other in only:
                raise DropRejected(
                    f"{rel}: rule 'delimiter {delimiter!r}': the header {only!r} looks {other!r}-delimited"
                )


def profile_parquet(rel: str, path: ObjectStoragePath) -> dict[str, Any]:
    """Row count and schema of a Parquet file, from its footer; binary columns are refused.

    :param rel: the file's path relative to the drop.
    :param path: the file.
    :raises DropRejected: when it is not readable Parquet or holds a binary column.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conveyor.data.failures import is_transient

    try:
        with path.open("rb") as handle:
            meta = pq.ParquetFile(handle).metadata
            arrow = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, OSError) and is_transient(exc):
            raise  # the storage failed, not the file: Airflow retries
        raise DropRejected(f"{rel}: rule 'readable Parquet': {exc}") from None
    binary = [
        field.name
        for field in arrow
        if pa.types.is_binary(field.type)
        or pa.types.is_large_binary(field.type)
        or pa.types.is_fixed_size_binary(field.type)
    ]
    if binary:
        raise DropRejected(
            f"{rel}: rule 'no binary columns in a tabular pipeline': column(s) {binary} hold raw bytes, not text "
            "(write them as UTF-8 strings, or leave them out of the drop)"
        )
    return {"rows": meta.num_rows, "schema": schema_of(arrow)}


def open_for_pandas(handle: Any, entry: dict[str, Any], cap: int) -> Any:
    """A file of a dataset version as pandas reads it: inflated when its manifest entry names a codec.

    :param handle: the copied file's byte stream.
    :param entry: its manifest entry (``path``, optional ``compression``).
    :param cap: the most bytes it may inflate to.
    """
    codec = entry.get("compression")
    return inflating(handle, codec, entry["path"], cap) if codec else handle
