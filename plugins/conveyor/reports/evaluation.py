"""Evaluation of a model on its held-out test set: metrics, plots and a report a person reads.

``compute_metrics`` returns plain, JSON-serialisable numbers for the gate and the registry;
``write_evaluation_report`` writes them, with PNG plots and a readable ``index.html``, into a folder.
Importing this module is cheap: numpy, pandas, scikit-learn, matplotlib and jinja2 are imported by
the functions that use them, so a gate can read ``HIGHER_IS_BETTER`` wherever it is defined.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
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
# Top-level integer counts in the metrics that are not metrics (never gated on).
COUNT_KEYS = frozenset({"n", "mape_ignored_rows"})

_TOP_K = ((3, 3), (5, 6))  # (k, the fewest classes for which top-k accuracy is reported)
_PROBA_METRICS = {
    "binary": "roc_auc, pr_auc and log_loss",
    "multiclass": "log_loss",
    "image_classification": "log_loss and top-k accuracy",
}
_PLOTS = ("confusion_matrix", "roc_curve", "pr_curve", "residuals", "predicted_vs_actual", "feature_importance")
_MAX_POINTS = 5000  # scatter plots draw a fixed sample of at most this many rows
_MAX_ANNOTATED_CLASSES = 30


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
    _check_problem_type(problem_type)
    truth, pred = _vectors(y_true, y_pred)
    if problem_type == "regression":
        return _regression_metrics(truth, pred)
    classes = _classes(problem_type, truth, pred, proba, class_labels, positive_class)
    return _classification_metrics(problem_type, classes)


def write_evaluation_report(
    out_dir: Path,
    metrics: dict[str, Any],
    problem_type: str,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    proba: Any = None,
    class_labels: Sequence[Any] | None = None,
    positive_class: Any = None,
    feature_importance: dict[str, float] | None = None,
    title: str = "Evaluation",
    context: dict[str, Any] | None = None,
    extra_sections: list[tuple[str, str]] | None = None,
) -> dict[str, str]:
    """Write ``metrics.json``, PNG plots and ``index.html`` into a folder; same inputs, same files.

    :param out_dir: the report folder (created; files of an earlier run are replaced).
    :param metrics: what ``compute_metrics`` returned for these inputs.
    :param problem_type: the problem type the metrics were computed for.
    :param y_true: the test set's true targets.
    :param y_pred: the model's predictions for the same rows.
    :param proba: the class probabilities, as given to ``compute_metrics``.
    :param class_labels: the class labels, as given to ``compute_metrics``.
    :param positive_class: the binary positive class, as given to ``compute_metrics``.
    :param feature_importance: importance per feature (non-finite values are left out), or None.
    :param title: the page's heading (escaped).
    :param context: facts shown above the metrics, e.g. model, version, dataset version, run id.
    :param extra_sections: (heading, already-safe HTML) sections appended to the page.
    :returns: ``{"html": path, "metrics": path, <plot name>: path, ...}`` as strings.
    :raises ValueError: as ``compute_metrics`` does for the same inputs.
    """
    _check_problem_type(problem_type)
    truth, pred = _vectors(y_true, y_pred)  # bad input fails here, before anything is written
    classes = None
    if problem_type != "regression":
        classes = _classes(problem_type, truth, pred, proba, class_labels, positive_class)
    importance = {str(k): float(v) for k, v in (feature_importance or {}).items() if math.isfinite(float(v))}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(out, metrics, truth, pred, classes, importance)
    for stale in set(_PLOTS) - set(plots):
        (out / f"{stale}.png").unlink(missing_ok=True)

    document = {**metrics, "context": context or {}}
    if importance:
        document["feature_importance"] = importance
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")

    html_path = out / "index.html"
    page = _render_html(title, problem_type, metrics, context or {}, plots, importance, extra_sections or [])
    html_path.write_text(page, encoding="utf-8")
    return {"html": str(html_path), "metrics": str(metrics_path), **{name: str(path) for name, path in plots.items()}}


# ---------------------------------------------------------------------------------------- inputs


class _Classes(NamedTuple):
    """Classification inputs as integer codes into ``labels``, with aligned probabilities."""

    truth: np.ndarray
    pred: np.ndarray
    labels: list[str]
    positive: str | None
    proba: np.ndarray | None
    note: str | None


def _check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"unknown problem_type {problem_type!r}: expected one of {', '.join(PROBLEM_TYPES)}")


def _vectors(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
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
        return str(int(value))
    return str(value)


def _sort_key(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text in text order."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _classes(
    problem_type: str, truth: np.ndarray, pred: np.ndarray, proba: Any, class_labels: Any, positive_class: Any
) -> _Classes:
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
    return _Classes(truth_codes, pred_codes, labels, positive, matrix, note)


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


def _classification_metrics(problem_type: str, c: _Classes) -> dict[str, Any]:
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
        i = c.labels.index(c.positive)
        metrics["positive_class"] = c.positive
        for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
            _put(metrics, name, values[i])
        _put(metrics, "mcc", _mcc(cm))
        _binary_proba_metrics(metrics, c, support)
        metrics["support"] = {label: int(s) for label, s in zip(c.labels, support)}
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
            for label, p, r, f, s in zip(c.labels, precision, recall, f1, support)
        }
    metrics["confusion_matrix"] = cm.tolist()
    return metrics


def _binary_proba_metrics(metrics: dict[str, Any], c: _Classes, support: np.ndarray) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    if c.proba is None:
        return
    present = [label for label, s in zip(c.labels, support) if s]
    if len(present) < 2:
        only = present[0]
        metrics["notes"].append(f"the test set holds only class {only!r}: roc_auc and pr_auc are undefined, left out")
    else:
        is_positive, score = c.truth == c.labels.index(c.positive), c.proba[:, c.labels.index(c.positive)]
        _put(metrics, "roc_auc", roc_auc_score(is_positive, score))
        _put(metrics, "pr_auc", average_precision_score(is_positive, score))
    _put(metrics, "log_loss", _log_loss(c))


def _log_loss(c: _Classes) -> float:
    """Mean negative log-probability of the true class (clipped as sklearn's ``log_loss``)."""
    import numpy as np

    eps = np.finfo(float).eps
    return float(-np.mean(np.log(np.clip(c.proba[np.arange(len(c.truth)), c.truth], eps, 1 - eps))))


# ----------------------------------------------------------------------------------------- plots


def _plain(text: Any) -> str:
    """Text for matplotlib, with ``$`` escaped so a label never turns into (broken) mathtext."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without pyplot: no display, no global state
    return figure


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


def _write_plots(
    out: Path, metrics: dict[str, Any], truth: np.ndarray, pred: np.ndarray,
    classes: _Classes | None, importance: dict[str, float],
) -> dict[str, Path]:
    """Draw the plots that fit the problem (classes is None for regression); returns name -> path."""
    plots: dict[str, Path] = {}
    if classes is None:
        actual, predicted = truth.astype(float), pred.astype(float)
        plots["residuals"] = _plot_residuals(out / "residuals.png", actual, predicted)
        plots["predicted_vs_actual"] = _plot_predicted_vs_actual(out / "predicted_vs_actual.png", actual, predicted)
    else:
        cm_path = out / "confusion_matrix.png"
        plots["confusion_matrix"] = _plot_confusion(cm_path, metrics["confusion_matrix"], metrics["labels"])
        if classes.positive is not None and classes.proba is not None and len(set(classes.truth.tolist())) == 2:
            i = classes.labels.index(classes.positive)
            is_positive, score = classes.truth == i, classes.proba[:, i]
            plots["roc_curve"] = _plot_roc(out / "roc_curve.png", is_positive, score, metrics.get("roc_auc"))
            plots["pr_curve"] = _plot_pr(out / "pr_curve.png", is_positive, score, metrics.get("pr_auc"))
    if importance:
        plots["feature_importance"] = _plot_importance(out / "feature_importance.png", importance)
    return plots


def _plot_confusion(path: Path, matrix: list[list[int]], labels: list[str]) -> Path:
    import numpy as np

    counts, k = np.asarray(matrix), len(labels)
    size = min(4 + 0.45 * k, 24)
    figure = _figure(size + 1, size)
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=ax, shrink=0.8)
    ticks = [_plain(label) for label in labels]
    ax.set_xticks(range(k), ticks, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (counts)")
    if k <= _MAX_ANNOTATED_CLASSES:
        threshold = counts.max() / 2
        for (row, col), count in np.ndenumerate(counts):
            ax.text(col, row, str(count), ha="center", va="center", color="white" if count > threshold else "black")
    return _save(figure, path)


def _plot_roc(path: Path, is_positive: np.ndarray, score: np.ndarray, auc: float | None) -> Path:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_positive, score)
    figure = _figure(5, 5)
    ax = figure.add_subplot()
    ax.plot(fpr, tpr, label=f"ROC AUC = {auc:.3f}" if auc is not None else "ROC")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _save(figure, path)


def _plot_pr(path: Path, is_positive: np.ndarray, score: np.ndarray, average_precision: float | None) -> Path:
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(is_positive, score)
    figure = _figure(5, 5)
    ax = figure.add_subplot()
    label = f"AP = {average_precision:.3f}" if average_precision is not None else "precision-recall"
    ax.step(recall, precision, where="post", label=label)
    ax.axhline(is_positive.mean(), linestyle="--", color="grey", label="chance (prevalence)")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left")
    return _save(figure, path)


def _sample(n: int) -> Any:
    """Row positions to draw: all of them, or a fixed sample of ``_MAX_POINTS``."""
    import numpy as np

    return slice(None) if n <= _MAX_POINTS else np.sort(np.random.default_rng(0).choice(n, _MAX_POINTS, replace=False))


def _subtitle(n: int) -> str:
    return f" ({_MAX_POINTS:,} of {n:,} rows)" if n > _MAX_POINTS else ""


def _plot_residuals(path: Path, actual: np.ndarray, predicted: np.ndarray) -> Path:
    rows = _sample(len(actual))
    figure = _figure(6, 4.5)
    ax = figure.add_subplot()
    ax.scatter(predicted[rows], (actual - predicted)[rows], s=8, alpha=0.5)
    ax.axhline(0, color="grey", linestyle="--")
    title = "Residuals vs predicted" + _subtitle(len(actual))
    ax.set(xlabel="predicted", ylabel="residual (actual - predicted)", title=title)
    return _save(figure, path)


def _plot_predicted_vs_actual(path: Path, actual: np.ndarray, predicted: np.ndarray) -> Path:
    rows = _sample(len(actual))
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    figure = _figure(5.5, 5.5)
    ax = figure.add_subplot()
    ax.scatter(actual[rows], predicted[rows], s=8, alpha=0.5)
    ax.plot([low, high], [low, high], color="grey", linestyle="--", label="perfect")
    ax.set(xlabel="actual", ylabel="predicted", title="Predicted vs actual" + _subtitle(len(actual)))
    ax.legend(loc="upper left")
    return _save(figure, path)


def _ranked(importance: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(importance.items(), key=lambda item: (-abs(item[1]), item[0]))


def _plot_importance(path: Path, importance: dict[str, float], top: int = 20) -> Path:
    shown = _ranked(importance)[:top][::-1]  # largest at the top
    figure = _figure(7, 1.2 + 0.3 * len(shown))
    ax = figure.add_subplot()
    ax.barh([_plain(name) for name, _ in shown], [value for _, value in shown])
    ax.set(xlabel="importance", title=f"Feature importance (top {len(shown)} of {len(importance)})")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------ html

_CAPTIONS = {
    "confusion_matrix": "Confusion matrix: rows are true classes, columns predicted ones",
    "roc_curve": "ROC curve of the positive class",
    "pr_curve": "Precision-recall curve of the positive class",
    "residuals": "Residuals (actual - predicted) against the prediction",
    "predicted_vs_actual": "Predicted against actual values",
    "feature_importance": "Feature importance (top 20)",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; color: #222; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: .3rem .7rem; text-align: left; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 2rem; }
img { max-width: 100%; border: 1px solid #eee; }
.notes li { color: #8a4b00; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p>Problem type: <strong>{{ problem_type }}</strong>{% if n is not none %}; {{ n }} test rows{% endif %}
{%- if positive_class %}; positive class <strong>{{ positive_class }}</strong>{% endif %}</p>
{% if context %}
<h2>Context</h2>
<table>{% for key, value in context %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
{% endif %}
<h2>Metrics</h2>
<table>
<tr><th>metric</th><th>value</th><th>better</th></tr>
{% for name, value, better in scalars %}
<tr><td>{{ name }}</td><td class="num">{{ value }}</td><td>{{ better }}</td></tr>
{% endfor %}</table>
{% if notes %}
<ul class="notes">
{% for note in notes %}
<li>{{ note }}</li>
{% endfor %}
</ul>
{% endif %}
{% if per_class %}
<h2>Per class</h2>
<table>
<tr><th>class</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr>
{% for label, row in per_class %}<tr><td>{{ label }}</td>
{%- for key in ("precision", "recall", "f1", "support") %}<td class="num">{{ row[key] }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endif %}
{% if plots %}
<h2>Plots</h2>
{% for file, caption in plots %}
<figure><img src="{{ file }}" alt="{{ caption }}"><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}{% endif %}
{% if importance %}
<h2>Feature importance</h2>
<table>
<tr><th>feature</th><th>importance</th></tr>
{% for name, value in importance %}<tr><td>{{ name }}</td><td class="num">{{ value }}</td></tr>
{% endfor %}</table>
{% endif %}
{% for heading, body in extra_sections %}
<h2>{{ heading }}</h2>
{{ body }}
{% endfor %}
</body>
</html>
"""


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _render_html(
    title: str, problem_type: str, metrics: dict[str, Any], context: dict[str, Any],
    plots: dict[str, Path], importance: dict[str, float], extra_sections: list[tuple[str, str]],
) -> str:
    from jinja2 import Environment
    from markupsafe import Markup

    per_class = [
        (label, {key: _number(value) for key, value in row.items()})
        for label, row in (metrics.get("per_class") or {}).items()
    ]
    return Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(_PAGE).render(
        title=title,
        problem_type=problem_type,
        n=metrics.get("n"),
        positive_class=metrics.get("positive_class"),
        context=[(str(key), str(value)) for key, value in context.items()],
        scalars=[
            (name, _number(value), "higher" if HIGHER_IS_BETTER[name] else "lower")
            for name, value in metrics.items()
            if name in HIGHER_IS_BETTER
        ],
        notes=metrics.get("notes") or [],
        per_class=per_class,
        plots=[(path.name, _CAPTIONS[name]) for name, path in plots.items()],
        importance=[(name, _number(value)) for name, value in _ranked(importance)],
        extra_sections=[(heading, Markup(body)) for heading, body in extra_sections],
    )
