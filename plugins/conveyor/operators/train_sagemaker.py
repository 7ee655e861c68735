"""The train task of ``compute: sagemaker``: the same training script as a SageMaker training job."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from conveyor.lake import Lake
from conveyor.operators.base import first_try, pipeline_spec, translate_errors


class SageMakerTrainModelOperator(BaseOperator):
    """Train on SageMaker: ``include/training/<trainer>/train.py`` in script mode, as a training job.

    The job (``<pipeline>-<hash of the DAG and run>``, the same for every try) reads the run's
    ``split/train`` and ``split/validation`` folders on S3 as its channels, gets the script's
    flags as hyperparameters (``conveyor.training.arguments``, as on the local backend), and runs in
    the trainer's framework container with the instance type and count, spot and max-run settings
    of ``sagemaker:``. The wait is deferred to the triggerer (the provider's ``SageMakerTrigger``).

    A retry finds the job of an earlier try: still running, it waits for it; completed, it uses
    its model; failed or stopped, it fails with the job's reason (trigger a new run to train
    again). A failed job's ``FailureReason`` and the last lines of its CloudWatch log go to the
    task log and the error. The job's ``model.tar.gz`` is repacked like the local backend's
    (``metadata.json`` first and beside it, ``code/inference.py``) into ``models/<pipeline>/<run>/``,
    and the result is the same as ``TrainModelOperator``'s.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param split: the split task's result (templated XCom).
    :param time_limit: the training budget in seconds (templated; the spec's when empty).
    :param presets: the trainer's presets (templated; the spec's when empty).
    :param deferrable: wait in the triggerer (else poll in the worker).
    :param log_lines: how many CloudWatch log lines a failed job's error carries.
    """

    template_fields = ("spec", "split", "time_limit", "presets")
    template_fields_renderers = {"spec": "json"}

    def __init__(
        self,
        *,
        spec: Any,
        split: Any,
        time_limit: Any = None,
        presets: str | None = None,
        deferrable: bool = True,
        log_lines: int = 30,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.split = split
        self.time_limit = time_limit
        self.presets = presets
        self.deferrable = deferrable
        self.log_lines = log_lines
        self._job: tuple[Any, str] | None = None

    # ------------------------------------------------------------------------------- helpers

    def _spec(self) -> Any:
        spec = pipeline_spec(self.spec)
        if spec.compute != "sagemaker":
            raise AirflowFailException(f"{spec.name}: compute is {spec.compute!r}; this task trains on SageMaker")
        return spec

    def _hook(self, spec: Any) -> Any:
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        return SageMakerHook(aws_conn_id=spec.sagemaker.aws_conn_id, region_name=spec.sagemaker.region)

    def job_name(self, context: Any) -> str:
        """The training job of this run (the same for every try)."""
        from conveyor.aws.training import training_job_name

        dag = context.get("dag")
        name = pipeline_spec(self.spec).name
        return training_job_name(name, getattr(dag, "dag_id", None) or self.dag_id, context["run_id"])

    def _describe(self, spec: Any, hook: Any, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        from conveyor.aws.common import aws_errors, error_code

        try:
            with aws_errors("sagemaker:DescribeTrainingJob", spec.sagemaker.aws_conn_id):
                return hook.describe_training_job(name)
        except ClientError as exc:
            if error_code(exc) == "ValidationException":  # what SageMaker answers for an unknown name
                return None
            raise

    def _start(self, spec: Any, hook: Any, name: str, context: Any) -> bool:
        """Create the run's training job (its ``sourcedir.tar.gz`` uploaded first); False when it existed."""
        from botocore.exceptions import ClientError

        from conveyor.aws.common import aws_errors, error_code
        from conveyor.aws.training import check_budget, job_request
        from conveyor.training.arguments import presets, time_budget

        time_limit = time_budget(spec, self.time_limit)
        check_budget(spec, time_limit)
        config = job_request(
            spec,
            Lake.from_env(),
            context["run_id"],
            name,
            hook.conn_region_name,
            {"conveyor:pipeline": spec.name, "conveyor:dag_id": self.dag_id},
            time_limit,
            presets(spec, self.presets),
        )
        self.log.info(
            "Starting SageMaker training job %s (%s x %s, image %s, spot %s, max run %ss)",
            name,
            spec.sagemaker.training_instance_count,
            spec.sagemaker.training_instance_type,
            config["AlgorithmSpecification"]["TrainingImage"],
            spec.sagemaker.use_spot,
            spec.sagemaker.max_run_seconds,
        )
        try:
            with aws_errors("sagemaker:CreateTrainingJob", spec.sagemaker.aws_conn_id):
                hook.conn.create_training_job(**config)
        except ClientError as exc:
            if error_code(exc) != "ResourceInUse":
                raise
            self.log.info("Training job %s already exists (started by a concurrent try): waiting for it", name)
            return False
        return True

    # ------------------------------------------------------------------------------ the task

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.aws.training import RUNNING

        spec = self._spec()
        hook = self._hook(spec)
        name = self.job_name(context)
        self._job = (hook, name)
        # The job's name derives from the run: only a retry can meet an earlier try's job (a concurrent one is
        # CreateTrainingJob's ResourceInUse), so a first try creates without asking first.
        first = first_try(context)
        description = None if first else self._describe(spec, hook, name)
        if description is not None:
            self.log.info(
                "Training job %s of an earlier try is %s: not starting another", name, description["TrainingJobStatus"]
            )
        elif self._start(spec, hook, name, context):
            description = {"TrainingJobStatus": "InProgress"}  # just created: nothing to ask SageMaker yet
        else:
            description = self._describe(spec, hook, name) or {"TrainingJobStatus": "InProgress"}
        if description["TrainingJobStatus"] in RUNNING:
            description = self._wait(spec, hook, name)
        return self._finish(context, spec, name, description)

    def _wait(self, spec: Any, hook: Any, name: str) -> dict[str, Any]:
        """Defer until the job ends (or poll, when not deferrable); returns its final description."""
        from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

        from conveyor.aws.training import RUNNING, wait_limit_seconds

        interval = spec.sagemaker.check_interval_seconds
        limit = wait_limit_seconds(spec) + 600
        if self.deferrable:
            self.log.info("Waiting for training job %s in the triggerer (every %ss)", name, interval)
            self.defer(
                trigger=SageMakerTrigger(
                    job_name=name,
                    job_type="training",
                    waiter_delay=interval,
                    waiter_max_attempts=limit // interval + 1,
                    aws_conn_id=spec.sagemaker.aws_conn_id,
                    region_name=spec.sagemaker.region,
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=limit),
            )
        started, status = time.monotonic(), None
        while True:
            description = self._describe(spec, hook, name) or {
                "TrainingJobStatus": "Failed",
                "FailureReason": "the job disappeared",
            }
            if description.get("SecondaryStatus") != status:
                status = description.get("SecondaryStatus")
                self.log.info("Training job %s: %s (%s)", name, description["TrainingJobStatus"], status)
            if description["TrainingJobStatus"] not in RUNNING:
                return description
            if time.monotonic() - started > limit:
                raise AirflowException(f"training job {name} still runs after {limit}s: a retry waits for it again")
            time.sleep(interval)

    @translate_errors
    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: check the event, then take the job's model (or its failure)."""
        spec = self._spec()
        hook = self._hook(spec)
        event = event or {}
        name = event.get("job_name") or self.job_name(context)
        self._job = (hook, name)
        status = event.get("status")
        if status == "timeout":
            raise AirflowException(
                f"training job {name} did not end in time ({event.get('message')}); a retry waits for it again"
            )
        if status not in ("success", "failed", "stopped"):
            raise AirflowException(f"waiting for training job {name} failed: {event.get('message') or event}")
        description = self._describe(spec, hook, name)
        if description is None:
            raise AirflowFailException(f"training job {name} no longer exists")
        return self._finish(context, spec, name, description)

    def _finish(self, context: Any, spec: Any, name: str, description: dict[str, Any]) -> dict[str, Any]:
        """A completed job's model, repacked into the run's ``model.tar.gz``; a failed one's error."""
        from conveyor.aws.training import job_failure, job_model

        description = {"TrainingJobName": name, **description}
        if description["TrainingJobStatus"] != "Completed":  # Failed or Stopped
            raise job_failure(spec, description, self.log_lines, self.log)
        return job_model(spec, Lake.from_env(), context["run_id"], self.split, description, self.log)

    def on_kill(self) -> None:
        """Stop the training job when the task is killed (it would otherwise run, and bill, on)."""
        if self._job is None:
            return
        hook, name = self._job
        try:
            hook.conn.stop_training_job(TrainingJobName=name)
            self.log.info("Stopped training job %s", name)
        except Exception as exc:  # the job may have ended meanwhile; a kill must not raise
            self.log.warning("Could not stop training job %s: %s", name, exc)
