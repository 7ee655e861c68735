"""The drift baseline of the AutoGluon tabular trainer: training-data statistics per feature and of
the label, and the distribution of the scored model's predictions on the validation data, in the
layout of the shipped contract (``conveyor_metadata``: QUANTILES, HISTOGRAM_BINS, TOP_VALUES, OTHER).

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from conveyor_metadata import OTHER, TOP_VALUES, Baseline, CategoricalSummary, NumericSummary, finite, numeric_summary


def feature_kind(dtype: Any) -> str:
    """How a column is summarised and coerced: ``numeric``, ``boolean``, ``datetime`` or ``categorical``.

    :param dtype: the column's pandas dtype.
    """
    if pd.api.types.is_bool_dtype(dtype):
        return "boolean"
    if pd.api.types.is_numeric_dtype(dtype):
        return "numeric"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    return "categorical"


def numeric_baseline(series: pd.Series) -> NumericSummary:
    """Count, missing rate, moments, quantiles and a decile histogram of a numeric column.

    The contract's :func:`~conveyor_metadata.numeric_summary` of the column's finite values: the
    histogram's edges are the distinct deciles of the non-missing values (``HISTOGRAM_BINS`` bins,
    fewer when deciles coincide); ``counts[i]`` counts values in ``[edges[i], edges[i+1])``, the last
    bin closed.

    :param series: the column (values that are not numbers count as missing).
    """
    return numeric_summary(pd.to_numeric(series, errors="coerce").astype("float64").to_numpy())


def categorical_baseline(series: pd.Series, kind: str = "categorical") -> CategoricalSummary:
    """Missing rate and the shares of the top values of a categorical column.

    ``frequencies`` holds the share of each of the ``TOP_VALUES`` most frequent values among the
    non-missing values (keys as strings), plus ``OTHER`` (``__other__``) for the rest (0.0 when there is none).

    :param series: the column.
    :param kind: the kind written into the summary (``categorical`` or ``boolean``).
    """
    rows = len(series)
    present = series.dropna()
    counts = present.astype(str).value_counts()
    top = counts.iloc[:TOP_VALUES]
    total = int(counts.sum())
    frequencies = {str(k): float(v / total) for k, v in top.items()} if total else {}
    if total:
        frequencies[OTHER] = float(counts.iloc[TOP_VALUES:].sum() / total)
    return {
        "kind": kind,
        "count": total,
        "missing_rate": finite((rows - total) / rows) if rows else None,
        "distinct": int(len(counts)),
        "frequencies": frequencies,
    }


def datetime_baseline(series: pd.Series) -> dict[str, Any]:
    """Count, missing rate and range of a datetime column.

    :param series: the column.
    """
    rows = len(series)
    present = series.dropna()
    return {
        "kind": "datetime",
        "count": int(len(present)),
        "missing_rate": finite((rows - len(present)) / rows) if rows else None,
        "min": present.min().isoformat() if len(present) else None,
        "max": present.max().isoformat() if len(present) else None,
    }


def build_baseline(train: pd.DataFrame, label: str, problem_type: str) -> Baseline:
    """Training-data statistics the drift monitor compares live data with.

    :param train: the training rows (label included, id column excluded).
    :param label: the label column.
    :param problem_type: binary, multiclass or regression.
    """
    features: dict[str, Any] = {}
    for name in train.columns:
        if name == label:
            continue
        kind = feature_kind(train[name].dtype)
        if kind == "numeric":
            features[str(name)] = numeric_baseline(train[name])
        elif kind == "datetime":
            features[str(name)] = datetime_baseline(train[name])
        else:
            features[str(name)] = categorical_baseline(train[name], kind)
    baseline: Baseline = {"rows": int(len(train)), "features": features}
    if problem_type == "regression":
        baseline["label"] = numeric_baseline(train[label])
    else:
        shares = train[label].value_counts(normalize=True)
        baseline["label_distribution"] = {str(k): float(v) for k, v in shares.items()}
    return baseline


def validation_predictions(predictor: Any, validation: pd.DataFrame, label: str, model: str) -> Any:
    """A model's predictions of the validation rows: those the fit made when it scored them (AutoGluon keeps
    them, ``predict_multi`` without data), predicted again only when they are not these rows.

    :param predictor: the fitted predictor (its tuning data was ``validation``).
    :param validation: the validation rows (label included; it is not used).
    :param label: the label column.
    :param model: the model that predicts.
    """
    cached = predictor.predict_multi(models=[model]).get(model)
    if cached is not None and len(cached) == len(validation):
        return cached
    return predictor.predict(validation.drop(columns=[label]), model=model)


def prediction_baseline(
    predictor: Any, validation: pd.DataFrame, label: str, problem_type: str, model: str, predicted: Any = None
) -> dict[str, Any]:
    """The distribution of a model's predictions on the validation data (held out from its fit).

    The drift monitor compares live predictions with it: ``{class: share}`` over every class the
    model knows (0.0 for a class it never predicted), as ``label_distribution``; for a regressor
    the :func:`numeric_baseline` of the predicted values, as ``label``.

    :param predictor: the fitted predictor.
    :param validation: the validation rows (label included; it is not used).
    :param label: the label column.
    :param problem_type: binary, multiclass or regression.
    :param model: the model that predicts (the one scored on validation, not a refit on it).
    :param predicted: its predictions of the validation rows when already made (:func:`validation_predictions`).
    """
    if predicted is None:
        predicted = predictor.predict(validation.drop(columns=[label]), model=model)
    if problem_type == "regression":
        return numeric_baseline(pd.Series(np.asarray(predicted, dtype="float64")))
    counts = pd.Series(np.asarray(predicted)).map(str).value_counts()
    total = int(counts.sum())
    return {str(c): float(counts.get(str(c), 0) / total) for c in predictor.class_labels}
