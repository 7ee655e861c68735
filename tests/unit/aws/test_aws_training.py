"""The SageMaker backend's request builders and AWS helpers (exact requests; logs on moto)."""

from __future__ import annotations

import json
import tarfile
import time
import uuid

import pytest
import yaml
from botocore.exceptions import ClientError

from conveyor.aws import common
from conveyor.aws import training as sm
from conveyor.errors import ConveyorError, SpecError, TransientError
from sagemaker_emulator import ROLE_ARN, sagemaker_pipeline


def client_error(code: str, message: str = "nope", operation: str = "CreateTrainingJob") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def test_job_name_is_the_same_for_every_try_and_differs_between_runs():
    first = sm.training_job_name("churn", "churn__train", "manual__2026-01-01T00:00:00+00:00")
    assert first == sm.training_job_name("churn", "churn__train", "manual__2026-01-01T00:00:00+00:00")
    assert first.startswith("churn-") and len(first) == len("churn-") + 12
    assert first != sm.training_job_name("churn", "churn__train", "manual__2026-01-02T00:00:00+00:00")
    assert first != sm.training_job_name("churn", "other__train", "manual__2026-01-01T00:00:00+00:00")


def test_job_name_of_a_long_pipeline_name_stays_valid():
    name = sm.training_job_name("a" * 40 + "_" + "b" * 22, "x__train", "r")
    assert len(name) <= 63
    assert sm._JOB_NAME.match(name)
    assert "_" not in name and "--" not in name


def test_model_package_group_name_uses_the_prefix_and_dashes():
    assert sm.model_package_group("customer_churn") == "customer-churn"
    assert sm.model_package_group("customer_churn", "team-a-") == "team-a-customer-churn"


def test_hyperparameters_are_json_encoded_flags_plus_the_script_mode_settings():
    args = ["--label", "churned", "--time-limit", "8", "--hyperparameters", '{"GBM": {}}', "--refit-full"]
    encoded = sm.hyperparameters(args, "train.py", "s3://b/models/churn/r/source/c-1/sourcedir.tar.gz", "eu-west-1")
    assert encoded == {
        "label": '"churned"',
        "time-limit": '"8"',
        "hyperparameters": json.dumps('{"GBM": {}}'),
        "refit-full": "true",
        "sagemaker_program": '"train.py"',
        "sagemaker_submit_directory": '"s3://b/models/churn/r/source/c-1/sourcedir.tar.gz"',
        "sagemaker_region": '"eu-west-1"',
        "sagemaker_container_log_level": "20",
    }
    # The training toolkit JSON-decodes every value: the script gets back exactly its flags.
    assert json.loads(encoded["hyperparameters"]) == '{"GBM": {}}'


def test_hyperparameters_refuse_what_sagemaker_refuses():
    with pytest.raises(sm.TrainingRequestInvalid, match="'hyperparameters'.*at most 2500") as caught:
        sm.hyperparameters(["--hyperparameters", json.dumps({"x": "y" * 3000})], "train.py", "s3://b/s", "r")
    assert isinstance(caught.value, ConveyorError) and not caught.value.retryable
    with pytest.raises(sm.TrainingRequestInvalid, match="'oops' is not a --flag"):
        sm.hyperparameters(["oops"], "train.py", "s3://b/s", "r")


def test_training_job_request_with_spot(tmp_path, monkeypatch):
    spec = sagemaker_pipeline(
        tmp_path,
        monkeypatch,
        use_spot=True,
        max_run_seconds=900,
        training_instance_type="ml.c5.2xlarge",
        training_instance_count=2,
        training_volume_gb=50,
    )
    config = sm.training_job_config(
        spec,
        "churn-0123456789ab",
        "img:1",
        {"train": "s3://b/split/train/", "validation": "s3://b/split/validation/"},
        "s3://b/run/sagemaker/",
        "s3://b/run/checkpoints/",
        {"a": '"1"'},
        {"conveyor:pipeline": "churn"},
    )
    assert config == {
        "TrainingJobName": "churn-0123456789ab",
        "RoleArn": ROLE_ARN,
        "AlgorithmSpecification": {"TrainingImage": "img:1", "TrainingInputMode": "File"},
        "HyperParameters": {"a": '"1"'},
        "InputDataConfig": [
            {
                "ChannelName": "train",
                "InputMode": "File",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": "s3://b/split/train/",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            },
            {
                "ChannelName": "validation",
                "InputMode": "File",
                "DataSource": {
                    "S3DataSource": {
                        "S3DataType": "S3Prefix",
                        "S3Uri": "s3://b/split/validation/",
                        "S3DataDistributionType": "FullyReplicated",
                    }
                },
            },
        ],
        "OutputDataConfig": {"S3OutputPath": "s3://b/run/sagemaker/"},
        "ResourceConfig": {"InstanceType": "ml.c5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 50},
        "StoppingCondition": {"MaxRuntimeInSeconds": 900, "MaxWaitTimeInSeconds": 1800},
        "EnableManagedSpotTraining": True,
        "CheckpointConfig": {"S3Uri": "s3://b/run/checkpoints/", "LocalPath": "/opt/ml/checkpoints"},
        "Tags": [{"Key": "conveyor:pipeline", "Value": "churn"}],
    }
    assert sm.wait_limit_seconds(spec) == 1800


def test_training_job_request_on_demand_has_no_wait_or_checkpoints(tmp_path, monkeypatch):
    spec = sagemaker_pipeline(tmp_path, monkeypatch, max_run_seconds=600)
    config = sm.training_job_config(spec, "j", "img", {}, "s3://b/o/", None, {}, {})
    assert config["StoppingCondition"] == {"MaxRuntimeInSeconds": 600}
    assert config["EnableManagedSpotTraining"] is False and "CheckpointConfig" not in config
    assert sm.wait_limit_seconds(spec) == 600


def test_images_default_to_the_trainers_aws_containers(tmp_path, monkeypatch):
    spec = sagemaker_pipeline(tmp_path, monkeypatch)
    assert (
        sm.training_image(spec, "eu-west-1")
        == "763104351884.dkr.ecr.eu-west-1.amazonaws.com/autogluon:1.6.3-cpu-amzn2023"
    )
    gpu = sagemaker_pipeline(tmp_path, monkeypatch, trainer={"gpu": True})
    assert sm.training_image(gpu, "us-east-1").endswith("/autogluon:1.6.3-cu133-amzn2023")
    custom = sagemaker_pipeline(tmp_path, monkeypatch, image_uri="123.dkr.ecr.us-east-1.amazonaws.com/mine:1")
    assert sm.training_image(custom, "us-east-1") == "123.dkr.ecr.us-east-1.amazonaws.com/mine:1"
    assert (
        sm.inference_image("resnet", "us-west-2")
        == "763104351884.dkr.ecr.us-west-2.amazonaws.com/pytorch-inference:2.9.0-cpu-py312-ubuntu22.04-sagemaker"
    )
    assert sm.inference_image("autogluon", "us-west-2", "mine:2") == "mine:2"


def test_plain_s3_uri_drops_the_connection_and_refuses_other_stores(s3_lake):
    path = s3_lake.models("churn", "manual__1") / "model.tar.gz"
    assert "@" in str(path)  # ObjectStoragePath's text names its connection
    bucket = s3_lake.root[len("s3://") :].split("/")[0]
    expected = f"s3://{bucket}/conveyor/models/churn/manual__1/model.tar.gz"
    assert sm.plain_s3_uri(path) == expected == sm.plain_s3_uri(str(path))
    with pytest.raises(common.NotOnS3, match="needs the lake on S3"):
        from airflow.sdk import ObjectStoragePath

        sm.plain_s3_uri(ObjectStoragePath("file:///tmp/lake/x"))
    with pytest.raises(common.NotOnS3, match="s3://") as caught:
        sm.plain_s3_uri("file:///tmp/lake/x")
    assert not caught.value.retryable


def test_pack_source_holds_the_script_folder_without_caches_and_the_shipped_contract(tmp_path):
    from conveyor.model.contract import shipped_files

    folder = tmp_path / "autogluon_tabular"
    (folder / "__pycache__").mkdir(parents=True)
    (folder / "train.py").write_text("print('hi')\n")
    (folder / "util.py").write_text("X = 1\n")
    (folder / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0")
    with tarfile.open(sm.pack_source(folder, tmp_path / "out" / "sourcedir.tar.gz")) as tar:
        assert sorted(tar.getnames()) == ["conveyor_metadata.py", "train.py", "util.py"]
        shipped = tar.extractfile("conveyor_metadata.py").read()
    assert [path.name for path in shipped_files()] == ["conveyor_metadata.py"]
    assert shipped == shipped_files()[0].read_bytes()  # the one definition, not a copy kept by hand
    # A folder with a module of that name keeps its own (no duplicate member).
    (folder / "conveyor_metadata.py").write_text("SCHEMA_VERSION = 1\n")
    with tarfile.open(sm.pack_source(folder, tmp_path / "again" / "sourcedir.tar.gz")) as tar:
        assert sorted(tar.getnames()) == ["conveyor_metadata.py", "train.py", "util.py"]
        assert tar.extractfile("conveyor_metadata.py").read() == b"SCHEMA_VERSION = 1\n"


def test_expired_credentials_are_a_clear_retryable_error():
    with pytest.raises(sm.AwsCredentialsExpired) as err:
        with sm.aws_errors("sagemaker:CreateTrainingJob", "aws_default"):
            raise client_error("ExpiredTokenException", "The security token included in the request is expired")
    assert isinstance(err.value, TransientError) and err.value.retryable  # retried: the connection may be refreshed
    assert "sagemaker:CreateTrainingJob" in str(err.value) and "'aws_default'" in str(err.value)
    assert "ExpiredTokenException" in str(err.value) and "expired" in str(err.value)


def test_missing_permission_is_not_retried_and_other_errors_pass_through():
    with pytest.raises(sm.AwsPermissionDenied, match="sagemaker:CreateModelPackage.*lacks the permission"):
        with sm.aws_errors("sagemaker:CreateModelPackage", "aws_default"):
            raise client_error("AccessDeniedException", "not authorized to perform: sagemaker:CreateModelPackage")
    assert issubclass(sm.AwsPermissionDenied, ConveyorError) and not sm.AwsPermissionDenied.retryable
    with pytest.raises(ClientError, match="ThrottlingException"):
        with sm.aws_errors("sagemaker:DescribeTrainingJob", "aws_default"):
            raise client_error("ThrottlingException", "Rate exceeded")


def test_log_tail_reads_the_last_lines_of_every_instance_in_time_order(sagemaker_aws):
    import boto3

    logs = boto3.client("logs", endpoint_url=sagemaker_aws, region_name="us-east-1")
    try:
        logs.create_log_group(logGroupName=sm.TRAINING_LOG_GROUP)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    job = f"churn-{uuid.uuid4().hex[:12]}"
    now = int(time.time() * 1000)
    for host, offset in (("algo-1", 0), ("algo-2", 1)):
        stream = f"{job}/{host}-1"
        logs.create_log_stream(logGroupName=sm.TRAINING_LOG_GROUP, logStreamName=stream)
        logs.put_log_events(
            logGroupName=sm.TRAINING_LOG_GROUP,
            logStreamName=stream,
            logEvents=[{"timestamp": now + 10 * i + offset, "message": f"{host} step {i}"} for i in range(40)],
        )
    tail = sm.training_log_tail("aws_default", None, job, lines=4)
    assert tail == ["algo-1 step 38", "algo-2 step 38", "algo-1 step 39", "algo-2 step 39"]
    assert sm.training_log_tail("aws_default", None, "no-such-job", lines=4) == [
        f"(no CloudWatch log in {sm.TRAINING_LOG_GROUP} for no-such-job)"
    ]


def test_spec_needs_a_role_for_sagemaker_compute_and_a_long_enough_spot_wait(tmp_path, monkeypatch):
    sagemaker_pipeline(tmp_path, monkeypatch)
    spec_file = tmp_path / "include" / "pipelines" / "churn.yaml"
    document = yaml.safe_load(spec_file.read_text())
    from conveyor.spec import load_spec

    del document["sagemaker"]["role_arn"]
    spec_file.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError, match="sagemaker.role_arn"):
        load_spec(spec_file)
    document["sagemaker"].update(role_arn=ROLE_ARN, use_spot=True, max_run_seconds=3600, max_wait_seconds=600)
    spec_file.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError, match="max_wait_seconds must be at least max_run_seconds"):
        load_spec(spec_file)
    document["sagemaker"].update(max_wait_seconds=7200, name_prefix="bad_prefix")
    spec_file.write_text(yaml.safe_dump(document))
    with pytest.raises(SpecError, match="sagemaker.name_prefix"):
        load_spec(spec_file)


def test_unexpected_aws_error_in_log_tail_is_reported_not_raised(monkeypatch):
    from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook

    class Broken:
        def describe_log_streams(self, **kwargs):
            raise client_error("AccessDeniedException", "logs:DescribeLogStreams denied", "DescribeLogStreams")

    monkeypatch.setattr(AwsLogsHook, "conn", Broken())
    (line,) = sm.training_log_tail("aws_default", None, "job-1")
    assert line.startswith("(the CloudWatch log of job-1 could not be read:") and "denied" in line
    assert isinstance(sm.AwsCredentialsExpired("x"), TransientError)
    assert sm.AwsCredentialsExpired is common.AwsCredentialsExpired  # shared helpers: one definition


def test_a_log_tail_without_a_usable_connection_is_reported_not_raised(monkeypatch):
    from airflow.exceptions import AirflowNotFoundException
    from airflow.providers.amazon.aws.hooks.logs import AwsLogsHook

    def missing(self):
        raise AirflowNotFoundException("The conn_id `nope` isn't defined")

    monkeypatch.setattr(AwsLogsHook, "conn", property(missing))
    (line,) = sm.training_log_tail("nope", None, "job-2")
    assert line.startswith("(the CloudWatch log of job-2 could not be read:") and "nope" in line


def test_sagemaker_flags_leave_gpus_to_the_container_and_resnet_checkpoints_to_sagemaker(tmp_path, monkeypatch):
    from conveyor.training.arguments import TrainingSettingsError, trainer_args

    spec = sagemaker_pipeline(tmp_path, monkeypatch, trainer={"gpu": True}, max_run_seconds=600)
    assert "--num-gpus" in trainer_args(spec, 60, "medium_quality", 0)
    assert "--num-gpus" not in sm.job_arguments(spec, 60, "medium_quality")
    shapes = sagemaker_pipeline(tmp_path, monkeypatch, pipeline="shapes")
    assert sm.job_arguments(shapes, 60, "")[-2:] == ["--checkpoint-dir", "/opt/ml/checkpoints"]
    sm.check_budget(spec, 599)
    with pytest.raises(TrainingSettingsError, match=r"'time_limit < sagemaker.max_run_seconds' \(600s\)"):
        sm.check_budget(spec, 600)


def test_job_durations_and_submitted_code_versions():
    from datetime import datetime, timedelta

    start = datetime(2026, 1, 1)
    assert sm.train_seconds({"TrainingTimeInSeconds": 12}) == 12.0
    assert sm.train_seconds({"TrainingStartTime": start, "TrainingEndTime": start + timedelta(seconds=3.5)}) == 3.5
    assert sm.train_seconds({}) == 0.0
    submit = json.dumps("s3://b/models/churn/r/source/c-0123456789ab/sourcedir.tar.gz")
    assert sm.submitted_code_version({"HyperParameters": {"sagemaker_submit_directory": submit}}) == "c-0123456789ab"
    assert (
        sm.submitted_code_version({"HyperParameters": {"sagemaker_submit_directory": '"s3://b/x/src.tar.gz"'}}) is None
    )
    assert sm.submitted_code_version({}) is None
