"""SageMaker on moto for the tests: an Airflow AWS connection, and an emulated training container.

moto accepts ``CreateTrainingJob`` and marks the job ``Completed`` at once, without running any
container or writing a model. :class:`TrainingEmulator` does what the SageMaker service would do
with the job instead, in a thread of the test process (moto's server runs in the same process):

1. the job is ``InProgress`` while its "container" runs;
2. the channels (every object under each ``S3Uri`` prefix) and ``sourcedir.tar.gz`` (the
   ``sagemaker_submit_directory`` hyperparameter) are downloaded from moto's S3 into a folder laid
   out like ``/opt/ml`` (``input/data/<channel>``, ``model``, ``output/data``, ``code``);
3. the ``sagemaker_program`` script runs as the SageMaker training toolkit runs it:
   ``python <program> --<name> <value> ...`` (hyperparameters JSON-decoded, sorted, ``sagemaker_*``
   left out), the ``SM_*`` environment variables set, container paths (``/opt/ml/...``) in
   values mapped to that folder, no GPU;
4. its output lines go to CloudWatch Logs (``/aws/sagemaker/TrainingJobs``, stream
   ``<job>/algo-1-<time>``) on moto;
5. exit 0: ``model.tar.gz`` (the model folder) and ``output.tar.gz`` (the output data folder) are
   uploaded to ``<S3OutputPath>/<job>/output/``, checkpoints to ``CheckpointConfig.S3Uri``, and
   the job is ``Completed``; otherwise it is ``Failed`` with an ``AlgorithmError`` reason, as on AWS.

Like AWS (and unlike moto), a second job of the same name is refused with ``ResourceInUse``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from scripts import environment_snapshot

REGION = "us-east-1"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
ROLE_ARN = "arn:aws:iam::123456789012:role/conveyor-sagemaker"


def aws_connection(monkeypatch: pytest.MonkeyPatch, endpoint_url: str, conn_id: str = "aws_default") -> None:
    """Point an Airflow AWS connection (and boto3's default credentials) at moto's server.

    :param monkeypatch: the test's monkeypatch.
    :param endpoint_url: moto's server.
    :param conn_id: the connection id (``sagemaker.aws_conn_id``).
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": endpoint_url, "region_name": REGION},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection))


def refuse_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto as SageMaker answers a create of a model or endpoint configuration that exists: refused
    (``ValidationException``, "Cannot create already existing …"), and of a transform job of a name
    taken (``ResourceInUse``), where moto would replace it.

    :param monkeypatch: the test's monkeypatch (moto's server runs in this process).
    """
    from moto.sagemaker.exceptions import ResourceInUseException, ValidationError
    from moto.sagemaker.models import SageMakerModelBackend

    def refusing(method: Any, registry: str, what: str, key: str) -> Any:
        def create(self: Any, *args: Any, **kwargs: Any) -> Any:
            name = kwargs.get(key, args[0] if args else None)
            existing = getattr(self, registry).get(name)
            if existing is not None:
                arn = getattr(existing, "endpoint_config_arn", None) or existing.arn
                raise ValidationError(message=f'Cannot create already existing {what} "{arn}".')
            return method(self, *args, **kwargs)

        return create

    for name, registry, what, key in (
        ("create_model", "_models", "model", "model_name"),
        ("create_endpoint_config", "endpoint_configs", "endpoint configuration", "endpoint_config_name"),
    ):
        monkeypatch.setattr(
            SageMakerModelBackend, name, refusing(getattr(SageMakerModelBackend, name), registry, what, key)
        )
    create_transform_job = SageMakerModelBackend.create_transform_job

    def unique_transform_job(self: Any, **kwargs: Any) -> Any:  # a job's name is unique: ResourceInUse
        existing = self.transform_jobs.get(kwargs.get("transform_job_name"))
        if existing is not None:
            raise ResourceInUseException(
                message=f"Job name must be unique within an AWS account and region, and a job with this name "
                f"already exists ({existing.arn})"
            )
        return create_transform_job(self, **kwargs)

    monkeypatch.setattr(SageMakerModelBackend, "create_transform_job", unique_transform_job)


def keep_what_an_update_omits(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto as SageMaker keeps what an UpdateModelPackage does not name (its status, approval description
    and metadata), where moto would set each to nothing.

    :param monkeypatch: the test's monkeypatch (moto's server runs in this process).
    """
    from moto.sagemaker.models import SageMakerModelBackend

    update = SageMakerModelBackend.update_model_package

    def keeping(
        self: Any,
        model_package_arn: str,
        model_approval_status: str | None,
        approval_description: str | None,
        customer_metadata_properties: dict[str, str] | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        package = self.model_packages.get(self.model_package_name_mapping.get(model_package_arn, model_package_arn))
        if package is not None:
            model_approval_status = model_approval_status or package.model_approval_status
            approval_description = approval_description or package.approval_description
            if customer_metadata_properties is None:
                customer_metadata_properties = package.customer_metadata_properties
        return update(
            self,
            model_package_arn,
            model_approval_status,
            approval_description,
            customer_metadata_properties,
            *args,
            **kwargs,
        )

    monkeypatch.setattr(SageMakerModelBackend, "update_model_package", keeping)


def as_sagemaker(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's SageMaker made to answer as SageMaker does where Conveyor relies on it: creates of what
    exists refused (:func:`refuse_duplicates`), updates keeping what they omit (:func:`keep_what_an_update_omits`).

    :param monkeypatch: the test's monkeypatch (moto's server runs in this process).
    """
    refuse_duplicates(monkeypatch)
    keep_what_an_update_omits(monkeypatch)


@pytest.fixture
def sagemaker_aws(moto_server, monkeypatch) -> str:
    """The ``aws_default`` connection on moto's server (answering as SageMaker does, :func:`as_sagemaker`);
    returns the endpoint URL."""
    aws_connection(monkeypatch, moto_server)
    as_sagemaker(monkeypatch)
    return moto_server


CONTAINER_CLIENT = "conveyor_container"
"""The attribute that marks the boto3 clients of the emulated containers (their calls are SageMaker's, not
Conveyor's: ``bench/sagemaker_requests.py`` and the call-budget tests leave them out, whatever thread makes them,
s3transfer's included)."""


def container_client(service: str, endpoint_url: str) -> Any:
    """A boto3 client for an emulated container, marked with :data:`CONTAINER_CLIENT`.

    :param service: the AWS service.
    :param endpoint_url: moto's server.
    """
    import boto3

    client = boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    setattr(client, CONTAINER_CLIENT, True)
    return client


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _decode(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _arg(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return "" if value is None else str(value)


class TrainingEmulator:
    """Runs the training container of every job created on moto (see the module's docstring).

    :param endpoint_url: moto's server.
    """

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self.created: list[str] = []
        self.errors: list[str] = []
        self.commands: dict[str, list[str]] = {}
        self.environments: dict[str, dict[str, str]] = {}
        self._threads: list[threading.Thread] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> TrainingEmulator:
        """Wrap moto's CreateTrainingJob so every new job gets its container run."""
        from moto.sagemaker.exceptions import ResourceInUseException
        from moto.sagemaker.models import SageMakerModelBackend

        original = SageMakerModelBackend.create_training_job
        emulator = self

        def create_training_job(backend: Any, **kwargs: Any) -> Any:
            name = kwargs["training_job_name"]
            if name in backend.training_jobs:
                raise ResourceInUseException(
                    f"Training job names must be unique within an AWS account and region, "
                    f"and a training job with this name already exists ({name})"
                )
            job = original(backend, **kwargs)
            job.training_job_status, job.secondary_status = "InProgress", "Starting"
            job.training_end_time = None
            emulator.created.append(name)
            thread = threading.Thread(target=emulator._run_safely, args=(job,), daemon=True)
            emulator._threads.append(thread)
            thread.start()
            return job

        monkeypatch.setattr(SageMakerModelBackend, "create_training_job", create_training_job)
        return self

    def wait(self, timeout: float = 300) -> None:
        """Wait until every started container has ended."""
        for thread in self._threads:
            thread.join(timeout)
            assert not thread.is_alive(), "an emulated training job did not end in time"

    def _client(self, service: str) -> Any:
        return container_client(service, self.endpoint_url)

    def _run_safely(self, job: Any) -> None:
        try:
            self._run(job)
        except Exception as exc:  # an emulator bug must show in the test, not hang it
            self.errors.append(f"{job.training_job_name}: {exc!r}")
            self._end(job, "Failed", f"InternalServerError: the test emulator failed: {exc!r}")

    def _download_prefix(self, uri: str, target: Path) -> None:
        s3 = self._client("s3")
        bucket, prefix = _split_s3(uri)
        target.mkdir(parents=True, exist_ok=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                rel = item["Key"][len(prefix) :].lstrip("/")
                if rel:
                    (target / rel).parent.mkdir(parents=True, exist_ok=True)
                    s3.download_file(bucket, item["Key"], str(target / rel))

    def _upload_tar(self, folder: Path, uri: str) -> None:
        archive = folder.parent / (folder.name + ".tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(folder.rglob("*")):
                tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
        self._client("s3").upload_file(str(archive), *_split_s3(uri))

    def _run(self, job: Any) -> None:
        root = Path(tempfile.mkdtemp(prefix=f"sm-{job.training_job_name}-"))
        hps = {k: _decode(v) for k, v in (job.hyper_parameters or {}).items()}
        for channel in job.input_data_config or []:
            self._download_prefix(
                channel["DataSource"]["S3DataSource"]["S3Uri"], root / "input" / "data" / channel["ChannelName"]
            )
        code = root / "code"
        code.mkdir()
        source = root / "sourcedir.tar.gz"
        self._client("s3").download_file(*_split_s3(hps["sagemaker_submit_directory"]), str(source))
        with tarfile.open(source, "r:gz") as tar:
            tar.extractall(code, filter="data")
        for folder in ("model", "output/data", "checkpoints"):
            (root / folder).mkdir(parents=True, exist_ok=True)

        def local(value: Any) -> str:  # the container's /opt/ml is this folder
            text = _arg(value)
            return str(root / text[len("/opt/ml/") :]) if text.startswith("/opt/ml/") else text

        user = {k: v for k, v in hps.items() if not k.startswith("sagemaker_")}
        args = [item for key in sorted(user) for item in (f"--{key}", local(user[key]))]
        channels = [c["ChannelName"] for c in job.input_data_config or []]
        env = {k: v for k, v in environment_snapshot().items() if not k.startswith("AIRFLOW")}
        env.update({f"SM_CHANNEL_{name.upper()}": str(root / "input" / "data" / name) for name in channels})
        env.update(
            SM_MODEL_DIR=str(root / "model"),
            SM_OUTPUT_DATA_DIR=str(root / "output" / "data"),
            SM_CHANNELS=json.dumps(channels),
            SM_HPS=json.dumps(user),
            SM_USER_ARGS=json.dumps(args),
            SM_NUM_GPUS="0",
            SM_CURRENT_HOST="algo-1",
            SM_HOSTS=json.dumps(["algo-1"]),
            SM_MODULE_DIR=str(hps["sagemaker_submit_directory"]),
            SM_INPUT_DIR=str(root / "input"),
            SM_OUTPUT_DIR=str(root / "output"),
            CUDA_VISIBLE_DEVICES="",
            PYTHONUNBUFFERED="1",
        )
        command = [sys.executable, hps["sagemaker_program"], *args]
        self.commands[job.training_job_name] = command
        self.environments[job.training_job_name] = {k: v for k, v in env.items() if k.startswith("SM_")}
        job.secondary_status = "Training"
        started = time.monotonic()
        proc = subprocess.run(
            command,
            cwd=code,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=job.stopping_condition["MaxRuntimeInSeconds"],
        )
        lines = proc.stdout.splitlines() or ["(no output)"]
        self._write_log(job.training_job_name, lines)
        if proc.returncode != 0:
            self._end(
                job,
                "Failed",
                f"AlgorithmError: ExecuteUserScriptError: ExitCode {proc.returncode} "
                f'ErrorMessage "{lines[-1][:200]}" Command "{" ".join(command[1:3])} ..."',
            )
            return
        artifact = job.model_artifacts["S3ModelArtifacts"]
        self._upload_tar(root / "model", artifact)
        self._upload_tar(root / "output" / "data", artifact.rsplit("/", 1)[0] + "/output.tar.gz")
        if job.checkpoint_config:
            self._upload_checkpoints(root / "checkpoints", job.checkpoint_config["S3Uri"])
        job.training_time_in_seconds = job.billable_time_in_seconds = max(1, round(time.monotonic() - started))
        self._end(job, "Completed", None)

    def _upload_checkpoints(self, folder: Path, uri: str) -> None:
        bucket, prefix = _split_s3(uri.rstrip("/") + "/")
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self._client("s3").upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())

    def _write_log(self, job_name: str, lines: list[str]) -> None:
        logs = self._client("logs")
        try:
            logs.create_log_group(logGroupName=LOG_GROUP)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        stream = f"{job_name}/algo-1-{int(time.time())}"
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
        now = int(time.time() * 1000)
        events = [{"timestamp": now, "message": line} for line in lines]
        for start in range(0, len(events), 5000):
            logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=events[start : start + 5000])

    @staticmethod
    def _end(job: Any, status: str, reason: str | None) -> None:
        now = datetime.now(UTC)
        job.secondary_status = status
        job.failure_reason = reason
        job.training_end_time = job.last_modified_time = now
        job.training_job_status = status


@pytest.fixture
def training_emulator(sagemaker_aws, monkeypatch) -> TrainingEmulator:
    """Every training job created on moto runs its container (see :class:`TrainingEmulator`)."""
    emulator = TrainingEmulator(sagemaker_aws).install(monkeypatch)
    yield emulator
    emulator.wait()
    assert emulator.errors == []


# ------------------------------------------------------------------------------- batch transform


class TransformFailed(Exception):
    """The emulated transform job failed (its message becomes the job's FailureReason)."""


def _mini_batches(records: list[bytes], strategy: str | None, max_bytes: int) -> Any:
    """Group records as SageMaker does: one per request (SingleRecord), or as many as fit (MultiRecord).

    :param records: the input file's records (lines, with their line ends).
    :param strategy: ``BatchStrategy``.
    :param max_bytes: ``MaxPayloadInMB`` in bytes.
    """
    held: list[bytes] = []
    size = 0
    for record in records:
        if len(record) > max_bytes:
            raise TransformFailed(f"a record of {len(record)} bytes exceeds MaxPayloadInMB")
        if held and (strategy == "SingleRecord" or size + len(record) > max_bytes):
            yield b"".join(held)
            held, size = [], 0
        held.append(record)
        size += len(record)
    if held:
        yield b"".join(held)


def run_transform_job(request: dict[str, Any], model_data_url: str, s3: Any) -> list[str]:
    """Run a ``CreateTransformJob`` request with a Conveyor model, as a SageMaker transform job would.

    The model's ``model.tar.gz`` is extracted and its ``code/inference.py`` loaded (``model_fn``
    once); every object under the input prefix is split into records (``SplitType``), grouped
    into mini-batches (``BatchStrategy``, ``MaxPayloadInMB``) and sent through ``input_fn`` (the
    ``ContentType``), ``predict_fn`` and ``output_fn`` (the ``Accept``); the answers go, in order,
    to ``<S3OutputPath>/<the input's key below the prefix>.out``, each followed by a line break
    (``AssembleWith: Line``).

    :param request: the CreateTransformJob request (as sent by the operator).
    :param model_data_url: the ``s3://`` URI of the model's ``model.tar.gz`` (``ModelDataUrl``).
    :param s3: a boto3 S3 client.
    :return: the output keys written.
    :raises TransformFailed: a handler raised (as the container's 4xx/5xx would fail the job).
    """
    from conveyor.model.artifacts import LoadedModel

    source = request["TransformInput"]["DataSource"]["S3DataSource"]
    if source["S3DataType"] != "S3Prefix":
        raise TransformFailed(f"S3DataType {source['S3DataType']} is not emulated")
    split = request["TransformInput"].get("SplitType") or "None"
    if split not in ("Line", "None"):
        raise TransformFailed(f"SplitType {split} is not emulated")
    content_type = request["TransformInput"]["ContentType"]
    accept = request["TransformOutput"].get("Accept")
    assemble = request["TransformOutput"].get("AssembleWith") or "None"
    max_bytes = int(request.get("MaxPayloadInMB") or 6) * 1024 * 1024
    in_bucket, prefix = _split_s3(source["S3Uri"])
    out_bucket, out_prefix = _split_s3(request["TransformOutput"]["S3OutputPath"].rstrip("/"))
    written = []
    with tempfile.TemporaryDirectory(prefix="sagemaker-transform-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        s3.download_file(*_split_s3(model_data_url), str(archive))
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(Path(tmp) / "model", filter="data")
        model = LoadedModel(Path(tmp) / "model")
        keys = sorted(
            item["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=in_bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        )
        if not keys:
            raise TransformFailed(f"ClientError: no input objects under {source['S3Uri']}")
        for key in keys:
            body = s3.get_object(Bucket=in_bucket, Key=key)["Body"].read()
            records = body.splitlines(keepends=True) if split == "Line" else [body]
            answers = []
            for payload in _mini_batches([r for r in records if r.strip()], request.get("BatchStrategy"), max_bytes):
                try:
                    answer = model.invoke(payload, content_type, accept)
                except Exception as exc:  # the container answers 4xx/5xx: the job fails
                    raise TransformFailed(f"ClientError: {key}: {exc}") from exc
                answers.append(answer + ("\n" if assemble == "Line" else ""))
            relative = key[len(prefix) :].lstrip("/")
            target = f"{out_prefix}/{relative}.out" if out_prefix else f"{relative}.out"
            s3.put_object(Bucket=out_bucket, Key=target, Body="".join(answers).encode("utf-8"))
            written.append(target)
    return written


class TransformEmulator:
    """Runs every transform job created on moto (:func:`run_transform_job`) before moto reports it.

    moto marks a transform job ``Completed`` at once and writes nothing; with this installed the
    job first runs on its request's S3 input with its model's ``ModelDataUrl``, and a job whose
    handlers fail is ``Failed`` with the reason, as on AWS.

    :param endpoint_url: moto's server.
    """

    def __init__(self, endpoint_url: str):
        self.endpoint_url = endpoint_url
        self.created: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> TransformEmulator:
        """Wrap moto's CreateTransformJob so every new job runs."""
        from moto.sagemaker.models import SageMakerModelBackend

        original = SageMakerModelBackend.create_transform_job
        emulator = self

        def create_transform_job(backend: Any, **kwargs: Any) -> Any:
            job = original(backend, **kwargs)
            request = {
                "TransformInput": kwargs["transform_input"],
                "TransformOutput": kwargs["transform_output"],
                "BatchStrategy": kwargs.get("batch_strategy"),
                "MaxPayloadInMB": kwargs.get("max_payload_in_mb"),
            }
            model_data_url = backend.describe_model(kwargs["model_name"]).primary_container["ModelDataUrl"]
            s3 = container_client("s3", emulator.endpoint_url)
            try:
                run_transform_job(request, model_data_url, s3)
            except TransformFailed as exc:
                job.transform_job_status, job.failure_reason = "Failed", str(exc)
            emulator.created.append(kwargs["transform_job_name"])
            return job

        monkeypatch.setattr(SageMakerModelBackend, "create_transform_job", create_transform_job)
        return self


@pytest.fixture
def transform_emulator(sagemaker_aws, monkeypatch) -> TransformEmulator:
    """Every transform job created on moto runs its model (see :class:`TransformEmulator`)."""
    return TransformEmulator(sagemaker_aws).install(monkeypatch)


def sagemaker_pipeline(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pipeline: str = "churn",
    compute: str = "sagemaker",
    registry: str = "sagemaker",
    trainer: dict | None = None,
    changes: dict | None = None,
    **sagemaker: Any,
) -> Any:
    """Point Conveyor at a copy of include/ whose pipeline runs on SageMaker; returns its spec.

    :param tmp_path: the test's folder (the copy goes to ``include/`` in it).
    :param monkeypatch: the test's monkeypatch (sets ``CONVEYOR_INCLUDE_DIR``).
    :param pipeline: the pipeline file to change.
    :param compute: ``compute:`` of the copy.
    :param registry: ``registry:`` of the copy.
    :param trainer: keys of ``trainer:`` to change.
    :param changes: other top-level keys to replace (``gate``, ``deploy``, ...).
    :param sagemaker: keys of ``sagemaker:`` (``role_arn`` defaults to a moto role).
    """
    import shutil

    import yaml

    from conveyor import settings
    from conveyor.spec import get_spec

    include = tmp_path / "include"
    if not include.exists():
        shutil.copytree(settings.include_dir(), include)
    path = include / "pipelines" / f"{pipeline}.yaml"
    document = yaml.safe_load(path.read_text())
    document.update(compute=compute, registry=registry, **(changes or {}))
    document["trainer"] = {**document["trainer"], **(trainer or {})}
    document["sagemaker"] = {"role_arn": ROLE_ARN, **document.get("sagemaker", {}), **sagemaker}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    return get_spec(pipeline)
