"""SageMaker inference handlers for the AutoGluon tabular trainer.

Packed as ``code/inference.py`` in ``model.tar.gz`` next to ``predictor/`` and ``metadata.json``
(written by ``include/training/autogluon_tabular/train.py``). The SageMaker containers, Conveyor's
model server and the local batch transform all call the same four handlers:

- :func:`model_fn` loads the predictor once, keeps its models in memory and remembers the model,
  so :func:`input_fn` (whose SageMaker signature has no model argument) can check requests against
  the feature schema; a server holding several models calls :func:`parse_request` instead.
- :func:`input_fn` turns a ``text/csv`` or ``application/json`` body into a DataFrame with the
  training columns and dtypes (plus the id column when the request carries it).
- :func:`predict_fn` returns ``prediction`` and, for classifiers, one ``proba_<class>`` column per class.
- :func:`output_fn` serialises to ``application/json`` (the default) or ``text/csv``.

Bad requests raise ``ValueError`` with a message that names the content type and the rule broken;
an unsupported content type or accept raises :class:`UnsupportedContentType` (a ``ValueError``).
Nothing here imports Airflow or Conveyor: ``metadata.json`` is read through the shipped contract
module ``conveyor_metadata`` (packed beside this file in ``code/``, on ``sys.path`` there); converting values to
the training dtypes is the sibling module ``tabular_values``, packed beside it too.
"""

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import conveyor_metadata
import numpy as np
import pandas as pd
from conveyor_metadata import OTHER, ModelMetadata
from tabular_values import converter, request_frame

logger = logging.getLogger(__name__)

CSV = "text/csv"
JSON = "application/json"
PROBA_PREFIX = "proba_"
MAX_NAMES_SHOWN = 50


class UnsupportedContentType(ValueError):
    """The request's content type, or the accept asked for, is not one this model speaks."""


@dataclass(frozen=True)
class TabularModel:
    """A loaded predictor and what requests are checked against.

    :param predictor: the AutoGluon ``TabularPredictor``, models persisted in memory.
    :param metadata: the artifact's ``metadata.json``.
    """

    predictor: Any
    metadata: ModelMetadata
    features: list[str] = field(init=False)
    dtypes: dict[str, str] = field(init=False)
    id_column: str | None = field(init=False)
    class_labels: list[Any] | None = field(init=False)
    converters: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", self.metadata.feature_names)
        object.__setattr__(self, "dtypes", self.metadata.dtypes)
        # one converter per feature, its dtype resolved once here rather than on every request
        object.__setattr__(self, "converters", {n: converter(self.dtypes[n], n) for n in self.features})
        object.__setattr__(self, "id_column", self.metadata.id_column)
        is_classifier = self.metadata.problem_type in ("binary", "multiclass")
        object.__setattr__(self, "class_labels", list(self.predictor.class_labels) if is_classifier else None)


_loaded: TabularModel | None = None


# -------------------------------------------------------------------------------------- handlers


def model_fn(model_dir: str) -> TabularModel:
    """Load ``<model_dir>/predictor`` and ``<model_dir>/metadata.json``, keep the models in memory.

    :param model_dir: the folder ``model.tar.gz`` was extracted into.
    """
    global _loaded
    from autogluon.tabular import TabularPredictor

    root = Path(model_dir)
    metadata = conveyor_metadata.read(root)
    predictor = TabularPredictor.load(str(root / "predictor"), require_py_version_match=False, verbosity=0)
    predictor.persist()
    model = TabularModel(predictor=predictor, metadata=metadata)
    _warm_up(model)
    _loaded = model
    return model


def input_fn(request_body: str | bytes, request_content_type: str | None) -> pd.DataFrame:
    """Parse a request for the model :func:`model_fn` loaded last (see :func:`parse_request`).

    :param request_body: the request body.
    :param request_content_type: its content type, ``text/csv`` or ``application/json``.
    """
    if _loaded is None:
        raise RuntimeError("input_fn: no model is loaded; model_fn must run first")
    return parse_request(request_body, request_content_type, _loaded)


def predict_fn(data: pd.DataFrame, model: TabularModel) -> pd.DataFrame:
    """Predict: a ``prediction`` column, ``proba_<class>`` columns for classifiers, and the id column.

    The prediction of a binary model applies the decision threshold calibrated in training.

    :param data: the rows from :func:`input_fn` (feature columns, maybe the id column).
    :param model: the model from :func:`model_fn`.
    """
    columns = data.columns.tolist()
    if columns == model.features:  # parse_request's frames are already the features in order: no copy then
        features = data
    else:
        missing = [name for name in model.features if name not in data.columns]
        if missing:
            raise ValueError(f"predict_fn: the data lacks features: {_names(missing)}")
        features = data[model.features]
    predictor = model.predictor
    out: dict[str, Any] = {}  # the answer's columns, made into one frame at the end (not column by column)
    if model.id_column is not None and model.id_column in columns:
        out[model.id_column] = data[model.id_column].to_numpy()
    if model.class_labels is None:
        out["prediction"] = np.asarray(predictor.predict(features, as_pandas=False))
    else:
        proba = predictor.predict_proba(features, as_multiclass=True)
        out["prediction"] = np.asarray(predictor.predict_from_proba(proba))
        for label in model.class_labels:
            out[f"{PROBA_PREFIX}{label}"] = proba[label].to_numpy(dtype="float64")
    if len(out) != 1 + len(model.class_labels or []) + (model.id_column in columns):
        raise ValueError(f"predict_fn: the id column {model.id_column!r} has the name of an output column")
    return pd.DataFrame(out, index=pd.RangeIndex(len(data)))


def predict_batch(inputs: list[pd.DataFrame], model: TabularModel) -> list[pd.DataFrame]:
    """Predict several parsed requests in one call (the model server's micro-batches): one frame each.

    Rows concatenated, predicted once, split back in order: each gets what :func:`predict_fn` alone gives it.

    :param inputs: frames from :func:`parse_request`, one per request.
    :param model: the model from :func:`model_fn`.
    """
    columns = list(model.features)
    if model.id_column is not None and any(model.id_column in frame.columns for frame in inputs):
        columns.append(model.id_column)
    merged = pd.concat([frame.reindex(columns=columns) for frame in inputs], ignore_index=True)
    if model.id_column in columns:
        merged[model.id_column] = merged[model.id_column].astype(object)
    out = predict_fn(merged, model)
    parts, start = [], 0
    for frame in inputs:
        part = out.iloc[start : start + len(frame)].reset_index(drop=True)
        if model.id_column is not None and model.id_column not in frame.columns and model.id_column in part:
            part = part.drop(columns=[model.id_column])
        parts.append(part)
        start += len(frame)
    return parts


def transform_fn(
    model: TabularModel, request_body: str | bytes, request_content_type: str | None, accept: str | None
) -> tuple[str, str]:
    """The whole request in one call, as AutoGluon's SageMaker inference container calls it.

    :param model: what :func:`model_fn` returned.
    :param request_body: the request body.
    :param request_content_type: its content type.
    :param accept: the response media type asked for.
    :return: the body and its content type.
    """
    frame = parse_request(request_body, request_content_type, model)
    return output_fn(predict_fn(frame, model), accept), choose_accept(accept)


def output_fn(prediction: pd.DataFrame, accept: str | None) -> str:
    """Serialise predictions; the body is returned and its content type is the accept chosen.

    As in SageMaker's PyTorch and scikit-learn containers, the container answers with the
    ``Accept`` media type (``application/json`` for ``None``, empty or ``*/*``). Supported:

    - ``application/json``: ``{"predictions": [{"id": ..., "prediction": ..., "probabilities":
      {class: p, ...}}, ...]}``, ``id`` only when the request carried the id column,
      ``probabilities`` only for classifiers;
    - ``text/csv``: one line per row without header: the id (when present), the prediction, then
      one probability per class in the order of ``class_labels``.

    A list of media types (``text/csv, application/json``) takes the first supported one.

    :param prediction: the frame from :func:`predict_fn`.
    :param accept: the request's ``Accept`` header.
    """
    media = choose_accept(accept)
    proba_columns = [c for c in prediction.columns if str(c).startswith(PROBA_PREFIX)]
    id_columns = [c for c in prediction.columns if c != "prediction" and c not in proba_columns]
    if media == CSV:
        ordered = prediction[id_columns[:1] + ["prediction"] + proba_columns]
        return ordered.to_csv(header=False, index=False, lineterminator="\n")
    classes = [str(c)[len(PROBA_PREFIX) :] for c in proba_columns]
    ids = prediction[id_columns[0]].tolist() if id_columns else None
    predictions = prediction["prediction"].tolist()
    probabilities = (
        np.column_stack([prediction[c].to_numpy(dtype="float64") for c in proba_columns]) if proba_columns else None
    )
    records = []
    for i, value in enumerate(predictions):
        record: dict[str, Any] = {}
        if ids is not None:
            record["id"] = _json_value(ids[i])
        record["prediction"] = _json_value(value)
        if probabilities is not None:
            record["probabilities"] = dict(zip(classes, map(float, probabilities[i])))
        records.append(record)
    return json.dumps({"predictions": records})


# ------------------------------------------------------------------------------------- requests


def parse_request(body: str | bytes, content_type: str | None, model: TabularModel) -> pd.DataFrame:
    """Parse and check a request body: the feature columns in training order and dtypes, plus the id.

    ``text/csv``: one row per line, the feature values in the order of ``metadata.json``, no
    header; or a header first (it names at least half its columns after features or the id
    column), then columns in any order, extra ones ignored except the id column.
    ``application/json``: ``{"instances": [{feature: value, ...}, ...]}`` (instances may also be
    lists of values in feature order), a bare list of such records, ``{"columns": [...],
    "data": [[...], ...]}``, or one record. Unknown keys are ignored except the id column; a record
    must name every feature (``null`` for a missing value). Empty strings are missing values;
    numbers are parsed from strings.

    :param body: the request body, bytes or text.
    :param content_type: its content type (parameters such as ``charset`` are ignored).
    :param model: the model whose schema the rows must fit.
    """
    media = _media_type(content_type)
    if media == CSV:
        rows, columns = _csv_rows(_decode(body, CSV), model)
    elif media == JSON:
        rows, columns = _json_rows(_decode(body, JSON), model)
    else:
        raise UnsupportedContentType(f"content type {content_type!r} is not supported: send {CSV} or {JSON}")
    return request_frame(rows, columns, model, media)


def choose_accept(accept: str | None) -> str:
    """The response media type for an ``Accept`` header: ``application/json`` or ``text/csv``.

    :param accept: the header (may list several types, with parameters).
    """
    if accept is None or not accept.strip():
        return JSON
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", JSON):
            return JSON
        if media in ("text/*", CSV):
            return CSV
    raise UnsupportedContentType(f"accept {accept!r} is not supported: ask for {JSON} or {CSV}")


def _media_type(content_type: str | None) -> str | None:
    """The media type of a content type, lower case, without parameters.

    :param content_type: e.g. ``text/csv; charset=utf-8``.
    """
    if content_type is None:
        return None
    return content_type.split(";")[0].strip().lower()


def _decode(body: str | bytes, media: str) -> str:
    """The body as text (UTF-8, a byte-order mark dropped); refuse an empty one.

    :param body: the request body.
    :param media: the content type, for messages.
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            text = bytes(body).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(f"{media}: the body is not UTF-8 text ({error})") from None
    elif isinstance(body, str):
        text = body.lstrip("\ufeff")
    else:
        raise ValueError(f"{media}: the body must be bytes or text, got {type(body).__name__}")
    if not text.strip():
        raise ValueError(f"{media}: empty input: the body holds no rows")
    return text


def _names(names: list[str]) -> str:
    """A comma-separated list of names, shortened when long.

    :param names: the names.
    """
    shown = ", ".join(map(str, names[:MAX_NAMES_SHOWN]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > MAX_NAMES_SHOWN else "")


def _expects(model: TabularModel) -> str:
    """How many features the model expects and which, for messages.

    :param model: the model.
    """
    return f"the model expects {len(model.features)} features: {_names(model.features)}"


def _csv_rows(text: str, model: TabularModel) -> tuple[list[tuple[int, list[Any]]], list[str]]:
    """Rows of a CSV body, each with its 1-based row number, and the column of each value.

    :param text: the body.
    :param model: the model.
    """
    try:
        records = [(n, row) for n, row in enumerate(csv.reader(io.StringIO(text), strict=True), 1) if row]
    except csv.Error as error:
        raise ValueError(f"{CSV}: malformed CSV ({error})") from None
    if not records:
        raise ValueError(f"{CSV}: empty input: the body holds no rows")
    known = set(model.features) | ({model.id_column} if model.id_column else set())
    first = [field.strip() for field in records[0][1]]
    if 2 * sum(name in known for name in first) >= len(first):
        columns = first
        duplicated = sorted({name for name in columns if columns.count(name) > 1})
        if duplicated:
            raise ValueError(f"{CSV}: the header names columns twice: {_names(duplicated)}")
        missing = [name for name in model.features if name not in columns]
        if missing:
            raise ValueError(f"{CSV}: the header lacks features: {_names(missing)}")
        records = records[1:]
        if not records:
            raise ValueError(f"{CSV}: empty input: a header but no rows")
        for number, row in records:
            if len(row) != len(columns):
                raise ValueError(f"{CSV}: row {number} has {len(row)} values; the header names {len(columns)} columns")
        return records, columns
    for number, row in records:
        if len(row) != len(model.features):
            raise ValueError(f"{CSV}: row {number} has {len(row)} values; {_expects(model)}")
    return records, list(model.features)


def _json_rows(text: str, model: TabularModel) -> tuple[list[tuple[int, list[Any]]], list[str]]:
    """Rows of a JSON body, each with its 1-based row number, and the column of each value.

    :param text: the body.
    :param model: the model.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{JSON}: malformed JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{JSON}: the body nests arrays or objects too deeply to parse") from None
    if isinstance(document, dict) and "columns" in document and "data" in document:
        return _json_split(document["columns"], document["data"], model)
    if isinstance(document, dict) and "instances" in document:
        instances = document["instances"]
    elif isinstance(document, list):
        instances = document
    elif isinstance(document, dict):
        instances = [document]
    else:
        raise ValueError(
            f'{JSON}: expected {{"instances": [...]}}, a list of records or {{"columns": [...], "data": [...]}}, '
            f"got a JSON {type(document).__name__}"
        )
    if not isinstance(instances, list):
        raise ValueError(f'{JSON}: "instances" must be a list, got a JSON {type(instances).__name__}')
    if not instances:
        raise ValueError(f"{JSON}: empty input: no instances")
    if all(isinstance(item, list) for item in instances):
        for number, row in enumerate(instances, 1):
            if len(row) != len(model.features):
                raise ValueError(f"{JSON}: instance {number} has {len(row)} values; {_expects(model)}")
        return list(enumerate(instances, 1)), list(model.features)
    columns = list(model.features)
    if model.id_column and any(isinstance(item, dict) and model.id_column in item for item in instances):
        columns.append(model.id_column)
    rows = []
    for number, item in enumerate(instances, 1):
        if not isinstance(item, dict):
            raise ValueError(
                f"{JSON}: instance {number} is a JSON {type(item).__name__}; every instance must be an object "
                "(feature: value) or every instance a list of values in feature order"
            )
        missing = [name for name in model.features if name not in item]
        if missing:
            raise ValueError(
                f"{JSON}: instance {number} lacks features: {_names(missing)} (send null for a missing value)"
            )
        rows.append((number, [item.get(name) for name in columns]))
    return rows, columns


def _json_split(columns: Any, data: Any, model: TabularModel) -> tuple[list[tuple[int, list[Any]]], list[str]]:
    """Rows of a ``{"columns": [...], "data": [[...], ...]}`` body.

    :param columns: the column names.
    :param data: the rows.
    :param model: the model.
    """
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise ValueError(f'{JSON}: "columns" must be a list of column names')
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise ValueError(f'{JSON}: "data" must be a list of rows, each a list of values')
    if not data:
        raise ValueError(f'{JSON}: empty input: "data" holds no rows')
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    if duplicated:
        raise ValueError(f'{JSON}: "columns" names columns twice: {_names(duplicated)}')
    missing = [name for name in model.features if name not in columns]
    if missing:
        raise ValueError(f'{JSON}: "columns" lacks features: {_names(missing)}')
    for number, row in enumerate(data, 1):
        if len(row) != len(columns):
            raise ValueError(f'{JSON}: row {number} has {len(row)} values; "columns" names {len(columns)}')
    return list(enumerate(data, 1)), columns


def _json_value(value: Any) -> Any:
    """A value JSON can hold: numpy scalars as Python values, NaN as null.

    :param value: one output value.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _warm_up(model: TabularModel) -> None:
    """Predict one typical row (training medians and most frequent values) so the first request is fast.

    :param model: the loaded model.
    """
    stats = (model.metadata.baseline or {}).get("features", {})
    row: dict[str, Any] = {}
    for name in model.features:
        summary = stats.get(name, {})
        if summary.get("kind") == "numeric":
            row[name] = (summary.get("quantiles") or {}).get("p50")
        elif summary.get("kind") in ("categorical", "boolean"):
            top = [k for k in summary.get("frequencies", {}) if k != OTHER]
            row[name] = top[0] if top else None
        else:
            row[name] = None
    try:
        predict_fn(parse_request(json.dumps([row]), JSON, model), model)
    except Exception:  # noqa: BLE001 - a warm-up failure must not stop serving; requests will report it
        logger.warning("warm-up prediction failed; the first request may be slow", exc_info=True)
