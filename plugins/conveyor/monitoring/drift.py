"""Data drift: a new batch (features, predictions, image statistics) against a model's training baseline.

The baseline is what the trainers write into ``metadata.json`` (``baseline``): per numeric feature
moments, quantiles ``p01..p99`` and a decile histogram; per categorical (or boolean) feature the
shares of its top values plus ``__other__``; ``label_distribution`` for classifiers and ``label``
(a numeric summary) for regressors; and ``predictions``, the model's predictions on its validation
data in the same format (class shares, or a numeric summary), the reference for prediction drift
(models trained before it existed fall back to the label's distribution). The image trainer
writes summaries of ``width``, ``height`` and ``brightness`` in the same numeric format, plus
per-channel pixel means and stds.

What is measured, per feature (missing values are left out of the distributions and reported as
a missing-rate change instead):

* numeric: PSI over the baseline's histogram bins (the outer bins open-ended), and a one-sample
  Kolmogorov-Smirnov test (:func:`ks_test`) of the batch against the baseline CDF rebuilt from its
  quantiles and histogram (:func:`baseline_cdf`; the raw training sample is not stored). A
  feature constant in training is binned as ``== constant`` / ``!= constant``.
* categorical: PSI over the baseline categories plus ``__other__`` (values the baseline does not
  list go there and are listed in ``new_categories``), and a chi-square test of the counts against
  the baseline shares, cells expecting fewer than 5 rows pooled.

**The drift rule** (:data:`DEFAULT_THRESHOLDS`): a feature drifts when any of
(1) ``psi > thresholds["psi"]``; (2) the test's p-value (KS or chi-square) is below
``thresholds["ks_pvalue"]`` *and* ``psi > thresholds["psi"] / 2``; (3) the missing rate moved by
more than ``thresholds["missing_rate"]`` (absolute). The tests only tip a borderline PSI because
on large batches they flag differences too small to matter, and because both treat the baseline
as exact: the training sample's own noise, and for KS the rebuilt CDF's error (a KS distance of
about 0.01 for unchanged data), are called significant once a batch has 100,000 rows or so.
Image channel means, for which the baseline keeps no per-image distribution, drift when the batch
mean moved by more than ``thresholds["channel_shift"]`` baseline pixel standard deviations.

The baseline's layout (quantile names, histogram, ``__other__``) is the shipped contract,
:mod:`conveyor.model.metadata`; a model's metadata is read as a
:class:`~conveyor.model.metadata.ModelMetadata`.

Every result is JSON-serialisable: plain floats, ``None`` where a figure does not exist (no NaN).
Bad input raises :class:`DriftInputError` (a ``ConveyorError`` and a ``ValueError``) naming the column
and the rule.

The statistics themselves (PSI, the rebuilt CDF, the KS and chi-square tests) live in
:mod:`conveyor.monitoring.stats` and are re-exported here.

This module imports numpy, pandas and scipy at the top: import it inside a task, not a DAG file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from conveyor.errors import ConveyorError
from conveyor.model.metadata import OTHER, QUANTILES, ModelMetadata
from conveyor.monitoring.stats import BaselineCDF, baseline_cdf, chisquare, ks_test, psi
from conveyor.monitoring.stats import num as _num

__all__ = [
    "DEFAULT_THRESHOLDS",
    "OTHER",
    "QUANTILES",
    "BaselineCDF",
    "DriftInputError",
    "baseline_cdf",
    "categorical_drift",
    "drift_report",
    "image_drift",
    "ks_test",
    "numeric_drift",
    "prediction_drift",
    "psi",
]

DEFAULT_THRESHOLDS: dict[str, float] = {"psi": 0.2, "ks_pvalue": 0.01, "missing_rate": 0.1, "channel_shift": 0.25}
NEW_CATEGORIES_LISTED = 20
IMAGE_STATS = ("width", "height", "brightness")
RULE = (
    "drifted when psi > {psi}, or test p-value < {ks_pvalue} and psi > {half_psi}, "
    "or |missing-rate change| > {missing_rate}"
)


class DriftInputError(ConveyorError, ValueError):
    """A batch, its predictions or a baseline the drift check cannot use; names the column and the rule."""


# ------------------------------------------------------------------------------------- helpers


def _series(values: Any, name: str) -> pd.Series:
    """The values as a 1-D pandas Series, refusing tables and empty input.

    :param values: a Series, array or list.
    :param name: the column name used in errors.
    """
    if isinstance(values, pd.DataFrame):
        if values.shape[1] != 1:
            raise DriftInputError(f"{name}: expected one column of values, got a table of {values.shape[1]} columns")
        values = values.iloc[:, 0]
    if not isinstance(values, pd.Series) and np.ndim(values) != 1:
        raise DriftInputError(f"{name}: expected one column of values, got {np.ndim(values)} dimension(s)")
    series = values if isinstance(values, pd.Series) else pd.Series(values)
    if not len(series):
        raise DriftInputError(f"{name}: no rows to compare with the baseline")
    return series


def _as_numeric(series: pd.Series, name: str) -> np.ndarray:
    """Float64 values of a numeric column (missing as NaN); text that is not a number is refused.

    :param series: the column.
    :param name: the column name used in errors.
    """
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype="float64", na_value=np.nan)
    converted = pd.to_numeric(series, errors="coerce")
    bad = converted.isna().to_numpy() & series.notna().to_numpy()
    if bad.any():
        examples = ", ".join(repr(v) for v in pd.unique(series[bad])[:3])
        raise DriftInputError(
            f"column {name!r} is numeric in the baseline but holds {int(bad.sum())} value(s) that are not "
            f"numbers (e.g. {examples}): a numeric feature must hold numbers or missing values"
        )
    return converted.to_numpy(dtype="float64", na_value=np.nan)


def _missing(baseline_feature: Mapping[str, Any], missing_rate: float) -> dict[str, float | None]:
    """The batch's missing rate, the baseline's, and the change.

    :param baseline_feature: the feature's baseline summary.
    :param missing_rate: the batch's missing rate.
    """
    before = _num(baseline_feature.get("missing_rate"))
    return {
        "missing_rate": _num(missing_rate),
        "baseline_missing_rate": before,
        "missing_rate_change": _num(missing_rate - before) if before is not None else None,
    }


# ------------------------------------------------------------------------------------ features


def numeric_drift(baseline_feature: Mapping[str, Any], values: Any, name: str = "values") -> dict[str, Any]:
    """PSI over the baseline histogram bins, KS test against the rebuilt baseline CDF, missing-rate change.

    :param baseline_feature: the feature's numeric baseline summary (the trainer's ``numeric_baseline``).
    :param values: the batch's values (Series, array or list); NaN, None and infinities count as missing.
    :param name: the column name used in errors.
    """
    raw = _as_numeric(_series(values, name), name)
    finite = np.isfinite(raw)
    present = raw if finite.all() else raw[finite]
    count = len(present)
    result: dict[str, Any] = {"kind": "numeric", "count": count, **_missing(baseline_feature, 1.0 - count / len(raw))}
    base_mean, base_std = _num(baseline_feature.get("mean")), _num(baseline_feature.get("std"))
    mean = _num(present.mean()) if count else None
    result |= {
        "mean": mean,
        "baseline_mean": base_mean,
        "mean_shift_std": _num((mean - base_mean) / base_std)
        if mean is not None and base_mean is not None and base_std
        else None,
        "constant_baseline": False,
        "bins": None,
        "expected_shares": None,
        "actual_shares": None,
        "psi": None,
        "test": "ks",
        "statistic": None,
        "pvalue": None,
    }
    histogram = baseline_feature.get("histogram")
    if not count or not histogram:
        return result
    edges = np.asarray(histogram["edges"], dtype="float64")
    ordered = np.sort(present)
    if edges[0] == edges[-1] or base_std == 0.0:
        constant = float(edges[0])
        equal = int(np.searchsorted(ordered, constant, side="right") - np.searchsorted(ordered, constant, side="left"))
        expected, actual = np.array([1.0, 0.0]), np.array([equal, count - equal]) / count
        result |= {"constant_baseline": True, "bins": [f"== {constant:g}", f"!= {constant:g}"]}
    else:
        base_counts = np.asarray(histogram["counts"], dtype="float64")
        expected = base_counts / base_counts.sum()
        # bin i is [edges[i], edges[i+1]); the first bin also takes everything below, the last everything above.
        below = np.searchsorted(ordered, edges[1:-1], side="left")
        actual = np.diff(np.concatenate(([0], below, [count]))) / count
        result["bins"] = [[float(lo), float(hi)] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    statistic, pvalue = ks_test(ordered, baseline_cdf(baseline_feature))
    result |= {
        "expected_shares": [float(v) for v in expected],
        "actual_shares": [float(v) for v in actual],
        "psi": _num(psi(expected, actual)),
        "statistic": _num(statistic),
        "pvalue": _num(pvalue),
    }
    return result


def categorical_drift(baseline_feature: Mapping[str, Any], values: Any, name: str = "values") -> dict[str, Any]:
    """PSI over the baseline categories plus ``__other__``, chi-square test, new categories, missing-rate change.

    Values are compared as strings, as the trainer keys them (``True``, ``3``, ``red``).

    :param baseline_feature: the feature's categorical baseline summary (``frequencies``, ``missing_rate``).
    :param values: the batch's values (Series, array or list); None and NaN count as missing.
    :param name: the column name used in errors.
    """
    series = _series(values, name)
    counts = series.value_counts(dropna=True, sort=False)
    counts = counts[counts.to_numpy() > 0]
    counts.index = counts.index.astype(str)
    if not counts.index.is_unique:
        counts = counts.groupby(level=0, sort=False).sum()
    total = int(counts.sum())
    result: dict[str, Any] = {
        "kind": baseline_feature.get("kind", "categorical"),
        "count": total,
        **_missing(baseline_feature, 1.0 - total / len(series)),
    }
    frequencies = dict(baseline_feature.get("frequencies") or {})
    result |= {
        "categories": None,
        "expected_shares": None,
        "actual_shares": None,
        "new_categories": {},
        "new_category_share": None,
        "psi": None,
        "test": "chi2",
        "statistic": None,
        "pvalue": None,
    }
    if not frequencies or not total:
        return result
    categories = [key for key in frequencies if key != OTHER]
    expected = np.array([frequencies[key] for key in categories] + [frequencies.get(OTHER, 0.0)], dtype="float64")
    known = counts.reindex(categories, fill_value=0).to_numpy(dtype="int64")
    observed = np.append(known, total - known.sum())
    actual = observed / total
    new = counts[~counts.index.isin(categories)]
    new = new[new.index != OTHER].sort_values(ascending=False)
    statistic, pvalue = chisquare(observed, expected)
    result |= {
        "categories": categories + [OTHER],
        "expected_shares": [float(v) for v in expected],
        "actual_shares": [float(v) for v in actual],
        "new_categories": {str(k): float(v / total) for k, v in new.iloc[:NEW_CATEGORIES_LISTED].items()},
        "new_category_share": float(new.sum() / total),
        "psi": _num(psi(expected, actual)),
        "statistic": statistic,
        "pvalue": pvalue,
    }
    return result


def _datetime_drift(baseline_feature: Mapping[str, Any], values: Any, name: str) -> dict[str, Any]:
    """Missing-rate change and the share of values outside the training range of a datetime feature.

    :param baseline_feature: the feature's datetime baseline summary (``min``, ``max`` as ISO text).
    :param values: the batch's values.
    :param name: the column name used in errors.
    """
    series = _series(values, name)
    parsed = pd.to_datetime(series, errors="coerce")
    present = parsed.dropna()
    result: dict[str, Any] = {
        "kind": "datetime",
        "count": int(len(present)),
        **_missing(baseline_feature, 1.0 - len(present) / len(series)),
        "out_of_range_share": None,
        "psi": None,
        "test": None,
        "statistic": None,
        "pvalue": None,
    }
    low, high = baseline_feature.get("min"), baseline_feature.get("max")
    if len(present) and low and high:
        try:
            outside = (present < pd.Timestamp(low)) | (present > pd.Timestamp(high))
            result["out_of_range_share"] = float(outside.mean())
        except TypeError:  # time-zone aware against naive: not comparable
            pass
    return result


def _thresholds(thresholds: Mapping[str, float] | None) -> dict[str, float]:
    """The default thresholds updated with the given ones; unknown names are refused.

    :param thresholds: overrides, or None.
    """
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in (thresholds or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise DriftInputError(f"unknown drift threshold {key!r}: known are {', '.join(DEFAULT_THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise DriftInputError(f"drift threshold {key!r} must be a non-negative number, got {value!r}")
        merged[key] = float(value)
    return merged


def _decide(result: dict[str, Any], thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Add ``drifted`` and its ``reasons`` to one feature's result, by the module's drift rule.

    :param result: a result of :func:`numeric_drift`, :func:`categorical_drift` or the datetime check.
    :param thresholds: the complete thresholds.
    """
    reasons = []
    value, pvalue, change = result.get("psi"), result.get("pvalue"), result.get("missing_rate_change")
    if value is not None and value > thresholds["psi"]:
        reasons.append(f"psi {value:.3f} > {thresholds['psi']:g}")
    elif (
        value is not None and pvalue is not None and pvalue < thresholds["ks_pvalue"] and value > thresholds["psi"] / 2
    ):
        reasons.append(
            f"{result['test']} p-value {pvalue:.2g} < {thresholds['ks_pvalue']:g} "
            f"and psi {value:.3f} > {thresholds['psi'] / 2:g}"
        )
    if change is not None and abs(change) > thresholds["missing_rate"]:
        reasons.append(f"missing rate {result['baseline_missing_rate']:.3f} -> {result['missing_rate']:.3f}")
    return result | {"drifted": bool(reasons), "reasons": reasons}


def prediction_drift(baseline_label_distribution: Mapping[str, Any], predictions: Any) -> dict[str, Any]:
    """Drift of the model's outputs: PSI and chi-square over predicted classes, or numeric drift for regression.

    :param baseline_label_distribution: the reference share of each class (``baseline["predictions"]``, or
        ``baseline["label_distribution"]``), or for a regressor a numeric summary (``baseline["predictions"]``,
        or the label's, ``baseline["label"]``).
    :param predictions: the predicted class or value of each row of the batch.
    """
    if baseline_label_distribution.get("kind") == "numeric":
        return numeric_drift(baseline_label_distribution, predictions, "prediction") | {"problem": "regression"}
    shares = {str(k): float(v) for k, v in baseline_label_distribution.items()}
    pseudo = {"kind": "class", "missing_rate": 0.0, "frequencies": shares | {OTHER: 0.0}}
    return categorical_drift(pseudo, predictions, "prediction") | {"problem": "classification"}


# -------------------------------------------------------------------------------------- reports


def _check_columns(frame: pd.DataFrame, names: list[str], ignore: set[str]) -> None:
    """Refuse a batch without rows, without some feature columns, or with duplicated feature columns.

    :param frame: the batch.
    :param names: the feature names it must hold.
    :param ignore: other columns a batch may hold (label, id) that are not "unexpected".
    """
    if not isinstance(frame, pd.DataFrame):
        raise DriftInputError(f"batch must be a pandas DataFrame, got {type(frame).__name__}")
    columns = [str(c) for c in frame.columns]
    missing = [n for n in names if n not in columns]
    if missing:
        unexpected = [c for c in columns if c not in names and c not in ignore]
        if unexpected:
            raise DriftInputError(
                f"batch columns do not match the model's features (renamed?): missing {missing}, unexpected "
                f"{unexpected}; every feature the model was trained on must be present under its name"
            )
        raise DriftInputError(
            f"batch lacks feature column(s) {missing}: every feature the model was trained on must be present"
        )
    duplicated = sorted({c for c in columns if columns.count(c) > 1 and c in names})
    if duplicated:
        raise DriftInputError(f"batch has duplicated feature column(s) {duplicated}: each must appear once")
    if not len(frame):
        raise DriftInputError("batch has no rows: there is nothing to compare with the baseline")


def _summarise(
    features: dict[str, dict[str, Any]], prediction: dict[str, Any] | None, rows: int, thresholds: Mapping[str, float]
) -> dict[str, Any]:
    """The report's top level: drifted features, their share, the verdict.

    :param features: per-feature results with ``drifted``.
    :param prediction: the prediction result with ``drifted``, or None.
    :param rows: the batch's rows.
    :param thresholds: the complete thresholds.
    """
    drifted = [name for name, result in features.items() if result["drifted"]]
    return {
        "rows": rows,
        "features": features,
        "prediction": prediction,
        "drifted_features": drifted,
        "drift_share": len(drifted) / len(features) if features else 0.0,
        "drifted": bool(drifted) or bool(prediction and prediction["drifted"]),
        "thresholds": dict(thresholds),
        "rule": RULE.format(half_psi=thresholds["psi"] / 2, **thresholds),
    }


def drift_report(
    metadata: ModelMetadata, frame: pd.DataFrame, predictions: Any = None, thresholds: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Compare a batch of a tabular model's features (and its predictions) with the model's training baseline.

    Every feature of ``metadata.features`` is checked by its baseline kind; other columns of the
    batch (label, id, scores) are ignored. See the module docstring for the drift rule.

    :param metadata: the model's metadata (``features``, ``baseline``, ``label``, ``id_column``).
    :param frame: the batch, one column per feature.
    :param predictions: the model's prediction for each row (classes or values), or None to skip.
    :param thresholds: overrides of :data:`DEFAULT_THRESHOLDS` (``psi``, ``ks_pvalue``, ``missing_rate``).
    """
    limits = _thresholds(thresholds)
    baseline = metadata.baseline
    if not isinstance(baseline, Mapping) or not isinstance(baseline.get("features"), Mapping):
        raise DriftInputError(
            "metadata: no training 'baseline' with per-feature statistics; retrain the model "
            "with a trainer that writes one"
        )
    names = metadata.feature_names
    if not names:
        raise DriftInputError("metadata: 'features' must list the model's features")
    _check_columns(frame, names, {str(metadata.label), str(metadata.id_column)})
    columns = {str(c): c for c in frame.columns}
    features: dict[str, dict[str, Any]] = {}
    for name in names:
        summary = baseline["features"].get(name)
        if summary is None:
            raise DriftInputError(f"metadata: the baseline has no statistics for feature {name!r}")
        kind = summary.get("kind")
        values = frame[columns[name]]
        if kind == "numeric":
            result = numeric_drift(summary, values, name)
        elif kind == "datetime":
            result = _datetime_drift(summary, values, name)
        else:
            result = categorical_drift(summary, values, name)
        features[name] = _decide(result, limits)
    prediction = None
    if predictions is not None:
        key, reference = _prediction_reference(baseline)
        if reference:
            prediction = _decide(prediction_drift(reference, predictions), limits) | {"reference": key}
    return _summarise(features, prediction, int(len(frame)), limits)


def _prediction_reference(baseline: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any] | None]:
    """What live predictions are compared with: the model's validation predictions when the trainer
    stored them (``predictions``), else the training label's distribution (``label_distribution``, or
    ``label`` for a regressor).

    :param baseline: the model's ``metadata.baseline``.
    """
    for key in ("predictions", "label_distribution", "label"):
        if baseline.get(key):
            return key, baseline[key]
    return None, None


def image_drift(
    baseline: ModelMetadata | Mapping[str, Any],
    stats_frame: pd.DataFrame,
    predictions: Any = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Compare per-image statistics of a batch with an image model's training baseline.

    ``width``, ``height`` and ``brightness`` (mean luma in [0, 1]) are checked with
    :func:`numeric_drift` against the baseline's summaries of them. ``mean_<channel>`` columns (mean
    pixel intensity of the image in [0, 1], e.g. ``mean_red``) are compared with the baseline's
    pixel mean: the shift, in baseline pixel standard deviations, is ``mean_shift_std``.

    :param baseline: the resnet trainer's baseline (``metadata.baseline``), or the model's whole metadata.
    :param stats_frame: one row per image: ``width``, ``height``, ``brightness``, ``mean_<channel>`` per channel.
    :param predictions: the predicted class of each image, or None to skip.
    :param thresholds: overrides of :data:`DEFAULT_THRESHOLDS` (``channel_shift`` for channel means).
    """
    limits = _thresholds(thresholds)
    if isinstance(baseline, ModelMetadata):
        baseline = dict(baseline.baseline or {})
    if baseline.get("kind") != "image":
        raise DriftInputError("image baseline: expected the resnet trainer's baseline (kind 'image')")
    pixel = baseline.get("pixel") or {}
    channels = list(pixel.get("channels") or [])
    required = list(IMAGE_STATS) + [f"mean_{c}" for c in channels]
    _check_columns(stats_frame, required, set())
    rows = int(len(stats_frame))
    columns = {str(c): c for c in stats_frame.columns}
    features: dict[str, dict[str, Any]] = {}
    for stat in IMAGE_STATS:
        features[stat] = _decide(numeric_drift(baseline[stat], stats_frame[columns[stat]], stat), limits)
    for index, channel in enumerate(channels):
        name = f"mean_{channel}"
        raw = _as_numeric(stats_frame[columns[name]], name)
        present = raw[np.isfinite(raw)]
        base_mean, base_std = _num(pixel["mean"][index]), _num(pixel["std"][index])
        mean = _num(present.mean()) if len(present) else None
        shift = _num((mean - base_mean) / base_std) if mean is not None and base_mean is not None and base_std else None
        moved = shift is not None and abs(shift) > limits["channel_shift"]
        features[name] = {
            "kind": "channel_mean",
            "count": int(len(present)),
            "mean": mean,
            "baseline_mean": base_mean,
            "baseline_std": base_std,
            "mean_shift_std": shift,
            "psi": None,
            "test": None,
            "statistic": None,
            "pvalue": None,
            "drifted": moved,
            "reasons": [f"channel mean moved {shift:+.2f} pixel std (limit {limits['channel_shift']:g})"]
            if moved
            else [],
        }
    prediction = None
    key, reference = _prediction_reference(baseline)
    if predictions is not None and reference:
        prediction = _decide(prediction_drift(reference, predictions), limits) | {"reference": key}
    return _summarise(features, prediction, rows, limits)
