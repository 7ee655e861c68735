"""The train task of ``compute: sagemaker`` with ``tuning:``: a hyperparameter tuning job, best model kept."""

from __future__ import annotations

from typing import Any

from airflow.providers.amazon.aws.operators.sagemaker import SageMakerTuningOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from conveyor.lake import Lake
from conveyor.operators.base import pipeline_spec, translate_errors


class SageMakerTuneModelOperator(SageMakerTuningOperator):
    """Tune on SageMaker: the provider's ``SageMakerTuningOperator`` with the run's tuning job request.

    At run time the request is built from the spec (``conveyor.aws.tuning.tuning_job_config``: the
    train task's training job, tuned flags as ranges, each trial's share of the budget), the trainer's
    ``sourcedir.tar.gz`` uploaded first; the provider creates the job and defers its wait. A retry finds
    the job of an earlier try (``<pipeline>-<hash of the DAG and run>``): still running, it waits for it;
    completed, it takes its model; failed or stopped, it fails with the job's reason. The best training
    job's model is repacked like the train task's (``conveyor.aws.training.job_model``) with the trials in
    its metadata (``tuning``); the result is ``TrainModelOperator``'s plus ``tuning``.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param split: the split task's result (templated XCom).
    :param time_limit: the run's time budget (templated; ``tuning.budget`` wins when set).
    :param presets: the trainer's presets (templated; the spec's when empty).
    """

    template_fields = ("spec", "split", "time_limit", "presets")
    template_fields_renderers = {"spec": "json"}

    def __init__(self, *, spec: Any, split: Any, time_limit: Any = None, presets: str | None = None, **kwargs: Any):
        super().__init__(config={}, **kwargs)
        self.spec = spec
        self.split = split
        self.time_limit = time_limit
        self.presets = presets

    def _spec(self) -> Any:
        spec = pipeline_spec(self.spec)
        if spec.compute != "sagemaker" or spec.tuning is None:
            raise AirflowFailException(f"{spec.name}: this task tunes on SageMaker (compute sagemaker, tuning:)")
        return spec

    def _budget(self, spec: Any) -> int:
        from conveyor.training.arguments import time_budget

        return spec.tuning.budget or time_budget(spec, self.time_limit)

    def job_name(self, context: Any) -> str:
        """The tuning job of this run (the same for every try)."""
        from conveyor.aws.tuning import tuning_job_name

        dag = context.get("dag")
        return tuning_job_name(
            pipeline_spec(self.spec).name, getattr(dag, "dag_id", None) or self.dag_id, context["run_id"]
        )

    def _describe(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        from conveyor.aws.common import error_code

        try:
            return self.hook.describe_tuning_job(name)
        except ClientError as exc:
            if error_code(exc) in ("ResourceNotFound", "ValidationException"):
                return None
            raise

    def _request(self, context: Any, spec: Any, name: str) -> dict[str, Any]:
        """The run's ``CreateHyperParameterTuningJob`` request (uploads the trainer's source first)."""
        from conveyor.aws.training import job_request, wait_limit_seconds
        from conveyor.aws.tuning import tuning_job_config
        from conveyor.training.arguments import presets
        from conveyor.training.tuning import trial_spec

        budget = self._budget(spec)
        training = job_request(
            trial_spec(spec, {}),  # the tuning metric set, the tuned flags left to the ranges
            Lake.from_env(),
            context["run_id"],
            name,
            self.hook.conn_region_name,
            {"conveyor:pipeline": spec.name, "conveyor:dag_id": self.dag_id},
            spec.tuning.trial_seconds(budget),
            presets(spec, self.presets),
        )
        return tuning_job_config(spec, name, training, budget, wait_limit_seconds(spec))

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.aws.tuning import RUNNING

        spec = self._spec()
        name = self.job_name(context)
        description = self._describe(name)
        if description is None:
            self.config = self._request(context, spec, name)
            self.check_interval = spec.sagemaker.check_interval_seconds
            description = super().execute(context)["Tuning"]  # the provider creates it, then defers or waits
        else:
            self.log.info("Tuning job %s of an earlier try is %s", name, description["HyperParameterTuningJobStatus"])
            if description["HyperParameterTuningJobStatus"] in RUNNING:
                self.config = {"HyperParameterTuningJobName": name}
                description = self.hook.check_status(
                    name, "HyperParameterTuningJobStatus", self.hook.describe_tuning_job, self.check_interval, None
                )
        return self._finish(context, spec, name, description)

    @translate_errors
    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the provider's trigger: the job's best model (or its failure)."""
        spec = self._spec()
        try:
            description = super().execute_complete(context, event)["Tuning"]
        except AirflowException as exc:
            raise AirflowException(f"waiting for tuning job {self.job_name(context)} failed: {exc}") from exc
        return self._finish(context, spec, self.job_name(context), description)

    def _finish(self, context: Any, spec: Any, name: str, description: dict[str, Any]) -> dict[str, Any]:
        """A completed job's best training job, repacked into the run's ``model.tar.gz`` with the trials."""
        from conveyor.aws.training import job_model
        from conveyor.aws.tuning import list_trials, trials_summary

        status = description.get("HyperParameterTuningJobStatus")
        best = (description.get("BestTrainingJob") or {}).get("TrainingJobName")
        if status != "Completed" or not best:
            reason = description.get("FailureReason") or "no training job completed"
            raise AirflowFailException(f"SageMaker tuning job {name} {status}: {reason}; nothing was registered")
        summary = trials_summary(spec, description, list_trials(self.hook.conn, name), self._budget(spec))
        self.log.info(
            "Tuning job %s: best training job %s (%s %s), %s trials",
            name,
            best,
            summary["metric"],
            summary["best_value"],
            len(summary["trials"]),
        )
        job = self.hook.describe_training_job(best)
        result = job_model(spec, Lake.from_env(), context["run_id"], self.split, job, self.log, tuning=summary)
        keys = ("number", "status", "value", "seconds")
        trials = [{k: t[k] for k in keys} for t in summary["trials"]]
        return {**result, "tuning": {"tuning_job": name, "best_trial": summary["best_trial"], "trials": trials}}
