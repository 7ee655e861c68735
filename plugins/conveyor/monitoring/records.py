"""The monitor's records: what was predicted (batch runs, captured traffic) and what the truth turned out to be.

Everything lives in the lake under ``monitor/<pipeline>/``:

```
observations/<source>-<id>.parquet   features, id, prediction, probabilities, model version, scored_at
checks/<source>-<id>.json            the drift check of one batch run or capture slice (or its error)
labels/<drop>.parquet                accepted feedback labels (id, label, received_at, drop)
capture_offsets.json                 how far each capture file has been read (written atomically)
history/<run>.json                   one record per monitor run (every source it checked)
triggers/<run>.json                  every retraining decision, fired or not, with its reasons
retrain/<run>/labelled.parquet       the labelled rows a fired trigger hands to training
```

A *source* is a finished batch prediction run (``batch``) or a slice of captured endpoint traffic
(``capture``). Each is observed once: its rows are stored as observations (so feedback can be
joined to them later) and compared with the training baseline of the model version that scored it.
This module reads and writes the observations, capture slices and labels; checks, history and
triggers are :mod:`conveyor.monitoring.decisions`, the live metric :mod:`conveyor.monitoring.live`,
the labelled rows for retraining :mod:`conveyor.monitoring.labelled`.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from conveyor.errors import ConveyorError
from conveyor.lake import Lake, read_json, write_atomic
from conveyor.model.metadata import IMAGE_CHANNELS
from conveyor.monitoring.decisions import source_key

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

ID = "_id"
META_COLUMNS = ("prediction", "model_version", "scored_at", "source", "source_id")
PROBA_PREFIX = "proba_"
SUCCESS = "_SUCCESS.json"
TABLE_SUFFIXES = (".csv", ".parquet")

log = logging.getLogger(__name__)


class SourceError(ConveyorError, ValueError):
    """A source the monitor cannot read (its input gone, no table file, rows that do not match); names it."""


# ------------------------------------------------------------------------------------------- files


def write_parquet(path: ObjectStoragePath, frame: pd.DataFrame) -> None:
    """Write a frame as one Parquet file at once (``lake.write_atomic``: readers see the old or the new file).

    :param path: the target (parents created).
    :param frame: the rows.
    """
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    write_atomic(path, buffer.getvalue())


def read_parquet(path: ObjectStoragePath) -> pd.DataFrame:
    """Read one Parquet object.

    :param path: the file.
    """
    with path.open("rb") as handle:
        return pd.read_parquet(io.BytesIO(handle.read()))


def read_frame(location: ObjectStoragePath) -> pd.DataFrame:
    """A CSV or Parquet file, or every such file in a folder (markers and hidden files left out), as one frame.

    :param location: the file or folder.
    :raises SourceError: no table file there.
    """
    files = (
        [location]
        if location.is_file()
        else sorted(
            (
                p
                for p in location.rglob("*")
                if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES) and not p.name.startswith(("_", "."))
            ),
            key=lambda p: p.path,
        )
    )
    if not files:
        raise SourceError(f"{location}: no CSV or Parquet file to read")
    frames = []
    for file in files:
        with file.open("rb") as handle:
            data = io.BytesIO(handle.read())
        frames.append(pd.read_parquet(data) if file.name.lower().endswith(".parquet") else pd.read_csv(data))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _frames(folder: ObjectStoragePath) -> pd.DataFrame | None:
    """Every Parquet file of a folder as one frame, or None when there is none.

    :param folder: the folder.
    """
    if not folder.exists():
        return None
    parts = [read_parquet(p) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".parquet")]
    return pd.concat(parts, ignore_index=True) if parts else None


# ------------------------------------------------------------------------------------------ sources


def unchecked_batch_runs(lake: Lake, pipeline: str) -> list[str]:
    """Finished batch prediction runs (their ``_SUCCESS.json`` exists) the monitor has not checked yet.

    :param lake: the lake.
    :param pipeline: the pipeline.
    """
    root = lake.path("predictions", pipeline)
    if not root.exists():
        return []
    checked = lake.monitor(pipeline, "checks")
    runs = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        done = (checked / f"{source_key('batch', folder.name)}.json").exists()
        if folder.is_dir() and (folder / SUCCESS).exists() and not done:
            runs.append(folder.name)
    return runs


def batch_rows(lake: Lake, pipeline: str, run: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """A finished batch run's input rows, its predictions (same order) and its ``_SUCCESS.json``.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run: the run's folder name under ``predictions/<pipeline>/``.
    :raises SourceError: the input is gone or no longer matches the predictions.
    """
    from airflow.sdk import ObjectStoragePath

    folder = lake.path("predictions", pipeline, run)
    manifest = read_json(folder / SUCCESS)
    predictions = pd.concat([read_parquet(folder / name) for name in manifest["parts"]], ignore_index=True)
    source = str(manifest["source"])
    location = (
        ObjectStoragePath(source, conn_id=lake.conn_id) if "://" in source else ObjectStoragePath(f"file://{source}")
    )
    if not location.exists():
        raise SourceError(f"batch run {run}: its input {source} no longer exists")
    inputs = read_frame(location)
    if len(inputs) != len(predictions):
        raise SourceError(f"batch run {run}: input {source} has {len(inputs)} rows but {len(predictions)} predictions")
    return inputs, predictions, manifest


def observations(
    features: pd.DataFrame,
    predictions: pd.DataFrame,
    *,
    ids: Any,
    model_version: str | Sequence[str],
    scored_at: str | Sequence[str],
    source: str,
    source_id: str,
) -> pd.DataFrame:
    """What the monitor keeps of a scored row: features, id, prediction, probabilities, model and time.

    :param features: the rows as the model read them (feature columns; others are dropped).
    :param predictions: ``prediction`` and ``proba_<class>`` columns, one row per feature row.
    :param ids: one id per row (text), or None where a row has no id.
    :param model_version: the version that scored the rows (or a Series of them).
    :param scored_at: when (ISO text, or a Series).
    :param source: ``batch`` or ``capture``.
    :param source_id: the batch run or capture slice.
    """
    frame = features.reset_index(drop=True).copy()
    frame[ID] = pd.Series(ids, dtype=object) if ids is not None else pd.Series([None] * len(frame), dtype=object)
    frame[ID] = frame[ID].map(lambda v: None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))
    predictions = predictions.reset_index(drop=True)
    frame["prediction"] = predictions["prediction"].astype(str) if "prediction" in predictions else None
    for column in predictions.columns:
        if str(column).startswith(PROBA_PREFIX):
            frame[str(column)] = predictions[column].astype("float64")
    frame["model_version"] = (
        model_version if isinstance(model_version, str) else pd.Series(model_version).astype(str).to_numpy()
    )
    frame["scored_at"] = scored_at if isinstance(scored_at, str) else pd.Series(scored_at).astype(str).to_numpy()
    frame["source"], frame["source_id"] = source, source_id
    return frame


def save_observations(lake: Lake, pipeline: str, source: str, ident: str, frame: pd.DataFrame) -> None:
    """Keep a source's observations (a re-run of the same source replaces them).

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param source: ``batch`` or ``capture``.
    :param ident: the batch run, or the capture slice and version.
    :param frame: what :func:`observations` returned.
    """
    write_parquet(lake.monitor(pipeline, "observations", f"{source_key(source, ident)}.parquet"), frame)


def load_observations(lake: Lake, pipeline: str) -> pd.DataFrame | None:
    """Every stored observation of the pipeline, or None before the first.

    :param lake: the lake.
    :param pipeline: the pipeline.
    """
    return _frames(lake.monitor(pipeline, "observations"))


def known_ids(lake: Lake, pipeline: str) -> set[str]:
    """Ids of stored predictions (what feedback can be joined with).

    :param lake: the lake.
    :param pipeline: the pipeline.
    """
    frame = load_observations(lake, pipeline)
    if frame is None or ID not in frame:
        return set()
    return {str(v) for v in frame[ID].dropna()}


# ------------------------------------------------------------------------------------------ capture


def capture_slices(lake: Lake, pipeline: str) -> tuple[list[tuple[str, list[dict[str, Any]]]], dict[str, int]]:
    """The captured records not read yet, per capture file, and the offsets after reading them.

    Capture files are appended to while the endpoint runs; only whole lines are taken, and the
    byte offset reached is returned so the next monitor run starts there.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :return: ``([(slice id, records)], new offsets)``; a slice id names the file and the byte range.
    """
    root = lake.capture(pipeline)
    offsets: dict[str, int] = {}
    stored = lake.monitor(pipeline, "capture_offsets.json")
    if stored.exists():
        offsets = dict(read_json(stored))
    slices: list[tuple[str, list[dict[str, Any]]]] = []
    if not root.exists():
        return slices, offsets
    base = root.path.rstrip("/")
    for file in sorted((p for p in root.rglob("*.jsonl") if p.is_file()), key=lambda p: p.path):
        rel = file.path[len(base) :].lstrip("/")
        start = int(offsets.get(rel, 0))
        with file.open("rb") as handle:
            data = handle.read()
        end = data.rfind(b"\n") + 1
        if end <= start:
            continue
        lines: list[dict[str, Any]] = []
        bad = 0
        for line in data[start:end].decode("utf-8", errors="replace").split("\n"):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:  # e.g. a worker killed half-way through a line: that line is lost, not the file
                record = False
            if isinstance(record, dict):
                lines.append(record)
            elif record is not None:
                bad += 1
        if bad:
            log.warning(
                "capture %s: %s line(s) between bytes %s and %s are not JSON records; left out", rel, bad, start, end
            )
        slices.append((f"{rel.removesuffix('.jsonl')}@{start}-{end}", lines))
        offsets[rel] = end
    return slices, offsets


def _body(part: Mapping[str, Any]) -> bytes:
    """The bytes of a captured request or response (``{"body": {"encoding", "data"}}``).

    :param part: the request or response record.
    """
    import base64

    body = part["body"]
    return base64.b64decode(body["data"]) if body.get("encoding") == "base64" else body["data"].encode("utf-8")


def image_stats(image: Any) -> dict[str, float]:
    """The statistics the image trainer's baseline holds, for one image: size, brightness, channel means.

    Brightness is the mean of PIL's ``L`` luma in [0, 1] and ``mean_<channel>`` the mean intensity
    of a channel of the RGB image in [0, 1], as ``include/training/resnet_image/train.py`` computes them.

    :param image: a PIL image.
    """
    import numpy as np

    rgb = image.convert("RGB")
    levels = np.arange(256, dtype=np.float64)
    luma = np.asarray(rgb.convert("L").histogram(), dtype=np.float64)
    channels = np.asarray(rgb.histogram(), dtype=np.float64).reshape(3, 256)
    stats = {
        "width": float(rgb.width),
        "height": float(rgb.height),
        "brightness": float((luma * levels).sum() / luma.sum() / 255.0),
    }
    for name, counts in zip(IMAGE_CHANNELS, channels, strict=True):
        stats[f"mean_{name}"] = float((counts * levels).sum() / counts.sum() / 255.0)
    return stats


def image_request_stats(body: bytes, content_type: str | None, handlers: Any) -> pd.DataFrame:
    """One row of :func:`image_stats` per image of a captured image request, decoded by the model's own handlers.

    :param body: the request body (image bytes, or JSON with base64 images).
    :param content_type: its content type.
    :param handlers: the model's ``code/inference.py`` module (``decode``, and ``json_images``; ``_json_images``
        in models packed before the request rules moved to ``image_requests.py``).
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json":
        images = getattr(handlers, "json_images", None) or handlers._json_images
        limits = getattr(handlers, "RequestLimits", None)  # models packed since issue 17 cap the images per request
        payloads = images(body, limits.from_env().max_images) if limits else images(body)
    else:
        payloads = [(media or "image", body)]
    return pd.DataFrame([image_stats(handlers.decode(data, where)) for where, data in payloads])


def capture_rows(
    records: list[dict[str, Any]], model_for: Callable[[str], Any], id_column: str | None, images: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, list[str | None], list[str], list[str]]:
    """Captured requests as feature rows, and their responses as predictions (one per row).

    A request is parsed by the answering version's own handlers (``parse_request``), the response
    read back from JSON (``{"predictions": [...]}``) or CSV. Row ids: the id column when the
    request carried it, else the request's inference id (``<id>`` for one row, ``<id>#<n>`` for
    several), else none.

    :param records: capture lines (``conveyor.serving.app.Capture``).
    :param model_for: a version -> ``LoadedModel`` function (cached by the caller).
    :param id_column: the pipeline's id column.
    :param images: an image model: each row is an image's statistics (:func:`image_request_stats`).
    :return: ``(features, predictions, ids, versions, times)``.
    """
    features, predictions, ids, versions, times = [], [], [], [], []
    for record in records:
        loaded = model_for(str(record["version"]))
        request = record["request"]
        if images:
            frame = image_request_stats(_body(request), request.get("content_type"), loaded.handlers)
        else:
            frame = loaded.handlers.parse_request(_body(request), request.get("content_type"), loaded.model)
        answer = _body(record["response"]).decode("utf-8")
        if (record["response"].get("content_type") or "").startswith("text/csv"):
            classes = [str(c) for c in loaded.metadata.class_labels or []]
            lines = [line for line in csv.reader(io.StringIO(answer)) if line]  # quoted ids may hold commas
            offset = 1 if id_column and id_column in frame.columns else 0
            rows = [
                {
                    "prediction": line[offset],
                    **{f"{PROBA_PREFIX}{c}": float(v) for c, v in zip(classes, line[offset + 1 :], strict=False)},
                }
                for line in lines
            ]
        else:
            rows = [
                {
                    "prediction": r["prediction"],
                    **{f"{PROBA_PREFIX}{c}": p for c, p in (r.get("probabilities") or {}).items()},
                }
                for r in json.loads(answer)["predictions"]
            ]
        if len(rows) != len(frame):
            continue  # a response that does not match its request cannot be attributed: left out
        inference_id = record.get("inference_id")
        if id_column and id_column in frame.columns:
            ids += [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in frame[id_column]]
        elif inference_id:
            ids += [str(inference_id)] if len(frame) == 1 else [f"{inference_id}#{n}" for n in range(len(frame))]
        else:
            ids += [None] * len(frame)
        features.append(frame)
        predictions.append(pd.DataFrame(rows))
        versions += [str(record["version"])] * len(frame)
        times += [str(record["timestamp"])] * len(frame)
    if not features:
        return pd.DataFrame(), pd.DataFrame(), [], [], []
    return (pd.concat(features, ignore_index=True), pd.concat(predictions, ignore_index=True), ids, versions, times)


# ------------------------------------------------------------------------------------------ labels


def save_labels(lake: Lake, pipeline: str, drop: str, labels: pd.DataFrame) -> None:
    """Keep the accepted labels of a feedback drop (``id``, ``label``, ``received_at``, ``drop``).

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param drop: the feedback drop's name.
    :param labels: its accepted labels.
    """
    write_parquet(lake.monitor(pipeline, "labels", f"{drop}.parquet"), labels)


def load_labels(lake: Lake, pipeline: str) -> pd.DataFrame:
    """Every accepted feedback label (``id``, ``label``, ``received_at``, ``drop``).

    :param lake: the lake.
    :param pipeline: the pipeline.
    """
    frame = _frames(lake.monitor(pipeline, "labels"))
    return frame if frame is not None else pd.DataFrame(columns=["id", "label", "received_at", "drop"])


def joined(observed: pd.DataFrame | None, labels: pd.DataFrame) -> pd.DataFrame:
    """Labelled predictions: observations joined with labels on the id (the first observation of an id).

    :param observed: stored observations.
    :param labels: accepted labels.
    """
    if observed is None or labels.empty:
        return pd.DataFrame()
    first = observed.dropna(subset=[ID]).drop_duplicates(subset=[ID], keep="first")
    return first.merge(labels.rename(columns={"id": ID, "label": "_label"}), on=ID, how="inner")
