"""The SageMaker backend: the same training scripts as a SageMaker training job, and AWS helpers.

A training job runs ``include/training/<trainer>/train.py`` in script mode inside an AWS framework
container: the script's folder is packed as ``sourcedir.tar.gz`` and uploaded under the run
(``models/<pipeline>/<run>/source/<code version>/``), the run's split folders are the ``train`` and
``validation`` channels, and every flag of the script is a hyperparameter (JSON-encoded as the
SageMaker Python SDK does, so the training toolkit hands them back to the script as
``--flag value``). ``sagemaker_program`` and ``sagemaker_submit_directory`` tell the container's
training toolkit which script to run.

The contract modules Conveyor ships beside the scripts (``conveyor.model.contract``) go into
``sourcedir.tar.gz`` beside ``train.py``. The train task's steps (:func:`job_request`,
:func:`job_failure`, :func:`job_model`) make a completed job's model like the local backend's.

Default training images (``sagemaker.image_uri`` overrides them; serving images: ``conveyor.aws.common``):

| trainer | training |
|---|---|
| ``autogluon`` | ``autogluon:1.6.3-cpu-amzn2023`` (``-cu133-`` with ``trainer.gpu``) |
| ``resnet`` | ``pytorch-training:2.9.0-cpu-py312-ubuntu22.04-sagemaker`` (``gpu-py312-cu130`` with ``trainer.gpu``) |

all in the AWS Deep Learning Containers registry ``763104351884.dkr.ecr.<region>.amazonaws.com``
(a few opt-in regions use another account: set the image explicitly there).

AWS errors (``conveyor.aws.common``, importable from here too): an expired or invalid credential
becomes :class:`AwsCredentialsExpired` (transient: the connection may be refreshed by a retry), a
missing IAM permission :class:`AwsPermissionDenied` (deterministic), both naming the connection
and the API call. Every error of this module is a ``ConveyorError``: the operators decide retries.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.aws.common import (
    CONTENT_TYPES,
    DLC_REGISTRY,
    INFERENCE_IMAGES,
    RESPONSE_TYPES,
    AwsCredentialsExpired,
    AwsPermissionDenied,
    NotOnS3,
    aws_errors,
    error_code,
    error_message,
    inference_image,
    model_package_group,
    plain_s3_uri,
    sagemaker_name,
)
from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

__all__ = [  # the shared AWS helpers, importable from here too (``conveyor.aws.common`` holds them)
    "CONTENT_TYPES",
    "INFERENCE_IMAGES",
    "RESPONSE_TYPES",
    "AwsCredentialsExpired",
    "AwsPermissionDenied",
    "NotOnS3",
    "aws_errors",
    "error_code",
    "error_message",
    "inference_image",
    "model_package_group",
    "plain_s3_uri",
    "sagemaker_name",
]

TRAINING_IMAGES = {
    ("autogluon", False): "autogluon:1.6.3-cpu-amzn2023",
    ("autogluon", True): "autogluon:1.6.3-cu133-amzn2023",
    ("resnet", False): "pytorch-training:2.9.0-cpu-py312-ubuntu22.04-sagemaker",
    ("resnet", True): "pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker",
}
TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CHANNELS = ("train", "validation")
RUNNING = frozenset({"InProgress", "Stopping"})
FAILED = frozenset({"Failed", "Stopped"})
HYPERPARAMETER_VALUE_MAX = 2500
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class TrainingJobFailed(ConveyorError):
    """A SageMaker training job ended ``Failed`` or ``Stopped`` (carries its reason and last log lines)."""


class TrainingRequestInvalid(ConveyorError):
    """A training job request SageMaker would refuse (a flag that is not one, a value too long)."""


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


def training_image(spec: PipelineSpec, region: str) -> str:
    """The training container: ``sagemaker.image_uri``, else the trainer's AWS framework image.

    :param spec: the pipeline.
    :param region: the AWS region the job runs in.
    """
    if spec.sagemaker.image_uri:
        return spec.sagemaker.image_uri
    return f"{DLC_REGISTRY.format(region=region)}/{TRAINING_IMAGES[(spec.trainer.kind, spec.trainer.gpu)]}"


def hyperparameters(args: list[str], program: str, submit_dir: str, region: str) -> dict[str, str]:
    """A training script's flags as SageMaker hyperparameters, JSON-encoded like the SageMaker SDK.

    ``--time-limit 60`` becomes ``{"time-limit": "\\"60\\""}``; the training toolkit decodes each
    value and passes ``--<name> <value>`` to the script, so a bare flag (JSON ``true``) arrives as
    ``--<name> True``: the script must accept a value for it (the ResNet trainer's flags do).

    :param args: the script's flags (``conveyor.training.arguments.trainer_args``).
    :param program: the script's file name in the source folder (``train.py``).
    :param submit_dir: the ``s3://`` URI of ``sourcedir.tar.gz``.
    :param region: the job's region.
    :raises TrainingRequestInvalid: a value is longer than SageMaker accepts, or a token is not a flag.
    """
    values: dict[str, Any] = {}
    index = 0
    while index < len(args):
        flag = args[index]
        if not flag.startswith("--"):
            raise TrainingRequestInvalid(f"training flags: {flag!r} is not a --flag (every hyperparameter is one)")
        has_value = index + 1 < len(args) and not args[index + 1].startswith("--")
        values[flag[2:]] = args[index + 1] if has_value else True
        index += 2 if has_value else 1
    encoded = {name: json.dumps(value) for name, value in values.items()}
    for name, value in encoded.items():
        if len(value) > HYPERPARAMETER_VALUE_MAX:
            raise TrainingRequestInvalid(
                f"hyperparameter {name!r}: {len(value)} characters, rule 'at most {HYPERPARAMETER_VALUE_MAX}' "
                "(SageMaker's limit): shorten trainer.hyperparameters"
            )
    encoded.update(
        {
            "sagemaker_program": json.dumps(program),
            "sagemaker_submit_directory": json.dumps(submit_dir),
            "sagemaker_region": json.dumps(region),
            "sagemaker_container_log_level": "20",
        }
    )
    return encoded


def pack_source(script_dir: Path, target: Path) -> Path:
    """Pack a training script's folder as ``sourcedir.tar.gz`` (files at the top, no caches).

    The contract modules Conveyor ships beside the scripts (``conveyor.model.contract``) go in
    beside ``train.py``, unless the folder has its own, so the script can ``import conveyor_metadata``.

    :param script_dir: ``include/training/<trainer>``.
    :param target: the archive to write.
    """
    from conveyor.model.contract import shipped_files

    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        names = set()
        for path in sorted(script_dir.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                names.add(path.relative_to(script_dir).as_posix())
                tar.add(path, arcname=path.relative_to(script_dir).as_posix())
        for path in shipped_files():
            if path.name not in names:
                tar.add(path, arcname=path.name)
    return target


def training_job_config(
    spec: PipelineSpec,
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
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": uri,
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
                "InputMode": "File",
            }
            for channel, uri in channels.items()
        ],
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {
            "InstanceType": settings.training_instance_type,
            "InstanceCount": settings.training_instance_count,
            "VolumeSizeInGB": settings.training_volume_gb,
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": settings.use_spot,
        "Tags": [{"Key": key, "Value": value} for key, value in tags.items()],
    }
    if checkpoint_uri:
        config["CheckpointConfig"] = {"S3Uri": checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    return config


def wait_limit_seconds(spec: PipelineSpec) -> int:
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

    try:
        client = AwsLogsHook(aws_conn_id=conn_id, region_name=region).conn
        streams = client.describe_log_streams(
            logGroupName=TRAINING_LOG_GROUP, logStreamNamePrefix=f"{job_name}/", limit=50
        )["logStreams"]
        events = []
        for stream in streams:
            events += client.get_log_events(
                logGroupName=TRAINING_LOG_GROUP,
                logStreamName=stream["logStreamName"],
                limit=lines,
                startFromHead=False,
            )["events"]
    except Exception as exc:  # botocore's, or the connection's: a log that cannot be read is one line
        if error_code(exc) == "ResourceNotFoundException":
            return [f"(no CloudWatch log in {TRAINING_LOG_GROUP} for {job_name})"]
        return [f"(the CloudWatch log of {job_name} could not be read: {exc})"]
    if not events:
        return [f"(no CloudWatch log in {TRAINING_LOG_GROUP} for {job_name})"]
    events.sort(key=lambda event: event["timestamp"])
    return [event["message"].rstrip() for event in events[-lines:]]


# ------------------------------------------------------------------------------ the train task


def check_budget(spec: PipelineSpec, time_limit: int) -> None:
    """Refuse a training budget SageMaker would cut short (``MaxRuntimeInSeconds``).

    :param spec: the pipeline.
    :param time_limit: the run's budget in seconds.
    :raises TrainingSettingsError: the budget is not below ``sagemaker.max_run_seconds``.
    """
    from conveyor.training.arguments import TrainingSettingsError

    if time_limit >= spec.sagemaker.max_run_seconds:
        raise TrainingSettingsError(
            f"time budget {time_limit}s: rule 'time_limit < sagemaker.max_run_seconds' "
            f"({spec.sagemaker.max_run_seconds}s): SageMaker would stop the job before the script ends"
        )


def job_arguments(spec: PipelineSpec, time_limit: int, presets: str) -> list[str]:
    """The script's flags in a training job: the local backend's, GPUs and checkpoints the container's.

    :param spec: the pipeline.
    :param time_limit: the training budget in seconds.
    :param presets: the trainer's presets.
    """
    from conveyor.training.arguments import trainer_args

    args = trainer_args(spec, time_limit, presets, num_gpus=0)
    if spec.trainer.gpu and "--num-gpus" in args:  # the container's SM_NUM_GPUS (the script's default)
        at = args.index("--num-gpus")
        del args[at : at + 2]
    if spec.trainer.kind == "resnet":
        args += ["--checkpoint-dir", CHECKPOINT_LOCAL_PATH]
    return args


def job_request(
    spec: PipelineSpec,
    lake: Any,
    run_id: str,
    name: str,
    region: str,
    tags: dict[str, str],
    time_limit: int,
    presets: str,
) -> dict[str, Any]:
    """The ``CreateTrainingJob`` request of a run; uploads the script's ``sourcedir.tar.gz`` first.

    :param spec: the pipeline.
    :param lake: the lake (on S3).
    :param run_id: the Airflow run.
    :param name: the job's name (:func:`training_job_name`).
    :param region: the job's region.
    :param tags: AWS tags of the job.
    :param time_limit: the training budget in seconds.
    :param presets: the trainer's presets.
    :raises NotOnS3: the lake is not on S3.
    """
    import tempfile

    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified
    from conveyor.model import artifacts

    run_dir = lake.models(spec.name, run_id)
    channels = {part: plain_s3_uri(run_dir / "split" / part) + "/" for part in CHANNELS}  # S3 only
    script = artifacts.training_script(spec.trainer.kind)
    source = run_dir / "source" / artifacts.code_version(spec.trainer.kind) / "sourcedir.tar.gz"
    with tempfile.TemporaryDirectory(prefix="conveyor-source-") as tmp:
        archive = pack_source(script.parent, Path(tmp) / "sourcedir.tar.gz")
        copy_verified(ObjectStoragePath(archive.as_uri()), source, 1 << 20)
    checkpoints = None
    if spec.trainer.kind == "resnet" or spec.sagemaker.use_spot:
        checkpoints = plain_s3_uri(run_dir / "checkpoints") + "/"
    return training_job_config(
        spec,
        name,
        training_image(spec, region),
        channels=channels,
        output_uri=plain_s3_uri(run_dir / "sagemaker") + "/",
        checkpoint_uri=checkpoints,
        hyperparameters=hyperparameters(
            job_arguments(spec, time_limit, presets), script.name, plain_s3_uri(source), region
        ),
        tags=tags,
    )


def job_failure(spec: PipelineSpec, description: dict[str, Any], lines: int, logger: Any) -> TrainingJobFailed:
    """The error of a job that ended ``Failed`` or ``Stopped``: its reason and its log's last lines.

    :param spec: the pipeline (its AWS connection and region read the log).
    :param description: the job's ``DescribeTrainingJob``.
    :param lines: how many CloudWatch log lines the error carries.
    :param logger: the task log (the reason and the lines go there too).
    """
    name, status = description["TrainingJobName"], description["TrainingJobStatus"]
    reason = description.get("FailureReason") or "(SageMaker gave no reason)"
    tail = training_log_tail(spec.sagemaker.aws_conn_id, spec.sagemaker.region, name, lines)
    logger.error("Training job %s %s: %s", name, status, reason)
    for line in tail:
        logger.error("[%s] %s", name, line)
    return TrainingJobFailed(
        f"SageMaker training job {name} {status}: {reason}; nothing was registered (a retry of this run "
        f"meets the same job: trigger a new run to train again); last log lines:\n" + "\n".join(tail)
    )


def job_model(
    spec: PipelineSpec,
    lake: Any,
    run_id: str,
    split: dict[str, Any],
    description: dict[str, Any],
    logger: Any,
    **extra: Any,
) -> dict[str, Any]:
    """A completed job's model, repacked like the local backend's into the run's ``model.tar.gz``.

    :param spec: the pipeline.
    :param lake: the lake.
    :param run_id: the Airflow run.
    :param split: the split task's result.
    :param description: the completed job's ``DescribeTrainingJob``.
    :param logger: the task log.
    :param extra: more facts kept in the metadata (the tuning step's ``tuning``).
    :returns: the train task's result (``conveyor.training.publish.train_result``).
    :raises TrainedModelInvalid: the job wrote no model, or one without a valid ``metadata.json``.
    """
    import tempfile

    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified, upload_tree
    from conveyor.model import artifacts
    from conveyor.training.publish import TrainedModelInvalid, publish, run_metadata, train_result, trained_metadata

    name, model_uri = description["TrainingJobName"], description["ModelArtifacts"]["S3ModelArtifacts"]
    run_dir = lake.models(spec.name, run_id)
    with tempfile.TemporaryDirectory(prefix="conveyor-sm-train-") as tmp:
        scratch = Path(tmp)
        logger.info("Fetching the model of training job %s: %s", name, model_uri)
        try:
            copy_verified(
                ObjectStoragePath(model_uri, conn_id=lake.conn_id),
                ObjectStoragePath((scratch / "job-model.tar.gz").as_uri()),
                1 << 20,
            )
        except FileNotFoundError:
            raise TrainedModelInvalid(f"training job {name} completed but wrote no model at {model_uri}") from None
        model_dir = artifacts.unpack(scratch / "job-model.tar.gz", scratch / "model")
        metadata = run_metadata(
            trained_metadata(model_dir, f"training job {name} ({model_uri})"),
            spec,
            run_id,
            split,
            "sagemaker",
            train_seconds(description),
            code_version=submitted_code_version(description),
            training_job=name,
            training_job_arn=description.get("TrainingJobArn"),
            instance_type=(description.get("ResourceConfig") or {}).get("InstanceType"),
            billable_seconds=description.get("BillableTimeInSeconds"),
            **extra,
        )
        target, size, sha256 = publish(model_dir, metadata, spec.trainer.kind, run_dir, scratch)
        output = ObjectStoragePath(model_uri.rsplit("/", 1)[0] + "/output.tar.gz", conn_id=lake.conn_id)
        try:  # one GET: a job without output files has none (no HEAD to ask first)
            copy_verified(output, ObjectStoragePath((scratch / "output.tar.gz").as_uri()), 1 << 20)
        except FileNotFoundError:
            pass
        else:
            upload_tree(artifacts.unpack(scratch / "output.tar.gz", scratch / "output"), run_dir / "output")
        logger.info(
            "Model artifact: %s (%.1f MB) from training job %s (%.0fs)",
            target,
            size / 1e6,
            name,
            metadata.train_seconds,
        )
    return train_result(str(target), metadata, sha256)


def train_seconds(description: dict[str, Any]) -> float:
    """A job's training time: ``TrainingTimeInSeconds``, else end minus start.

    :param description: the job's ``DescribeTrainingJob``.
    """
    if description.get("TrainingTimeInSeconds") is not None:
        return float(description["TrainingTimeInSeconds"])
    start, end = description.get("TrainingStartTime"), description.get("TrainingEndTime")
    if start is not None and end is not None:
        return round((end - start).total_seconds(), 2)
    return 0.0


def submitted_code_version(description: dict[str, Any]) -> str | None:
    """The code version a job ran: the folder of its ``sagemaker_submit_directory``.

    :param description: the job's ``DescribeTrainingJob``.
    """
    raw = (description.get("HyperParameters") or {}).get("sagemaker_submit_directory")
    if not raw:
        return None
    try:
        uri = json.loads(raw)
    except ValueError:
        uri = raw
    parts = str(uri).rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-2].startswith("c-") else None
