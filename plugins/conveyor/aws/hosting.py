"""SageMaker hosting: the models, endpoint configurations and deployment policy Conveyor asks for.

Shared by the endpoint deploy (``operators/deploy_sagemaker.py``) and the batch transform
(``operators/batch_sagemaker.py``). The request builders are pure functions, so tests assert the
exact requests; the calls go through the Amazon provider's ``SageMakerHook``.

Names derive from the pipeline, the model version and the request's content, never the clock:

| resource | name |
|---|---|
| model | ``<prefix><pipeline>-v<version>-<6 hex of the container>`` |
| endpoint config | ``<prefix><pipeline>-v<version>-<6 hex of variants and capture>`` |
| endpoint | ``<prefix><deploy.endpoint.name or pipeline>`` |

``_`` becomes ``-`` (SageMaker names allow letters, digits and ``-``, 63 at most). The same name
means the same content, so "already exists" means "already made by an earlier try or deploy":
it is reused. A changed image, instance type or capture share makes new names.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from conveyor.errors import TransientError

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from conveyor.lake import Lake
    from conveyor.spec import EndpointSpec, PipelineSpec

VARIANT = "AllTraffic"
NAME_MAX = 63
# The model server settings of the AWS framework containers: run code/inference.py of model.tar.gz.
CONTAINER_ENV = {
    "SAGEMAKER_PROGRAM": "inference.py",
    "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
}
CAPTURE_CONTENT_TYPES = {"CsvContentTypes": ["text/csv"], "JsonContentTypes": ["application/json"]}
# Statuses of an endpoint with a change in progress (SageMaker refuses another until it ends).
ENDPOINT_BUSY = frozenset({"Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"})


class EndpointBusy(TransientError):
    """The endpoint has another change in progress (transient: the task is retried)."""


class TransformStillRunning(TransientError):
    """The transform job outlasted the run's wait (transient: a retry waits for the same job again)."""


def sagemaker_hook(spec: PipelineSpec) -> SageMakerHook:
    """The provider's SageMaker hook on the pipeline's AWS connection and region.

    :param spec: the pipeline (``sagemaker.aws_conn_id``, ``sagemaker.region``).
    """
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    return SageMakerHook(aws_conn_id=spec.sagemaker.aws_conn_id, region_name=spec.sagemaker.region)


def digest(document: Any, length: int = 6) -> str:
    """A short, stable hash of a JSON-able document (for names that change when the content does).

    :param document: the content.
    :param length: hex characters.
    """
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:length]


def resource_name(spec: PipelineSpec, base: str, suffix: str = "") -> str:
    """``<prefix><base><suffix>`` as a SageMaker name; a long base is cut (the suffix is kept whole).

    :param spec: the pipeline (``sagemaker.name_prefix``).
    :param base: e.g. the pipeline's name (``_`` becomes ``-``).
    :param suffix: e.g. ``-v3-1a2b3c``.
    """
    from conveyor.aws.common import sagemaker_name

    tail = sagemaker_name(suffix, NAME_MAX) if suffix else ""
    head = sagemaker_name(f"{spec.sagemaker.name_prefix}{base}", NAME_MAX - len(tail) - (1 if tail else 0))
    return f"{head}-{tail}" if tail else head


def endpoint_name(spec: PipelineSpec) -> str:
    """The pipeline's SageMaker endpoint: ``<prefix><deploy.endpoint.name or pipeline>``.

    :param spec: the pipeline.
    """
    return resource_name(spec, spec.deploy.endpoint.name or spec.name)


def tags(spec: PipelineSpec, version: str, run_id: str) -> list[dict[str, str]]:
    """The AWS tags of what a run creates: which pipeline, model version and Airflow run.

    :param spec: the pipeline.
    :param version: the registered model version.
    :param run_id: the Airflow run that creates the resource.
    """
    return [
        {"Key": "conveyor:pipeline", "Value": spec.name},
        {"Key": "conveyor:model-version", "Value": str(version)},
        {"Key": "conveyor:run-id", "Value": run_id[:256]},
    ]


def model_request(spec: PipelineSpec, model: dict[str, Any], region: str, run_id: str) -> dict[str, Any]:
    """The ``CreateModel`` request of a registered version: its ``model.tar.gz`` in the serving image.

    :param spec: the pipeline (role, inference image, trainer).
    :param model: the resolve task's result (``version``, ``model_uri``: the S3 URI of ``model.tar.gz``).
    :param region: the AWS region (for the default framework image).
    :param run_id: the Airflow run (a tag).
    """
    from conveyor.aws.common import inference_image, plain_s3_uri

    container = {
        "Image": inference_image(spec.trainer.kind, region, spec.sagemaker.inference_image_uri),
        "ModelDataUrl": plain_s3_uri(model["model_uri"]),
        "Environment": {**CONTAINER_ENV, "SAGEMAKER_REGION": region},
    }
    version = str(model["version"])
    content = {"container": container, "role": spec.sagemaker.role_arn}
    return {
        "ModelName": resource_name(spec, spec.name, f"v{version}-{digest(content)}"),
        "ExecutionRoleArn": spec.sagemaker.role_arn,
        "PrimaryContainer": container,
        "Tags": tags(spec, version, run_id),
    }


def capture_config(spec: PipelineSpec, lake: Lake) -> dict[str, Any] | None:
    """The endpoint's ``DataCaptureConfig``: ``capture_share`` of requests and responses to ``capture/<p>/``.

    SageMaker samples whole percents: a share above 0 captures at least 1 %. None when the share is 0.

    :param spec: the pipeline (``deploy.endpoint.capture_share``).
    :param lake: the lake (on S3).
    """
    from conveyor.aws.common import plain_s3_uri

    share = spec.deploy.endpoint.capture_share
    if share <= 0:
        return None
    return {
        "EnableCapture": True,
        "InitialSamplingPercentage": max(1, min(100, round(share * 100))),
        "DestinationS3Uri": plain_s3_uri(lake.capture(spec.name)),
        "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
        "CaptureContentTypeHeader": CAPTURE_CONTENT_TYPES,
    }


def endpoint_config_request(
    spec: PipelineSpec, lake: Lake, model_name: str, version: str, run_id: str
) -> dict[str, Any]:
    """The ``CreateEndpointConfig`` request: one variant of the model, with data capture when asked.

    :param spec: the pipeline (instance type and count, capture share).
    :param lake: the lake (capture destination).
    :param model_name: the SageMaker model (:func:`model_request`).
    :param version: the registered model version (the name and a tag).
    :param run_id: the Airflow run (a tag).
    """
    settings = spec.deploy.endpoint
    variants = [
        {
            "VariantName": VARIANT,
            "ModelName": model_name,
            "InitialInstanceCount": settings.instance_count,
            "InstanceType": settings.instance_type,
            "InitialVariantWeight": 1.0,
        }
    ]
    capture = capture_config(spec, lake)
    content = {"variants": variants, "capture": capture}
    request: dict[str, Any] = {
        "EndpointConfigName": resource_name(spec, spec.name, f"v{version}-{digest(content)}"),
        "ProductionVariants": variants,
    }
    if capture:
        request["DataCaptureConfig"] = capture
    request["Tags"] = tags(spec, version, run_id)
    return request


def percent(share: float) -> dict[str, Any]:
    """A share of the fleet as SageMaker's ``CAPACITY_PERCENT`` size (whole percents, at least 1).

    :param share: between 0 and 1.
    """
    return {"Type": "CAPACITY_PERCENT", "Value": max(1, min(100, round(share * 100)))}


def rollout_seconds(settings: EndpointSpec) -> int:
    """How long a blue/green update's schedule takes at least: the traffic steps' waits and the termination wait.

    :param settings: ``deploy.endpoint``.
    """
    steps = {"ALL_AT_ONCE": 1, "CANARY": 2, "LINEAR": math.ceil(1 / settings.traffic_step_share)}
    return steps[settings.traffic_routing] * settings.wait_interval_seconds + settings.termination_wait_seconds


def deployment_config(settings: EndpointSpec) -> dict[str, Any]:
    """The ``DeploymentConfig`` of an update: blue/green traffic shifting, automatic rollback on alarms.

    SageMaker itself rolls back when the new fleet fails to come up, when an alarm fires during
    the shift or the bake, or when the update outlasts ``MaximumExecutionTimeoutInSeconds``
    (``deploy_timeout_seconds`` plus the schedule, within SageMaker's 600-28800 s).

    :param settings: ``deploy.endpoint``.
    """
    routing: dict[str, Any] = {
        "Type": settings.traffic_routing,
        "WaitIntervalInSeconds": settings.wait_interval_seconds,
    }
    if settings.traffic_routing == "CANARY":
        routing["CanarySize"] = percent(settings.traffic_step_share)
    elif settings.traffic_routing == "LINEAR":
        routing["LinearStepSize"] = percent(settings.traffic_step_share)
    timeout = min(28800, max(600, settings.deploy_timeout_seconds + rollout_seconds(settings)))
    config: dict[str, Any] = {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": routing,
            "TerminationWaitInSeconds": settings.termination_wait_seconds,
            "MaximumExecutionTimeoutInSeconds": timeout,
        }
    }
    if settings.rollback_alarms:
        config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": name} for name in settings.rollback_alarms]}
    return config


def is_missing(exc: Exception) -> bool:
    """Whether an AWS error says the named resource does not exist (SageMaker: ``Could not find …``).

    :param exc: the exception of a describe call.
    """
    from conveyor.aws.common import error_code, error_message

    missing = error_code(exc) in {"ValidationException", "ResourceNotFound"}
    return missing and "could not find" in error_message(exc).lower()


def describe_or_none(describe: Callable[[str], dict[str, Any]], name: str) -> dict[str, Any] | None:
    """A describe call's answer, or None when the resource does not exist.

    :param describe: e.g. ``hook.describe_endpoint``.
    :param name: the resource's name.
    """
    from botocore.exceptions import ClientError

    try:
        return describe(name)
    except ClientError as exc:
        if is_missing(exc):
            return None
        raise


def is_duplicate(exc: Exception) -> bool:
    """Whether an AWS error refuses a create because the named resource exists (SageMaker: ``Cannot create
    already existing model …``).

    :param exc: the exception of a create call.
    """
    from conveyor.aws.common import error_code, error_message

    return error_code(exc) == "ValidationException" and "already exist" in error_message(exc).lower()


def _create_unless_there(create: Callable[[dict[str, Any]], Any], request: dict[str, Any]) -> bool:
    from botocore.exceptions import ClientError

    try:
        create(request)
    except ClientError as exc:
        if is_duplicate(exc):
            return False
        raise
    return True


def ensure_model(hook: SageMakerHook, request: dict[str, Any]) -> bool:
    """Create the SageMaker model unless it exists (its name carries its content); True when created.

    One call: the create itself, SageMaker's "already existing" refusal meaning it is there (no
    describe first).

    :param hook: the SageMaker hook.
    :param request: from :func:`model_request`.
    """
    return _create_unless_there(hook.create_model, request)


def ensure_endpoint_config(hook: SageMakerHook, request: dict[str, Any]) -> bool:
    """Create the endpoint configuration unless it exists (its name carries its content); True when created.

    One call, as :func:`ensure_model`.

    :param hook: the SageMaker hook.
    :param request: from :func:`endpoint_config_request`.
    """
    return _create_unless_there(hook.create_endpoint_config, request)


def delete_quietly(log: Any, what: str, delete: Callable[..., Any], **kwargs: Any) -> bool:
    """Delete a resource during clean-up; a failure is logged, never raised (the first error matters).

    :param log: the task's logger.
    :param what: the resource, for the log.
    :param delete: the delete call.
    :param kwargs: its arguments.
    :return: whether it was deleted (or was already gone).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        delete(**kwargs)
    except ClientError as exc:
        if is_missing(exc):
            return True
        log.warning("Could not delete %s: %s", what, exc)
        return False
    except BotoCoreError as exc:
        log.warning("Could not delete %s: %s", what, exc)
        return False
    log.info("Deleted %s", what)
    return True


def transform_job_name(spec: PipelineSpec, run_id: str) -> str:
    """The transform job of a batch run: ``<prefix><pipeline>-batch-<12 hex of the run id>``.

    The same for every try of the run, so a retry finds the job an earlier try started.

    :param spec: the pipeline.
    :param run_id: the Airflow run.
    """
    return resource_name(spec, spec.name, f"batch-{hashlib.sha256(run_id.encode()).hexdigest()[:12]}")


def transform_request(
    spec: PipelineSpec, job: str, model_name: str, input_uri: str, output_uri: str, version: str, run_id: str
) -> dict[str, Any]:
    """The ``CreateTransformJob`` request: CSV lines in mini-batches, JSON answers assembled by line.

    :param spec: the pipeline (``deploy.batch``: instances, payload size).
    :param job: the job's name (:func:`transform_job_name`).
    :param model_name: the SageMaker model (:func:`model_request`).
    :param input_uri: the ``s3://`` prefix of the prepared input files (``conveyor.aws.transform``).
    :param output_uri: the ``s3://`` prefix the answers go to.
    :param version: the registered model version (a tag).
    :param run_id: the Airflow run (a tag).
    """
    from conveyor.aws.transform import ACCEPT, CONTENT_TYPE

    batch = spec.deploy.batch
    return {
        "TransformJobName": job,
        "ModelName": model_name,
        "BatchStrategy": "MultiRecord",
        "MaxPayloadInMB": batch.max_payload_mb,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri.rstrip("/") + "/"}},
            "ContentType": CONTENT_TYPE,
            "CompressionType": "None",
            "SplitType": "Line",
        },
        "TransformOutput": {"S3OutputPath": output_uri.rstrip("/"), "Accept": ACCEPT, "AssembleWith": "Line"},
        "TransformResources": {"InstanceType": batch.instance_type, "InstanceCount": batch.instance_count},
        "Tags": tags(spec, version, run_id),
    }


def created_by_run(hook: SageMakerHook, arn: str, run_id: str) -> bool:
    """Whether a resource carries this run's ``conveyor:run-id`` tag (it was created by this run, any try).

    :param hook: the SageMaker hook.
    :param arn: the resource's ARN.
    :param run_id: the Airflow run.
    """
    found = hook.conn.list_tags(ResourceArn=arn).get("Tags", [])
    return {"Key": "conveyor:run-id", "Value": run_id[:256]} in [{"Key": t["Key"], "Value": t["Value"]} for t in found]
