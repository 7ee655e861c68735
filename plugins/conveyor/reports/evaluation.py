"""Evaluation of a model on its held-out test set: metrics, plots and a report a person reads.

``write_evaluation_report`` writes the metrics (``conveyor.model.metrics``) and a readable
``index.html`` that holds its plots (PNG ``data:`` URIs: one self-contained page) into a folder.
Importing this module is cheap: numpy, pandas, scikit-learn, matplotlib and jinja2 are imported by
the functions that use them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.model.metrics import HIGHER_IS_BETTER, Classes, check_problem_type, classes_of, vectors
from conveyor.reports.plots import embed_images
from conveyor.reports.plots import figure as _figure
from conveyor.reports.plots import save as _save

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike

    from conveyor.spec import PipelineSpec
    from conveyor.training.evaluate import Importance, Scored

_PLOTS = ("confusion_matrix", "roc_curve", "pr_curve", "residuals", "predicted_vs_actual", "feature_importance")
_MAX_POINTS = 5000  # scatter plots draw a fixed sample of at most this many rows
_MAX_ANNOTATED_CLASSES = 15  # above, the per-class table carries the counts (676 labels cost seconds to draw)


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
    importance_info: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write ``metrics.json`` and ``index.html`` (its PNG plots inlined) into a folder; same inputs, same files.

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
    :param extra_sections: (heading, already-safe HTML) sections appended to the page; their
        ``src="<name>.png"`` images of files in the folder are inlined too.
    :param importance_info: how the importance was computed (``summary`` line and its settings: rows,
        repeats, seconds, budget), written to ``metrics.json`` and shown above the importance table.
    :returns: ``{"html": path, "metrics": path, <plot name>: "<html path>#<plot name>", ...}`` as strings
        (each plot is the page's ``<figure>`` of that id).
    :raises ValueError: as ``compute_metrics`` does for the same inputs.
    """
    check_problem_type(problem_type)
    truth, pred = vectors(y_true, y_pred)  # bad input fails here, before anything is written
    classes = None
    if problem_type != "regression":
        classes = classes_of(problem_type, truth, pred, proba, class_labels, positive_class)
    importance = {str(k): float(v) for k, v in (feature_importance or {}).items() if math.isfinite(float(v))}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(out, metrics, truth, pred, classes, importance)
    for stale in set(_PLOTS) - set(plots):
        (out / f"{stale}.png").unlink(missing_ok=True)

    document = {**metrics, "context": context or {}}
    if importance:
        document["feature_importance"] = importance
    if importance_info:
        document["feature_importance_settings"] = importance_info
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")

    html_path = out / "index.html"
    note = str((importance_info or {}).get("summary") or "")
    page = _render_html(title, problem_type, metrics, context or {}, plots, (importance, note), extra_sections or [])
    html_path.write_text(embed_images(page, out), encoding="utf-8")
    return {"html": str(html_path), "metrics": str(metrics_path), **{name: f"{html_path}#{name}" for name in plots}}


# ----------------------------------------------------------------------------------------- plots


def _plain(text: Any) -> str:
    """Text for matplotlib, with ``$`` escaped so a label never turns into (broken) mathtext."""
    return str(text).replace("$", r"\$")


def _write_plots(
    out: Path,
    metrics: dict[str, Any],
    truth: np.ndarray,
    pred: np.ndarray,
    classes: Classes | None,
    importance: dict[str, float],
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
{% for name, file, caption in plots %}
<figure id="{{ name }}"><img src="{{ file }}" alt="{{ caption }}"><figcaption>{{ caption }}</figcaption></figure>
{% endfor %}{% endif %}
{% if importance %}
<h2>Feature importance</h2>
{% if importance_note %}<p class="importance-note">{{ importance_note }}</p>{% endif %}
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
    title: str,
    problem_type: str,
    metrics: dict[str, Any],
    context: dict[str, Any],
    plots: dict[str, Path],
    importance_and_note: tuple[dict[str, float], str],
    extra_sections: list[tuple[str, str]],
) -> str:
    from jinja2 import Environment
    from markupsafe import Markup

    importance, importance_note = importance_and_note
    per_class = [
        (label, {key: _number(value) for key, value in row.items()})
        for label, row in (metrics.get("per_class") or {}).items()
    ]
    return (
        Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
        .from_string(_PAGE)
        .render(
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
            plots=[(name, path.name, _CAPTIONS[name]) for name, path in plots.items()],
            importance=[(name, _number(value)) for name, value in _ranked(importance)],
            importance_note=importance_note,
            extra_sections=[(heading, Markup(body)) for heading, body in extra_sections],
        )
    )


def write_model_report(
    out: Path,
    scored: Scored,
    spec: PipelineSpec,
    run_id: str,
    title: str,
    importance: Importance | dict[str, float] | None = None,
) -> dict[str, str]:
    """The evaluate task's report of a scored model: predictions, metrics, plots and ``index.html``.

    :param out: the report folder.
    :param scored: what ``conveyor.training.evaluate.score_model`` returned.
    :param spec: the pipeline.
    :param run_id: the run the test set belongs to.
    :param title: the page's title (after the pipeline's name).
    :param importance: permutation importance (``evaluate.Importance``: values, sample size, repeats and
        time, shown on the page) or a plain feature -> importance dict, or None.
    """
    from conveyor.training.evaluate import save_predictions

    out.mkdir(parents=True, exist_ok=True)
    save_predictions(out / "predictions.parquet", scored.test, spec, scored.y_pred, scored.proba)
    images = spec.data.format == "images"
    sections = None
    if images:
        grid = misclassified_grid(scored.test, scored.y_pred, scored.proba, out)
        sections = [("Worst misclassified test images", grid)]
    meta = scored.metadata
    if isinstance(meta.extra.get("tuning"), dict):  # the tuning step's trials (conveyor.reports.tuning)
        from conveyor.reports.tuning import tuning_section

        sections = [*(sections or []), ("Tuning trials", tuning_section(meta.extra["tuning"], out))]
    context = {
        "pipeline": spec.name,
        "run": run_id,
        "dataset version": meta.dataset_version,
        "code version": meta.code_version,
        "best model": meta.best_model,
        "test rows": len(scored.test),
    }
    plan = meta.extra.get("model_plan")
    if isinstance(plan, dict) and plan.get("models"):
        context["model plan"] = plan_summary(plan)
    values: dict[str, float] | None = importance if importance is None or isinstance(importance, dict) else None
    info = None
    if importance is not None and not isinstance(importance, dict):
        values, info = importance.values, {"summary": importance.summary(), **importance.settings()}
        context["feature importance"] = importance.summary()
    if getattr(scored, "timings", None):
        context["evaluation cost"] = scored.cost()
    return write_evaluation_report(
        out,
        scored.metrics,
        spec.data.problem_type,
        scored.y_true,
        scored.y_pred,
        scored.proba,
        meta.class_labels,
        meta.positive_class,
        feature_importance=values or None,
        title=f"{spec.name}: {title}",
        context=context,
        extra_sections=sections,
        importance_info=info,
    )


def plan_summary(plan: dict[str, Any]) -> str:
    """The trainer's model plan in one line: the models in fit order with their sizes and time limits,
    and why the others were left out (``metadata.json`` ``model_plan``, see the trainer's ``plan.py``).

    :param plan: the plan as the trainer wrote it.
    """
    kept = ", ".join(
        f"{m.get('key')} ({m.get('name')}, size {m.get('size')}, limit {m.get('max_time_limit')} s)"
        for m in plan.get("models", [])
    )
    left = "; ".join(f"{key}: {why}" for key, why in (plan.get("left_out") or {}).items())
    head = f"fit {plan.get('fit_time_limit')} s of a {plan.get('budget')} s budget: {kept}"
    return head + (f"; left out {left}" if left else "")


def misclassified_grid(test: Any, y_pred: Any, proba: Any, out: Path, limit: int = 16) -> str:
    """Save a grid of the most confidently misclassified images; returns the HTML that shows it."""
    import html

    from PIL import Image, ImageDraw

    wrong = [i for i, (truth, guess) in enumerate(zip(test["label"], y_pred, strict=True)) if str(truth) != str(guess)]
    if not wrong:
        return "<p>No test image was misclassified.</p>"
    confidence = {i: float(proba.iloc[i].max()) if proba is not None else 0.0 for i in wrong}
    worst = sorted(wrong, key=lambda i: -confidence[i])[:limit]
    tile, columns = 96, 4
    rows = (len(worst) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + 28)), "white")
    draw = ImageDraw.Draw(grid)
    for n, i in enumerate(worst):
        with Image.open(test["path"].iloc[i]) as image:
            thumb = image.convert("RGB").resize((tile, tile))
        x, y = (n % columns) * tile, (n // columns) * (tile + 28)
        grid.paste(thumb, (x, y))
        draw.text((x + 2, y + tile + 1), f"true {str(test['label'].iloc[i])[:11]}", fill="black")
        draw.text((x + 2, y + tile + 13), f"{str(y_pred[i])[:10]} {confidence[i]:.2f}", fill="darkred")
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "misclassified.png")
    names = ", ".join(html.escape(str(test["path"].iloc[i]).rsplit("/", 1)[-1]) for i in worst)
    return f'<img src="misclassified.png" alt="misclassified test images"><p>{names}</p>'
