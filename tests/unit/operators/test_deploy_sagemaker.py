"""The SageMaker endpoint deploy: the exact requests at the hook boundary, deferral, rollback and clean-up.

The provider's ``SageMakerHook`` is replaced by a mock (``conveyor.aws.hosting.sagemaker_hook``), so
every request Conveyor sends is asserted as sent. moto 5.2.5 has no ``UpdateEndpoint``: the
update path is only ever exercised here, with that call mocked at the hook.
"""

from __future__ import annotations

import json
import re
from unittest import mock

import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from botocore.exceptions import ClientError

from helpers import context, pipeline_spec_dict
from sagemaker_pipeline import IMAGE, ROLE, Matches, sagemaker_include

MODEL = {
    "model_name": "churn",
    "version": "3",
    "model_uri": "s3://lake-bucket/conveyor/models/churn/train-7/model.tar.gz",
    "train_run": "train-7",
    "status": "Approved",
    "sha256": "5a" * 32,
}
RUN = "manual__deploy-1"
TAGS = [
    {"Key": "conveyor:pipeline", "Value": "churn"},
    {"Key": "conveyor:model-version", "Value": "3"},
    {"Key": "conveyor:run-id", "Value": RUN},
]
ENDPOINT_SETTINGS = {
    "enabled": True,
    "name": "churn_live",
    "instance_type": "ml.c5.large",
    "instance_count": 2,
    "capture_share": 0.25,
    "traffic_routing": "CANARY",
    "traffic_step_share": 0.2,
    "wait_interval_seconds": 120,
    "termination_wait_seconds": 60,
    "rollback_alarms": ["churn-5xx", "churn-latency"],
    "deploy_timeout_seconds": 900,
}


def aws_error(code: str, message: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def missing(what: str, operation: str) -> ClientError:
    """SageMaker's answer to a describe call on something that does not exist."""
    arn = "arn:aws:sagemaker:us-east-1:123456789012:x"
    return aws_error("ValidationException", f'Could not find {what} "{arn}".', operation)


ARN = "arn:aws:sagemaker:us-east-1:123456789012:{}/{}"


@pytest.fixture
def hook(tmp_path, monkeypatch):
    """A churn pipeline in sagemaker mode on an S3 lake, with the SageMaker hook and the registry mocked.

    The mock keeps the models and endpoint configurations it is asked to create, with their tags,
    so describe and ListTags answer as SageMaker would; every call stays recorded.
    """
    sagemaker_include(
        tmp_path / "include",
        monkeypatch,
        {"deploy": {"endpoint": ENDPOINT_SETTINGS}, "sagemaker": {"check_interval_seconds": 15}},
    )
    monkeypatch.setenv("CONVEYOR_LAKE_URI", "s3://lake-bucket/conveyor")
    monkeypatch.setenv("CONVEYOR_LAKE_CONN_ID", "lake_s3")
    fake = mock.MagicMock(name="SageMakerHook")
    fake.conn_region_name = "us-east-1"
    fake.models, fake.configs, fake.tags = {}, {}, {}

    def describer(store: dict, what: str):
        def describe(name: str) -> dict:
            if name not in store:
                raise missing(what, "Describe")
            return store[name]

        return describe

    def creator(store: dict, kind: str, name_key: str, arn_key: str):
        def create(request: dict, **_) -> dict:
            arn = ARN.format(kind, request[name_key])
            if request[name_key] in store:  # as SageMaker: a create never replaces
                what = kind.replace("-", " ").replace("config", "configuration")
                raise aws_error("ValidationException", f'Cannot create already existing {what} "{arn}".', "Create")
            store[request[name_key]] = {name_key: request[name_key], arn_key: arn}
            fake.tags[arn] = request.get("Tags", [])
            return {arn_key: arn}

        return create

    fake.describe_model.side_effect = describer(fake.models, "model")
    fake.create_model.side_effect = creator(fake.models, "model", "ModelName", "ModelArn")
    fake.describe_endpoint_config.side_effect = describer(fake.configs, "endpoint configuration")
    fake.create_endpoint_config.side_effect = creator(
        fake.configs, "endpoint-config", "EndpointConfigName", "EndpointConfigArn"
    )
    fake.create_endpoint.side_effect = creator({}, "endpoint", "EndpointName", "EndpointArn")
    fake.conn.list_tags.side_effect = lambda ResourceArn: {"Tags": fake.tags.get(ResourceArn, [])}
    monkeypatch.setattr("conveyor.aws.hosting.sagemaker_hook", lambda spec: fake)
    # The archive on S3: its sha256 as streamed (the bytes the registry recorded unless a test changes it).
    fake.archive_sha256 = mock.Mock(return_value=MODEL["sha256"])
    monkeypatch.setattr("conveyor.model.artifacts.archive_sha256", fake.archive_sha256)
    registry = mock.MagicMock(name="registry")
    registry.record_deployment.return_value = "2"
    monkeypatch.setattr("conveyor.registry.registry_hook", lambda spec, tracking_uri=None: registry)
    fake.registry = registry
    return fake


def operator():
    from conveyor.operators.deploy_sagemaker import SageMakerDeployEndpointOperator

    return SageMakerDeployEndpointOperator(task_id="deploy", spec=pipeline_spec_dict("churn"), model=MODEL)


def deferred(op) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as caught:
        op.execute(context(RUN))
    return caught.value


def resume(event: dict):
    """The task resumed after the wait. Nothing rides on the deferral: dag.test() passes only the event."""
    return operator().execute_complete(context(RUN), event)


MODEL_NAME = Matches(r"churn-v3-[0-9a-f]{6}")
CONFIG_NAME = Matches(r"churn-v3-[0-9a-f]{6}")


def expected_model_request() -> dict:
    return {
        "ModelName": MODEL_NAME,
        "ExecutionRoleArn": ROLE,
        "PrimaryContainer": {
            "Image": IMAGE,
            "ModelDataUrl": "s3://lake-bucket/conveyor/models/churn/train-7/model.tar.gz",
            "Environment": {
                "SAGEMAKER_PROGRAM": "inference.py",
                "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
                "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
                "SAGEMAKER_REGION": "us-east-1",
            },
        },
        "Tags": TAGS,
    }


def expected_config_request(model_name: str) -> dict:
    return {
        "EndpointConfigName": CONFIG_NAME,
        "ProductionVariants": [
            {
                "VariantName": "AllTraffic",
                "ModelName": model_name,
                "InitialInstanceCount": 2,
                "InstanceType": "ml.c5.large",
                "InitialVariantWeight": 1.0,
            }
        ],
        "DataCaptureConfig": {
            "EnableCapture": True,
            "InitialSamplingPercentage": 25,
            "DestinationS3Uri": "s3://lake-bucket/conveyor/capture/churn",
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"CsvContentTypes": ["text/csv"], "JsonContentTypes": ["application/json"]},
        },
        "Tags": TAGS,
    }


def in_service(config: str, **extra) -> dict:
    return {
        "EndpointName": "churn-live",
        "EndpointArn": ARN.format("endpoint", "churn-live"),
        "EndpointConfigName": config,
        "EndpointStatus": "InService",
        **extra,
    }


def names(hook) -> tuple[str, str]:
    """The model and endpoint configuration the deploy asked for."""
    return (
        hook.create_model.call_args.args[0]["ModelName"],
        hook.create_endpoint_config.call_args.args[0]["EndpointConfigName"],
    )


def test_first_deploy_creates_model_config_and_endpoint_then_defers(hook):
    from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

    hook.describe_endpoint.side_effect = missing("endpoint", "DescribeEndpoint")
    event = deferred(operator())

    hook.create_model.assert_called_once_with(expected_model_request())
    model_name = hook.create_model.call_args.args[0]["ModelName"]
    hook.create_endpoint_config.assert_called_once_with(expected_config_request(model_name))
    config_name = hook.create_endpoint_config.call_args.args[0]["EndpointConfigName"]
    assert config_name != model_name  # the configuration's hash covers its variants, not only the model
    hook.create_endpoint.assert_called_once_with(
        {"EndpointName": "churn-live", "EndpointConfigName": config_name, "Tags": TAGS}, wait_for_completion=False
    )
    hook.update_endpoint.assert_not_called()

    # The wait is the provider's trigger; nothing but the trigger is needed to resume.
    assert isinstance(event.trigger, SageMakerTrigger) and event.method_name == "execute_complete"
    assert not event.kwargs
    classpath, kwargs = event.trigger.serialize()
    assert classpath == "airflow.providers.amazon.aws.triggers.sagemaker.SageMakerTrigger"
    # 900 s of timeout plus the canary schedule (2 x 120 s + 60 s) at one check every 15 s.
    assert kwargs == {
        "job_name": "churn-live",
        "job_type": "endpoint",
        "waiter_delay": 15,
        "waiter_max_attempts": 80,
        "aws_conn_id": "aws_default",
    }
    assert SageMakerTrigger(**json.loads(json.dumps(kwargs))).serialize() == (classpath, kwargs)

    # The endpoint comes up on the new configuration: the registry records the live version.
    hook.describe_endpoint.side_effect = None
    hook.describe_endpoint.return_value = in_service(config_name)
    result = resume({"status": "success", "job_name": "churn-live"})
    assert result == {
        "endpoint": "churn-live",
        "endpoint_arn": ARN.format("endpoint", "churn-live"),
        "config": config_name,
        "model": model_name,
        "version": "3",
        "previous": "2",
    }
    hook.registry.record_deployment.assert_called_once_with("churn", "3", "churn-live")
    hook.conn.delete_model.assert_not_called()


def test_update_is_blue_green_with_auto_rollback(hook):
    hook.describe_endpoint.return_value = in_service("churn-v2-0a1b2c")
    deferred(operator())
    model_name, config_name = names(hook)
    hook.create_endpoint.assert_not_called()
    # moto 5.2.5 does not implement UpdateEndpoint: this request is only checked here, mocked at the hook.
    hook.update_endpoint.assert_called_once_with(
        {
            "EndpointName": "churn-live",
            "EndpointConfigName": config_name,
            "DeploymentConfig": {
                "BlueGreenUpdatePolicy": {
                    "TrafficRoutingConfiguration": {
                        "Type": "CANARY",
                        "WaitIntervalInSeconds": 120,
                        "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20},
                    },
                    "TerminationWaitInSeconds": 60,
                    "MaximumExecutionTimeoutInSeconds": 1200,
                },
                "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "churn-5xx"}, {"AlarmName": "churn-latency"}]},
            },
        },
        wait_for_completion=False,
    )


def test_rolled_back_update_deletes_the_new_config_and_model_and_fails_with_the_reason(hook):
    hook.describe_endpoint.return_value = in_service("churn-v2-0a1b2c")
    deferred(operator())
    model_name, config_name = names(hook)
    # SageMaker rolled back: the endpoint is in service again, on the old configuration.
    hook.describe_endpoint.return_value = in_service(
        "churn-v2-0a1b2c", FailureReason="Deployment rolled back: alarm churn-5xx went to ALARM during baking"
    )
    with pytest.raises(AirflowFailException, match="rolled the update back.*churn-v2-0a1b2c.*churn-5xx went to ALARM"):
        resume({"status": "success", "job_name": "churn-live"})
    hook.conn.delete_endpoint_config.assert_called_once_with(EndpointConfigName=config_name)
    hook.conn.delete_model.assert_called_once_with(ModelName=model_name)
    hook.conn.delete_endpoint.assert_not_called()  # it serves the old version: never deleted
    hook.registry.record_deployment.assert_not_called()


def test_failed_create_deletes_the_endpoint_it_created(hook):
    hook.describe_endpoint.side_effect = missing("endpoint", "DescribeEndpoint")
    deferred(operator())
    model_name, config_name = names(hook)
    hook.describe_endpoint.side_effect = None
    hook.describe_endpoint.return_value = {
        **in_service(config_name),
        "EndpointStatus": "Failed",
        "FailureReason": "The primary container for production variant AllTraffic did not pass the ping health check",
    }
    with pytest.raises(AirflowFailException, match="endpoint is Failed.*did not pass the ping health check"):
        resume({"status": "failed", "job_name": "churn-live", "message": "Waiter EndpointInService failed"})
    hook.conn.delete_endpoint.assert_called_once_with(EndpointName="churn-live")
    hook.conn.delete_endpoint_config.assert_called_once_with(EndpointConfigName=config_name)
    hook.conn.delete_model.assert_called_once_with(ModelName=model_name)


def test_a_failing_update_call_deletes_what_it_created(hook):
    hook.describe_endpoint.return_value = in_service("churn-v2-0a1b2c")
    hook.update_endpoint.side_effect = aws_error(
        "ValidationException", "Cannot update in-progress endpoint", "UpdateEndpoint"
    )
    with pytest.raises(ClientError):
        operator().execute(context(RUN))
    model_name, config_name = names(hook)
    hook.conn.delete_endpoint_config.assert_called_once_with(EndpointConfigName=config_name)
    hook.conn.delete_model.assert_called_once_with(ModelName=model_name)


def test_only_what_this_run_created_is_deleted(hook):
    # The model exists already, made by an earlier deploy run: reused, and kept when this one fails.
    hook.describe_endpoint.return_value = in_service("churn-v2-0a1b2c")
    deferred(operator())
    model_name, _ = names(hook)
    hook.reset_mock(return_value=False, side_effect=False)
    hook.tags[hook.models[model_name]["ModelArn"]] = [{"Key": "conveyor:run-id", "Value": "manual__an-earlier-deploy"}]
    hook.configs.clear()
    deferred(operator())
    hook.create_model.assert_called_once()  # one call, refused: "already existing" (no describe first)
    hook.describe_model.assert_not_called()
    assert hook.tags[hook.models[model_name]["ModelArn"]][0]["Value"] == "manual__an-earlier-deploy"
    hook.create_endpoint_config.assert_called_once()
    hook.describe_endpoint.return_value = in_service("churn-v2-0a1b2c", FailureReason="rolled back")
    with pytest.raises(AirflowFailException, match="Deleted what this deploy created: endpoint configuration"):
        resume({"status": "success"})
    hook.conn.delete_model.assert_not_called()  # an earlier deploy made it: it may serve elsewhere
    hook.conn.delete_endpoint_config.assert_called_once()


def test_an_archive_changed_since_registration_is_never_handed_to_sagemaker(hook):
    from conveyor.errors import IntegrityError

    hook.describe_endpoint.side_effect = missing("endpoint", "DescribeEndpoint")
    hook.archive_sha256.return_value = "e1" * 32
    with pytest.raises(AirflowFailException, match="churn version 3: archive s3://lake-bucket/.* refused") as caught:
        operator().execute(context(RUN))
    assert isinstance(caught.value.__cause__, IntegrityError)
    assert (caught.value.__cause__.expected, caught.value.__cause__.actual) == ("5a" * 32, "e1" * 32)
    hook.archive_sha256.assert_called_once_with(MODEL["model_uri"], "lake_s3")
    hook.create_model.assert_not_called()
    hook.create_endpoint_config.assert_not_called()
    hook.create_endpoint.assert_not_called()


def test_a_version_registered_without_a_sha256_is_refused_unless_allowed(hook, monkeypatch):
    from conveyor.operators.deploy_sagemaker import SageMakerDeployEndpointOperator

    hook.describe_endpoint.side_effect = missing("endpoint", "DescribeEndpoint")
    legacy = {**MODEL, "sha256": None}
    op = SageMakerDeployEndpointOperator(task_id="deploy", spec=pipeline_spec_dict("churn"), model=legacy)
    with pytest.raises(AirflowFailException, match="registry recorded no sha256.*CONVEYOR_ALLOW_UNHASHED_MODELS"):
        op.execute(context(RUN))
    hook.create_model.assert_not_called()
    monkeypatch.setenv("CONVEYOR_ALLOW_UNHASHED_MODELS", "true")
    deferred(op)
    hook.create_model.assert_called_once()


def test_a_version_already_live_is_only_recorded(hook):
    hook.describe_endpoint.side_effect = [missing("endpoint", "DescribeEndpoint")]
    deferred(operator())
    _, config_name = names(hook)
    hook.reset_mock(return_value=False, side_effect=False)
    hook.describe_endpoint.side_effect = None
    hook.describe_endpoint.return_value = in_service(config_name)
    result = operator().execute(context(RUN))
    assert result["config"] == config_name and result["previous"] == "2"
    hook.create_endpoint.assert_not_called()
    hook.update_endpoint.assert_not_called()
    hook.create_endpoint_config.assert_not_called()


def test_an_endpoint_busy_with_another_change_is_retried_later(hook):
    from conveyor.aws.hosting import EndpointBusy

    hook.describe_endpoint.return_value = {**in_service("churn-v2-0a1b2c"), "EndpointStatus": "Updating"}
    with pytest.raises(EndpointBusy, match="churn-live is Updating") as caught:
        operator().execute(context(RUN))
    assert caught.value.retryable and not isinstance(caught.value, AirflowFailException)  # retried
    hook.create_model.assert_not_called()
    hook.update_endpoint.assert_not_called()


def test_a_failed_endpoint_is_not_touched(hook):
    hook.describe_endpoint.return_value = {
        **in_service("churn-v2-0a1b2c"),
        "EndpointStatus": "Failed",
        "FailureReason": "capacity",
    }
    with pytest.raises(AirflowFailException, match="churn-live is Failed \\(capacity\\).*delete-endpoint"):
        operator().execute(context(RUN))
    hook.update_endpoint.assert_not_called()
    hook.conn.delete_endpoint.assert_not_called()


def test_an_expired_credential_is_a_clear_retryable_error(hook):
    from conveyor.aws.common import AwsCredentialsExpired

    hook.describe_endpoint.side_effect = aws_error(
        "ExpiredTokenException", "The security token included in the request is expired", "DescribeEndpoint"
    )
    with pytest.raises(AwsCredentialsExpired, match="'aws_default'.*ExpiredTokenException.*refresh") as caught:
        operator().execute(context(RUN))
    assert caught.value.retryable and not isinstance(caught.value, AirflowFailException)  # retried
    hook.create_model.assert_not_called()
    hook.create_endpoint.assert_not_called()


def test_deployment_config_and_names_follow_the_spec():
    from conveyor.aws import hosting
    from conveyor.spec import EndpointSpec, PipelineSpec

    linear = EndpointSpec(
        traffic_routing="LINEAR",
        traffic_step_share=0.25,
        wait_interval_seconds=60,
        termination_wait_seconds=0,
        deploy_timeout_seconds=60,
    )
    assert hosting.deployment_config(linear) == {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {
                "Type": "LINEAR",
                "WaitIntervalInSeconds": 60,
                "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25},
            },
            "TerminationWaitInSeconds": 0,
            "MaximumExecutionTimeoutInSeconds": 600,
        }
    }  # SageMaker's minimum
    all_at_once = hosting.deployment_config(EndpointSpec())
    assert all_at_once["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"] == {
        "Type": "ALL_AT_ONCE",
        "WaitIntervalInSeconds": 300,
    }
    assert "AutoRollbackConfiguration" not in all_at_once  # SageMaker refuses an empty alarm list

    spec = PipelineSpec.model_validate(
        {
            "name": "a_very_long_pipeline_name_for_customer_lifetime_value_scoring",
            "data": {"format": "csv", "label": "y", "problem_type": "binary"},
            "trainer": {"kind": "autogluon"},
            "gate": {"metric": "roc_auc"},
            "compute": "sagemaker",
            "sagemaker": {"role_arn": ROLE, "name_prefix": "team-"},
        }
    )
    name = hosting.model_request(spec, MODEL, "eu-west-1", RUN)["ModelName"]
    assert len(name) <= 63 and re.fullmatch(r"team-a-very-long-[a-z0-9-]+-v3-[0-9a-f]{6}", name)
    assert hosting.endpoint_name(spec).startswith("team-a-very-long-pipeline")
    assert hosting.model_request(spec, MODEL, "eu-west-1", RUN)["PrimaryContainer"]["Image"] == (
        "763104351884.dkr.ecr.eu-west-1.amazonaws.com/autogluon:1.6.3-cpu-amzn2023"
    )  # the framework image
    job = hosting.transform_job_name(spec, RUN)
    assert len(job) <= 63
    assert job == hosting.transform_job_name(spec, RUN) != hosting.transform_job_name(spec, RUN + "x")


def test_capture_share_becomes_whole_percents(monkeypatch):
    from conveyor.aws import hosting
    from conveyor.lake import Lake
    from conveyor.spec import PipelineSpec

    lake = Lake("s3://b/root", "lake_s3")
    base = {
        "name": "churn",
        "data": {"format": "csv", "label": "y", "problem_type": "binary"},
        "trainer": {"kind": "autogluon"},
        "gate": {"metric": "roc_auc"},
    }
    for share, percent in ((0.004, 1), (0.1, 10), (1.0, 100)):
        spec = PipelineSpec.model_validate({**base, "deploy": {"endpoint": {"capture_share": share}}})
        assert hosting.capture_config(spec, lake)["InitialSamplingPercentage"] == percent
    assert hosting.capture_config(PipelineSpec.model_validate(base), lake) is None
    spec = PipelineSpec.model_validate(base)
    request = hosting.endpoint_config_request(spec, lake, "churn-v1-aaaaaa", "1", RUN)
    assert "DataCaptureConfig" not in request


def test_sagemaker_pipelines_get_the_sagemaker_deploy_and_batch_tasks(tmp_path, monkeypatch):
    from conveyor.factory import build_for
    from conveyor.operators.batch_sagemaker import SageMakerBatchPredictOperator
    from conveyor.operators.deploy import DeployEndpointOperator
    from conveyor.operators.deploy_sagemaker import SageMakerDeployEndpointOperator
    from conveyor.spec import get_spec

    local = {dag.dag_id: dag for dag in build_for(get_spec("churn"))}
    assert isinstance(local["churn__deploy"].get_task("deploy"), DeployEndpointOperator)
    sagemaker_include(tmp_path / "include", monkeypatch, {"deploy": {"batch": {"enabled": True}}})
    spec = get_spec("churn")
    dags = {dag.dag_id: dag for dag in build_for(spec)}
    assert isinstance(dags["churn__deploy"].get_task("deploy"), SageMakerDeployEndpointOperator)
    assert isinstance(dags["churn__batch_predict"].get_task("score"), SageMakerBatchPredictOperator)
    # Every task gets the spec the DAG was built from (shown in Rendered Template, never re-read at run time).
    for dag_id, task_id in (
        ("churn__deploy", "resolve"),
        ("churn__deploy", "deploy"),
        ("churn__batch_predict", "resolve"),
        ("churn__batch_predict", "score"),
    ):
        task = dags[dag_id].get_task(task_id)
        assert "spec" in task.template_fields and task.template_fields_renderers["spec"] == "json"
        assert task.spec.value == spec.model_dump(mode="json")


@pytest.mark.parametrize(
    "endpoint, field",
    [
        ({"rollback_alarms": [f"alarm-{n}" for n in range(11)]}, "deploy.endpoint.rollback_alarms"),
        ({"traffic_step_share": 1.0}, "deploy.endpoint.traffic_step_share"),
        ({"traffic_routing": "BLUE_GREEN"}, "deploy.endpoint.traffic_routing"),
        ({"termination_wait_seconds": 3601}, "deploy.endpoint.termination_wait_seconds"),
    ],
)
def test_blue_green_settings_outside_sagemakers_limits_are_refused(tmp_path, monkeypatch, endpoint, field):
    from conveyor.errors import SpecError
    from conveyor.spec import load_spec

    include = sagemaker_include(tmp_path / "include", monkeypatch, {"deploy": {"endpoint": endpoint}})
    with pytest.raises(SpecError, match=f"churn.yaml: field '{field}'"):
        load_spec(include / "pipelines" / "churn.yaml")
