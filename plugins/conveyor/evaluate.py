"""Score a packed model on a run's test set through its own inference code (as serving will)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.lake import Lake

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

IMPORTANCE_ROWS = 1000


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-value metrics (what a gate compares and a registry stores); counts are left out."""
    from conveyor.reports.evaluation import HIGHER_IS_BETTER

    return {k: float(v) for k, v in metrics.items() if k in HIGHER_IS_BETTER and isinstance(v, (int, float))}


def predictions(model: Any, frame: Any) -> tuple[Any, Any]:
    """Predicted labels and, for classifiers, a class-probability frame (columns = class labels)."""
    import pandas as pd

    scored = model.predict_frame(frame)
    classes = model.metadata.get("class_labels")
    proba = None
    if classes:
        proba = pd.DataFrame({label: scored[f"proba_{label}"].to_numpy() for label in classes})
    return scored["prediction"].to_numpy(), proba


def permutation_importance(model: Any, frame: Any, spec: "PipelineSpec", metric: str, seed: int = 0) -> dict[str, float]:
    """How much the gate metric drops when each feature is shuffled (model-agnostic, on a sample).

    :param model: a ``LoadedModel``.
    :param frame: labelled rows.
    :param spec: the pipeline.
    :param metric: the metric to watch (higher is better after the sign flip).
    :param seed: the shuffle seed.
    """
    import numpy as np

    from conveyor.reports.evaluation import HIGHER_IS_BETTER, compute_metrics

    sample = frame.sample(min(len(frame), IMPORTANCE_ROWS), random_state=seed).reset_index(drop=True)
    classes = model.metadata.get("class_labels")
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0

    def score(data: Any) -> float | None:
        y_pred, proba = predictions(model, data)
        value = compute_metrics(spec.data.problem_type, data[spec.data.label].to_numpy(), y_pred, proba,
                                classes, model.metadata.get("positive_class")).get(metric)
        return None if value is None else sign * float(value)

    base = score(sample)
    if base is None:
        return {}
    rng = np.random.default_rng(seed)
    importance = {}
    for feature in model.feature_names:
        shuffled = sample.copy()
        shuffled[feature] = rng.permutation(shuffled[feature].to_numpy())
        after = score(shuffled)
        importance[feature] = round(base - after, 6) if after is not None else 0.0
    return importance


def read_image_part(lake: Lake, pipeline: str, run_id: str, part: str, scratch: Path) -> Any:
    """An image part of a run's split as a frame of local image paths and labels."""
    import pandas as pd

    from conveyor.lake import as_local_folder

    folder = as_local_folder(lake.models(pipeline, run_id) / "split" / part, scratch)
    frame = pd.read_csv(folder / "manifest.csv")
    frame["path"] = [str(folder / rel) for rel in frame["path"]]
    return frame


def misclassified_grid(test: Any, y_pred: Any, proba: Any, out: Path, limit: int = 16) -> str:
    """Save a grid of the most confidently misclassified images; returns the HTML that shows it."""
    import html

    from PIL import Image, ImageDraw

    wrong = [i for i, (truth, guess) in enumerate(zip(test["label"], y_pred)) if str(truth) != str(guess)]
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


def save_predictions(path: Path, test: Any, spec: "PipelineSpec", y_pred: Any, proba: Any) -> None:
    """The test set's predictions (id, truth, prediction, probabilities): what a deploy's smoke test
    compares the endpoint's answers with."""
    import pandas as pd

    key = "path" if spec.data.format == "images" else spec.data.id_column
    frame = pd.DataFrame({"row": range(len(test)), "truth": test[spec.data.label].to_numpy(), "prediction": y_pred})
    if key and key in test:
        frame.insert(1, "id", [str(v).rsplit("/", 1)[-1] if key == "path" else v for v in test[key]])
    if proba is not None:
        for label in proba.columns:
            frame[f"proba_{label}"] = proba[label].to_numpy()
    frame.to_parquet(path, index=False)


def evaluate_model(
    lake: Lake, spec: "PipelineSpec", run_id: str, model_uri: str, workdir: Path, title: str,
    report: bool = True,
) -> dict[str, Any]:
    """Load a ``model.tar.gz``, score the run's test set, and optionally write the HTML report.

    :param lake: the lake.
    :param spec: the pipeline.
    :param run_id: the run whose test set is used.
    :param model_uri: the model artifact's URI.
    :param workdir: a scratch folder; the report goes to ``workdir/report``.
    :param title: the report's title.
    :param report: whether to write the report (a champion re-score needs only metrics).
    :return: ``{"metrics", "metadata", "report_dir"}``.
    """
    from conveyor.artifacts import LoadedModel, fetch
    from conveyor.reports.evaluation import compute_metrics, write_evaluation_report
    from conveyor.splits import read_part

    model = LoadedModel(fetch(model_uri, workdir / "model", lake.conn_id))
    images = spec.data.format == "images"
    if images:
        test = read_image_part(lake, spec.name, run_id, "test", workdir / "test")
    else:
        test = read_part(lake, spec.name, run_id, "test")
    y_true = test[spec.data.label].to_numpy()
    y_pred, proba = predictions(model, test)
    classes = model.metadata.get("class_labels")
    positive = model.metadata.get("positive_class")
    metrics = compute_metrics(spec.data.problem_type, y_true, y_pred, proba, classes, positive)
    out = workdir / "report"
    if report:
        out.mkdir(parents=True, exist_ok=True)
        save_predictions(out / "predictions.parquet", test, spec, y_pred, proba)
        importance = {} if images else permutation_importance(model, test, spec, spec.gate.metric)
        sections = [("Worst misclassified test images", misclassified_grid(test, y_pred, proba, out))] if images else None
        context = {
            "pipeline": spec.name,
            "run": run_id,
            "dataset version": model.metadata.get("dataset_version"),
            "code version": model.metadata.get("code_version"),
            "best model": model.metadata.get("best_model"),
            "test rows": len(test),
        }
        write_evaluation_report(out, metrics, spec.data.problem_type, y_true, y_pred, proba, classes, positive,
                                feature_importance=importance or None, title=f"{spec.name}: {title}", context=context,
                                extra_sections=sections)
    return {"metrics": metrics, "metadata": model.metadata, "report_dir": out}
