"""A batch run's output folder: staged Parquet parts, published together, ``_SUCCESS.json`` last.

Output under ``out``: ``part-00000.parquet``… then ``_SUCCESS.json`` (rows, parts, model, version,
run id), written last; readers go through :func:`completed_parts`. Parts are written to
``out/_staging/`` and moved into place only when every chunk is scored, replacing the run's old
parts (``_SUCCESS.json`` is removed first), so a re-run writes the same names, never duplicates,
and a run that fails half-way leaves the last complete output (or nothing) and no staging behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.batch.readers import BatchInputError, lake_path

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS.json"
STAGING = "_staging"


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


def part_name(index: int) -> str:
    """The name of the run's ``index``-th part file (0-based).

    :param index: the part's position.
    """
    return f"part-{index:05d}.parquet"


def completed_parts(out: str | Path | ObjectStoragePath, conn_id: str | None = None) -> list[ObjectStoragePath]:
    """The part files of a finished run, from its ``_SUCCESS.json`` (the only safe way to read a run).

    :param out: the run's output folder.
    :param conn_id: the Airflow connection for a non-local folder.
    :raises FileNotFoundError: the run has not finished (or failed).
    """
    from conveyor.lake import read_json

    target = lake_path(out, conn_id)
    try:
        manifest = read_json(target / SUCCESS)
    except FileNotFoundError:
        raise FileNotFoundError(f"{target}: no {SUCCESS}: the batch run has not finished") from None
    return [target / name for name in manifest["parts"]]


def fresh_staging(target: ObjectStoragePath) -> ObjectStoragePath:
    """The run's staging folder, emptied of an earlier attempt's parts and created.

    On an object store nothing is asked of the store: a crashed attempt's leftovers there are never
    published (:func:`publish` moves only this attempt's parts) and go with the staging folder.

    :param target: the run's output folder.
    """
    from conveyor.lake import make_folder

    staging = target / STAGING
    if not _on_store(staging):
        remove(staging)
        make_folder(staging)
    return staging


def _on_store(path: ObjectStoragePath) -> bool:
    """Whether a path is on an object store (not the local disk).

    :param path: the path.
    """
    return path.protocol not in ("file", "local", "")


def write_part(folder: ObjectStoragePath, name: str, table: pa.Table) -> None:
    """Write one Parquet part file.

    :param folder: the staging folder.
    :param name: the part's name (:func:`part_name`).
    :param table: its rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Written into memory first, then handed to the file in one write: pyarrow writing through a Python
    # file object makes one Python call per page (a 50,000-row part: 3x the time of the encoding itself).
    from conveyor.batch.readers import keep_local

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    encoded = memoryview(sink.getvalue())  # the buffer itself, not a bytes copy of it
    with (folder / name).open("wb") as handle:
        handle.write(encoded)
    keep_local(folder / name, encoded)  # read back from disk, not the store, in a local_copies(keep_writes=True)


def write_parts(
    out: str | Path | ObjectStoragePath,
    tables: Iterator[pa.Table],
    manifest: dict[str, Any],
    conn_id: str | None = None,
    fresh: bool = False,
) -> BatchResult:
    """Write output tables as the run's parts and ``_SUCCESS.json``, with ``score_file``'s layout and rules.

    Parts are staged and replace the run's old ones only once every table is written; a failure
    leaves the last complete output (or nothing) and no staging behind.

    :param out: the run's output folder.
    :param tables: the output rows (``conveyor.batch.scoring.output_table``), in input order.
    :param manifest: ``_SUCCESS.json``'s content besides ``rows`` and ``parts``.
    :param conn_id: the Airflow connection for a non-local ``out``.
    :param fresh: the caller knows the folder holds no earlier output (the first try of its run's task):
        on an object store it is not listed to find out.
    :raises BatchInputError: there were no rows to write (or a table's rows broke a rule).
    """
    started = time.monotonic()
    target = lake_path(out, conn_id)
    if _on_store(target) and (fresh or not _old_output(target)):  # (one listing): a first run writes in place
        return _write_in_place(target, tables, manifest, started)
    staging = fresh_staging(target)
    names: list[str] = []
    try:
        rows = _write_tables(staging, tables, names, target)
        publish(target, staging, names, {**manifest, "rows": rows, "parts": names})
    except BaseException:
        remove(staging, quiet=True)
        raise
    return BatchResult(str(target), [str(target / name) for name in names], rows, round(time.monotonic() - started, 3))


def _write_tables(folder: ObjectStoragePath, tables: Iterator[pa.Table], names: list[str], target: Any) -> int:
    """Write each table as the next part in ``folder`` (one schema for all), appending each part's name to
    ``names`` as it is written (so a caller's clean-up sees every part); returns the rows written.

    :raises BatchInputError: no rows at all (``target`` names the output).
    """
    rows, schema = 0, None
    for table in tables:
        schema = schema or table.schema
        names.append(part_name(len(names)))
        write_part(folder, names[-1], table.cast(schema))
        rows += table.num_rows
    if rows == 0:
        raise BatchInputError(f"{target}: no rows to write")
    return rows


def _old_output(target: ObjectStoragePath) -> list[str]:
    """The names of an earlier output (parts, ``_SUCCESS.json``, a staging folder) directly in an output
    folder on an object store, from one listing; other entries (the SageMaker transform's ``_transform/``)
    are not output.

    :param target: the run's output folder.
    """
    from conveyor.lake import keys_below

    names = [key.rstrip("/").rsplit("/", 1)[-1] for key in keys_below(target, recursive=False)]
    return [name for name in names if name in (SUCCESS, STAGING) or name.startswith("part-")]


def _write_in_place(
    target: ObjectStoragePath, tables: Iterator[pa.Table], manifest: dict[str, Any], started: float
) -> BatchResult:
    """:func:`write_parts` into an empty folder on an object store: each part one PUT in its place, then
    ``_SUCCESS.json``; no staging, copies or deletes (readers go through ``_SUCCESS.json``, so parts
    without it are never read). A failure deletes the parts written (nothing is left, as before).

    :param target: the run's output folder (empty).
    :param tables: the output rows, in input order.
    :param manifest: ``_SUCCESS.json``'s content besides ``rows`` and ``parts``.
    :param started: when the write began (``time.monotonic``).
    """
    from conveyor.lake import write_json

    names: list[str] = []
    try:
        rows = _write_tables(target, tables, names, target)
        write_json(target / SUCCESS, {**manifest, "rows": rows, "parts": names})
    except BaseException:
        written = [(target / name).path for name in names]
        try:
            if written:
                target.fs.rm(written)
        except Exception:
            log.warning("could not remove the parts written to %s", target, exc_info=True)
        raise
    return BatchResult(str(target), [str(target / name) for name in names], rows, round(time.monotonic() - started, 3))


def publish(target: ObjectStoragePath, staging: ObjectStoragePath, names: list[str], manifest: dict[str, Any]) -> None:
    """Replace the run's old output with the staged parts, then write ``_SUCCESS.json`` last.

    :param target: the run's output folder.
    :param staging: the folder holding the new parts.
    :param names: the new parts' names.
    :param manifest: the content of ``_SUCCESS.json``.
    """
    from conveyor.lake import write_json

    old = [item for item in target.iterdir() if item.name != STAGING]  # one listing
    for item in old:
        if item.name == SUCCESS:
            item.unlink()  # first: the run's old parts are never read without it
    for item in old:
        if item.name.startswith("part-") and item.name.endswith(".parquet") and item.name not in names:
            item.unlink()  # a new part of the same name replaces the old one as it moves in
    from conveyor.batch.readers import kept_as

    for name in names:
        source = staging / name
        if _on_store(source) and hasattr(source.fs, "_copy_basic"):  # s3fs: one CopyObject (parts are < 5 GB)
            from fsspec.asyn import sync

            sync(source.fs.loop, source.fs._copy_basic, source.path, (target / name).path)
        else:
            source.fs.mv(source.path, (target / name).path)
        kept_as(source, target / name)
    remove(staging)  # on an object store: one listing and one bulk delete
    write_json(target / SUCCESS, manifest)


def remove(path: ObjectStoragePath, quiet: bool = False) -> None:
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
