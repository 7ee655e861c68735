"""Dataset versions: a drop becomes an immutable, content-addressed copy in ``raw/`` with a manifest.

The version is a hash of the drop's file names and contents, so the same bytes always give the
same version. Files are streamed (hashed and profiled in one pass, copied in another), never
loaded whole into memory.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, BinaryIO

from conveyor.errors import DropRejected, TransientError
from conveyor.lake import Lake, copy_verified, read_json, write_json

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.spec import PipelineSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VALIDATED = "validation.json"
LATEST = "LATEST.json"


class DropChanged(TransientError):
    """A drop's bytes changed while it was being copied; a retry copies it again under the same names."""


class _HashingReader:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self.digest.update(chunk)
        self.size += len(chunk)
        return chunk

    def drain(self, chunk_bytes: int) -> None:
        while self.read(chunk_bytes):
            pass

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def _schema_of(arrow_schema: Any) -> dict[str, str]:
    return {field.name: str(field.type) for field in arrow_schema}


def _profile_csv(rel: str, handle: _HashingReader, spec: PipelineSpec) -> dict[str, Any]:
    import pyarrow as pa
    from pyarrow import csv

    options = spec.data.csv
    try:
        reader = csv.open_csv(
            handle,
            read_options=csv.ReadOptions(
                block_size=1 << 20, encoding=options.encoding, autogenerate_column_names=not options.header
            ),
            parse_options=csv.ParseOptions(delimiter=options.delimiter),
        )
        schema = _schema_of(reader.schema)
        rows = sum(batch.num_rows for batch in reader)
    except pa.ArrowInvalid as exc:
        message = str(exc)
        if "Empty CSV file" in message:
            raise DropRejected(f"{rel}: rule 'not empty': the file has no bytes") from None
        if "UTF8" in message or "utf8" in message.lower():
            raise DropRejected(f"{rel}: rule 'encoding {options.encoding}': {message}") from None
        raise DropRejected(f"{rel}: rule 'readable CSV (delimiter {options.delimiter!r})': {message}") from None
    # Arrow types a column whose bytes are not valid text as binary instead of failing.
    not_text = [name for name, kind in schema.items() if "binary" in kind]
    if not_text:
        raise DropRejected(
            f"{rel}: rule 'encoding {options.encoding}': column(s) {not_text} hold bytes that are not valid "
            f"{options.encoding}"
        )
    if len(schema) == 1:
        only = next(iter(schema))
        for other in (";", "\t", "|", ","):
            if other != options.delimiter and other in only:
                raise DropRejected(
                    f"{rel}: rule 'delimiter {options.delimiter!r}': the header {only!r} looks {other!r}-delimited"
                )
    return {"rows": rows, "schema": schema}


def _profile_parquet(rel: str, path: ObjectStoragePath) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with path.open("rb") as handle:
            meta = pq.ParquetFile(handle).metadata
            return {"rows": meta.num_rows, "schema": _schema_of(meta.schema.to_arrow_schema())}
    except (pa.ArrowInvalid, OSError) as exc:
        raise DropRejected(f"{rel}: rule 'readable Parquet': {exc}") from None


def profile_drop(
    files: list[tuple[str, ObjectStoragePath]], spec: PipelineSpec, chunk_bytes: int
) -> list[dict[str, Any]]:
    """Hash every file and read its row count and schema, one streaming pass per file.

    :param files: the drop's data files (relative name, path).
    :param spec: the pipeline, for the format and CSV options.
    :param chunk_bytes: bytes per read.
    :raises DropRejected: naming the file and the rule it broke.
    """
    suffixes = {"csv": (".csv",), "parquet": (".parquet", ".pq")}[spec.data.format]
    entries = []
    for rel, path in files:
        if not rel.lower().endswith(suffixes):
            raise DropRejected(f"{rel}: rule 'format {spec.data.format}': expected files ending in {suffixes}")
        with path.open("rb") as raw:
            handle = _HashingReader(raw)
            if spec.data.format == "csv":
                profile = _profile_csv(rel, handle, spec)
            else:
                profile = {}
            handle.drain(chunk_bytes)
        if handle.size == 0:
            raise DropRejected(f"{rel}: rule 'not empty': the file has no bytes")
        if spec.data.format == "parquet":
            profile = _profile_parquet(rel, path)
        entries.append({"path": rel, "bytes": handle.size, "sha256": handle.digest.hexdigest(), **profile})
        log.info("Profiled %s: %s bytes, %s rows", rel, handle.size, profile["rows"])
    schemas = {tuple(entry["schema"]) for entry in entries}
    if len(schemas) > 1:
        raise DropRejected(f"rule 'one schema per drop': files have different columns: {sorted(schemas)}")
    return entries


def version_of(entries: list[dict[str, Any]]) -> str:
    """The content address of a drop: a hash of its file names, sizes and contents.

    :param entries: the drop's file entries (path, bytes, sha256).
    """
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda item: item["path"]):
        digest.update(f"{entry['path']}\t{entry['bytes']}\t{entry['sha256']}\n".encode())
    return "v-" + digest.hexdigest()[:20]


def copy_drop(
    lake: Lake,
    spec: PipelineSpec,
    drop: str,
    files: list[tuple[str, ObjectStoragePath]],
    entries: list[dict[str, Any]],
    version: str,
    run_id: str,
    extra: dict[str, bytes] | None = None,
) -> dict[str, Any]:
    """Copy a profiled drop into ``raw/<pipeline>/<version>/`` and write its manifest last.

    Every copy is hashed as it is written and compared with the profile; a mismatch means the
    landing bytes changed under us, which a retry repairs (the same names are written again).

    :param lake: the lake.
    :param spec: the pipeline.
    :param drop: the drop's folder name in landing.
    :param files: the drop's data files (relative name, path).
    :param entries: their profile (from :func:`profile_drop`).
    :param version: the dataset version (from :func:`version_of`).
    :param run_id: the Airflow run (recorded in the manifest).
    :param extra: derived files written beside ``data/`` before the manifest (e.g. the image table).
    :return: the manifest.
    """
    target = lake.raw(spec.name, version)
    by_rel = {entry["path"]: entry for entry in entries}
    for rel, path in files:
        sha, size = copy_verified(path, target / "data" / rel, spec.ingest.chunk_bytes)
        expected = by_rel[rel]
        if sha != expected["sha256"] or size != expected["bytes"]:
            raise DropChanged(f"{path}: changed while being ingested (sha256 {sha} != {expected['sha256']})")
    for name, payload in (extra or {}).items():
        (target / name).write_bytes(payload)
    schema = entries[0]["schema"] if spec.data.format != "images" else {"image_table": "images.parquet"}
    manifest = {
        "pipeline": spec.name,
        "version": version,
        "drop": drop,
        "run_id": run_id,
        "format": spec.data.format,
        "files": entries,
        "bytes": sum(entry["bytes"] for entry in entries),
        "rows": sum(entry["rows"] for entry in entries),
        "schema": schema,
        "uri": str(target),
    }
    write_json(target / MANIFEST, manifest)
    return manifest


def ingest_drop(lake: Lake, spec: PipelineSpec, drop: str, run_id: str) -> dict[str, Any]:
    """Profile a drop and copy it into its content-addressed dataset version (once: same bytes, same version).

    :param lake: the lake.
    :param spec: the pipeline.
    :param drop: the drop's folder name in ``landing/<pipeline>/``.
    :param run_id: the Airflow run (recorded in the manifest, names a quarantine receipt).
    :return: ``{"drop", "version", "manifest_uri", "rows", "bytes", "already_validated"}``.
    :raises DropRejected: after moving the drop to quarantine, naming the file, the rule and the quarantine folder.
    """
    log.info("Ingesting drop %s", lake.landing(spec.name, drop))
    files, entries, extra = _profile_or_quarantine(lake, spec, drop, run_id)
    version = version_of(entries)
    manifest = load_manifest(lake, spec.name, version)
    if manifest is None:
        log.info("Copying %s file(s) to dataset version %s", len(files), version)
        manifest = copy_drop(lake, spec, drop, files, entries, version, run_id, extra)
    else:
        log.info("Version %s already holds these bytes (from drop %s): not copied again", version, manifest["drop"])
    log.info("Dataset version %s: %s rows, %s bytes", version, manifest["rows"], manifest["bytes"])
    return {
        "drop": drop,
        "version": version,
        "manifest_uri": lake.uri("raw", spec.name, version, MANIFEST),
        "rows": manifest["rows"],
        "bytes": manifest["bytes"],
        "already_validated": is_validated(lake, spec.name, version),
    }


def _profile_or_quarantine(
    lake: Lake, spec: PipelineSpec, drop: str, run_id: str
) -> tuple[list[tuple[str, ObjectStoragePath]], list[dict[str, Any]], dict[str, bytes] | None]:
    """The drop's files, their profile and derived files; a drop that cannot be read goes to quarantine."""
    from conveyor.data.drops import drop_files, quarantine_drop

    source = lake.landing(spec.name, drop)
    try:
        files = drop_files(source, spec.data.marker)
        if not files:
            raise DropRejected(f"{source}: rule 'data files': the drop holds nothing but its marker")
        if spec.data.format != "images":
            return files, profile_drop(files, spec, spec.ingest.chunk_bytes), None
        from conveyor.data.images import TABLE, profile_image_drop, table_bytes

        entries, table = profile_image_drop(files, spec, source)
        return files, entries, {TABLE: table_bytes(table)}
    except DropRejected as exc:
        report = {"stage": "ingest", "drop": drop, "error": str(exc)}
        where = quarantine_drop(lake, spec.name, drop, run_id, report, spec.ingest.chunk_bytes)
        raise DropRejected(f"drop {drop!r} rejected: {exc}; kept in quarantine at {where}") from None


def load_manifest(lake: Lake, pipeline: str, version: str) -> dict[str, Any] | None:
    """The manifest of a version, or None when its copy was never completed.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param version: the dataset version.
    """
    path = lake.raw(pipeline, version) / MANIFEST
    return read_json(path) if path.exists() else None


def is_validated(lake: Lake, pipeline: str, version: str) -> bool:
    """Whether a version passed validation (only such versions are used for training).

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param version: the dataset version.
    """
    return (lake.raw(pipeline, version) / VALIDATED).exists()


def latest_version(lake: Lake, pipeline: str) -> str | None:
    """The most recently validated version of a pipeline's dataset, or None.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    """
    path = lake.raw(pipeline) / LATEST
    return read_json(path)["version"] if path.exists() else None


def read_table(lake: Lake, manifest: dict[str, Any], spec: PipelineSpec, columns: list[str] | None = None) -> Any:
    """Read a dataset version into one pandas DataFrame.

    :param lake: the lake.
    :param manifest: the version's manifest.
    :param spec: the pipeline, for the format and CSV options.
    :param columns: only these columns, when given.
    """
    import pandas as pd

    if manifest["format"] == "images":
        with (lake.raw(manifest["pipeline"], manifest["version"]) / "images.parquet").open("rb") as handle:
            return pd.read_parquet(handle, columns=columns)
    base = lake.raw(manifest["pipeline"], manifest["version"]) / "data"
    frames = []
    for entry in manifest["files"]:
        with (base / entry["path"]).open("rb") as handle:
            if manifest["format"] == "csv":
                frames.append(
                    pd.read_csv(
                        handle,
                        sep=spec.data.csv.delimiter,
                        encoding=spec.data.csv.encoding,
                        header=0 if spec.data.csv.header else None,
                        usecols=columns,
                        low_memory=False,
                    )
                )
            else:
                frames.append(pd.read_parquet(handle, columns=columns))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
