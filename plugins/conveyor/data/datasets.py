"""Dataset versions: a drop becomes an immutable, content-addressed copy in ``raw/`` with a manifest.

The version is a hash of the drop's file names and contents, so the same bytes always give the
same version. Files are streamed (hashed and profiled in one pass, copied in another), never
loaded whole into memory.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, BinaryIO

from conveyor import settings
from conveyor.errors import DropRejected, TransientError
from conveyor.lake import Lake, copy_verified, open_sized, read_json_if_exists, write_json

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


def profile_drop(
    files: list[tuple[str, ObjectStoragePath]],
    spec: PipelineSpec,
    chunk_bytes: int,
    skipped: list[dict[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Hash every file and read its row count and schema, one streaming pass per file.

    Files may be compressed CSV or the parts of a table written as a folder; an empty part file
    (Spark writes one per empty partition) is not data: it is added to ``skipped``.

    :param files: the drop's data files (relative name, path).
    :param spec: the pipeline, for the format and CSV options.
    :param chunk_bytes: bytes per read.
    :param skipped: the drop's skipped files, extended with the empty part files.
    :raises DropRejected: naming the file and the rule it broke.
    """
    from conveyor.data.formats import SUFFIXES, Peeked, is_part_file, is_table_file, profile_csv, profile_parquet

    fmt = spec.data.format
    cap = settings.ingest_settings().max_decompressed_bytes
    entries = []
    for rel, path in files:
        if not is_table_file(rel, fmt):
            kinds = SUFFIXES[fmt] + ((".csv.gz", ".csv.bz2", ".csv.zst") if fmt == "csv" else ())
            raise DropRejected(
                f"{rel}: rule 'format {fmt}': expected files ending in {kinds} or part files of a folder "
                f"named <table>{SUFFIXES[fmt][0]}/"
            )
        with path.open("rb") as raw:
            handle = _HashingReader(raw)
            head = handle.read(1)
            profile: dict[str, Any] = {}
            if head and fmt == "csv":
                profile = profile_csv(rel, Peeked(head, handle), spec, cap)
            handle.drain(chunk_bytes)
        if handle.size == 0:
            if is_part_file(rel, fmt) and skipped is not None:
                skipped.append({"path": rel, "reason": "empty part file (no bytes; an empty partition)"})
                continue
            raise DropRejected(f"{rel}: rule 'not empty': the file has no bytes")
        if fmt == "parquet":
            profile = profile_parquet(rel, path)
        entries.append({"path": rel, "bytes": handle.size, "sha256": handle.digest.hexdigest(), **profile})
        log.info("Profiled %s: %s bytes, %s rows", rel, handle.size, profile["rows"])
    if not entries:
        raise DropRejected("rule 'data files': every data file of the drop is empty")
    _check_one_schema(entries)
    return entries


def _check_one_schema(entries: list[dict[str, Any]]) -> None:
    """Every file holds the same columns, matched by name (their order may differ)."""
    first = entries[0]
    names = set(first["schema"])
    for entry in entries[1:]:
        other = set(entry["schema"])
        if other != names:
            missing, extra = sorted(names - other), sorted(other - names)
            raise DropRejected(
                f"rule 'one schema per drop': {entry['path']} has different columns from {first['path']}"
                f" (missing {missing}, extra {extra})"
            )


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
    skipped: list[dict[str, str]] | None = None,
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
    :param skipped: the drop's files left out of the version, with why (listed in the manifest).
    :return: the manifest.
    """
    target = lake.raw(spec.name, version)
    by_rel = {entry["path"]: entry for entry in entries}
    for rel, path in files:
        if rel not in by_rel:
            continue  # an empty part file: listed as skipped
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
        "skipped": list(skipped or []),
        "uri": str(target),
    }
    write_json(target / MANIFEST, manifest)
    return manifest


def ingest_drop(lake: Lake, spec: PipelineSpec, drop: str, run_id: str) -> dict[str, Any]:
    """Profile a drop and copy it into its content-addressed dataset version (once: same bytes, same version).

    Every failure to read the drop ends in one of three ways (:mod:`conveyor.data.failures`): bad
    bytes are quarantined at once; a storage failure propagates (Airflow retries; the drop is not
    blamed); an unclear error is counted in ``_ATTEMPTS.json`` and quarantined at the
    ``CONVEYOR_INGEST_MAX_ATTEMPTS``-th try, so a drop never blocks the ones after it.

    :param lake: the lake.
    :param spec: the pipeline.
    :param drop: the drop's folder name in ``landing/<pipeline>/``.
    :param run_id: the Airflow run (recorded in the manifest, names a quarantine receipt).
    :return: ``{"drop", "version", "manifest_uri", "rows", "bytes", "already_validated", "skipped"}``.
    :raises DropRejected: after moving the drop to quarantine, naming the file, the rule and the quarantine folder.
    """
    from conveyor.data.drops import check_drop_name

    check_drop_name(drop)
    log.info("Ingesting drop %s", lake.landing(spec.name, drop))
    files, entries, extra, skipped = _profile_or_quarantine(lake, spec, drop, run_id)
    for item in skipped:
        log.warning("Skipped %s: %s", item["path"], item["reason"])
    version = version_of(entries)
    manifest = load_manifest(lake, spec.name, version)
    if manifest is None:
        log.info("Copying %s file(s) to dataset version %s", len(entries), version)
        manifest = copy_drop(lake, spec, drop, files, entries, version, run_id, extra, skipped)
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
        "skipped": len(skipped),
    }


_Profiled = tuple[
    list[tuple[str, "ObjectStoragePath"]], list[dict[str, Any]], dict[str, bytes] | None, list[dict[str, str]]
]


def _profile(source: ObjectStoragePath, spec: PipelineSpec) -> _Profiled:
    """List, check and profile a drop: its files, their entries, derived files and the files skipped."""
    from conveyor.data.drops import refuse_links, scan_drop

    listing = scan_drop(source, spec.data.marker)
    refuse_links(listing)
    skipped = list(listing.skipped)
    if not listing.files:
        also = f" and {len(skipped)} skipped file(s): {[item['path'] for item in skipped][:10]}" if skipped else ""
        raise DropRejected(f"{source}: rule 'data files': the drop holds nothing but its marker{also}")
    if spec.data.format != "images":
        entries = profile_drop(listing.files, spec, spec.ingest.chunk_bytes, skipped)
        return listing.files, entries, None, sorted(skipped, key=lambda item: item["path"])
    from conveyor.data.images import TABLE, profile_image_drop, table_bytes

    entries, table = profile_image_drop(listing.files, spec, source)
    return listing.files, entries, {TABLE: table_bytes(table)}, skipped


def _profile_or_quarantine(lake: Lake, spec: PipelineSpec, drop: str, run_id: str) -> _Profiled:
    """:func:`_profile`; a drop that cannot be read goes to quarantine (at once, or at its last try)."""
    from conveyor.data.drops import attempts_of, quarantine_drop, record_attempt
    from conveyor.data.failures import classify, describe

    try:
        return _profile(lake.landing(spec.name, drop), spec)
    except Exception as exc:
        kind = classify(exc)
        if kind == "transient":
            log.warning(
                "Reading drop %s failed in the storage (%s): the drop is not blamed; a retry reads it again",
                drop,
                describe(exc),
            )
            raise
        reason = str(exc) if isinstance(exc, DropRejected) else f"rule 'readable drop': {describe(exc)}"
        if kind == "unclear":
            tries, limit = (
                record_attempt(lake, spec.name, drop, run_id, describe(exc)),
                settings.ingest_settings().max_attempts,
            )
            if tries < limit:
                log.warning(
                    "Reading drop %s failed (try %s of %s before quarantine): %s", drop, tries, limit, describe(exc)
                )
                raise
            reason = f"rule 'readable drop': reading it failed {tries} time(s), the last with {describe(exc)}"
        report = {"stage": "ingest", "drop": drop, "error": reason, "attempts": attempts_of(lake, spec.name, drop)}
        where = quarantine_drop(lake, spec.name, drop, run_id, report, spec.ingest.chunk_bytes)
        raise DropRejected(f"drop {drop!r} rejected: {reason}; kept in quarantine at {where}") from None


def load_manifest(lake: Lake, pipeline: str, version: str) -> dict[str, Any] | None:
    """The manifest of a version, or None when its copy was never completed.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param version: the dataset version.
    """
    return read_json_if_exists(lake.raw(pipeline, version) / MANIFEST)


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
    latest = read_json_if_exists(lake.raw(pipeline) / LATEST)
    return latest["version"] if latest is not None else None


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
    from conveyor.data.formats import open_for_pandas

    base = lake.raw(manifest["pipeline"], manifest["version"]) / "data"
    cap = settings.ingest_settings().max_decompressed_bytes
    frames = []
    for entry in manifest["files"]:
        with open_sized(base / entry["path"], entry.get("bytes")) as handle:  # immutable: no HEAD for its size
            if manifest["format"] == "csv":
                frames.append(
                    pd.read_csv(
                        open_for_pandas(handle, entry, cap),
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
