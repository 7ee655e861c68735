"""The landing zone: which drops are complete, what they hold, and moving a rejected one away."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from conveyor.lake import PROCESSED_MARKER, RESERVED_DROPS, Lake, copy_verified, remove_tree, safe_name, write_json

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

log = logging.getLogger(__name__)


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


def drop_files(drop: ObjectStoragePath, marker: str) -> list[tuple[str, ObjectStoragePath]]:
    """The data files of a drop, with their path relative to the drop, sorted.

    Markers, hidden files and Conveyor's own bookkeeping are left out.

    :param drop: the drop's folder, ``landing/<pipeline>/<drop>/``.
    :param marker: the completion marker's file name (left out).
    """
    base = drop.path.rstrip("/")
    files = []
    for path in drop.rglob("*"):
        if not path.is_file():
            continue
        rel = path.path[len(base) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")) or rel == marker:
            continue
        files.append((rel, path))
    return sorted(files, key=lambda item: item[0])


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
    files = [(rel, path) for rel, path in _all_files(source)]
    for rel, path in files:
        copy_verified(path, target / rel, chunk_bytes)
        if (target / rel).stat().st_size != path.stat().st_size:
            raise OSError(f"quarantine copy of {path} is incomplete; landing left untouched")
    write_json(target / "_report.json", report)
    write_json(receipt, {"run_id": run_id, "drop": drop, "files": [rel for rel, _ in files]})
    if source.exists():
        remove_tree(source)
    log.warning("Drop %s moved to quarantine at %s", drop, target)
    return str(target)


def _run_of(receipt: ObjectStoragePath) -> str | None:
    from conveyor.lake import read_json

    return read_json(receipt).get("run_id")


def _all_files(drop: ObjectStoragePath) -> list[tuple[str, ObjectStoragePath]]:
    if not drop.exists():
        return []
    base = drop.path.rstrip("/")
    return sorted(
        ((p.path[len(base) :].lstrip("/"), p) for p in drop.rglob("*") if p.is_file()),
        key=lambda item: item[0],
    )
