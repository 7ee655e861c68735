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

This module imports numpy, pandas and scipy at the top: import it inside a task, not a DAG file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from conveyor.errors import ConveyorError
from conveyor.model.metadata import OTHER, QUANTILES, ModelMetadata

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
MIN_EXPECTED = 5.0
EXACT_KS_ROWS = 10_000  # above: the asymptotic KS p-value (scipy's exact one takes seconds at 1M rows)
NEW_CATEGORIES_LISTED = 20
IMAGE_STATS = ("width", "height", "brightness")
RULE = (
    "drifted when psi > {psi}, or test p-value < {ks_pvalue} and psi > {half_psi}, "
    "or |missing-rate change| > {missing_rate}"
)


class DriftInputError(ConveyorError, ValueError):
    """A batch, its predictions or a baseline the drift check cannot use; names the column and the rule."""


# ------------------------------------------------------------------------------------- helpers


def _num(value: Any) -> float | None:
    """A JSON-safe float: None for None, NaN or infinity.

    :param value: a number or None.
    """
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


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


def psi(
    expected_shares: Sequence[float] | np.ndarray, actual_shares: Sequence[float] | np.ndarray, eps: float = 1e-4
) -> float:
    """Population stability index ``sum((a - e) * ln(a / e))`` over aligned bins or categories.

    Shares below ``eps`` are raised to ``eps`` so an empty bin costs a large but finite amount.

    :param expected_shares: the baseline's share of each bin (sums to 1).
    :param actual_shares: the batch's share of the same bins, in the same order.
    :param eps: the floor applied to every share before the logarithm.
    """
    expected = np.asarray(expected_shares, dtype="float64")
    actual = np.asarray(actual_shares, dtype="float64")
    if expected.ndim != 1 or expected.shape != actual.shape or not len(expected):
        raise ValueError(
            f"psi: expected and actual shares must be two non-empty lists of the same length, "
            f"got shapes {expected.shape} and {actual.shape}"
        )
    if not (np.isfinite(expected).all() and np.isfinite(actual).all()) or (expected < 0).any() or (actual < 0).any():
        raise ValueError("psi: shares must be finite and non-negative")
    expected = np.maximum(expected, eps)
    actual = np.maximum(actual, eps)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class BaselineCDF:
    """A piecewise-linear CDF through points ``(xs[i], levels[i])``: 0 below ``xs[0]``, 1 above ``xs[-1]``.

    It is continuous except where ``levels[0] > 0``: a jump at ``xs[0]`` (a point mass at the minimum).
    """

    def __init__(self, xs: np.ndarray, levels: np.ndarray):
        self.xs = xs
        self.levels = levels

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """F(x) = P(X <= x) at each value."""
        return np.interp(values, self.xs, self.levels, left=0.0, right=1.0)

    def left_limit(self, values: np.ndarray, right: np.ndarray | None = None) -> np.ndarray:
        """F(x-) = P(X < x) at each value; ``right`` is F(x) when already computed."""
        right = self(values) if right is None else right
        return np.where(values <= self.xs[0], 0.0, right) if self.levels[0] > 0 else right


def baseline_cdf(baseline_feature: Mapping[str, Any]) -> BaselineCDF:
    """The training CDF rebuilt from a numeric summary, piecewise linear between its known points.

    The points are ``(min, 0)``, ``(p01, 0.01)`` .. ``(p99, 0.99)``, ``(max, 1)`` and, from the
    decile histogram, each inner edge with the share of training values below it (the deciles
    p10..p90 when all 11 edges are distinct), which makes the curve four to five times closer to
    the true CDF than the seven quantiles alone. Where several points share an x (a point mass),
    the CDF takes the highest level there.

    :param baseline_feature: a numeric baseline summary (``min``, ``max``, ``quantiles``, ``histogram``).
    """
    quantiles = baseline_feature.get("quantiles") or {}
    points = [(float(baseline_feature["min"]), 0.0), (float(baseline_feature["max"]), 1.0)]
    points += [(float(quantiles[key]), level) for key, level in QUANTILES.items() if quantiles.get(key) is not None]
    histogram = baseline_feature.get("histogram")
    if histogram and len(histogram["edges"]) > 2:
        counts = np.asarray(histogram["counts"], dtype="float64")
        below = np.cumsum(counts)[:-1] / counts.sum()
        points += list(zip(map(float, histogram["edges"][1:-1]), map(float, below), strict=True))
    points.sort()
    xs = np.array([p[0] for p in points], dtype="float64")
    levels = np.maximum.accumulate(np.array([p[1] for p in points], dtype="float64"))
    last_of_run = np.append(xs[1:] != xs[:-1], True)
    return BaselineCDF(xs[last_of_run], levels[last_of_run])


def ks_test(ordered: np.ndarray, cdf: BaselineCDF | Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
    """Two-sided one-sample Kolmogorov-Smirnov statistic and p-value of sorted values against a CDF.

    The computation of ``scipy.stats.kstest(values, cdf)`` (``D+ = max(i/n - F(x_i))``,
    ``D- = max(F(x_i-) - (i-1)/n)``) with two differences. The CDF's left limit is used in ``D-``:
    kstest assumes a continuous CDF and reports ``D = 1`` for an unchanged batch of a feature
    with a point mass at its training minimum (a constant, zero-inflated counts). The p-value is
    kstest's exact one (``scipy.stats.kstwo.sf(D, n)``) up to ``EXACT_KS_ROWS`` values and the
    asymptotic one (``kstest(..., method="asymp")``, ``kstwobign.sf(D * sqrt(n))``) above, where
    the exact one can take seconds (3 s at 1,000,000 rows) for a difference below 1% relative.
    Where the CDF is continuous, the numbers are kstest's with ``method="exact"`` up to
    ``EXACT_KS_ROWS`` values and ``method="asymp"`` above. Takes sorted values so a caller that
    already sorted does not sort again.

    :param ordered: the batch's non-missing values, sorted ascending.
    :param cdf: a CDF from :func:`baseline_cdf` (a plain callable is taken as continuous).
    """
    n = len(ordered)
    right = cdf(ordered)
    left = cdf.left_limit(ordered, right) if isinstance(cdf, BaselineCDF) else right
    steps = np.arange(n, dtype="float64")
    d_plus = float(np.max((steps + 1.0) / n - right))
    d_minus = float(np.max(left - steps / n))
    statistic = max(d_plus, d_minus, 0.0)
    pvalue = stats.kstwo.sf(statistic, n) if n <= EXACT_KS_ROWS else stats.kstwobign.sf(statistic * math.sqrt(n))
    return statistic, float(np.clip(pvalue, 0.0, 1.0))


def _chisquare(observed: np.ndarray, expected_shares: np.ndarray) -> tuple[float | None, float | None]:
    """Chi-square goodness of fit of counts against shares; cells expecting < 5 rows are pooled.

    The pooled cell stays a cell of its own when it expects 5 rows or more, otherwise it joins the
    smallest remaining cell. Fewer than two cells left: no test (None, None).

    :param observed: the batch's count per cell.
    :param expected_shares: the baseline's share per cell.
    """
    observed = observed.astype("float64")
    total = observed.sum()
    if total <= 0 or expected_shares.sum() <= 0:
        return None, None
    expected = expected_shares / expected_shares.sum() * total
    small = expected < MIN_EXPECTED
    if small.any():
        pooled_observed, pooled_expected = observed[small].sum(), expected[small].sum()
        observed, expected = observed[~small], expected[~small]
        if pooled_expected >= MIN_EXPECTED or not len(expected):
            observed, expected = np.append(observed, pooled_observed), np.append(expected, pooled_expected)
        else:
            smallest = int(np.argmin(expected))
            observed[smallest] += pooled_observed
            expected[smallest] += pooled_expected
    if len(expected) < 2:
        return None, None
    result = stats.chisquare(observed, expected)
    return _num(result.statistic), _num(result.pvalue)


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
    statistic, pvalue = _chisquare(observed, expected)
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
