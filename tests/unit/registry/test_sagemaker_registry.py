"""The SageMaker Model Registry hook: on moto's server, plus exact requests at the hook boundary."""

from __future__ import annotations

import hashlib
import uuid
from unittest import mock

import pytest
from botocore.exceptions import ClientError

from conveyor.aws.common import AwsCredentialsExpired
from conveyor.errors import IntegrityError
from conveyor.registry import ModelVersionNotFound, registry_hook
from conveyor.registry.base import APPROVED, PENDING, REJECTED, SHA256_TAG, STATUS_TAG, UnknownApprovalStatus
from conveyor.registry.sagemaker import SageMakerRegistryHook
from sagemaker_emulator import sagemaker_pipeline

TAGS = {
    "dataset_version": "v-0123",
    "code_version": "c-abc",
    "backend": "sagemaker",
    "gate_decision": "passed",
    "conveyor_run_id": "manual__2026-01-01T00:00:00+00:00",
    "deploy": "true",
}


@pytest.fixture
def hook(sagemaker_aws) -> SageMakerRegistryHook:
    """A hook whose model package groups are this test's own (a unique name prefix on moto)."""
    return SageMakerRegistryHook(name_prefix=f"t{uuid.uuid4().hex[:10]}-", realtime_instance_types=["ml.m5.large"])


def model_uri(run: str) -> str:
    return f"s3://lake_s3@lake-bucket/conveyor/models/churn/{run}/model.tar.gz"


def digest(run: str) -> str:
    """The sha256 the tests give for the archive of ``run``."""
    return hashlib.sha256(f"model of {run}".encode()).hexdigest()


def register(hook: SageMakerRegistryHook, run: str, **kwargs) -> object:
    kwargs.setdefault("sha256", digest(run))
    return hook.register("churn", model_uri(run), f"mlflow-{run}", {**TAGS, "conveyor_run_id": run}, **kwargs)


def packages(hook: SageMakerRegistryHook) -> list[dict]:
    return hook.hook.conn.list_model_packages(ModelPackageGroupName=hook.group("churn"))["ModelPackageSummaryList"]


def test_register_creates_the_group_once_and_a_pending_package_with_its_provenance(hook):
    create_group = mock.Mock(wraps=hook.hook.conn.create_model_package_group)
    with mock.patch.object(hook.hook.conn, "create_model_package_group", create_group):
        first = register(
            hook,
            "run1",
            metrics={"roc_auc": 0.8123456789, "accuracy": 0.75},
            metrics_uri="s3://lake_s3@lake-bucket/conveyor/reports/churn/run1/evaluation/metrics.json",
        )
        second = register(hook, "run2")
    assert create_group.call_count == 1
    assert (first.version, second.version) == ("1", "2")
    assert first.source == "s3://lake-bucket/conveyor/models/churn/run1/model.tar.gz"
    assert first.tags[STATUS_TAG] == PENDING and first.status == PENDING
    assert first.tags["conveyor_run_id"] == "run1" and first.tags["dataset_version"] == "v-0123"
    assert first.tags["test_roc_auc"] == "0.812346" and first.run_id == "mlflow-run1"
    assert first.tags[SHA256_TAG] == digest("run1") and second.tags[SHA256_TAG] == digest("run2")
    described = hook.hook.conn.describe_model_package(ModelPackageName=first.arn)
    assert described["ModelPackageGroupName"] == hook.group("churn")
    assert described["InferenceSpecification"] == {
        "Containers": [
            {
                "Image": "763104351884.dkr.ecr.us-east-1.amazonaws.com/autogluon:1.6.3-cpu-amzn2023",
                "ModelDataUrl": "s3://lake-bucket/conveyor/models/churn/run1/model.tar.gz",
                "Environment": {
                    "SAGEMAKER_PROGRAM": "inference.py",
                    "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                    "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                },
            }
        ],
        "SupportedContentTypes": ["text/csv", "application/json"],
        "SupportedResponseMIMETypes": ["application/json", "text/csv"],
        "SupportedRealtimeInferenceInstanceTypes": ["ml.m5.large"],
    }
    assert described["ModelMetrics"] == {
        "ModelQuality": {
            "Statistics": {
                "ContentType": "application/json",
                "S3Uri": "s3://lake-bucket/conveyor/reports/churn/run1/evaluation/metrics.json",
            }
        }
    }
    assert described["MetadataProperties"]["CommitId"] == "c-abc"
    assert "ModelMetrics" not in hook.hook.conn.describe_model_package(ModelPackageName=second.arn)


def test_register_is_idempotent_for_a_retry_of_the_same_run(hook):
    first = register(hook, "run1")
    again = register(hook, "run1")
    assert again.version == first.version == "1" and again.arn == first.arn
    assert len(packages(hook)) == 1


def test_register_reads_the_archive_sha256_through_the_lake_connection(hook, s3_lake):
    target = s3_lake.models("churn", "read-run") / "model.tar.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"the archive on S3")
    version = hook.register("churn", str(target), "mlflow-read-run", dict(TAGS))
    described = hook.hook.conn.describe_model_package(ModelPackageName=version.arn)
    recorded = described["CustomerMetadataProperties"][SHA256_TAG]
    assert recorded == hashlib.sha256(b"the archive on S3").hexdigest()
    assert hook.version("churn", version.version).tags[SHA256_TAG] == recorded


def test_a_retry_naming_other_bytes_is_refused(hook):
    first = register(hook, "run1")
    with pytest.raises(IntegrityError, match=f"churn version 1: .* its sha256 is {digest('other')}") as caught:
        register(hook, "run1", sha256=digest("other"))
    assert (caught.value.expected, caught.value.version) == (digest("run1"), first.version)
    assert len(packages(hook)) == 1


def test_approve_reject_and_champion_is_the_latest_approved(hook):
    for run in ("r1", "r2", "r3"):
        register(hook, run)
    assert hook.champion("churn") is None
    hook.promote("churn", "1")
    assert hook.champion("churn").version == "1"
    hook.promote("churn", "2")
    hook.set_status("churn", "3", REJECTED)
    champion = hook.champion("churn")
    assert champion.version == "2" and champion.tags[STATUS_TAG] == APPROVED
    assert champion.tags["conveyor_run_id"] == "r2"  # the metadata survived the status change
    assert hook.version("churn", "3").tags[STATUS_TAG] == REJECTED
    hook.set_status("churn", "2", REJECTED)  # the live champion is withdrawn: the one before returns
    assert hook.champion("churn").version == "1"
    with pytest.raises(UnknownApprovalStatus, match="unknown approval status 'Maybe'"):
        hook.set_status("churn", "1", "Maybe")


def test_resolve_by_number_and_alias(hook):
    register(hook, "r1")
    register(hook, "r2")
    with pytest.raises(ModelVersionNotFound, match="no champion version yet"):
        hook.resolve("churn", "champion")
    hook.promote("churn", "1")
    found = hook.resolve("churn", "champion")
    assert (found.version, found.source, found.tags["conveyor_run_id"]) == (
        "1",
        "s3://lake-bucket/conveyor/models/churn/r1/model.tar.gz",
        "r1",
    )
    assert hook.resolve("churn", "2").tags[STATUS_TAG] == PENDING
    assert hook.resolve("churn", "latest").version == "2"
    with pytest.raises(ModelVersionNotFound, match="has no version 7"):
        hook.resolve("churn", "7")
    with pytest.raises(ModelVersionNotFound, match="unknown alias 'staging'"):
        hook.resolve("churn", "staging")


def test_approving_an_older_version_warns_that_the_newer_stays_champion(hook):
    for run in ("r1", "r2"):
        register(hook, run)
    hook.promote("churn", "2")
    log = mock.MagicMock()
    with mock.patch.object(type(hook), "log", new_callable=mock.PropertyMock, return_value=log):
        hook.promote("churn", "1")
    message, *values = log.warning.call_args.args
    assert message % tuple(values) == "churn version 1 approved, but the newer approved version 2 stays champion"
    assert hook.champion("churn").version == "2"


def test_an_approval_known_to_be_the_newest_lists_nothing():
    """The automatic approval of the version its run just registered: one UpdateModelPackage, no listing."""
    hook = SageMakerRegistryHook()
    conn = mock.MagicMock()
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/churn/4"
    with mock.patch.object(type(hook.hook), "conn", conn):
        hook.remember({"model_name": "churn", "version": "4", "arn": arn})
        hook.promote("churn", "4", newest=True)
    conn.list_model_packages.assert_not_called()
    conn.describe_model_package.assert_not_called()
    conn.update_model_package.assert_called_once_with(
        ModelPackageArn=arn, ModelApprovalStatus=APPROVED, ApprovalDescription="Approved by Conveyor"
    )


def test_version_tags_are_added_without_losing_status_or_metadata(hook):
    register(hook, "r1")
    hook.promote("churn", "1")
    hook.set_version_tags("churn", "1", {"decided_by": "ana"})
    found = hook.version("churn", "1")
    assert found.tags["decided_by"] == "ana" and found.tags[STATUS_TAG] == APPROVED
    assert found.tags["dataset_version"] == "v-0123"


def test_record_deployment_moves_the_live_version(hook):
    for run in ("r1", "r2"):
        register(hook, run)
    assert hook.live_version("churn", "churn-endpoint") is None
    assert hook.record_deployment("churn", "1", "churn-endpoint") is None
    assert hook.live_version("churn", "churn-endpoint") == "1"
    assert hook.record_deployment("churn", "2", "churn-endpoint") == "1"
    assert hook.live_version("churn", "churn-endpoint") == "2"
    assert hook.version("churn", "2").tags["live_on"] == "churn-endpoint"
    assert "live_on" not in hook.version("churn", "1").tags
    assert hook.version("churn", "1").tags["dataset_version"] == "v-0123"
    assert hook.record_deployment("churn", "2", "churn-endpoint") == "2"  # a redeploy of the same version
    tags = hook.hook.conn.list_tags(ResourceArn=hook.group_arn("churn"))["Tags"]
    assert [tag for tag in tags if tag["Key"] == "conveyor:live_on:churn-endpoint"] == [
        {"Key": "conveyor:live_on:churn-endpoint", "Value": "2"}
    ]


def test_nothing_registered_means_no_group_no_champion_no_live_version(hook):
    assert hook.group_arn("churn") is None
    assert hook.champion("churn") is None
    assert hook.live_version("churn", "churn") is None


def test_exact_requests_at_the_hook_boundary():
    """The boto3 client is a mock: the exact CreateModelPackage and UpdateModelPackage requests."""
    hook = SageMakerRegistryHook(trainer="resnet", inference_image_uri="img:serve", name_prefix="p-")
    conn = mock.MagicMock()
    conn.meta.region_name = conn.meta.client.meta.region_name = "eu-west-1"
    conn.list_model_packages.return_value = {"ModelPackageSummaryList": []}
    conn.describe_model_package_group.return_value = {"ModelPackageGroupArn": "arn:group/p-shapes"}
    conn.create_model_package.return_value = {"ModelPackageArn": "arn:pkg/p-shapes/1"}
    conn.describe_model_package.return_value = {
        "ModelPackageArn": "arn:pkg/p-shapes/1",
        "ModelPackageVersion": 1,
        "ModelPackageGroupName": "p-shapes",
        "ModelApprovalStatus": PENDING,
        "CustomerMetadataProperties": {"conveyor_run_id": "r9", "x": "1"},
        "InferenceSpecification": {"Containers": [{"ModelDataUrl": "s3://b/m.tar.gz"}]},
    }
    with mock.patch.object(type(hook.hook), "conn", conn):
        version = hook.register(
            "shapes",
            "s3://b/m.tar.gz",
            "mlflow-9",
            {"conveyor_run_id": "r9", "code_version": "c-9"},
            metrics={"accuracy": 0.5, "flag": True},
            sha256="ab" * 32,
        )
        conn.list_model_packages.return_value = {
            "ModelPackageSummaryList": [{"ModelPackageArn": "arn:pkg/p-shapes/1", "ModelPackageVersion": 1}]
        }
        hook.set_status("shapes", "1", APPROVED)
    assert version.version == "1" and version.arn == "arn:pkg/p-shapes/1"
    request = conn.create_model_package.call_args.kwargs
    assert request == {
        "ModelPackageGroupName": "p-shapes",
        "ModelPackageDescription": "shapes model of Airflow run r9 [registration mlflow-9]",
        "InferenceSpecification": {
            "Containers": [
                {
                    "Image": "img:serve",
                    "ModelDataUrl": "s3://b/m.tar.gz",
                    "Environment": {
                        "SAGEMAKER_PROGRAM": "inference.py",
                        "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                    },
                }
            ],
            "SupportedContentTypes": ["image/jpeg", "image/png", "application/x-image", "application/json"],
            "SupportedResponseMIMETypes": ["application/json", "text/csv"],
        },
        "ModelApprovalStatus": PENDING,
        "CustomerMetadataProperties": {
            "conveyor_run_id": "r9",
            "code_version": "c-9",
            "mlflow_run_id": "mlflow-9",
            SHA256_TAG: "ab" * 32,
            "test_accuracy": "0.5",
        },
        "MetadataProperties": {"GeneratedBy": "conveyor run r9", "CommitId": "c-9", "ProjectId": "shapes"},
        "ClientToken": request["ClientToken"],
        "Tags": [{"Key": "conveyor:pipeline", "Value": "shapes"}, {"Key": "conveyor:run_id", "Value": "r9"}],
    }
    assert len(request["ClientToken"]) == 36
    conn.create_model_package_group.assert_not_called()  # the group existed
    # No DescribeModelPackage after the create (the hook knows what it sent), nor before the update: a new status
    # is sent alone (SageMaker keeps the metadata an update does not name).
    conn.describe_model_package.assert_not_called()
    conn.update_model_package.assert_called_once_with(
        ModelPackageArn="arn:pkg/p-shapes/1", ModelApprovalStatus=APPROVED, ApprovalDescription="Approved by Conveyor"
    )


def test_a_first_try_registers_without_listing_and_a_retry_finds_its_package():
    """The register task's first try cannot meet a package of its own: no ListModelPackages before the
    create (whose ClientToken, the same for a repeat, is idempotent); a retry lists and reuses what it finds."""
    hook = SageMakerRegistryHook(inference_image_uri="img:serve")
    conn = mock.MagicMock()
    conn.describe_model_package_group.return_value = {"ModelPackageGroupArn": "arn:group/churn"}
    conn.create_model_package.return_value = {"ModelPackageArn": "arn:pkg/churn/1"}
    with mock.patch.object(type(hook.hook), "conn", conn):
        first = hook.register(
            "churn", "s3://b/m.tar.gz", "mlflow-1", {"conveyor_run_id": "r1"}, sha256="ab" * 32, first_try=True
        )
    conn.list_model_packages.assert_not_called()
    token = conn.create_model_package.call_args.kwargs["ClientToken"]
    retry = SageMakerRegistryHook(inference_image_uri="img:serve")
    conn.list_model_packages.return_value = {
        "ModelPackageSummaryList": [
            {
                "ModelPackageArn": "arn:pkg/churn/1",
                "ModelPackageVersion": 1,
                "ModelPackageDescription": "churn model of Airflow run r1 [registration mlflow-1]",
            }
        ]
    }
    conn.describe_model_package.return_value = {
        "ModelPackageArn": "arn:pkg/churn/1",
        "ModelPackageVersion": 1,
        "CustomerMetadataProperties": {SHA256_TAG: "ab" * 32},
    }
    with mock.patch.object(type(retry.hook), "conn", conn):
        again = retry.register("churn", "s3://b/m.tar.gz", "mlflow-1", {"conveyor_run_id": "r1"}, sha256="ab" * 32)
    conn.list_model_packages.assert_called_once()
    assert conn.create_model_package.call_count == 1 and first.version == again.version == "1"
    assert len(token) == 36


def test_a_fresh_hook_sends_a_status_alone_and_describes_before_it_changes_metadata():
    """A status change names nothing else; a metadata change reads the package first and sends back what
    another task or person set on it (here ``x``), and no status (SageMaker keeps the one set before)."""
    hook = SageMakerRegistryHook()
    conn = mock.MagicMock()
    conn.list_model_packages.return_value = {
        "ModelPackageSummaryList": [{"ModelPackageArn": "arn:pkg/churn/2", "ModelPackageVersion": 2}]
    }
    conn.describe_model_package.return_value = {
        "ModelPackageArn": "arn:pkg/churn/2",
        "ModelPackageVersion": 2,
        "ModelApprovalStatus": PENDING,
        "CustomerMetadataProperties": {"conveyor_run_id": "r2", "x": "1"},
    }
    with mock.patch.object(type(hook.hook), "conn", conn):
        hook.set_status("churn", "2", APPROVED)
        hook.set_version_tags("churn", "2", {"live_on": "churn"})
    conn.list_model_packages.assert_called_once()  # the ARN of version 2 is known after the first listing
    conn.describe_model_package.assert_called_once_with(ModelPackageName="arn:pkg/churn/2")
    assert [call.kwargs for call in conn.update_model_package.call_args_list] == [
        {
            "ModelPackageArn": "arn:pkg/churn/2",
            "ModelApprovalStatus": APPROVED,
            "ApprovalDescription": "Approved by Conveyor",
        },
        {
            "ModelPackageArn": "arn:pkg/churn/2",
            "CustomerMetadataProperties": {"conveyor_run_id": "r2", "x": "1", "live_on": "churn"},
        },
    ]


def test_a_remembered_arn_saves_the_listing_and_names_the_group():
    """A later task's hook takes the register task's ARN: no ListModelPackages to find the version, no
    DescribeModelPackageGroup to find the group (its ARN follows from the package's)."""
    hook = SageMakerRegistryHook(name_prefix="p-")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/p-churn/3"
    conn = mock.MagicMock()
    conn.describe_model_package.return_value = {
        "ModelPackageArn": arn,
        "ModelPackageVersion": 3,
        "ModelApprovalStatus": APPROVED,
        "CustomerMetadataProperties": {"conveyor_run_id": "r3"},
    }
    conn.list_tags.return_value = {"Tags": []}
    with mock.patch.object(type(hook.hook), "conn", conn):
        hook.remember({"model_name": "churn", "version": "3", "arn": arn})
        assert hook.record_deployment("churn", "3", "churn") is None
    conn.list_model_packages.assert_not_called()
    conn.describe_model_package_group.assert_not_called()
    group_arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package-group/p-churn"
    conn.list_tags.assert_called_once_with(ResourceArn=group_arn)
    conn.delete_tags.assert_not_called()  # no live tag to replace yet
    conn.add_tags.assert_called_once_with(ResourceArn=group_arn, Tags=[{"Key": "conveyor:live_on:churn", "Value": "3"}])


def test_an_arn_of_another_group_version_or_shape_is_not_remembered():
    hook = SageMakerRegistryHook(name_prefix="p-")
    hook.remember({"model_name": "churn", "version": "1", "arn": "arn:aws:sagemaker:r:1:model-package/other/1"})
    hook.remember({"model_name": "churn", "version": "2", "arn": "arn:aws:sagemaker:r:1:model-package/p-churn/7"})
    hook.remember({"model_name": "churn", "version": "2", "arn": "arn:pkg/churn/2"})
    hook.remember({"model_name": "churn", "version": "3", "arn": None})
    assert hook._group_arns == {} and hook._package_arns == {}  # each is left for a listing to find


def test_the_derived_group_arn_is_the_one_sagemaker_gives(hook):
    first = register(hook, "r1")
    derived = SageMakerRegistryHook(name_prefix=hook.name_prefix)
    derived.remember({"model_name": "churn", "version": first.version, "arn": first.arn})
    described = hook.hook.conn.describe_model_package_group(ModelPackageGroupName=hook.group("churn"))
    assert derived.group_arn("churn") == described["ModelPackageGroupArn"]


def test_expired_credentials_become_a_clear_retryable_error():
    hook = SageMakerRegistryHook()
    conn = mock.MagicMock()
    conn.list_model_packages.side_effect = ClientError(
        {
            "Error": {
                "Code": "ExpiredTokenException",
                "Message": "The security token included in the request is expired",
            }
        },
        "ListModelPackages",
    )
    with mock.patch.object(type(hook.hook), "conn", conn):
        with pytest.raises(AwsCredentialsExpired, match="sagemaker:ListModelPackages.*'aws_default'.*expired"):
            hook.champion("churn")


def test_registry_hook_follows_the_spec(tmp_path, monkeypatch):
    from conveyor.registry.mlflow import MlflowRegistryHook
    from conveyor.spec import get_spec

    assert isinstance(registry_hook(get_spec("churn"), "sqlite:////tmp/x.db"), MlflowRegistryHook)
    spec = sagemaker_pipeline(
        tmp_path,
        monkeypatch,
        aws_conn_id="aws_ml",
        region="eu-central-1",
        inference_image_uri="img:2",
        name_prefix="team-",
    )
    hook = registry_hook(spec)
    assert isinstance(hook, SageMakerRegistryHook)
    assert (hook.aws_conn_id, hook.region_name, hook.inference_image_uri, hook.trainer) == (
        "aws_ml",
        "eu-central-1",
        "img:2",
        "autogluon",
    )
    assert hook.group("churn") == "team-churn" and hook.realtime_instance_types == ["ml.m5.large"]
