"""The train task on SageMaker: exact requests, deferral, retries, failures, credentials.

The jobs run on moto's server. moto runs no container, so the tests that need a trained model use
``training_emulator`` (``tests/sagemaker_emulator.py``): it downloads the job's channels and
``sourcedir.tar.gz`` from moto's S3, runs the real ``include/training/.../train.py`` with the
``SM_*`` environment of a SageMaker container, writes its lines to CloudWatch Logs, uploads
``model.tar.gz`` where the job's ``ModelArtifacts`` say, and ends the job ``Completed`` or
``Failed``. The request tests mock the boto3 client of the provider's ``SageMakerHook`` instead.
"""

from __future__ import annotations

import json
import tarfile
import uuid
from unittest import mock

import pytest
from airflow.exceptions import TaskDeferred
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from botocore.exceptions import ClientError

from conveyor.aws.common import AwsCredentialsExpired
from conveyor.aws.training import TrainingJobFailed
from conveyor.operators.train_sagemaker import SageMakerTrainModelOperator
from helpers import context
from sagemaker_emulator import ROLE_ARN, sagemaker_pipeline

RESULT_KEYS = {
    "model_uri",
    "sha256",
    "code_version",
    "dataset_version",
    "best_model",
    "validation_score",
    "train_seconds",
}
NOT_FOUND = ClientError(
    {"Error": {"Code": "ValidationException", "Message": "Could not find training job 'x'."}}, "DescribeTrainingJob"
)


@pytest.fixture
def run(tmp_path, monkeypatch, s3_lake, sagemaker_aws):
    """A SageMaker churn pipeline (tiny GBM budget) with this run's split on the S3 lake."""
    from conveyor.data.splits import write_split
    from conveyor.demo import churn_frame

    spec = sagemaker_pipeline(
        tmp_path, monkeypatch, check_interval_seconds=1, trainer={"time_limit": 5, "hyperparameters": {"GBM": {}}}
    )
    run_id = f"manual__{uuid.uuid4().hex[:8]}"
    record = write_split(s3_lake, spec, "v-test", run_id, churn_frame(600, seed=5))
    return {
        "spec": spec,
        "lake": s3_lake,
        "run_id": run_id,
        "split": {"dataset_version": "v-test", "parts": record["parts"]},
    }


def operator(run: dict, spec=None, **kwargs) -> SageMakerTrainModelOperator:
    """The train task as the factory builds it: the validated spec (the run's, or ``spec``) as JSON."""
    spec = (spec or run["spec"]).model_dump(mode="json")
    return SageMakerTrainModelOperator(task_id="train", spec=spec, split=run["split"], **kwargs)


def mocked_conn(*descriptions) -> mock.MagicMock:
    """A boto3 SageMaker client whose DescribeTrainingJob answers the given results in turn."""
    conn = mock.MagicMock()
    conn.meta.region_name = conn.meta.client.meta.region_name = "us-east-1"
    conn.describe_training_job.side_effect = list(descriptions)
    return conn


def patched(conn):
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    return mock.patch.object(SageMakerHook, "conn", conn)


def s3(run: dict, *parts: str) -> str:
    from conveyor.aws.training import plain_s3_uri

    return plain_s3_uri(run["lake"].models("churn", run["run_id"]).joinpath(*parts))


def test_the_exact_training_job_request_then_a_deferred_wait(run, tmp_path, monkeypatch):
    import importlib

    from conveyor.model import artifacts

    spec = sagemaker_pipeline(
        tmp_path,
        monkeypatch,
        check_interval_seconds=7,
        use_spot=True,
        max_run_seconds=900,
        max_wait_seconds=2700,
        training_instance_type="ml.c5.2xlarge",
        image_uri="img:train",
    )
    conn = mocked_conn(NOT_FOUND, {"TrainingJobName": "x", "TrainingJobStatus": "InProgress"})
    op = operator(run, spec, time_limit=5)
    assert "spec" in op.template_fields and op.template_fields_renderers["spec"] == "json"
    with patched(conn), pytest.raises(TaskDeferred) as deferred:
        op.execute(context(run["run_id"]))
    name = op.job_name(context(run["run_id"]))
    code = artifacts.code_version("autogluon")
    source = s3(run, "source", code, "sourcedir.tar.gz")
    conn.create_training_job.assert_called_once_with(
        TrainingJobName=name,
        RoleArn=ROLE_ARN,
        AlgorithmSpecification={"TrainingImage": "img:train", "TrainingInputMode": "File"},
        HyperParameters={
            "label": '"churned"',
            "problem-type": '"binary"',
            "presets": '"medium_quality"',
            "time-limit": '"5"',
            "excluded-model-types": '"NN_TORCH,FASTAI"',
            "seed": '"42"',
            "num-gpus": '"0"',
            "eval-metric": '"roc_auc"',
            "hyperparameters": json.dumps('{"GBM": {}}'),
            "id-column": '"customer_id"',
            "sagemaker_program": '"train.py"',
            "sagemaker_submit_directory": json.dumps(source),
            "sagemaker_region": '"us-east-1"',
            "sagemaker_container_log_level": "20",
        },
        InputDataConfig=[
            {
                "ChannelName": part,
                "InputMode": "File",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": s3(run, "split", part) + "/",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            }
            for part in ("train", "validation")
        ],
        OutputDataConfig={"S3OutputPath": s3(run, "sagemaker") + "/"},
        ResourceConfig={"InstanceType": "ml.c5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 900, "MaxWaitTimeInSeconds": 2700},
        EnableManagedSpotTraining=True,
        CheckpointConfig={"S3Uri": s3(run, "checkpoints") + "/", "LocalPath": "/opt/ml/checkpoints"},
        Tags=[{"Key": "conveyor:pipeline", "Value": "churn"}, {"Key": "conveyor:dag_id", "Value": op.dag_id}],
    )
    # The script's folder went to S3 as sourcedir.tar.gz, under the code version.
    archive = tmp_path / "sourcedir.tar.gz"
    uploaded = run["lake"].models("churn", run["run_id"]) / "source" / code / "sourcedir.tar.gz"
    archive.write_bytes(uploaded.read_bytes())
    with tarfile.open(archive) as tar:
        assert "train.py" in tar.getnames() and "conveyor_metadata.py" in tar.getnames()  # the shipped contract
    # The wait is deferred to the provider's trigger, which survives serialisation.
    trigger = deferred.value.trigger
    assert deferred.value.method_name == "execute_complete"
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow.providers.amazon.aws.triggers.sagemaker.SageMakerTrigger"
    assert kwargs["job_name"] == name and kwargs["job_type"] == "training" and kwargs["waiter_delay"] == 7
    assert kwargs["aws_conn_id"] == "aws_default" and kwargs["waiter_max_attempts"] >= 2700 // 7
    module, name_ = classpath.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name_)(**kwargs).serialize() == (classpath, kwargs)


def test_a_first_try_creates_its_job_without_describing_it(run):
    from types import SimpleNamespace

    conn = mocked_conn()  # no answer to give: a DescribeTrainingJob would fail the test
    ctx = {**context(run["run_id"]), "ti": SimpleNamespace(try_number=1)}
    with patched(conn), pytest.raises(TaskDeferred):
        operator(run).execute(ctx)
    conn.create_training_job.assert_called_once()
    conn.describe_training_job.assert_not_called()  # the wait is the trigger's; the job is only just created


def test_a_retry_while_the_job_runs_waits_for_it_without_starting_another(run):
    conn = mocked_conn({"TrainingJobName": "x", "TrainingJobStatus": "InProgress"})
    op = operator(run)
    with patched(conn), pytest.raises(TaskDeferred):
        op.execute(context(run["run_id"]))
    conn.create_training_job.assert_not_called()
    assert not (run["lake"].models("churn", run["run_id"]) / "source").exists()
    with patched(conn):
        op.on_kill()  # a killed task stops the job it waits for
    conn.stop_training_job.assert_called_once_with(TrainingJobName=op.job_name(context(run["run_id"])))


def test_train_on_the_emulated_container_then_a_retry_reuses_the_completed_job(run, training_emulator, tmp_path):
    from conveyor.model import artifacts

    op = operator(run)
    ctx = context(run["run_id"])
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(ctx)
    name = deferred.value.trigger.job_name
    training_emulator.wait()
    result = operator(run).execute_complete(ctx, {"status": "success", "job_name": name})
    assert set(result) == RESULT_KEYS
    assert result["model_uri"] == str(run["lake"].models("churn", run["run_id"]) / "model.tar.gz")
    assert result["dataset_version"] == "v-test" and result["code_version"].startswith("c-")
    assert result["train_seconds"] >= 1 and 0.5 < result["validation_score"] <= 1.0

    # The script ran as a SageMaker container runs it: flags from the hyperparameters, SM_* paths.
    command = training_emulator.commands[name]
    assert command[1] == "train.py" and command[command.index("--time-limit") + 1] == "5"
    assert json.loads(training_emulator.environments[name]["SM_CHANNELS"]) == ["train", "validation"]

    # The job's model was repacked like the local backend's: metadata first, inference code, shipped contract.
    from conveyor.model.metadata import ModelMetadata, read, read_sidecar, sidecar_uri

    local = artifacts.fetch(result["model_uri"], tmp_path / "model", run["lake"].conn_id)
    assert result["sha256"] == artifacts.archive_sha256(
        result["model_uri"], run["lake"].conn_id
    )  # what register records
    assert (local / "code" / "inference.py").exists() and (local / "code" / "conveyor_metadata.py").exists()
    with tarfile.open(tmp_path / "model.tar.gz") as tar:
        assert tar.getnames()[0] == "metadata.json"
    metadata = read(local)
    assert isinstance(metadata, ModelMetadata)
    assert metadata.backend == "sagemaker" and metadata.extra["training_job"] == name
    assert metadata.run_id == run["run_id"] and metadata.code_version == result["code_version"]
    assert metadata.dataset_version == "v-test" and metadata.train_seconds == result["train_seconds"]
    # ... and its metadata.json is also beside it in the lake (the sidecar: no download to read it).
    sidecar = run["lake"].models("churn", run["run_id"]) / "metadata.json"
    assert str(sidecar) == sidecar_uri(result["model_uri"])
    assert read_sidecar(result["model_uri"], run["lake"].conn_id) == metadata
    assert (local / "predictor").is_dir()  # the trainer's files (the e2e test scores with them)
    assert (run["lake"].models("churn", run["run_id"]) / "output" / "leaderboard.csv").exists()

    # A retry of the task finds the completed job: same model, no second job.
    again = operator(run).execute(ctx)
    # The retry packs the job's model again (the archive's mtimes are the pack's): the sha256 it returns is
    # that of the archive now in the lake, the rest is the same.
    assert {**again, "sha256": None} == {**result, "sha256": None}
    assert again["sha256"] == artifacts.archive_sha256(again["model_uri"], run["lake"].conn_id)
    assert training_emulator.created == [name]


def test_a_failed_job_fails_with_its_reason_and_log_tail(run, training_emulator, tmp_path):
    script = tmp_path / "include" / "training" / "autogluon_tabular" / "train.py"
    script.write_text("for i in range(40):\n    print(f'step {i}')\nraise RuntimeError('disk on fire')\n")
    ctx = context(run["run_id"])
    with pytest.raises(TaskDeferred) as deferred:
        operator(run).execute(ctx)
    name = deferred.value.trigger.job_name
    training_emulator.wait()
    with pytest.raises(AirflowFailException) as err:  # deterministic: not retried
        operator(run).execute_complete(ctx, {"status": "failed", "job_name": name, "message": "AlgorithmError"})
    message = str(err.value)
    assert isinstance(err.value.__cause__, TrainingJobFailed) and str(err.value.__cause__) == message
    assert f"training job {name} Failed: AlgorithmError: ExecuteUserScriptError: ExitCode 1" in message
    assert "RuntimeError: disk on fire" in message and "step 39" in message
    assert "step 0\n" not in message  # the tail, not the whole log
    assert not (run["lake"].models("churn", run["run_id"]) / "model.tar.gz").exists()
    with pytest.raises(AirflowFailException) as err:  # a retry meets the same failed job and starts none
        operator(run).execute(ctx)
    assert isinstance(err.value.__cause__, TrainingJobFailed)
    assert training_emulator.created == [name]


def test_polling_without_a_triggerer_sees_the_failure(run, monkeypatch):
    from conveyor.aws import training

    monkeypatch.setattr(training, "training_log_tail", lambda *args, **kwargs: ["oom at step 3"])
    running = {"TrainingJobName": "x", "TrainingJobStatus": "InProgress", "SecondaryStatus": "Training"}
    failed = {
        "TrainingJobName": "x",
        "TrainingJobStatus": "Failed",
        "SecondaryStatus": "Failed",
        "FailureReason": "ClientError: Please use an instance type with more memory",
    }
    conn = mocked_conn(running, running, failed)
    expected = "x Failed: ClientError: Please use.*\noom at step 3"
    with patched(conn), pytest.raises(AirflowFailException, match=expected) as err:
        operator(run, deferrable=False).execute(context(run["run_id"]))
    assert isinstance(err.value.__cause__, TrainingJobFailed)
    assert conn.describe_training_job.call_count == 3


def test_an_expired_credential_is_a_clear_retryable_error(run):
    expired = ClientError(
        {
            "Error": {
                "Code": "ExpiredTokenException",
                "Message": "The security token included in the request is expired",
            }
        },
        "DescribeTrainingJob",
    )
    with patched(mocked_conn(expired)), pytest.raises(AwsCredentialsExpired) as err:
        operator(run).execute(context(run["run_id"]))
    assert not isinstance(err.value, AirflowFailException) and err.value.retryable  # propagates: retried
    assert "sagemaker:DescribeTrainingJob" in str(err.value) and "'aws_default'" in str(err.value)


@pytest.mark.parametrize(
    "event",
    [{"status": "timeout", "message": "max attempts"}, {"status": "error", "message": "connection reset"}, None],
)
def test_a_wait_that_ends_without_an_outcome_is_retried(run, event):
    with patched(mocked_conn()), pytest.raises(AirflowException) as err:
        operator(run).execute_complete(context(run["run_id"]), event)
    assert not isinstance(err.value, AirflowFailException)


def test_bad_settings_are_refused_before_any_job_starts(run, lake, tmp_path, monkeypatch):
    from conveyor.aws.common import NotOnS3
    from conveyor.training.arguments import TrainingSettingsError

    conn = mocked_conn(NOT_FOUND, NOT_FOUND, NOT_FOUND, NOT_FOUND)
    with patched(conn):
        with pytest.raises(AirflowFailException, match=r"time_limit < sagemaker.max_run_seconds' \(3600s\)") as err:
            operator(run, time_limit=4000).execute(context(run["run_id"]))
        assert isinstance(err.value.__cause__, TrainingSettingsError)
        with pytest.raises(AirflowFailException, match=r"rule 'time_limit > 0'"):
            operator(run, time_limit=0).execute(context(run["run_id"]))
        with pytest.raises(AirflowFailException, match="needs the lake on S3") as err:
            operator(run).execute(context(run["run_id"]))  # the `lake` fixture made the lake local
        assert isinstance(err.value.__cause__, NotOnS3)
        local = sagemaker_pipeline(tmp_path, monkeypatch, compute="local")
        with pytest.raises(AirflowFailException, match="compute is 'local'"):
            operator(run, local).execute(context(run["run_id"]))
    conn.create_training_job.assert_not_called()


def test_gpu_and_resumable_trainers_in_the_request(tmp_path, monkeypatch, s3_lake):
    """GPUs: the container's SM_NUM_GPUS decides; ResNet checkpoints go to S3 and resume a spot restart."""
    from conveyor.aws.training import job_request, plain_s3_uri, training_job_name

    spec = sagemaker_pipeline(tmp_path, monkeypatch, trainer={"gpu": True}, training_instance_type="ml.g5.xlarge")
    config = job_request(spec, s3_lake, "r1", training_job_name("churn", "d", "r1"), "us-west-2", {}, 60, "")
    assert "num-gpus" not in config["HyperParameters"] and "CheckpointConfig" not in config
    assert (
        config["AlgorithmSpecification"]["TrainingImage"]
        == "763104351884.dkr.ecr.us-west-2.amazonaws.com/autogluon:1.6.3-cu133-amzn2023"
    )

    spec = sagemaker_pipeline(tmp_path, monkeypatch, pipeline="shapes")
    config = job_request(spec, s3_lake, "r1", training_job_name("shapes", "d", "r1"), "us-west-2", {}, 60, "")
    assert config["HyperParameters"]["checkpoint-dir"] == '"/opt/ml/checkpoints"'
    assert config["CheckpointConfig"] == {
        "S3Uri": plain_s3_uri(s3_lake.models("shapes", "r1") / "checkpoints") + "/",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert config["HyperParameters"]["sagemaker_program"] == '"train.py"'
    assert config["AlgorithmSpecification"]["TrainingImage"].endswith(  # shapes.yaml: trainer.gpu
        "/pytorch-training:2.9.0-gpu-py312-cu130-ubuntu22.04-sagemaker"
    )
