"""The live metric: the gate's metric (or ``monitor.metric``) over predictions whose true label came back.

Labelled predictions are observations joined with feedback labels
(:func:`conveyor.monitoring.records.joined`); they are scored with the evaluation's own metric
functions (:func:`conveyor.model.metrics.compute_metrics`), per day and model version for the
report, and over the live version's labels received since the last trigger for the decision.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

from conveyor.lake import Lake, read_json
from conveyor.monitoring.records import PROBA_PREFIX

if TYPE_CHECKING:
    from conveyor.model.metadata import ModelMetadata


def score(
    rows: pd.DataFrame, problem_type: str, metric: str, classes: list[str] | None, positive_class: str | None
) -> float | None:
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
        values = compute_metrics(
            problem_type,
            rows["_label"].astype(str).to_numpy(),
            rows["prediction"].astype(str).to_numpy(),
            proba,
            classes,
            positive_class,
        )
    value = values.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def live_series(
    rows: pd.DataFrame, problem_type: str, metric: str, classes: list[str] | None, positive_class: str | None
) -> list[dict[str, Any]]:
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
        series.append(
            {
                "day": day,
                "model_version": str(version),
                "labels": int(len(group)),
                "metric": metric,
                "value": score(group, problem_type, metric, classes, positive_class),
            }
        )
    return series


def scoring(metadata: ModelMetadata) -> tuple[list[str] | None, str | None]:
    """The class labels and the positive class of a model as text, as observations hold them.

    :param metadata: the model's metadata.
    """
    classes = [str(c) for c in metadata.class_labels or []] or None
    positive = metadata.positive_class
    return classes, str(positive) if positive is not None else None


def new_labels(rows: pd.DataFrame, version: str, since: datetime | None) -> pd.DataFrame:
    """The labelled predictions of one model version whose label arrived after ``since``.

    :param rows: labelled predictions (``model_version``, ``received_at``).
    :param version: the model version.
    :param since: the last trigger's time, or None for every label.
    """
    if not len(rows):
        return rows
    current = rows[rows["model_version"].astype(str) == version]
    if since is not None:
        received = current["received_at"].map(lambda s: datetime.fromisoformat(str(s)))
        current = current[received > since]
    return current


def live_metric(
    rows: pd.DataFrame, problem_type: str, metric: str, version: str, metadata: ModelMetadata, since: datetime | None
) -> dict[str, Any]:
    """The live version's metric over its labels received since the last trigger (what the decision reads).

    :param rows: labelled predictions.
    :param problem_type: the pipeline's problem type.
    :param metric: the metric.
    :param version: the live (champion) version.
    :param metadata: its metadata (class labels, positive class).
    :param since: the last trigger's time, or None.
    :return: ``{"metric", "version", "labels", "value"}``.
    """
    classes, positive = scoring(metadata)
    current = new_labels(rows, version, since)
    return {
        "metric": metric,
        "version": version,
        "labels": int(len(current)),
        "value": score(current, problem_type, metric, classes, positive) if len(current) else None,
    }


def evaluation_score(lake: Lake, pipeline: str, run: str | None, metric: str) -> float | None:
    """A model's test-set score at evaluation (its training run's ``metrics.json``), if stored.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run: the training run (the version's ``conveyor_run_id`` tag), or None.
    :param metric: the metric.
    """
    path = lake.reports(pipeline, run) / "evaluation" / "metrics.json" if run else None
    if path is None or not path.exists():
        return None
    value = read_json(path).get(metric)
    return float(value) if isinstance(value, (int, float)) else None
