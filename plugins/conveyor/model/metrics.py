"""Model metrics: what the gate decides on and the registry stores (plain, JSON-serialisable numbers).

Importing this module is cheap: numpy and scikit-learn are imported by the functions that use them,
so the gate can read ``HIGHER_IS_BETTER`` wherever it runs.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike

PROBLEM_TYPES = ("binary", "multiclass", "regression", "image_classification")

# Every scalar metric compute_metrics can return, and which way is better (for the gate).
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "balanced_accuracy": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "roc_auc": True,
    "pr_auc": True,
    "mcc": True,
    "log_loss": False,
    "f1_macro": True,
    "f1_weighted": True,
    "precision_macro": True,
    "precision_weighted": True,
    "recall_macro": True,
    "recall_weighted": True,
    "top_3_accuracy": True,
    "top_5_accuracy": True,
    "rmse": False,
    "mae": False,
    "r2": True,
    "mape": False,
}
_MULTICLASS = ("accuracy", "balanced_accuracy", "log_loss") + tuple(
    f"{name}_{mean}" for name in ("f1", "precision", "recall") for mean in ("macro", "weighted")
)
# The scalar metrics compute_metrics returns per problem type (given probabilities; top-k accuracy
# needs 3 / 6 classes): the gate and monitor metrics a spec may name (checked at parse time).
METRICS_BY_PROBLEM_TYPE: dict[str, frozenset[str]] = {
    "binary": frozenset(
        ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "mcc", "roc_auc", "pr_auc", "log_loss")
    ),
    "multiclass": frozenset(_MULTICLASS),
    "image_classification": frozenset((*_MULTICLASS, "top_3_accuracy", "top_5_accuracy")),
    "regression": frozenset(("rmse", "mae", "r2", "mape")),
}
# Top-level integer counts in the metrics that are not metrics (never gated on).
COUNT_KEYS = frozenset({"n", "mape_ignored_rows"})

_TOP_K = ((3, 3), (5, 6))  # (k, the fewest classes for which top-k accuracy is reported)
_PROBA_METRICS = {
    "binary": "roc_auc, pr_auc and log_loss",
    "multiclass": "log_loss",
    "image_classification": "log_loss and top-k accuracy",
}


def compute_metrics(
    problem_type: str,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    proba: Any = None,
    class_labels: Sequence[Any] | None = None,
    positive_class: Any = None,
) -> dict[str, Any]:
    """Metrics of predictions against the truth, as plain JSON-serialisable values.

    Metrics that cannot be computed (no probabilities, one class in the test set, a constant
    target) are left out and explained in ``metrics["notes"]``. Class labels become strings.

    :param problem_type: ``binary``, ``multiclass``, ``regression`` or ``image_classification``.
    :param y_true: the test set's true targets, one per row (list, array or Series).
    :param y_pred: the model's predictions for the same rows, in the same order.
    :param proba: a DataFrame with a column per class, an array in ``class_labels`` order, or (binary) P(positive).
    :param class_labels: every class the model knows, in its order; defaults to proba's columns, then the labels seen.
    :param positive_class: the binary positive class; defaults to the second of the sorted class labels.
    :raises ValueError: on an unknown problem type, empty, misaligned or missing inputs, or unfit probabilities.
    """
    check_problem_type(problem_type)
    truth, pred = vectors(y_true, y_pred)
    if problem_type == "regression":
        return _regression_metrics(truth, pred)
    classes = classes_of(problem_type, truth, pred, proba, class_labels, positive_class)
    return _classification_metrics(problem_type, classes)


# ---------------------------------------------------------------------------------------- inputs


class Classes(NamedTuple):
    """Classification inputs as integer codes into ``labels``, with aligned probabilities."""

    truth: np.ndarray
    pred: np.ndarray
    labels: list[str]
    positive: str | None
    proba: np.ndarray | None
    note: str | None


def check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}: expected one of {', '.join(PROBLEM_TYPES)}")


def vectors(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np
    import pandas as pd

    truth, pred = np.asarray(y_true), np.asarray(y_pred)
    for name, values in (("y_true", truth), ("y_pred", pred)):
        if values.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}")
    if len(truth) != len(pred):
        raise ValueError(f"length mismatch: y_true has {len(truth)} rows but y_pred has {len(pred)}")
    if len(truth) == 0:
        raise ValueError("y_true and y_pred are empty: there is nothing to evaluate")
    for name, values in (("y_true", truth), ("y_pred", pred)):
        missing = int(pd.isna(values).sum())
        if missing:
            raise ValueError(f"{name} has {missing} missing value(s) of {len(values)}")
    return truth, pred


def _label(value: Any) -> str:
    """A class label as text; a whole float reads as the integer it is (1.0 -> "1")."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
        return str(int(value))  # type: ignore[call-overload]  # a whole Real: int() is exact
    return str(value)


def _sort_key(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text in text order."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def classes_of(
    problem_type: str, truth: np.ndarray, pred: np.ndarray, proba: Any, class_labels: Any, positive_class: Any
) -> Classes:
    import numpy as np
    import pandas as pd

    truth_s = [_label(v) for v in truth]
    pred_s = [_label(v) for v in pred]
    declared = [_label(v) for v in class_labels] if class_labels is not None else []
    columns = [_label(c) for c in proba.columns] if isinstance(proba, pd.DataFrame) else []
    seen = sorted(set(truth_s) | set(pred_s), key=_sort_key)
    labels = list(dict.fromkeys(declared + columns + seen))

    positive = None
    if problem_type == "binary":
        if len(labels) > 2:
            raise ValueError(f"a binary problem has at most 2 classes, found {len(labels)}: {labels}")
        positive = _label(positive_class) if positive_class is not None else sorted(labels, key=_sort_key)[-1]
        if positive not in labels:
            raise ValueError(f"positive_class {positive!r} is not one of the class labels {labels}")

    matrix, note = _proba_matrix(proba, labels, declared, positive, len(truth))
    index = {label: i for i, label in enumerate(labels)}
    truth_codes = np.array([index[v] for v in truth_s], dtype=np.int64)
    pred_codes = np.array([index[v] for v in pred_s], dtype=np.int64)
    return Classes(truth_codes, pred_codes, labels, positive, matrix, note)


def _proba_matrix(
    proba: Any, labels: list[str], declared: list[str], positive: str | None, n_rows: int
) -> tuple[np.ndarray | None, str | None]:
    """Probabilities as an (n_rows, len(labels)) array in ``labels`` order, or None and why."""
    import numpy as np
    import pandas as pd

    if proba is None:
        return None, "no class probabilities were given"
    if isinstance(proba, pd.DataFrame):
        columns, values = [_label(c) for c in proba.columns], proba.to_numpy(dtype=float)
    else:
        values = np.asarray(proba, dtype=float)
        if values.ndim == 1:
            if positive is None or len(labels) != 2:
                raise ValueError("a 1-D proba is P(positive class): only for a binary problem with 2 labels")
            columns, values = [positive, *(set(labels) - {positive})], np.column_stack([values, 1 - values])
        elif not declared:
            raise ValueError("proba is an array: pass class_labels to name its columns (or pass a DataFrame)")
        else:
            columns = declared
    if values.ndim != 2 or values.shape[0] != n_rows or values.shape[1] != len(columns):
        raise ValueError(
            f"proba has shape {values.shape}, expected ({n_rows}, {len(columns)}): "
            f"a row per prediction, a column per class {columns}"
        )
    if np.isnan(values).any() or values.min() < 0 or values.max() > 1:
        raise ValueError("proba must hold probabilities in [0, 1] with no missing values")
    missing = [label for label in labels if label not in columns]
    if missing:
        return None, f"proba has no column for class(es) {missing} seen in y_true or y_pred"
    return values[:, [columns.index(label) for label in labels]], None


# --------------------------------------------------------------------------------------- metrics


def _put(metrics: dict[str, Any], name: str, value: float) -> None:
    """Store a metric as a float, or explain in the notes why a non-finite one was left out."""
    value = float(value)
    if math.isfinite(value):
        metrics[name] = value
    else:
        metrics["notes"].append(f"{name} is not finite ({value}) and was left out")


def _regression_metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    import numpy as np

    try:
        actual, predicted = truth.astype(float), pred.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"regression needs numeric y_true and y_pred: {exc}") from exc
    error = predicted - actual
    metrics: dict[str, Any] = {"problem_type": "regression", "n": len(actual), "notes": []}
    _put(metrics, "rmse", np.sqrt(np.mean(error**2)))
    _put(metrics, "mae", np.mean(np.abs(error)))
    spread = np.sum((actual - actual.mean()) ** 2)
    if spread > 0:
        _put(metrics, "r2", 1 - np.sum(error**2) / spread)
    else:
        metrics["notes"].append("r2 is undefined: y_true is constant (or a single row)")
    nonzero = actual != 0
    metrics["mape_ignored_rows"] = int((~nonzero).sum())
    if metrics["mape_ignored_rows"]:
        metrics["notes"].append(f"mape ignores {metrics['mape_ignored_rows']} row(s) where y_true is 0")
    if nonzero.any():
        _put(metrics, "mape", np.mean(np.abs(error[nonzero]) / np.abs(actual[nonzero])))
    else:
        metrics["notes"].append("mape is undefined: every y_true is 0")
    return metrics


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.divide(top, bottom, out=np.zeros(len(top)), where=bottom > 0)


def _mcc(cm: np.ndarray) -> float:
    """Matthews correlation coefficient from a confusion matrix (0 when undefined, as sklearn)."""
    true, pred = cm.sum(axis=1).astype(float), cm.sum(axis=0).astype(float)
    correct, total = float(cm.trace()), float(cm.sum())
    denominator = math.sqrt((total**2 - true @ true) * (total**2 - pred @ pred))
    return (correct * total - true @ pred) / denominator if denominator else 0.0


def _classification_metrics(problem_type: str, c: Classes) -> dict[str, Any]:
    import numpy as np

    n, k = len(c.truth), len(c.labels)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (c.truth, c.pred), 1)
    support, hits = cm.sum(axis=1), np.diag(cm)
    precision, recall = _ratio(hits, cm.sum(axis=0)), _ratio(hits, support)
    f1 = _ratio(2 * hits, support + cm.sum(axis=0))

    metrics: dict[str, Any] = {"problem_type": problem_type, "n": n, "labels": c.labels, "notes": []}
    _put(metrics, "accuracy", hits.sum() / n)
    _put(metrics, "balanced_accuracy", recall[support > 0].mean())
    if c.note:
        metrics["notes"].append(f"{c.note}: {_PROBA_METRICS[problem_type]} left out")

    if problem_type == "binary":
        assert c.positive is not None  # classes_of always picks the positive class of a binary problem
        i = c.labels.index(c.positive)
        metrics["positive_class"] = c.positive
        for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            _put(metrics, name, values[i])
        _put(metrics, "mcc", _mcc(cm))
        _binary_proba_metrics(metrics, c, support)
        metrics["support"] = {label: int(s) for label, s in zip(c.labels, support, strict=True)}
    else:
        for name, values in (("f1", f1), ("precision", precision), ("recall", recall)):
            _put(metrics, f"{name}_macro", values.mean())
            _put(metrics, f"{name}_weighted", np.average(values, weights=support))
        if c.proba is not None:
            _put(metrics, "log_loss", _log_loss(c))
            if problem_type == "image_classification":
                ranked = np.argsort(-c.proba, axis=1, kind="stable")
                for top, fewest in _TOP_K:
                    if k >= fewest:
                        _put(metrics, f"top_{top}_accuracy", (ranked[:, :top] == c.truth[:, None]).any(axis=1).mean())
        metrics["per_class"] = {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(c.labels, precision, recall, f1, support, strict=True)
        }
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


def _binary_proba_metrics(metrics: dict[str, Any], c: Classes, support: np.ndarray) -> None:
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    if c.proba is None or c.positive is None:
        return
    present = [label for label, s in zip(c.labels, support, strict=True) if s]
    if len(present) < 2:
        only = present[0]
        metrics["notes"].append(f"the test set holds only class {only!r}: roc_auc and pr_auc are undefined, left out")
    else:
        column = c.labels.index(c.positive)
        is_positive, score = c.truth == column, np.asarray(c.proba)[:, column]
        _put(metrics, "roc_auc", roc_auc_score(is_positive, score))
        _put(metrics, "pr_auc", average_precision_score(is_positive, score))
    _put(metrics, "log_loss", _log_loss(c))


def _log_loss(c: Classes) -> float:
    """Mean negative log-probability of the true class (clipped as sklearn's ``log_loss``)."""
    import numpy as np

    eps = np.finfo(float).eps
    proba = np.asarray(c.proba)
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(c.truth)), c.truth], eps, 1 - eps))))
