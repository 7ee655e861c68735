"""Split a dataset version, train a model on it, and evaluate the model on the held-out test set."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from conveyor.lake import Lake
from conveyor.links import EvaluationReportLink


def resolve_version(context: Any, requested: str | None, lake: Lake, pipeline: str) -> str:
    """The dataset version a run trains on: the one asked for, the triggering event's, or the latest."""
    from conveyor.data.datasets import is_validated, latest_version

    version = requested or None
    if not version:
        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                version = (event.extra or {}).get("version") or version
    version = version or latest_version(lake, pipeline)
    if not version:
        raise AirflowFailException(f"pipeline {pipeline!r} has no validated dataset version yet: ingest a drop first")
    if not is_validated(lake, pipeline, version):
        raise AirflowFailException(f"dataset version {version!r} of {pipeline!r} does not exist or was not validated")
    return version


class SplitDatasetOperator(BaseOperator):
    """Split a validated dataset version into train/validation/test parts stored under the run.

    :param pipeline: the pipeline's name.
    :param dataset_version: the version to split (templated); empty means the triggering Asset
        event's version, else the latest validated one.
    :param labelled_rows: a Parquet URI of newly labelled rows to add (templated); empty means
        those of the retraining event that started the run, if any.
    """

    template_fields = ("pipeline", "dataset_version", "labelled_rows")

    def __init__(self, *, pipeline: str, dataset_version: str | None = None, labelled_rows: str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.dataset_version = dataset_version
        self.labelled_rows = labelled_rows

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.data.datasets import load_manifest, read_table
        from conveyor.spec import get_spec
        from conveyor.data.splits import SplitError, write_split

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        version = resolve_version(context, self.dataset_version, lake, self.pipeline)
        manifest = load_manifest(lake, self.pipeline, version)
        self.log.info("Splitting dataset version %s (%s rows)", version, manifest["rows"])
        frame = read_table(lake, manifest, spec)
        labelled = self.labelled_rows or labelled_source(context)
        if labelled:
            from conveyor.monitoring.records import LabelledRowsError, with_labelled_rows

            try:
                frame, added = with_labelled_rows(frame, labelled, spec, lake.conn_id)
            except LabelledRowsError as exc:
                raise AirflowFailException(str(exc)) from None
            self.log.info("Added %s newly labelled rows from %s (retraining)", added, labelled)
        try:
            record = write_split(lake, spec, version, context["run_id"], frame)
        except SplitError as exc:
            raise AirflowFailException(str(exc)) from None
        result = {"dataset_version": version, "split_uri": record["uri"], "parts": record["parts"]}
        if labelled:
            result["labelled"] = {"uri": labelled, "rows": added}
        return result


def labelled_source(context: Any) -> str | None:
    """The newly labelled rows a retraining event (``<name>.retrain``) hands to this run, if any."""
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            uri = (event.extra or {}).get("labelled_uri")
            if uri:
                return str(uri)
    return None


class TrainModelOperator(BaseOperator):
    """Train with the pipeline's trainer on the run's split and write ``model.tar.gz``.

    The script runs on the local backend as a child process (SageMaker script mode); its lines
    stream into this task's log. Returns ``{"model_uri", "code_version", "dataset_version",
    "best_model", "validation_score", "train_seconds"}``.

    :param pipeline: the pipeline's name.
    :param split: the split task's result (templated XCom).
    :param time_limit: the training budget in seconds (templated; the spec's when None).
    :param presets: the trainer's presets (templated; the spec's when None).
    """

    template_fields = ("pipeline", "split", "time_limit", "presets")

    def __init__(self, *, pipeline: str, split: Any, time_limit: Any = None, presets: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.split = split
        self.time_limit = time_limit
        self.presets = presets
        self._backend: Any = None

    def trainer_args(self, spec: Any, time_limit: int, presets: str, num_gpus: int) -> list[str]:
        """The training script's flags, from the spec (every hyperparameter is a flag)."""
        trainer = spec.trainer
        if trainer.kind == "resnet":
            args = ["--time-limit", str(time_limit), "--seed", str(spec.split.seed)]
            for key, value in trainer.hyperparameters.items():
                flag = "--" + key.replace("_", "-")
                if value is True:
                    args.append(flag)
                elif value not in (False, None):
                    args += [flag, str(value)]
            if trainer.pretrained_weights:
                args += ["--pretrained-weights", trainer.pretrained_weights]
            return args
        args = [
            "--label", spec.data.label,
            "--problem-type", spec.data.problem_type,
            "--presets", presets,
            "--time-limit", str(time_limit),
            "--excluded-model-types", ",".join(trainer.excluded_model_types),
            "--seed", str(spec.split.seed),
            "--num-gpus", str(num_gpus),
        ]
        if trainer.eval_metric:
            args += ["--eval-metric", trainer.eval_metric]
        if trainer.hyperparameters:
            args += ["--hyperparameters", json.dumps(trainer.hyperparameters)]
        if spec.data.id_column:
            args += ["--id-column", spec.data.id_column]
        if trainer.refit_full:
            args.append("--refit-full")
        if trainer.infer_limit:
            args += ["--infer-limit", str(trainer.infer_limit)]
        return args

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk import ObjectStoragePath

        from conveyor import __version__, settings
        from conveyor.model import artifacts
        from conveyor.lake import safe_name
        from conveyor.training.local import LocalTrainingBackend, TrainingJob, available_gpus
        from conveyor.lake import as_local_folder, copy_verified, upload_tree
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        if spec.compute != "local":
            raise AirflowFailException(f"compute {spec.compute!r} is not available in this deployment")
        time_limit = int(self.time_limit if self.time_limit not in (None, "", "None") else spec.trainer.time_limit)
        if time_limit <= 0:
            raise AirflowFailException(f"time budget {time_limit}s: rule 'time_limit > 0' (a model needs time to train)")
        presets = self.presets or spec.trainer.presets
        lake = Lake.from_env()
        run_id = context["run_id"]
        run_dir = lake.models(self.pipeline, run_id)
        num_gpus = available_gpus() if spec.trainer.gpu else 0
        with tempfile.TemporaryDirectory(prefix="conveyor-train-") as tmp:
            scratch = Path(tmp)
            args = self.trainer_args(spec, time_limit, presets, num_gpus)
            checkpoints = None
            if spec.trainer.kind == "resnet":
                # Outside the scratch folder, so a retry of this task resumes from the last epoch.
                checkpoints = settings.state_dir() / "checkpoints" / self.pipeline / safe_name(run_id)
                args += ["--checkpoint-dir", str(checkpoints)]
            job = TrainingJob(
                script=artifacts.training_script(spec.trainer.kind),
                args=args,
                channels={part: as_local_folder(run_dir / "split" / part, scratch) for part in ("train", "validation")},
                model_dir=scratch / "model",
                output_dir=scratch / "output",
                timeout_s=time_limit * 1.5 + 300,
                num_gpus=num_gpus,
            )
            self._backend = LocalTrainingBackend(self.log)
            seconds = self._backend.run(job)
            trained = json.loads((job.model_dir / "metadata.json").read_text())
            metadata = {
                **trained,
                "pipeline": self.pipeline,
                "run_id": run_id,
                "dataset_version": self.split["dataset_version"],
                "labelled": self.split.get("labelled"),
                "split": self.split["parts"],
                "code_version": artifacts.code_version(spec.trainer.kind),
                "conveyor_version": __version__,
                "backend": "local",
                "train_seconds": round(seconds, 2),
            }
            archive = artifacts.pack(job.model_dir, artifacts.inference_code(spec.trainer.kind), metadata,
                                     scratch / "model.tar.gz")
            target = run_dir / "model.tar.gz"
            copy_verified(ObjectStoragePath(archive.as_uri()), target, 1 << 20)
            upload_tree(job.output_dir, run_dir / "output")
            if checkpoints is not None:
                shutil.rmtree(checkpoints, ignore_errors=True)
            self.log.info("Model artifact: %s (%.1f MB)", target, archive.stat().st_size / 1e6)
        return {
            "model_uri": str(target),
            "code_version": metadata["code_version"],
            "dataset_version": metadata["dataset_version"],
            "best_model": trained.get("best_model"),
            "validation_score": trained.get("validation_score"),
            "train_seconds": metadata["train_seconds"],
        }

    def on_kill(self) -> None:
        if self._backend is not None:
            self._backend.kill()


class EvaluateModelOperator(BaseOperator):
    """Score the model on the run's test set: metrics, plots and an HTML report.

    Writes ``reports/<pipeline>/<run>/evaluation/`` (``index.html``, ``metrics.json``, plots).
    Returns ``{"metrics": {scalar metrics}, "report": uri}``.

    :param pipeline: the pipeline's name.
    :param model: the train task's result (templated XCom).
    """

    template_fields = ("pipeline", "model")
    operator_extra_links = (EvaluationReportLink(),)

    def __init__(self, *, pipeline: str, model: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.model = model

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.reports.evaluation import write_model_report
        from conveyor.training.evaluate import permutation_importance, scalar_metrics, score_model
        from conveyor.lake import upload_tree
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        report_dir = lake.reports(self.pipeline, run_id) / "evaluation"
        with tempfile.TemporaryDirectory(prefix="conveyor-eval-") as tmp:
            scored = score_model(lake, spec, run_id, self.model["model_uri"], Path(tmp))
            importance = None
            if spec.data.format != "images":
                importance = permutation_importance(scored.model, scored.test, spec, spec.gate.metric)
            write_model_report(Path(tmp) / "report", scored, spec, run_id, "Challenger", importance)
            upload_tree(Path(tmp) / "report", report_dir)
        metrics = scalar_metrics(scored.metrics)
        self.log.info("Test metrics: %s", metrics)
        self.log.info("Evaluation report: %s", report_dir / "index.html")
        return {"metrics": metrics, "report": str(report_dir / "index.html")}
