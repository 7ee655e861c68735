"""The landing zone: which drops are complete, what they hold, and moving a rejected one away."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor.errors import DropRejected
from conveyor.lake import (
    PROCESSED_MARKER,
    RESERVED_DROPS,
    Lake,
    copy_verified,
    read_json,
    remove_tree,
    safe_name,
    write_json,
)

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)

ATTEMPTS = "_ATTEMPTS.json"
# Conveyor's own files in a drop folder: never data, never listed as skipped.
BOOKKEEPING = frozenset({PROCESSED_MARKER, ATTEMPTS, "_QUARANTINED.json", "_report.json"})
# Files operating systems leave in folders (Windows thumbnails and folder settings, macOS Finder data).
OS_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", ".ds_store", ".localized", "icon\r"})


def find_complete_drops(landing: ObjectStoragePath, marker: str) -> list[str]:
    """Names of the drops that hold their completion marker and were not processed yet.

    :param landing: ``landing/<pipeline>/``.
    :param marker: the file whose presence says a drop is complete (e.g. ``_SUCCESS``).
    :return: drop names, oldest name first.
    """
    if not landing.exists():
        return []
    ready = []
    for child in landing.iterdir():
        name = child.name
        if name in RESERVED_DROPS or name.startswith((".", "_")) or not child.is_dir():
            continue
        if (child / marker).exists() and not (child / PROCESSED_MARKER).exists():
            ready.append(name)
    return sorted(ready)


@dataclass
class DropListing:
    """What a drop folder holds: its data files, the files left out (with why), its symbolic links."""

    files: list[tuple[str, ObjectStoragePath]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    links: list[dict[str, str]] = field(default_factory=list)


def skip_reason(rel: str) -> str | None:
    """Why a file of a drop is not data (None: it is data).

    :param rel: the file's path relative to the drop.
    """
    parts = rel.split("/")
    name = parts[-1]
    if name.lower() in OS_FILES or name.startswith("._"):
        return "operating-system file (folder thumbnails or settings)"
    if name.startswith(".") and name.lower().endswith(".crc"):
        return "checksum file (.crc) written beside a part file"
    for folder in parts[:-1]:
        if folder.startswith((".", "_")):
            return f"inside folder {folder!r}, whose name starts with {folder[0]!r} (skipped by convention)"
    if name.startswith("_"):
        return "name starts with '_' (a job marker or metadata file, skipped by convention)"
    if name.startswith("."):
        return "hidden file (name starts with '.', skipped by convention)"
    return None


def _is_link(path: ObjectStoragePath) -> bool:
    return path.protocol in ("file", "local", "") and os.path.islink(path.path)


def scan_drop(drop: ObjectStoragePath, marker: str) -> DropListing:
    """List a drop: data files sorted by relative path, skipped files with their reason, symbolic links.

    The marker and Conveyor's own bookkeeping at the top of the drop are neither data nor skipped.
    Links (local lakes only) are listed, never followed.

    :param drop: the drop's folder, ``landing/<pipeline>/<drop>/``.
    :param marker: the completion marker's file name.
    """
    base = drop.path.rstrip("/")
    listing = DropListing()
    if _is_link(drop):
        listing.links.append({"path": ".", "target": os.readlink(drop.path)})
        return listing
    for path in drop.rglob("*"):
        rel = path.path[len(base) :].lstrip("/")
        if _is_link(path):
            listing.links.append({"path": rel, "target": os.readlink(path.path)})
            continue
        if not path.is_file() or rel == marker or rel in BOOKKEEPING:
            continue
        reason = skip_reason(rel)
        if reason:
            listing.skipped.append({"path": rel, "reason": reason})
        else:
            listing.files.append((rel, path))
    listing.files.sort(key=lambda item: item[0])
    listing.skipped.sort(key=lambda item: item["path"])
    return listing


def find_incomplete_drops(
    landing: ObjectStoragePath, marker: str, older_than: float, now: float | None = None
) -> list[dict[str, Any]]:
    """Drops that wait without their marker (or with one of the wrong case) since longer than ``older_than``.

    :param landing: ``landing/<pipeline>/``.
    :param marker: the completion marker's file name (case matters: ``_success`` is not ``_SUCCESS``).
    :param older_than: seconds since the drop last changed (the sensor's timeout).
    :param now: the current time (seconds since the epoch; tests pass it).
    :return: ``{"drop", "reason", "age_seconds"}`` per drop, by name.
    """
    if not landing.exists():
        return []
    now = time.time() if now is None else now
    waiting = []
    for child in landing.iterdir():
        name = child.name
        if name in RESERVED_DROPS or name.startswith((".", "_")) or not child.is_dir():
            continue
        if (child / marker).exists() or (child / PROCESSED_MARKER).exists():
            continue
        changed = [_modified(path) for path in child.rglob("*") if path.is_file()] or [_modified(child)]
        age = now - max(changed)
        if age < older_than:
            continue
        wrong = sorted(c.name for c in child.iterdir() if c.name.lower() == marker.lower() and c.name != marker)
        reason = (
            f"holds {wrong[0]!r}, not its marker {marker!r} (the name is case-sensitive)"
            if wrong
            else f"has no {marker!r} marker"
        )
        waiting.append({"drop": name, "reason": reason, "age_seconds": int(age)})
    return sorted(waiting, key=lambda item: item["drop"])


def _modified(path: ObjectStoragePath) -> float:
    """When a file last changed (seconds since the epoch); 0 when the store does not say."""
    try:
        return float(path.stat().st_mtime or 0)
    except (OSError, AttributeError, TypeError, ValueError):
        return 0.0


def describe_incomplete(waiting: list[dict[str, Any]]) -> str:
    """One line naming each drop that waits without its marker, and why.

    :param waiting: from :func:`find_incomplete_drops`.
    """
    return "; ".join(f"{item['drop']} ({item['reason']}, unchanged for {item['age_seconds']}s)" for item in waiting)


def drop_files(drop: ObjectStoragePath, marker: str) -> list[tuple[str, ObjectStoragePath]]:
    """The data files of a drop, with their path relative to the drop, sorted.

    Markers, hidden files, Conveyor's own bookkeeping and symbolic links are left out
    (:func:`scan_drop` lists what was left out, and why).

    :param drop: the drop's folder, ``landing/<pipeline>/<drop>/``.
    :param marker: the completion marker's file name (left out).
    """
    return scan_drop(drop, marker).files


def refuse_links(listing: DropListing) -> None:
    """Reject a drop that holds symbolic links: their targets lie outside the drop.

    :param listing: the drop's listing.
    :raises DropRejected: naming every link and its target.
    """
    if listing.links:
        named = ", ".join(f"{item['path']} -> {item['target']}" for item in listing.links)
        raise DropRejected(f"rule 'no symbolic links': the drop holds {len(listing.links)} link(s): {named}")


def check_drop_name(drop: str) -> None:
    """Refuse a drop name that is not one folder of the landing zone (``..``, ``a/b``, empty).

    :param drop: the drop's name as the sensor (or a person) passed it.
    :raises DropRejected: naming the drop.
    """
    if not drop or "/" in drop or "\\" in drop or not drop.strip(".") or drop != drop.strip():
        raise DropRejected(f"drop {drop!r}: rule 'one folder of the landing zone': not a drop name")


def mark_processed(lake: Lake, pipeline: str, drop: str, receipt: dict[str, Any]) -> None:
    """Mark a drop as processed; the sensor then passes it by. Its bytes stay in landing.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param drop: the drop's folder name.
    :param receipt: what processed it (version, run).
    """
    write_json(lake.landing(pipeline, drop) / PROCESSED_MARKER, receipt)


def quarantine_drop(lake: Lake, pipeline: str, drop: str, run_id: str, report: dict[str, Any], chunk_bytes: int) -> str:
    """Move a rejected drop, bytes untouched, to ``quarantine/<pipeline>/<drop>/`` with its report.

    Every file is copied and verified before the landing copy is deleted, so a crash half-way
    loses nothing: the drop is still complete in landing and the move is simply done again.
    A drop of the same name quarantined before is kept: this one gets ``<drop>__<run>``.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param drop: the drop's folder name in landing.
    :param run_id: the Airflow run that rejects it.
    :param report: why it was rejected (written as ``_report.json``).
    :param chunk_bytes: bytes per read while copying.
    :return: the URI of the quarantine folder.
    """
    source = lake.landing(pipeline, drop)
    target = lake.quarantine(pipeline, drop)
    receipt = target / "_QUARANTINED.json"
    if target.exists() and (not receipt.exists() or _run_of(receipt) != run_id):
        target = lake.quarantine(pipeline, f"{drop}__{safe_name(run_id)}")
        receipt = target / "_QUARANTINED.json"
    files, links = _all_files(source)
    for rel, path in files:
        copy_verified(path, target / rel, chunk_bytes)
        if (target / rel).stat().st_size != path.stat().st_size:
            raise OSError(f"quarantine copy of {path} is incomplete; landing left untouched")
    _copy_links(links, target)
    write_json(target / "_report.json", report)
    listed = {"run_id": run_id, "drop": drop, "files": [rel for rel, _ in files]}
    write_json(receipt, {**listed, **({"links": links} if links else {})})
    if _is_link(source):
        os.unlink(source.path)  # the link goes; what it points to is not the drop's and stays
    elif source.exists():
        remove_tree(source)
    log.warning("Drop %s moved to quarantine at %s", drop, target)
    return str(target)


def _run_of(receipt: ObjectStoragePath) -> str | None:
    return read_json(receipt).get("run_id")


def _all_files(drop: ObjectStoragePath) -> tuple[list[tuple[str, ObjectStoragePath]], list[dict[str, str]]]:
    """Every file of a folder (relative name, path) and its symbolic links (never followed)."""
    if _is_link(drop):
        return [], [{"path": ".", "target": os.readlink(drop.path)}]
    if not drop.exists():
        return [], []
    base = drop.path.rstrip("/")
    files, links = [], []
    for path in drop.rglob("*"):
        rel = path.path[len(base) :].lstrip("/")
        if _is_link(path):
            links.append({"path": rel, "target": os.readlink(path.path)})
        elif path.is_file():
            files.append((rel, path))
    return sorted(files, key=lambda item: item[0]), sorted(links, key=lambda item: item["path"])


def _copy_links(links: list[dict[str, str]], target: ObjectStoragePath) -> None:
    """Recreate a local drop's links as links in quarantine (their targets are never read)."""
    for item in links:
        where = target.path.rstrip("/") + ("" if item["path"] == "." else f"/{item['path']}")
        os.makedirs(os.path.dirname(where), exist_ok=True)
        if not os.path.lexists(where):
            os.symlink(item["target"], where)


# --- attempts: how often reading a drop failed with an unclear error ---------------------------------


def record_attempt(lake: Lake, pipeline: str, drop: str, run_id: str, error: str) -> int:
    """Count one failed try of a drop in ``landing/<pipeline>/<drop>/_ATTEMPTS.json`` (beside its receipt).

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param drop: the drop's folder name.
    :param run_id: the Airflow run that tried.
    :param error: what failed (one line).
    :return: the number of failed tries so far, this one included.
    """
    path = lake.landing(pipeline, drop) / ATTEMPTS
    tries = attempts_of(lake, pipeline, drop)
    tries.append({"run_id": run_id, "error": error, "at": time.time()})
    write_json(path, {"attempts": tries})
    return len(tries)


def attempts_of(lake: Lake, pipeline: str, drop: str) -> list[dict[str, Any]]:
    """The failed tries recorded for a drop (oldest first).

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param drop: the drop's folder name.
    """
    path = lake.landing(pipeline, drop) / ATTEMPTS
    if not path.exists():
        return []
    try:
        return list(read_json(path).get("attempts", []))
    except (ValueError, AttributeError):  # a torn or foreign file must not block the drop: count afresh
        log.warning("%s is not a list of attempts; counting afresh", path)
        return []
