"""The monitor's records and decisions: what was predicted, what the truth turned out to be, when to retrain.

Everything lives in the lake under ``monitor/<pipeline>/``:

```
observations/<source>-<id>.parquet   features, id, prediction, probabilities, model version, scored_at
checks/<source>-<id>.json            the drift check of one batch run or capture slice (or its error)
labels/<drop>.parquet                accepted feedback labels (id, label, received_at, drop)
capture_offsets.json                 how far each capture file has been read
history/<run>.json                   one record per monitor run (every source it checked)
triggers/<run>.json                  every retraining decision, fired or not, with its reasons
retrain/<run>/labelled.parquet       the labelled rows a fired trigger hands to training
```

A *source* is a finished batch prediction run (``batch``) or a slice of captured endpoint traffic
(``capture``). Each is observed once: its rows are stored as observations (so feedback can be
joined to them later) and compared with the training baseline of the model version that scored it.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd

from conveyor.lake import Lake, read_json, safe_name, write_json

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.spec import PipelineSpec

ID = "_id"
META_COLUMNS = ("prediction", "model_version", "scored_at", "source", "source_id")
PROBA_PREFIX = "proba_"
SUCCESS = "_SUCCESS.json"
TABLE_SUFFIXES = (".csv", ".parquet")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- files


def write_parquet(path: "ObjectStoragePath", frame: pd.DataFrame) -> None:
    """Write a frame as one Parquet object (parents created; whole object on object stores).

    :param path: the target.
    :param frame: the rows.
    """
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(buffer.getvalue())


def read_parquet(path: "ObjectStoragePath") -> pd.DataFrame:
    """Read one Parquet object.

    :param path: the file.
    """
    with path.open("rb") as handle:
        return pd.read_parquet(io.BytesIO(handle.read()))


def read_frame(location: "ObjectStoragePath") -> pd.DataFrame:
    """A CSV or Parquet file, or every such file in a folder (markers and hidden files left out), as one frame.

    :param location: the file or folder.
    :raises ValueError: no table file there.
    """
    files = [location] if location.is_file() else sorted(
        (p for p in location.rglob("*") if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES)
         and not p.name.startswith(("_", "."))), key=lambda p: p.path)
    if not files:
        raise ValueError(f"{location}: no CSV or Parquet file to read")
    frames = []
    for file in files:
        with file.open("rb") as handle:
            data = io.BytesIO(handle.read())
        frames.append(pd.read_parquet(data) if file.name.lower().endswith(".parquet") else pd.read_csv(data))
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _records(folder: "ObjectStoragePath") -> list[dict[str, Any]]:
    """Every JSON record in a folder, in name order (names derive from run ids, not the clock).

    :param folder: the folder.
    """
    if not folder.exists():
        return []
    return [read_json(p) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".json")]


def _frames(folder: "ObjectStoragePath") -> pd.DataFrame | None:
    """Every Parquet file of a folder as one frame, or None when there is none.

    :param folder: the folder.
    """
    if not folder.exists():
        return None
    parts = [read_parquet(p) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".parquet")]
    return pd.concat(parts, ignore_index=True) if parts else None


# ------------------------------------------------------------------------------------------ sources


def source_key(source: str, ident: str) -> str:
    """The file stem of a source's records: ``batch-<run>`` or ``capture-<slice>``."""
    return safe_name(f"{source}-{ident}")


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
        if folder.is_dir() and (folder / SUCCESS).exists() and not (checked / f"{source_key('batch', folder.name)}.json").exists():
            runs.append(folder.name)
    return runs


def batch_rows(lake: Lake, pipeline: str, run: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """A finished batch run's input rows, its predictions (same order) and its ``_SUCCESS.json``.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run: the run's folder name under ``predictions/<pipeline>/``.
    :raises ValueError: the input is gone or no longer matches the predictions.
    """
    from airflow.sdk import ObjectStoragePath

    folder = lake.path("predictions", pipeline, run)
    manifest = read_json(folder / SUCCESS)
    predictions = pd.concat([read_parquet(folder / name) for name in manifest["parts"]], ignore_index=True)
    source = str(manifest["source"])
    location = ObjectStoragePath(source, conn_id=lake.conn_id) if "://" in source else ObjectStoragePath(f"file://{source}")
    if not location.exists():
        raise ValueError(f"batch run {run}: its input {source} no longer exists")
    inputs = read_frame(location)
    if len(inputs) != len(predictions):
        raise ValueError(f"batch run {run}: input {source} has {len(inputs)} rows but {len(predictions)} predictions")
    return inputs, predictions, manifest


def observations(features: pd.DataFrame, predictions: pd.DataFrame, *, ids: Any, model_version: str,
                 scored_at: str, source: str, source_id: str) -> pd.DataFrame:
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
    frame["model_version"] = model_version if isinstance(model_version, str) else pd.Series(model_version).astype(str).to_numpy()
    frame["scored_at"] = scored_at if isinstance(scored_at, str) else pd.Series(scored_at).astype(str).to_numpy()
    frame["source"], frame["source_id"] = source, source_id
    return frame


def load_observations(lake: Lake, pipeline: str) -> pd.DataFrame | None:
    """Every stored observation of the pipeline, or None before the first."""
    return _frames(lake.monitor(pipeline, "observations"))


def known_ids(lake: Lake, pipeline: str) -> set[str]:
    """Ids of stored predictions (what feedback can be joined with)."""
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
    record = lake.monitor(pipeline, "capture_offsets.json")
    if record.exists():
        offsets = dict(read_json(record))
    slices = []
    if not root.exists():
        return slices, offsets
    base = root.path.rstrip("/")
    for file in sorted((p for p in root.rglob("*.jsonl") if p.is_file()), key=lambda p: p.path):
        rel = file.path[len(base):].lstrip("/")
        start = int(offsets.get(rel, 0))
        with file.open("rb") as handle:
            data = handle.read()
        end = data.rfind(b"\n") + 1
        if end <= start:
            continue
        lines, bad = [], 0
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
            log.warning("capture %s: %s line(s) between bytes %s and %s are not JSON records; left out", rel, bad, start, end)
        slices.append((f"{rel.removesuffix('.jsonl')}@{start}-{end}", lines))
        offsets[rel] = end
    return slices, offsets


def _body(part: Mapping[str, Any]) -> bytes:
    import base64

    body = part["body"]
    return base64.b64decode(body["data"]) if body.get("encoding") == "base64" else body["data"].encode("utf-8")


IMAGE_CHANNELS = ("red", "green", "blue")


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
    stats = {"width": float(rgb.width), "height": float(rgb.height),
             "brightness": float((luma * levels).sum() / luma.sum() / 255.0)}
    for name, counts in zip(IMAGE_CHANNELS, channels):
        stats[f"mean_{name}"] = float((counts * levels).sum() / counts.sum() / 255.0)
    return stats


def image_request_stats(body: bytes, content_type: str | None, handlers: Any) -> pd.DataFrame:
    """One row of :func:`image_stats` per image of a captured image request, decoded by the model's own handlers.

    :param body: the request body (image bytes, or JSON with base64 images).
    :param content_type: its content type.
    :param handlers: the model's ``code/inference.py`` module (``decode``, ``_json_images``).
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/json":
        payloads = handlers._json_images(body)
    else:
        payloads = [(media or "image", body)]
    return pd.DataFrame([image_stats(handlers.decode(data, where)) for where, data in payloads])


def capture_rows(records: list[dict[str, Any]], model_for: Callable[[str], Any], id_column: str | None,
                 images: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[str | None], list[str], list[str]]:
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
            classes = [str(c) for c in loaded.metadata.get("class_labels") or []]
            lines = [line for line in csv.reader(io.StringIO(answer)) if line]  # quoted ids may hold commas
            offset = 1 if id_column and id_column in frame.columns else 0
            rows = [{"prediction": line[offset], **{f"{PROBA_PREFIX}{c}": float(v) for c, v in zip(classes, line[offset + 1:])}}
                    for line in lines]
        else:
            rows = [{"prediction": r["prediction"], **{f"{PROBA_PREFIX}{c}": p for c, p in (r.get("probabilities") or {}).items()}}
                    for r in json.loads(answer)["predictions"]]
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


def load_labels(lake: Lake, pipeline: str) -> pd.DataFrame:
    """Every accepted feedback label (``id``, ``label``, ``received_at``, ``drop``)."""
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


def score(rows: pd.DataFrame, problem_type: str, metric: str, classes: list[str] | None,
          positive_class: str | None) -> float | None:
    """The metric of labelled predictions, or None when it cannot be computed (e.g. one class only).

    :param rows: labelled predictions (``_label``, ``prediction``, ``proba_<class>``).
    :param problem_type: the pipeline's problem type.
    :param metric: the metric's name (as the evaluation report names it).
    :param classes: the class labels as text.
    :param positive_class: the binary positive class as text.
    """
    from conveyor.model.metrics import compute_metrics

    if rows.empty:
        return None
    if problem_type == "regression":
        values = compute_metrics(problem_type, rows["_label"].astype(float), rows["prediction"].astype(float))
    else:
        proba = None
        if classes and all(f"{PROBA_PREFIX}{c}" in rows for c in classes):
            proba = pd.DataFrame({c: rows[f"{PROBA_PREFIX}{c}"].astype(float).to_numpy() for c in classes})
        values = compute_metrics(problem_type, rows["_label"].astype(str).to_numpy(),
                                 rows["prediction"].astype(str).to_numpy(), proba, classes, positive_class)
    value = values.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def live_series(rows: pd.DataFrame, problem_type: str, metric: str, classes: list[str] | None,
                positive_class: str | None) -> list[dict[str, Any]]:
    """The live metric per day of prediction and model version.

    :param rows: labelled predictions.
    :param problem_type: the pipeline's problem type.
    :param metric: the metric.
    :param classes: class labels as text.
    :param positive_class: the binary positive class.
    """
    if rows.empty:
        return []
    days = pd.to_datetime(rows["scored_at"], utc=True, format="mixed").dt.strftime("%Y-%m-%d")
    series = []
    for (day, version), group in rows.groupby([days, rows["model_version"]], sort=True):
        series.append({"day": day, "model_version": str(version), "labels": int(len(group)), "metric": metric,
                       "value": score(group, problem_type, metric, classes, positive_class)})
    return series


def labelled_training_rows(rows: pd.DataFrame, features: list[str], label: str, id_column: str | None) -> pd.DataFrame:
    """Labelled predictions as training rows: the features, the id column if any, and the label.

    :param rows: labelled predictions.
    :param features: the model's feature names.
    :param label: the pipeline's label column.
    :param id_column: the pipeline's id column.
    """
    frame = rows[features].copy()
    if id_column:
        frame[id_column] = rows[ID].to_numpy()
    frame[label] = rows["_label"].to_numpy()
    return frame


# ------------------------------------------------------------------------------------------ decisions


def history_record(check: Mapping[str, Any], at: str) -> dict[str, Any]:
    """The line a source's check leaves in the drift history.

    :param check: ``{"source", "id", "rows", "report", "error"}``.
    :param at: the monitor run's time (ISO).
    """
    report = check.get("report") or {}
    features = report.get("features") or {}
    psis = [f["psi"] for f in features.values() if f.get("psi") is not None]
    prediction = report.get("prediction") or {}
    return {"at": at, "source": check["source"], "id": check["id"], "rows": check.get("rows", 0),
            "drift_share": report.get("drift_share"), "drifted_features": report.get("drifted_features", []),
            "max_psi": max(psis) if psis else None, "prediction_psi": prediction.get("psi"),
            "drifted": bool(report.get("drifted")), "error": check.get("error")}


def last_fired(triggers: list[dict[str, Any]]) -> datetime | None:
    """When retraining last fired, from the trigger records."""
    times = [datetime.fromisoformat(t["at"]) for t in triggers if t.get("retrain")]
    return max(times) if times else None


def decide(spec: "PipelineSpec", checks: list[dict[str, Any]], live: dict[str, Any], triggers: list[dict[str, Any]],
           now: datetime) -> dict[str, Any]:
    """Whether to retrain now, and why (every reason is kept, fired or not).

    Drift: a source of at least ``monitor.min_rows`` rows whose share of drifted features exceeds
    ``monitor.max_drift_share``, or whose prediction distribution drifted (when
    ``retrain_on_prediction_drift``). Live metric: below
    ``monitor.min_live_metric`` over at least ``monitor.min_new_labels`` labels of the live
    version received since the last trigger. A trigger within ``cooldown_hours`` of the last one
    is suppressed (recorded, not fired).

    :param spec: the pipeline.
    :param checks: this run's source checks.
    :param live: ``{"version", "metric", "value", "labels"}`` of the live version's new labels.
    :param triggers: earlier trigger records.
    :param now: the run's time (timezone-aware).
    """
    monitor = spec.monitor
    reasons = []
    notes = []
    for check in checks:
        report = check.get("report")
        if not report:
            continue
        if int(check.get("rows") or report.get("rows") or 0) < monitor.min_rows:
            notes.append(f"{check['source']} {check['id']}: {check.get('rows')} rows, fewer than monitor.min_rows "
                         f"({monitor.min_rows}): reported, no drift verdict")
            continue
        share = report.get("drift_share") or 0.0
        if report.get("drifted_features") and share > monitor.max_drift_share:
            reasons.append(f"data drift in {check['source']} {check['id']}: {len(report['drifted_features'])} of "
                           f"{len(report['features'])} features drifted ({share:.0%} > {monitor.max_drift_share:.0%}): "
                           f"{', '.join(report['drifted_features'][:10])}")
        prediction = report.get("prediction") or {}
        if monitor.retrain_on_prediction_drift and prediction.get("drifted"):
            reasons.append(f"prediction drift in {check['source']} {check['id']}: "
                           f"{'; '.join(prediction.get('reasons') or ['distribution moved'])}")
    value, count = live.get("value"), int(live.get("labels") or 0)
    if monitor.min_live_metric is not None and value is not None and count >= monitor.min_new_labels \
            and value < monitor.min_live_metric:
        reasons.append(f"live {live['metric']} of version {live.get('version')} is {value:.4f} < "
                       f"{monitor.min_live_metric} over {count} new labels (at least {monitor.min_new_labels} needed)")
    last = last_fired(triggers)
    until = last + timedelta(hours=monitor.cooldown_hours) if last else None
    suppressed = bool(reasons) and until is not None and now < until
    return {"retrain": bool(reasons) and not suppressed, "reasons": reasons, "notes": notes,
            "suppressed_by_cooldown": suppressed,
            "cooldown_until": until.isoformat() if until else None, "last_trigger": last.isoformat() if last else None,
            "at": now.isoformat(),
            "thresholds": {"psi": monitor.psi_threshold, "ks_pvalue": monitor.ks_pvalue,
                           "missing_rate": monitor.missing_rate, "max_drift_share": monitor.max_drift_share,
                           "min_rows": monitor.min_rows,
                           "min_live_metric": monitor.min_live_metric, "min_new_labels": monitor.min_new_labels,
                           "cooldown_hours": monitor.cooldown_hours}}


def load_history(lake: Lake, pipeline: str) -> list[dict[str, Any]]:
    """Every history line, oldest monitor run first."""
    lines = []
    for record in _records(lake.monitor(pipeline, "history")):
        lines += record.get("sources", [])
    return sorted(lines, key=lambda line: line["at"])


def load_triggers(lake: Lake, pipeline: str) -> list[dict[str, Any]]:
    """Every retraining decision, oldest first."""
    return sorted(_records(lake.monitor(pipeline, "triggers")), key=lambda t: t["at"])


def save_check(lake: Lake, pipeline: str, check: dict[str, Any]) -> None:
    """Record that a source was checked (its report or error), so it is not checked again."""
    write_json(lake.monitor(pipeline, "checks", f"{source_key(check['source'], check['id'])}.json"), check)


class LabelledRowsError(ValueError):
    """Newly labelled rows that cannot be added to a dataset; names the file and the rule."""


def with_labelled_rows(frame: pd.DataFrame, uri: str, spec: "PipelineSpec", conn_id: str | None = None
                       ) -> tuple[pd.DataFrame, int]:
    """A dataset plus newly labelled rows (retraining): the rows' label cast to the dataset's, a row
    with an id already in the dataset replacing it (the newer truth wins).

    :param frame: the dataset version's rows.
    :param uri: the labelled rows (``monitor/<pipeline>/retrain/<run>/labelled.parquet``).
    :param spec: the pipeline.
    :param conn_id: the lake's Airflow connection.
    :return: ``(rows, added)``.
    :raises LabelledRowsError: unreadable, or lacking a column the dataset has.
    """
    from airflow.sdk import ObjectStoragePath

    try:
        rows = read_parquet(ObjectStoragePath(uri, conn_id=conn_id))
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's
        raise LabelledRowsError(f"{uri}: labelled rows cannot be read ({type(exc).__name__}: {exc})") from None
    missing = [c for c in frame.columns if c not in rows.columns]
    if missing:
        raise LabelledRowsError(f"{uri}: labelled rows lack dataset column(s) {missing}: features must match the dataset")
    rows = rows[list(frame.columns)].copy()
    for column in frame.columns:
        try:
            if pd.api.types.is_bool_dtype(frame[column].dtype) and rows[column].dtype == object:
                truth = {"true": True, "1": True, "false": False, "0": False}
                rows[column] = rows[column].map(lambda v: truth[str(v).strip().lower()])
            rows[column] = rows[column].astype(frame[column].dtype)
        except (TypeError, ValueError, KeyError):
            if column == spec.data.label:
                raise LabelledRowsError(f"{uri}: labels cannot be read as the dataset's label type "
                                        f"{frame[column].dtype}") from None
    id_column = spec.data.id_column
    if id_column and id_column in frame:
        frame = frame[~frame[id_column].astype(str).isin(set(rows[id_column].astype(str)))]
    return pd.concat([frame, rows], ignore_index=True), int(len(rows))
