"""Split a dataset version, train a model on it, and evaluate the model on the held-out test set."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from conveyor.lake import Lake
from conveyor.links import EvaluationReportLink
from conveyor.operators.base import pipeline_spec, translate_errors


def resolve_version(context: Any, requested: str | None, lake: Lake, pipeline: str) -> str:
    """The dataset version a run trains on: the one asked for, the triggering event's, or the latest.

    :param context: the task's context (its triggering Asset events).
    :param requested: the version the run asks for (empty: the event's, else the latest).
    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :raises LocationRefused: the asked or the event's version is not ``v-<hex digest>``.
    """
    from conveyor.data.datasets import is_validated, latest_version
    from conveyor.lake import check_dataset_version

    version = check_dataset_version(requested, "Param 'dataset_version'") if requested else None
    if not version:
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                version = (event.extra or {}).get("version") or version
        if version:
            check_dataset_version(str(version), "the triggering dataset event's version")
    latest = None if version else latest_version(lake, pipeline)  # written after the version's VALIDATED marker
    if latest:
        check_dataset_version(str(latest), f"the version {pipeline}'s LATEST.json names")
    version = version or latest
    if not version:
        raise AirflowFailException(f"pipeline {pipeline!r} has no validated dataset version yet: ingest a drop first")
    if version != latest and not is_validated(lake, pipeline, version):
        raise AirflowFailException(f"dataset version {version!r} of {pipeline!r} does not exist or was not validated")
    return version


def labelled_source(context: Any) -> str | None:
    """The newly labelled rows a retraining event (``<name>.retrain``) hands to this run, if any.

    :param context: the task's context (its triggering Asset events).
    """
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            uri = (event.extra or {}).get("labelled_uri")
            if uri:
                return str(uri)
    return None


class SplitDatasetOperator(BaseOperator):
    """Split a validated dataset version into train/validation/test parts stored under the run.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param dataset_version: the version to split (templated); empty means the triggering Asset
        event's version, else the latest validated one.
    :param labelled_rows: a Parquet URI of newly labelled rows to add (templated); empty means
        those of the retraining event that started the run, if any. Either must be inside the lake
        (``Lake.inside``), and ``dataset_version`` must be ``v-<hex digest>``: anything else fails the task.
    """

    template_fields = ("spec", "dataset_version", "labelled_rows")
    template_fields_renderers = {"spec": "json"}

    def __init__(
        self, *, spec: Any, dataset_version: str | None = None, labelled_rows: str | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.dataset_version = dataset_version
        self.labelled_rows = labelled_rows

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.data.datasets import load_manifest, read_table
        from conveyor.data.splits import write_split

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        version = resolve_version(context, self.dataset_version, lake, spec.name)
        manifest = load_manifest(lake, spec.name, version)
        if manifest is None:  # resolve_version found it validated: its copy is complete
            raise AirflowFailException(f"dataset version {version!r} of {spec.name!r} has no manifest")
        self.log.info("Splitting dataset version %s (%s rows)", version, manifest["rows"])
        frame = read_table(lake, manifest, spec)
        labelled = self.labelled_rows or labelled_source(context)
        if labelled:  # read only from the lake (a Param or an event could name any URI)
            what = "Param 'labelled_rows'" if self.labelled_rows else "the retraining event's labelled_uri"
            labelled = lake.inside(labelled, what)
            from conveyor.monitoring.labelled import with_labelled_rows

            joined = with_labelled_rows(frame, labelled, spec, lake, context["run_id"])  # checks + suite first
            frame, added = joined.rows, joined.summary()
            self.log.info(
                "Added %s newly labelled rows from %s (retraining); %s rejected (kept in %s)",
                joined.added,
                labelled,
                joined.rejected,
                joined.quarantine,
            )
        record = write_split(lake, spec, version, context["run_id"], frame)
        result = {"dataset_version": version, "split_uri": record["uri"], "parts": record["parts"]}
        if labelled:
            result["labelled"] = {"uri": labelled, **added}  # rows, rejected, superseded, quarantine, rules
        return result


class TrainModelOperator(BaseOperator):
    """Train with the pipeline's trainer on the run's split and write ``model.tar.gz``.

    The script runs on the local backend as a child process (SageMaker script mode); its lines
    stream into this task's log. The model goes to ``models/<pipeline>/<run>/model.tar.gz`` with
    its ``metadata.json`` beside it. Returns ``{"model_uri", "code_version", "dataset_version",
    "best_model", "validation_score", "train_seconds"}``.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param split: the split task's result (templated XCom).
    :param time_limit: the training budget in seconds (templated; the spec's when empty).
    :param presets: the trainer's presets (templated; the spec's when empty).
    """

    template_fields = ("spec", "split", "time_limit", "presets")
    template_fields_renderers = {"spec": "json"}

    def __init__(self, *, spec: Any, split: Any, time_limit: Any = None, presets: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.split = split
        self.time_limit = time_limit
        self.presets = presets
        self._backend: Any = None

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.training.arguments import presets, time_budget
        from conveyor.training.local import LocalTrainingBackend, train_locally

        spec = pipeline_spec(self.spec)
        if spec.compute != "local":
            raise AirflowFailException(f"compute {spec.compute!r} is not available in this deployment")
        time_limit = time_budget(spec, self.time_limit)
        if spec.tuning is not None:  # trials first, the best one's model goes on (conveyor.training.tuning)
            from conveyor.training.tuning import LocalTuning, tune_locally
            from conveyor.training.tuning_tracking import TrialTracker

            tracker = TrialTracker(spec, context["run_id"], try_number=getattr(context.get("ti"), "try_number", 1))
            self._backend = LocalTuning(spec, self.log, tracker)
            budget = spec.tuning.budget or time_limit
            lake = Lake.from_env()
            return tune_locally(
                spec, lake, context["run_id"], self.split, budget, presets(spec, self.presets), self._backend
            )
        self._backend = LocalTrainingBackend(self.log)
        return train_locally(
            spec, Lake.from_env(), context["run_id"], self.split, time_limit, presets(spec, self.presets), self._backend
        )

    def on_kill(self) -> None:
        if self._backend is not None:
            self._backend.kill()


class EvaluateModelOperator(BaseOperator):
    """Score the model on the run's test set: metrics, plots and an HTML report.

    Writes ``reports/<pipeline>/<run>/evaluation/`` (``index.html`` with its plots inlined, ``metrics.json``,
    ``predictions.parquet``) and logs the same files to the run's MLflow run (``reports/evaluation``; the
    gate logs the rest there), from here where they are on disk. Returns ``{"metrics": {scalar metrics},
    "report": uri}``.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param model: the train task's result (templated XCom).
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = ("spec", "model")
    template_fields_renderers = {"spec": "json"}
    operator_extra_links = (EvaluationReportLink(),)

    def __init__(self, *, spec: Any, model: Any, tracking_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.lake import upload_tree
        from conveyor.registry.mlflow import MlflowRegistryHook
        from conveyor.reports.evaluation import write_model_report
        from conveyor.training.evaluate import bounded_importance, scalar_metrics, score_model

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        run_id = context["run_id"]
        report_dir = lake.reports(spec.name, run_id) / "evaluation"
        with tempfile.TemporaryDirectory(prefix="conveyor-eval-") as tmp:
            scored = score_model(lake, spec, run_id, self.model["model_uri"], Path(tmp))
            importance = None
            if spec.data.format != "images":
                importance = bounded_importance(scored, spec, spec.gate.metric)
            write_model_report(Path(tmp) / "report", scored, spec, run_id, "Challenger", importance)
            upload_tree(Path(tmp) / "report", report_dir)
            tracking = MlflowRegistryHook(self.tracking_uri)  # experiment runs: MLflow tracking with either registry
            mlflow_run = tracking.ensure_run(spec.name, run_id, run_name=run_id, tags={"pipeline": spec.name})
            tracking.log_artifacts(mlflow_run, Path(tmp) / "report", "reports/evaluation")
        metrics = scalar_metrics(scored.metrics)
        self.log.info("Test metrics: %s", metrics)
        self.log.info("Evaluation report: %s", report_dir / "index.html")
        return {"metrics": metrics, "report": str(report_dir / "index.html")}
