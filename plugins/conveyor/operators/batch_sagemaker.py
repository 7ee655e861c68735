"""Batch predictions on SageMaker: a transform job, then the same Parquet files and SQL table as locally."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from conveyor.aws.hosting import TransformStillRunning
from conveyor.lake import Lake
from conveyor.operators.base import first_try, pipeline_spec, translate_errors
from conveyor.operators.batch import BaseBatchPredictOperator

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec


CREATED_BY_THIS_CALL = timedelta(minutes=5)
"""How long before a create a job of its name may have been created and still be that create's own (botocore
resends a request after a timeout; clocks differ by seconds): a job of an earlier run is hours or days old."""


class SageMakerBatchPredictOperator(BaseBatchPredictOperator):
    """Score an input with a SageMaker batch transform job into ``predictions/<pipeline>/<run>/`` and a SQL table.

    1. The input (the Param, else the oldest complete, unscored drop in
       ``landing/<pipeline>/inference/``) is prepared for the job under the run's
       ``_transform/`` folder (``conveyor.aws.transform``): headerless CSV files of the model's features.
    2. ``CreateTransformJob`` runs the model (the SageMaker model of the deploy step: the version's
       ``model.tar.gz`` in the serving image) over them: ``text/csv`` split by line, mini-batches
       of ``deploy.batch.max_payload_mb``, ``deploy.batch.instance_count`` × ``instance_type``.
    3. Defers to the provider's ``SageMakerTrigger`` until the job ends.
    4. Pairs the answers with the input's ids and writes the local transform's rows (id,
       ``prediction``, ``proba_<class>``, model name and version, run id, ``scored_at``) to
       ``part-*.parquet`` + ``_SUCCESS.json``, replaces the run's rows in the table, writes the
       report, marks the drop scored and updates the predictions Asset.

    The job's name derives from the run, so a retry reuses the job: it waits for one in progress
    and loads one that completed; a job that failed fails the task with its ``FailureReason`` (a
    run's name is fixed: start a new run to score again). Returns what ``BatchPredictOperator``
    returns. Bad input fails the task (``AirflowFailException`` caused by ``BatchInputError``).

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param model: the resolve task's result (templated XCom): ``version`` and ``model_uri`` (S3).
    :param input_uri: a file or folder URI on S3 (templated); empty: the oldest pending inference drop.
    """

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

        from conveyor.aws import hosting
        from conveyor.aws.common import aws_errors, plain_s3_uri
        from conveyor.aws.transform import INPUT, OUTPUT, WORK

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        hook = hosting.sagemaker_hook(spec)
        conn_id = spec.sagemaker.aws_conn_id
        run_id = context["run_id"]
        job = hosting.transform_job_name(spec, run_id)
        work = lake.predictions(spec.name, run_id) / WORK
        # The job's name derives from the run: only a retry can meet an earlier try's job, so a first try
        # neither asks for one nor clears an earlier try's input (a run id used before fails at the create).
        first = first_try(context)
        with aws_errors(f"batch transform {job} of {spec.name}", conn_id):
            found = None if first else hosting.describe_or_none(hook.describe_transform_job, job)
            if found is None:
                manifest = self._prepare(spec, lake, work, first)
                region = hook.conn_region_name
                model = hosting.model_request(spec, self.model, region, run_id)
                if hosting.ensure_model(hook, model):
                    self.log.info("Created SageMaker model %s", model["ModelName"])
                request = hosting.transform_request(
                    spec,
                    job,
                    model["ModelName"],
                    plain_s3_uri(work / INPUT),
                    plain_s3_uri(work / OUTPUT),
                    str(self.model["version"]),
                    run_id,
                )
                self._create(hook, request, job, run_id, first)
                self.log.info(
                    "Started transform job %s: %s rows in %s files of %s with %s (%s x %s)",
                    job,
                    manifest["rows"],
                    len(manifest["parts"]),
                    manifest["source"],
                    model["ModelName"],
                    spec.deploy.batch.instance_count,
                    spec.deploy.batch.instance_type,
                )
            else:
                status = found["TransformJobStatus"]
                self.log.info("Transform job %s of this run exists already (%s): reusing it", job, status)
                if status == "Completed":
                    return self.execute_complete(context, {"status": "success", "job_name": job})
                if status not in ("InProgress", "Stopping"):
                    raise AirflowFailException(self._failure(job, found))
        interval = spec.sagemaker.check_interval_seconds
        timeout = spec.deploy.batch.timeout_seconds
        self.defer(
            trigger=SageMakerTrigger(
                job_name=job,
                job_type="transform",
                waiter_delay=interval,
                waiter_max_attempts=max(1, math.ceil(timeout / interval)),
                aws_conn_id=conn_id,
                region_name=spec.sagemaker.region,
            ),
            method_name="execute_complete",
            kwargs={"manifest": manifest} if found is None else None,  # what loading needs, not read back
            timeout=timedelta(seconds=timeout + 10 * interval),
        )

    def _prepare(self, spec: PipelineSpec, lake: Lake, work: ObjectStoragePath, fresh: bool) -> dict[str, Any]:
        """Find the input (or skip), check the model's archive, then write the job's input files (before any job
        exists).

        :param spec: the pipeline.
        :param lake: the lake (on S3).
        :param work: the run's ``_transform`` folder.
        :param fresh: the task's first try (no earlier input to clear).
        """
        from conveyor.aws.common import plain_s3_uri
        from conveyor.aws.transform import prepare_input
        from conveyor.batch.readers import BatchInputError

        plain_s3_uri(work)  # the lake must be on S3: SageMaker reads and writes only S3
        source, drop = self.batch_input(spec, lake)  # nothing to score: skipped before the archive is read
        metadata = self._verified(spec, lake)
        if metadata.problem_type == "image_classification":
            raise BatchInputError(
                f"{spec.name}: batch predictions score tables; an image model has no SageMaker batch path here"
            )
        self.log.info("Preparing %s for the transform job under %s", source, work)
        return prepare_input(
            source, metadata, work, spec.deploy.batch.chunk_rows, lake.conn_id, {"drop": drop}, fresh=fresh
        )

    def _create(self, hook: Any, request: dict[str, Any], job: str, run_id: str, first: bool) -> None:
        """``CreateTransformJob`` (the boto3 call itself: the hook's ``create_transform_job`` first checks the
        input prefix just written, with a HeadBucket, a HEAD and a listing).

        A job of this name met by a first try is this call's own when SageMaker created it moments ago (botocore
        resent the request after a timeout or a 5xx): it is waited for. An older one is a run id used before.

        :raises AirflowFailException: a first try meets an older job of this name: the run id was used before
            (a run deleted and triggered again), and its job is not this run's to load.
        """
        from datetime import UTC, datetime

        from botocore.exceptions import ClientError

        from conveyor.aws import hosting
        from conveyor.aws.common import error_code, error_message

        started = datetime.now(UTC)
        try:
            hook.conn.create_transform_job(**request)
        except ClientError as exc:
            taken = error_code(exc) == "ResourceInUse" or (
                error_code(exc) == "ValidationException" and "already exists" in error_message(exc)
            )
            if not first or not taken:
                raise
            created = (hosting.describe_or_none(hook.describe_transform_job, job) or {}).get("CreationTime")
            if isinstance(created, datetime) and created >= started - CREATED_BY_THIS_CALL:
                self.log.info("Transform job %s was created by this request (sent again by botocore)", job)
                return
            raise AirflowFailException(
                f"transform job {job} exists already (created {created}), though this is the task's first try: "
                f"the run id {run_id!r} was used before (a run deleted and triggered again?) and that job is not "
                "this run's to load; start a new run to score"
            ) from exc

    @staticmethod
    def _failure(job: str, described: dict[str, Any]) -> str:
        """The message of a transform job that did not complete.

        :param job: the job's name.
        :param described: the job as described.
        """
        return (
            f"transform job {job} ended {described.get('TransformJobStatus')}: "
            f"{described.get('FailureReason') or 'no reason given'}; its log is in CloudWatch "
            f"(/aws/sagemaker/TransformJobs, streams {job}/...). A run's job name is fixed: start a new run "
            "to score again"
        )

    def _verified(self, spec: PipelineSpec, lake: Lake) -> ModelMetadata:
        """The model's metadata, from its archive once its bytes are checked: SageMaker is never handed an
        archive whose bytes are not the ones the registry recorded (the transform job runs its
        ``code/inference.py``); nothing is written or created before.

        :param spec: the pipeline.
        :param lake: the lake (its connection reads the archive).
        :raises IntegrityError: the hashes differ, or none was recorded (unless unhashed versions are allowed).
        :raises BatchInputError: the archive holds no valid ``metadata.json`` (not a Conveyor model.tar.gz).
        """
        from conveyor.batch.readers import BatchInputError
        from conveyor.model.artifacts import RegisteredArchive, verified_metadata
        from conveyor.model.metadata import MetadataError

        registered = RegisteredArchive.of({"model_name": spec.name, **self.model})
        try:
            return verified_metadata(self.model["model_uri"], registered, lake.conn_id)
        except MetadataError as exc:
            raise BatchInputError(f"{exc} (not a Conveyor model.tar.gz)") from exc

    @translate_errors
    def execute_complete(
        self, context: Any, event: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None, **_: Any
    ) -> dict[str, Any]:
        """Load a completed job's answers into the run's Parquet files and the predictions table.

        The job's name derives from the run again; the input's manifest comes with the deferral (the
        try that prepared the input), else from ``_transform/ids/_manifest.json``.

        :param context: the task context.
        :param event: the trigger's event (``status``: success, failed, stopped, timeout or error).
        :param manifest: the manifest :meth:`_prepare` wrote, when this try wrote it.
        """
        from conveyor.aws import hosting
        from conveyor.aws.common import aws_errors
        from conveyor.aws.transform import IDS, MANIFEST, WORK, load_output
        from conveyor.batch.parts import write_parts
        from conveyor.batch.readers import local_copies
        from conveyor.batch.runs import predictions_table, run_timestamp
        from conveyor.batch.scoring import utc
        from conveyor.lake import read_json

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        run_id = context["run_id"]
        job = hosting.transform_job_name(spec, run_id)
        event = event or {}
        if event.get("status") != "success":
            with aws_errors(f"check transform job {job}", spec.sagemaker.aws_conn_id):
                described = hosting.sagemaker_hook(spec).describe_transform_job(job)
            if described["TransformJobStatus"] in ("InProgress", "Stopping"):
                raise TransformStillRunning(
                    f"transform job {job} is still {described['TransformJobStatus']} after "
                    f"{spec.deploy.batch.timeout_seconds}s ({event.get('message')}); "
                    "a retry waits for it again"
                )
            if described["TransformJobStatus"] != "Completed":
                raise AirflowFailException(self._failure(job, described))
        out = lake.predictions(spec.name, run_id)
        manifest = manifest or read_json(out / WORK / IDS / MANIFEST)
        stamp = utc(run_timestamp(context))
        version = str(self.model["version"])
        constants = {"model_name": spec.name, "model_version": version, "run_id": run_id, "scored_at": stamp}
        self.log.info(
            "Loading the answers of transform job %s (%s rows) into %s and table %s",
            job,
            manifest["rows"],
            out,
            predictions_table(spec),
        )
        with local_copies(keep_writes=True):  # the parts written stay on disk for the SQL load and summary (no GET)
            result = write_parts(
                out,
                load_output(out / WORK, constants, manifest),
                {
                    "model": spec.name,
                    "version": version,
                    "run_id": run_id,
                    "scored_at": str(stamp),
                    "source": manifest["source"],
                    "transform_job": job,
                },
                conn_id=lake.conn_id,
                fresh=first_try(context),  # this try made the job: no parts yet
            )
            return self.finish(
                context,
                spec=spec,
                lake=lake,
                source=manifest["source"],
                drop=manifest.get("drop"),
                result=result,
                details={"transform_job": job},
            )
