"""The train task of ``compute: sagemaker``: the same training script as a SageMaker training job."""

from __future__ import annotations

import json
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from conveyor.lake import Lake
from conveyor.operators.train import TrainModelOperator


class SageMakerTrainModelOperator(TrainModelOperator):
    """Train on SageMaker: ``include/training/<trainer>/train.py`` in script mode, as a training job.

    The job (``<pipeline>-<hash of the DAG and run>``, the same for every try) reads the run's
    ``split/train`` and ``split/validation`` folders on S3 as its channels, gets the script's
    flags as hyperparameters (``trainer_args``, as on the local backend), and runs in the
    trainer's framework container with the instance type and count, spot and max-run settings of
    ``sagemaker:``. The wait is deferred to the triggerer (the provider's ``SageMakerTrigger``).

    A retry finds the job of an earlier try: still running, it waits for it; completed, it uses
    its model; failed or stopped, it fails with the job's reason (trigger a new run to train
    again). A failed job's ``FailureReason`` and the last lines of its CloudWatch log go to the
    task log and the error. The job's ``model.tar.gz`` is repacked like the local backend's
    (``code/inference.py`` and the full ``metadata.json``) into ``models/<pipeline>/<run>/``, and
    the result is the same as ``TrainModelOperator``'s.

    :param pipeline: the pipeline's name.
    :param split: the split task's result (templated XCom).
    :param time_limit: the training budget in seconds (templated; the spec's when None).
    :param presets: the trainer's presets (templated; the spec's when None).
    :param deferrable: wait in the triggerer (else poll in the worker).
    :param log_lines: how many CloudWatch log lines a failed job's error carries.
    """

    template_fields = TrainModelOperator.template_fields

    def __init__(self, *, pipeline: str, split: Any, time_limit: Any = None, presets: str | None = None,
                 deferrable: bool = True, log_lines: int = 30, **kwargs: Any):
        super().__init__(pipeline=pipeline, split=split, time_limit=time_limit, presets=presets, **kwargs)
        self.deferrable = deferrable
        self.log_lines = log_lines
        self._job: tuple[Any, str] | None = None

    # ------------------------------------------------------------------------------- helpers

    def _spec(self) -> Any:
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        if spec.compute != "sagemaker":
            raise AirflowFailException(f"{self.pipeline}: compute is {spec.compute!r}; this task trains on SageMaker")
        return spec

    def _hook(self, spec: Any) -> Any:
        from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

        return SageMakerHook(aws_conn_id=spec.sagemaker.aws_conn_id, region_name=spec.sagemaker.region)

    def job_name(self, context: Any) -> str:
        """The training job of this run (the same for every try)."""
        from conveyor.aws.training import training_job_name

        dag = context.get("dag")
        return training_job_name(self.pipeline, getattr(dag, "dag_id", None) or self.dag_id, context["run_id"])

    def _describe(self, spec: Any, hook: Any, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        from conveyor.aws.training import aws_errors, error_code

        try:
            with aws_errors("sagemaker:DescribeTrainingJob", spec.sagemaker.aws_conn_id):
                return hook.describe_training_job(name)
        except ClientError as exc:
            if error_code(exc) == "ValidationException":  # what SageMaker answers for an unknown name
                return None
            raise

    def _budget(self, spec: Any) -> tuple[int, str]:
        time_limit = int(self.time_limit if self.time_limit not in (None, "", "None") else spec.trainer.time_limit)
        if time_limit <= 0:
            raise AirflowFailException(f"time budget {time_limit}s: rule 'time_limit > 0' (a model needs time to train)")
        if time_limit >= spec.sagemaker.max_run_seconds:
            raise AirflowFailException(
                f"time budget {time_limit}s: rule 'time_limit < sagemaker.max_run_seconds' "
                f"({spec.sagemaker.max_run_seconds}s): SageMaker would stop the job before the script ends"
            )
        presets = self.presets if self.presets not in (None, "", "None") else spec.trainer.presets
        return time_limit, presets

    def job_config(self, spec: Any, lake: Lake, run_id: str, name: str, region: str) -> dict[str, Any]:
        """The ``CreateTrainingJob`` request of this run; uploads the script's ``sourcedir.tar.gz``.

        :param spec: the pipeline.
        :param lake: the lake (on S3).
        :param run_id: the Airflow run.
        :param name: the job's name.
        :param region: the job's region.
        """
        from airflow.sdk import ObjectStoragePath

        from conveyor.model import artifacts
        from conveyor.aws.training import (
            CHANNELS,
            CHECKPOINT_LOCAL_PATH,
            hyperparameters,
            pack_source,
            plain_s3_uri,
            training_image,
            training_job_config,
        )
        from conveyor.lake import copy_verified

        time_limit, presets = self._budget(spec)
        run_dir = lake.models(self.pipeline, run_id)
        channels = {part: plain_s3_uri(run_dir / "split" / part) + "/" for part in CHANNELS}  # S3 only
        script = artifacts.training_script(spec.trainer.kind)
        source = run_dir / "source" / artifacts.code_version(spec.trainer.kind) / "sourcedir.tar.gz"
        with tempfile.TemporaryDirectory(prefix="conveyor-source-") as tmp:
            archive = pack_source(script.parent, Path(tmp) / "sourcedir.tar.gz")
            copy_verified(ObjectStoragePath(archive.as_uri()), source, 1 << 20)
        # GPUs: the container's SM_NUM_GPUS (the script's default) when the trainer may use them.
        args = self.trainer_args(spec, time_limit, presets, num_gpus=0)
        if spec.trainer.gpu and "--num-gpus" in args:
            at = args.index("--num-gpus")
            del args[at:at + 2]
        checkpoints = None
        if spec.trainer.kind == "resnet":
            args += ["--checkpoint-dir", CHECKPOINT_LOCAL_PATH]
        if spec.trainer.kind == "resnet" or spec.sagemaker.use_spot:
            checkpoints = plain_s3_uri(run_dir / "checkpoints") + "/"
        return training_job_config(
            spec, name, training_image(spec, region),
            channels=channels,
            output_uri=plain_s3_uri(run_dir / "sagemaker") + "/",
            checkpoint_uri=checkpoints,
            hyperparameters=hyperparameters(args, script.name, plain_s3_uri(source), region),
            tags={"conveyor:pipeline": self.pipeline, "conveyor:dag_id": self.dag_id},
        )

    # ------------------------------------------------------------------------------ the task

    def execute(self, context: Any) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        from conveyor.aws.training import RUNNING, aws_errors, error_code

        spec = self._spec()
        lake = Lake.from_env()
        hook = self._hook(spec)
        name = self.job_name(context)
        self._job = (hook, name)
        description = self._describe(spec, hook, name)
        if description is not None:
            self.log.info("Training job %s of an earlier try is %s: not starting another",
                          name, description["TrainingJobStatus"])
        else:
            config = self.job_config(spec, lake, context["run_id"], name, hook.conn_region_name)
            self.log.info("Starting SageMaker training job %s (%s x %s, image %s, spot %s, max run %ss)", name,
                          spec.sagemaker.training_instance_count, spec.sagemaker.training_instance_type,
                          config["AlgorithmSpecification"]["TrainingImage"], spec.sagemaker.use_spot,
                          spec.sagemaker.max_run_seconds)
            try:
                with aws_errors("sagemaker:CreateTrainingJob", spec.sagemaker.aws_conn_id):
                    hook.conn.create_training_job(**config)
            except ClientError as exc:
                if error_code(exc) != "ResourceInUse":
                    raise
                self.log.info("Training job %s already exists (started by a concurrent try): waiting for it", name)
            description = self._describe(spec, hook, name) or {"TrainingJobStatus": "InProgress"}
        if description["TrainingJobStatus"] in RUNNING:
            description = self._wait(spec, hook, name)
        return self._finish(context, spec, lake, hook, description)

    def _wait(self, spec: Any, hook: Any, name: str) -> dict[str, Any]:
        """Defer until the job ends (or poll, when not deferrable); returns its final description."""
        from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

        from conveyor.aws.training import RUNNING, wait_limit_seconds

        interval = spec.sagemaker.check_interval_seconds
        limit = wait_limit_seconds(spec) + 600
        if self.deferrable:
            self.log.info("Waiting for training job %s in the triggerer (every %ss)", name, interval)
            self.defer(
                trigger=SageMakerTrigger(job_name=name, job_type="training", waiter_delay=interval,
                                         waiter_max_attempts=limit // interval + 1,
                                         aws_conn_id=spec.sagemaker.aws_conn_id, region_name=spec.sagemaker.region),
                method_name="execute_complete",
                timeout=timedelta(seconds=limit),
            )
        started, status = time.monotonic(), None
        while True:
            description = self._describe(spec, hook, name) or {"TrainingJobStatus": "Failed",
                                                               "FailureReason": "the job disappeared"}
            if description.get("SecondaryStatus") != status:
                status = description.get("SecondaryStatus")
                self.log.info("Training job %s: %s (%s)", name, description["TrainingJobStatus"], status)
            if description["TrainingJobStatus"] not in RUNNING:
                return description
            if time.monotonic() - started > limit:
                raise AirflowException(f"training job {name} still runs after {limit}s: a retry waits for it again")
            time.sleep(interval)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: check the event, then take the job's model (or its failure)."""
        spec = self._spec()
        hook = self._hook(spec)
        event = event or {}
        name = event.get("job_name") or self.job_name(context)
        self._job = (hook, name)
        status = event.get("status")
        if status == "timeout":
            raise AirflowException(f"training job {name} did not end in time ({event.get('message')}); "
                                   "a retry waits for it again")
        if status not in ("success", "failed", "stopped"):
            raise AirflowException(f"waiting for training job {name} failed: {event.get('message') or event}")
        description = self._describe(spec, hook, name)
        if description is None:
            raise AirflowFailException(f"training job {name} no longer exists")
        return self._finish(context, spec, Lake.from_env(), hook, description)

    def _finish(self, context: Any, spec: Any, lake: Lake, hook: Any, description: dict[str, Any]) -> dict[str, Any]:
        """A completed job's model, repacked into the run's ``model.tar.gz``; a failed one's error."""
        from conveyor.aws.training import TrainingJobFailed, training_log_tail

        name = description.get("TrainingJobName") or self.job_name(context)
        status = description["TrainingJobStatus"]
        if status != "Completed":  # Failed or Stopped
            reason = description.get("FailureReason") or "(SageMaker gave no reason)"
            tail = training_log_tail(spec.sagemaker.aws_conn_id, spec.sagemaker.region, name, self.log_lines)
            self.log.error("Training job %s %s: %s", name, status, reason)
            for line in tail:
                self.log.error("[%s] %s", name, line)
            raise TrainingJobFailed(
                f"SageMaker training job {name} {status}: {reason}; nothing was registered (a retry of this run "
                f"meets the same job: trigger a new run to train again); last log lines:\n" + "\n".join(tail)
            )
        return self._repack(context, spec, lake, description)

    def _repack(self, context: Any, spec: Any, lake: Lake, description: dict[str, Any]) -> dict[str, Any]:
        from airflow.sdk import ObjectStoragePath

        from conveyor import __version__
        from conveyor.model import artifacts
        from conveyor.lake import copy_verified, upload_tree

        name = description["TrainingJobName"]
        run_id = context["run_id"]
        run_dir = lake.models(self.pipeline, run_id)
        model_uri = description["ModelArtifacts"]["S3ModelArtifacts"]
        seconds = _train_seconds(description)
        with tempfile.TemporaryDirectory(prefix="conveyor-sm-train-") as tmp:
            scratch = Path(tmp)
            local = scratch / "job-model.tar.gz"
            self.log.info("Fetching the model of training job %s: %s", name, model_uri)
            try:
                copy_verified(ObjectStoragePath(model_uri, conn_id=lake.conn_id), ObjectStoragePath(local.as_uri()), 1 << 20)
            except FileNotFoundError:
                raise AirflowFailException(f"training job {name} completed but wrote no model at {model_uri}") from None
            model_dir = artifacts.unpack(local, scratch / "model")
            if not (model_dir / "metadata.json").exists():
                raise AirflowFailException(f"training job {name}: {model_uri} has no metadata.json (not a Conveyor trainer?)")
            trained = json.loads((model_dir / "metadata.json").read_text())
            metadata = {
                **trained,
                "pipeline": self.pipeline,
                "run_id": run_id,
                "dataset_version": self.split["dataset_version"],
                "labelled": self.split.get("labelled"),
                "split": self.split["parts"],
                "code_version": _submitted_code_version(description) or artifacts.code_version(spec.trainer.kind),
                "conveyor_version": __version__,
                "backend": "sagemaker",
                "training_job": name,
                "training_job_arn": description.get("TrainingJobArn"),
                "instance_type": (description.get("ResourceConfig") or {}).get("InstanceType"),
                "billable_seconds": description.get("BillableTimeInSeconds"),
                "train_seconds": seconds,
            }
            archive = artifacts.pack(model_dir, artifacts.inference_code(spec.trainer.kind), metadata,
                                     scratch / "model.tar.gz")
            target = run_dir / "model.tar.gz"
            copy_verified(ObjectStoragePath(archive.as_uri()), target, 1 << 20)
            output = ObjectStoragePath(model_uri.rsplit("/", 1)[0] + "/output.tar.gz", conn_id=lake.conn_id)
            if output.exists():
                copy_verified(output, ObjectStoragePath((scratch / "output.tar.gz").as_uri()), 1 << 20)
                upload_tree(artifacts.unpack(scratch / "output.tar.gz", scratch / "output"), run_dir / "output")
            self.log.info("Model artifact: %s (%.1f MB) from training job %s (%.0fs)", target,
                          archive.stat().st_size / 1e6, name, seconds)
        return {
            "model_uri": str(target),
            "code_version": metadata["code_version"],
            "dataset_version": metadata["dataset_version"],
            "best_model": trained.get("best_model"),
            "validation_score": trained.get("validation_score"),
            "train_seconds": seconds,
        }

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


def _train_seconds(description: dict[str, Any]) -> float:
    """The job's training time: ``TrainingTimeInSeconds``, else end minus start."""
    if description.get("TrainingTimeInSeconds") is not None:
        return float(description["TrainingTimeInSeconds"])
    start, end = description.get("TrainingStartTime"), description.get("TrainingEndTime")
    if start is not None and end is not None:
        return round((end - start).total_seconds(), 2)
    return 0.0


def _submitted_code_version(description: dict[str, Any]) -> str | None:
    """The code version the job ran: the folder of its ``sagemaker_submit_directory``."""
    raw = (description.get("HyperParameters") or {}).get("sagemaker_submit_directory")
    if not raw:
        return None
    try:
        uri = json.loads(raw)
    except ValueError:
        uri = raw
    parts = str(uri).rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2].startswith("c-") else None
