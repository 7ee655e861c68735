"""Image drops: a folder per class (ImageFolder layout) or a ``manifest.csv`` (``path,label``).

Ingest lists every image with its sha256, byte size, width, height, mode and format, and whether
it decodes; the table is stored as ``images.parquet`` beside the copy. Structural problems (a
manifest row pointing outside the drop or to a missing file, images outside any class folder)
reject the drop; undecodable images are kept and judged by validation against the spec's
tolerated share of bad files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import posixpath
from typing import TYPE_CHECKING, Any

from conveyor.errors import DropRejected

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.spec import PipelineSpec

log = logging.getLogger(__name__)

MANIFEST_CSV = "manifest.csv"
TABLE = "images.parquet"
COLUMNS = ["path", "label", "sha256", "bytes", "width", "height", "mode", "format", "decodes", "error"]


def describe_image(payload: bytes, max_pixels: int | None = None) -> dict[str, Any]:
    """Width, height, mode and format of an image, and whether it decodes fully.

    An image whose header claims more than ``max_pixels`` pixels is not decoded (a few kilobytes
    of PNG can inflate to gigabytes): it is a bad file, with the reason.

    :param payload: the image file's bytes.
    :param max_pixels: the most pixels an image may have (``CONVEYOR_MAX_IMAGE_PIXELS`` when None).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from conveyor import settings

    cap = settings.ingest_settings().max_image_pixels if max_pixels is None else max_pixels

    info: dict[str, Any] = {
        "width": None,
        "height": None,
        "mode": None,
        "format": None,
        "decodes": False,
        "error": None,
    }
    if not payload:
        info["error"] = "zero bytes"
        return info
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the cap below decides
            with Image.open(io.BytesIO(payload)) as image:
                info.update(width=image.width, height=image.height, mode=image.mode, format=image.format)
                if image.width * image.height > cap:
                    info["error"] = _too_many_pixels(image.width, image.height, cap)
                    return info
                image.load()  # a truncated file fails here, not at open
        info["decodes"] = True
    except Image.DecompressionBombError as exc:
        info["error"] = f"rule 'at most {cap} pixels' (CONVEYOR_MAX_IMAGE_PIXELS): {exc}"
    except UnidentifiedImageError:
        info["error"] = "not an image PIL can identify"
    except (OSError, SyntaxError, ValueError) as exc:
        info["error"] = f"does not decode: {exc}"
    return info


def _too_many_pixels(width: int, height: int, cap: int) -> str:
    return (
        f"rule 'at most {cap} pixels' (CONVEYOR_MAX_IMAGE_PIXELS): {width}x{height} is {width * height} pixels; "
        "not decoded"
    )


def _manifest_rows(path: ObjectStoragePath) -> tuple[list[str] | None, list[dict[str, str]]]:
    """The header and rows of ``manifest.csv``: UTF-8 with or without a BOM, at most ``CONVEYOR_MAX_MANIFEST_BYTES``."""
    from conveyor import settings

    cap = settings.ingest_settings().max_manifest_bytes
    with path.open("rb") as handle:
        payload = handle.read(cap + 1)
    if len(payload) > cap:
        raise DropRejected(f"{MANIFEST_CSV}: rule 'at most {cap} bytes' (CONVEYOR_MAX_MANIFEST_BYTES): it is larger")
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DropRejected(
            f"{MANIFEST_CSV}: rule 'encoding utf-8': byte {exc.start} is not UTF-8 ({exc.reason})"
        ) from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        return (list(reader.fieldnames) if reader.fieldnames else None), rows
    except csv.Error as exc:
        raise DropRejected(f"{MANIFEST_CSV}: rule 'readable CSV': line {reader.line_num}: {exc}") from None


def _labelled_paths(files: dict[str, ObjectStoragePath], drop: ObjectStoragePath) -> list[tuple[str, str]]:
    if MANIFEST_CSV in files:
        fieldnames, lines = _manifest_rows(files[MANIFEST_CSV])
        if not fieldnames or not {"path", "label"} <= set(fieldnames):
            raise DropRejected(f"{MANIFEST_CSV}: rule 'columns path,label': found {fieldnames}")
        rows = []
        for number, row in enumerate(lines, start=2):
            raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            normal = posixpath.normpath(raw)
            if not raw or raw.startswith("/") or normal.startswith("..") or "://" in raw:
                raise DropRejected(f"{MANIFEST_CSV} line {number}: rule 'paths inside the drop': {raw!r}")
            if normal not in files:
                raise DropRejected(f"{MANIFEST_CSV} line {number}: rule 'file exists': {raw!r} is not in the drop")
            if not label:
                raise DropRejected(f"{MANIFEST_CSV} line {number}: rule 'every image has a label'")
            rows.append((normal, label))
        return rows
    rows = []
    for rel in files:
        if "/" not in rel:
            raise DropRejected(f"{rel}: rule 'ImageFolder layout': images go in a folder named after their class")
        rows.append((rel, rel.split("/", 1)[0]))
    return rows


def profile_image_drop(
    files: list[tuple[str, ObjectStoragePath]], spec: PipelineSpec, drop: ObjectStoragePath
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hash every file and describe every image of an image drop.

    :param files: the drop's files (relative name, path).
    :param spec: the pipeline.
    :param drop: the drop's folder.
    :return: the file entries (for the dataset version) and one row per labelled image.
    :raises DropRejected: naming the file or manifest line and the rule it broke.
    """
    by_rel = dict(files)
    labelled = _labelled_paths(by_rel, drop)
    if not labelled:
        raise DropRejected("rule 'images': the drop holds no image")
    from conveyor import settings

    max_pixels = settings.ingest_settings().max_image_pixels
    entries, table = [], []
    label_of = dict(labelled)
    for rel, path in files:
        payload = path.read_bytes()
        sha = hashlib.sha256(payload).hexdigest()
        entries.append({"path": rel, "bytes": len(payload), "sha256": sha})
        if rel in label_of:
            table.append(
                {
                    "path": rel,
                    "label": label_of[rel],
                    "sha256": sha,
                    "bytes": len(payload),
                    **describe_image(payload, max_pixels),
                }
            )
    bad = [row for row in table if not row["decodes"]]
    classes = len({row["label"] for row in table})
    log.info("Profiled %s image(s) in %s classes; %s do not decode", len(table), classes, len(bad))
    for entry in entries:
        entry["rows"] = 1 if entry["path"] in label_of else 0
        entry["schema"] = {}
    return entries, table


def table_bytes(table: list[dict[str, Any]]) -> bytes:
    """The image table as Parquet bytes.

    :param table: one row per labelled image (:data:`COLUMNS`).
    """
    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame(table, columns=COLUMNS).to_parquet(buffer, index=False)
    return buffer.getvalue()


def with_checks(frame: Any) -> Any:
    """The image table plus the columns validation judges: images per class, duplicates across classes.

    :param frame: the image table of a dataset version.
    """
    frame = frame.copy()
    frame["class_count"] = frame.groupby("label")["path"].transform("count")
    labels_per_sha = frame.groupby("sha256")["label"].transform("nunique")
    frame["duplicate_across_classes"] = labels_per_sha > 1
    return frame


def class_report(frame: Any) -> dict[str, Any]:
    """Images per class and the imbalance ratio (largest class over smallest).

    :param frame: the image table (decodable rows).
    """
    counts = {str(k): int(v) for k, v in frame["label"].value_counts().sort_index().items()}
    ratio = max(counts.values()) / min(counts.values()) if counts else None
    return {"images_per_class": counts, "imbalance_ratio": ratio}


def judge_images(frame: Any, max_bad_file_share: float) -> tuple[Any, dict[str, Any], list[str]]:
    """Add the per-image checks, apply the tolerated share of bad files, keep the decodable rows.

    :param frame: the image table of a dataset version.
    :param max_bad_file_share: the spec's tolerated share of images that do not decode.
    :return: the rows GX validates, report sections (classes, corrupt files), problems found.
    """
    frame = with_checks(frame)
    bad = frame[~frame["decodes"]]
    corrupt = [{"path": p, "error": e} for p, e in zip(bad["path"], bad["error"], strict=True)]
    good = frame[frame["decodes"]].reset_index(drop=True)
    extra = {"classes": class_report(good), "corrupt_files": corrupt}
    log.info("Images per class: %s", extra["classes"])
    share = len(bad) / max(len(frame), 1)
    problems = []
    if share > max_bad_file_share:
        problems.append(
            f"{len(bad)} of {len(frame)} image(s) ({share:.1%}) do not decode; tolerated: {max_bad_file_share:.1%}"
        )
        problems += [f"corrupt image {item['path']}: {item['error']}" for item in corrupt]
    elif corrupt:
        log.warning(
            "%s corrupt image(s) within the tolerated share; they are left out: %s",
            len(corrupt),
            [item["path"] for item in corrupt],
        )
    return good, extra, problems
