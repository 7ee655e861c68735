"""The SageMaker backend: the same training scripts as a SageMaker training job, and AWS helpers.

A training job runs ``include/training/<trainer>/train.py`` in script mode inside an AWS framework
container: the script's folder is packed as ``sourcedir.tar.gz`` and uploaded under the run
(``models/<pipeline>/<run>/source/<code version>/``), the run's split folders are the ``train`` and
``validation`` channels, and every flag of the script is a hyperparameter (JSON-encoded as the
SageMaker Python SDK does, so the training toolkit hands them back to the script as
``--flag value``). ``sagemaker_program`` and ``sagemaker_submit_directory`` tell the container's
training toolkit which script to run.

Default container images (``sagemaker.image_uri`` / ``sagemaker.inference_image_uri`` override them):

| trainer | training | inference |
|---|---|---|
| ``autogluon`` | ``autogluon:1.6.3-cpu-amzn2023`` (``-cu133-`` with ``trainer.gpu``) | the same image |
| ``resnet`` | ``pytorch-training:2.9.0-cpu-py312-ubuntu22.04-sagemaker`` (``gpu-py312-cu130`` with ``trainer.gpu``) | ``pytorch-inference:2.9.0-cpu-py312-ubuntu22.04-sagemaker`` |

all in the AWS Deep Learning Containers registry ``763104351884.dkr.ecr.<region>.amazonaws.com``
(a few opt-in regions use another account: set the image explicitly there).

AWS errors: an expired or invalid credential becomes :class:`AwsCredentialsExpired` (retried: the
connection may be refreshed by then), a missing IAM permission :class:`AwsPermissionDenied` (not
retried), both naming the connection and the API call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from airflow.sdk.exceptions import AirflowException, AirflowFailException

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.spec import PipelineSpec

DLC_REGISTRY = "763104351884.dkr.ecr.{region}.amazonaws.com"
TRAINING_IMAGES = {
    ("autogluon", False): "autogluon:1.6.3-cpu-amzn2023",
    ("autogluon", True): "autogluon:1.6.3-cu133-amzn2023",
    ("resnet", False): "pytorch-training:2.9.0-cpu-py312-ubuntu22.04-sagemaker",
    ("resnet", True): "pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker",
}
INFERENCE_IMAGES = {
    "autogluon": "autogluon:1.6.3-cpu-amzn2023",
    "resnet": "pytorch-inference:2.9.0-cpu-py312-ubuntu22.04-sagemaker",
}
CONTENT_TYPES = {
    "autogluon": ["text/csv", "application/json"],
    "resnet": ["image/jpeg", "image/png", "application/x-image", "application/json"],
}
RESPONSE_TYPES = ["application/json", "text/csv"]

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CHANNELS = ("train", "validation")
RUNNING = frozenset({"InProgress", "Stopping"})
FAILED = frozenset({"Failed", "Stopped"})
HYPERPARAMETER_VALUE_MAX = 2500
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_CREDENTIAL_ERRORS = frozenset({
    "ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId",
    "UnrecognizedClientException", "InvalidSignatureException", "SignatureDoesNotMatch",
})
_PERMISSION_ERRORS = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"})


class AwsCredentialsExpired(AirflowException):
    """The AWS connection's credentials expired or were refused (transient: the task is retried)."""


class AwsPermissionDenied(AirflowFailException):
    """The role behind the AWS connection lacks an IAM permission (deterministic: not retried)."""


class TrainingJobFailed(AirflowFailException):
    """A SageMaker training job ended ``Failed`` or ``Stopped`` (carries its reason and last log lines)."""


def error_code(exc: Exception) -> str:
    """The AWS error code of a botocore ``ClientError`` ('' for anything else).

    :param exc: the exception.
    """
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code") or "")


def error_message(exc: Exception) -> str:
    """The AWS error message of a botocore ``ClientError`` (``str(exc)`` for anything else).

    :param exc: the exception.
    """
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Message") or exc)


@contextlib.contextmanager
def aws_errors(action: str, conn_id: str | None) -> Iterator[None]:
    """Turn credential and permission errors of AWS calls into Conveyor's clear errors.

    :param action: the API call(s) made inside, e.g. ``sagemaker:CreateTrainingJob``.
    :param conn_id: the Airflow connection the calls use.
    :raises AwsCredentialsExpired: the credentials expired or were refused.
    :raises AwsPermissionDenied: the role may not make the call.
    """
    from botocore.exceptions import ClientError, NoCredentialsError, TokenRetrievalError

    try:
        yield
    except ClientError as exc:
        code = error_code(exc)
        if code in _CREDENTIAL_ERRORS:
            raise AwsCredentialsExpired(
                f"{action}: the credentials of AWS connection {conn_id!r} were refused ({code}: "
                f"{error_message(exc)}); refresh them (the task is retried)"
            ) from exc
        if code in _PERMISSION_ERRORS:
            raise AwsPermissionDenied(
                f"{action}: the role of AWS connection {conn_id!r} lacks the permission ({code}: "
                f"{error_message(exc)}); see docs/aws.md for the IAM policy each step needs"
            ) from exc
        raise
    except (NoCredentialsError, TokenRetrievalError) as exc:
        raise AwsCredentialsExpired(f"{action}: AWS connection {conn_id!r} has no usable credentials: {exc}") from exc


def plain_s3_uri(location: "str | ObjectStoragePath") -> str:
    """``s3://bucket/key`` for an S3 ``ObjectStoragePath`` or URI (whose text may carry ``conn@``).

    :param location: an S3 path of the lake or an ``s3://`` URI.
    :raises AirflowFailException: the location is not on S3 (SageMaker reads and writes only S3).
    """
    if not isinstance(location, str):
        if location.protocol not in ("s3", "s3a"):
            raise AirflowFailException(f"{location}: SageMaker needs the lake on S3 (CONVEYOR_LAKE_URI=s3://...)")
        return "s3://" + location.path
    match = re.match(r"^s3a?://(?:[^@/]+@)?(.+)$", location)
    if not match:
        raise AirflowFailException(f"{location}: SageMaker needs an s3:// location (the lake must be on S3)")
    return "s3://" + match.group(1)


def sagemaker_name(text: str, limit: int) -> str:
    """A SageMaker resource name part: letters, digits and '-', at most ``limit`` characters.

    :param text: e.g. a pipeline name (``_`` becomes ``-``).
    :param limit: the longest result.
    """
    return re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9-]", "-", text))[:limit].strip("-") or "conveyor"


def training_job_name(pipeline: str, dag_id: str, run_id: str) -> str:
    """The training job of an Airflow run: ``<pipeline>-<12 hex of dag_id and run_id>``.

    The same for every try of the run, so a retry finds the job a previous try started.

    :param pipeline: the pipeline's name.
    :param dag_id: the train DAG's id.
    :param run_id: the Airflow run's id.
    """
    digest = hashlib.sha256(f"{dag_id}\n{run_id}".encode()).hexdigest()[:12]
    name = f"{sagemaker_name(pipeline, 50)}-{digest}"
    assert _JOB_NAME.match(name), name
    return name


def model_package_group(pipeline: str, prefix: str = "") -> str:
    """The model package group of a pipeline: ``<prefix><pipeline with '-' for '_'>``.

    :param pipeline: the pipeline's name.
    :param prefix: ``sagemaker.name_prefix``.
    """
    return sagemaker_name(f"{prefix}{pipeline}", 63)


def training_image(spec: "PipelineSpec", region: str) -> str:
    """The training container: ``sagemaker.image_uri``, else the trainer's AWS framework image.

    :param spec: the pipeline.
    :param region: the AWS region the job runs in.
    """
    if spec.sagemaker.image_uri:
        return spec.sagemaker.image_uri
    return f"{DLC_REGISTRY.format(region=region)}/{TRAINING_IMAGES[(spec.trainer.kind, spec.trainer.gpu)]}"


def inference_image(kind: str, region: str, override: str | None = None) -> str:
    """The serving container of a trainer's models: the override, else the AWS framework image.

    :param kind: the trainer (``autogluon`` or ``resnet``).
    :param region: the AWS region of the endpoint or transform job.
    :param override: ``sagemaker.inference_image_uri``.
    """
    return override or f"{DLC_REGISTRY.format(region=region)}/{INFERENCE_IMAGES[kind]}"


def hyperparameters(args: list[str], program: str, submit_dir: str, region: str) -> dict[str, str]:
    """A training script's flags as SageMaker hyperparameters, JSON-encoded like the SageMaker SDK.

    ``--time-limit 60`` becomes ``{"time-limit": "\\"60\\""}``; the training toolkit decodes each
    value and passes ``--<name> <value>`` to the script, so a bare flag (JSON ``true``) arrives as
    ``--<name> True``: the script must accept a value for it (the ResNet trainer's flags do).

    :param args: the script's flags (``TrainModelOperator.trainer_args``).
    :param program: the script's file name in the source folder (``train.py``).
    :param submit_dir: the ``s3://`` URI of ``sourcedir.tar.gz``.
    :param region: the job's region.
    :raises AirflowFailException: a value is longer than SageMaker accepts, or a token is not a flag.
    """
    values: dict[str, Any] = {}
    index = 0
    while index < len(args):
        flag = args[index]
        if not flag.startswith("--"):
            raise AirflowFailException(f"training flags: {flag!r} is not a --flag (every hyperparameter is one)")
        has_value = index + 1 < len(args) and not args[index + 1].startswith("--")
        values[flag[2:]] = args[index + 1] if has_value else True
        index += 2 if has_value else 1
    encoded = {name: json.dumps(value) for name, value in values.items()}
    for name, value in encoded.items():
        if len(value) > HYPERPARAMETER_VALUE_MAX:
            raise AirflowFailException(
                f"hyperparameter {name!r}: {len(value)} characters, rule 'at most {HYPERPARAMETER_VALUE_MAX}' "
                "(SageMaker's limit): shorten trainer.hyperparameters"
            )
    encoded.update({
        "sagemaker_program": json.dumps(program),
        "sagemaker_submit_directory": json.dumps(submit_dir),
        "sagemaker_region": json.dumps(region),
        "sagemaker_container_log_level": "20",
    })
    return encoded


def pack_source(script_dir: Path, target: Path) -> Path:
    """Pack a training script's folder as ``sourcedir.tar.gz`` (files at the top, no caches).

    :param script_dir: ``include/training/<trainer>``.
    :param target: the archive to write.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(script_dir.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                tar.add(path, arcname=path.relative_to(script_dir).as_posix())
    return target


def training_job_config(
    spec: "PipelineSpec",
    name: str,
    image: str,
    channels: dict[str, str],
    output_uri: str,
    checkpoint_uri: str | None,
    hyperparameters: dict[str, str],
    tags: dict[str, str],
) -> dict[str, Any]:
    """The ``CreateTrainingJob`` request of a run.

    :param spec: the pipeline (instance type and count, volume, spot, max run and wait, role).
    :param name: the job's name.
    :param image: the training container image.
    :param channels: ``s3://`` prefix of each input channel by name.
    :param output_uri: where SageMaker writes ``<name>/output/model.tar.gz``.
    :param checkpoint_uri: where checkpoints are synced (spot, resumable trainers), or None.
    :param hyperparameters: from :func:`hyperparameters`.
    :param tags: AWS tags of the job.
    """
    settings = spec.sagemaker
    stopping = {"MaxRuntimeInSeconds": settings.max_run_seconds}
    if settings.use_spot:
        stopping["MaxWaitTimeInSeconds"] = settings.max_wait_seconds or 2 * settings.max_run_seconds
    config: dict[str, Any] = {
        "TrainingJobName": name,
        "RoleArn": settings.role_arn,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File"},
        "HyperParameters": hyperparameters,
        "InputDataConfig": [
            {
                "ChannelName": channel,
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                                "S3DataDistributionType": "FullyReplicated"}},
                "InputMode": "File",
            }
            for channel, uri in channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {"InstanceType": settings.training_instance_type,
                           "InstanceCount": settings.training_instance_count,
                           "VolumeSizeInGB": settings.training_volume_gb},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": settings.use_spot,
        "Tags": [{"Key": key, "Value": value} for key, value in tags.items()],
    }
    if checkpoint_uri:
        config["CheckpointConfig"] = {"S3Uri": checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    return config


def wait_limit_seconds(spec: "PipelineSpec") -> int:
    """The longest a training job of this pipeline can take (its max wait with spot, else its max run).

    :param spec: the pipeline.
    """
    settings = spec.sagemaker
    if settings.use_spot:
        return settings.max_wait_seconds or 2 * settings.max_run_seconds
    return settings.max_run_seconds


def training_log_tail(conn_id: str | None, region: str | None, job_name: str, lines: int = 30) -> list[str]:
    """The last lines a training job wrote to CloudWatch Logs (every instance, in time order).

    Never raises: a log that cannot be read is reported as one line saying why.

    :param conn_id: the AWS connection.
    :param region: the job's region (the connection's when None).
    :param job_name: the training job.
    :param lines: how many lines at most.
    """
    from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = AwsLogsHook(aws_conn_id=conn_id, region_name=region).conn
        streams = client.describe_log_streams(
            logGroupName=TRAINING_LOG_GROUP, logStreamNamePrefix=f"{job_name}/", limit=50
        )["logStreams"]
        events = []
        for stream in streams:
            events += client.get_log_events(
                logGroupName=TRAINING_LOG_GROUP, logStreamName=stream["logStreamName"], limit=lines,
                startFromHead=False,
            )["events"]
    except (ClientError, BotoCoreError, AirflowException) as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return [f"(no CloudWatch log in {TRAINING_LOG_GROUP} for {job_name})"]
        return [f"(the CloudWatch log of {job_name} could not be read: {exc})"]
    if not events:
        return [f"(no CloudWatch log in {TRAINING_LOG_GROUP} for {job_name})"]
    events.sort(key=lambda event: event["timestamp"])
    return [event["message"].rstrip() for event in events[-lines:]]
