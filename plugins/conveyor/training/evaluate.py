"""Score a packed model on a run's test set through its own inference code (as serving will)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.lake import Lake

if TYPE_CHECKING:
    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec

IMPORTANCE_ROWS = 1000


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-value metrics (what a gate compares and a registry stores); counts are left out."""
    from conveyor.model.metrics import HIGHER_IS_BETTER

    return {k: float(v) for k, v in metrics.items() if k in HIGHER_IS_BETTER and isinstance(v, (int, float))}


def predictions(model: Any, frame: Any) -> tuple[Any, Any]:
    """Predicted labels and, for classifiers, a class-probability frame (columns = class labels)."""
    import pandas as pd

    scored = model.predict_frame(frame)
    classes = model.metadata.class_labels
    proba = None
    if classes:
        proba = pd.DataFrame({label: scored[f"proba_{label}"].to_numpy() for label in classes})
    return scored["prediction"].to_numpy(), proba


def permutation_importance(model: Any, frame: Any, spec: PipelineSpec, metric: str, seed: int = 0) -> dict[str, float]:
    """How much the gate metric drops when each feature is shuffled (model-agnostic, on a sample).

    :param model: a ``LoadedModel``.
    :param frame: labelled rows.
    :param spec: the pipeline.
    :param metric: the metric to watch (higher is better after the sign flip).
    :param seed: the shuffle seed.
    """
    import numpy as np

    from conveyor.model.metrics import HIGHER_IS_BETTER, compute_metrics

    sample = frame.sample(min(len(frame), IMPORTANCE_ROWS), random_state=seed).reset_index(drop=True)
    classes = model.metadata.class_labels
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0

    def score(data: Any) -> float | None:
        y_pred, proba = predictions(model, data)
        value = compute_metrics(
            spec.data.problem_type,
            data[spec.data.label].to_numpy(),
            y_pred,
            proba,
            classes,
            model.metadata.positive_class,
        ).get(metric)
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


def save_predictions(path: Path, test: Any, spec: PipelineSpec, y_pred: Any, proba: Any) -> None:
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


@dataclass
class Scored:
    """A model's answers on a run's test set, and the metrics computed from them."""

    model: Any
    test: Any
    y_true: Any
    y_pred: Any
    proba: Any
    metrics: dict[str, Any]

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata


def score_model(
    lake: Lake, spec: PipelineSpec, run_id: str, model_uri: str, workdir: Path, registered: Any = None
) -> Scored:
    """Load a ``model.tar.gz`` and score the run's test set through the model's own inference code.

    :param lake: the lake.
    :param spec: the pipeline.
    :param run_id: the run whose test set is used.
    :param model_uri: the model artifact's URI.
    :param workdir: a scratch folder (the model is unpacked in ``workdir/model``).
    :param registered: a registered model's ``RegisteredArchive`` (its archive is checked against the
        registry's sha256 before it is loaded); None for the model this run trained.
    """
    from conveyor.data.splits import read_part
    from conveyor.model.artifacts import LoadedModel, fetch
    from conveyor.model.metrics import compute_metrics

    model = LoadedModel(fetch(model_uri, workdir / "model", lake.conn_id, registered=registered))
    if spec.data.format == "images":
        test = read_image_part(lake, spec.name, run_id, "test", workdir / "test")
    else:
        test = read_part(lake, spec.name, run_id, "test")
    y_true = test[spec.data.label].to_numpy()
    y_pred, proba = predictions(model, test)
    metrics = compute_metrics(
        spec.data.problem_type, y_true, y_pred, proba, model.metadata.class_labels, model.metadata.positive_class
    )
    return Scored(model, test, y_true, y_pred, proba, metrics)
