"""Roll an approved model out to the pipeline's SageMaker endpoint: blue/green, automatic rollback."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from conveyor.aws.hosting import EndpointBusy
from conveyor.lake import Lake
from conveyor.operators.base import pipeline_spec, translate_errors

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    from conveyor.spec import PipelineSpec


class SageMakerDeployEndpointOperator(BaseOperator):
    """Deploy a registered version to a SageMaker endpoint and wait (deferred) until it serves.

    1. A SageMaker model (the version's ``model.tar.gz`` in the trainer's serving image, run as
       ``sagemaker.role_arn``) and an endpoint configuration (``deploy.endpoint`` instances, data
       capture of ``capture_share`` of the traffic to ``capture/<pipeline>/``); names derive from
       the pipeline, the version and the content (``conveyor.aws.hosting``), so a retry reuses them.
    2. ``CreateEndpoint`` when the endpoint does not exist, else ``UpdateEndpoint`` with a
       blue/green ``DeploymentConfig`` (traffic routing, termination wait) and
       ``AutoRollbackConfiguration`` on ``deploy.endpoint.rollback_alarms``; the old fleet serves
       until the new one is healthy.
    3. Defers to the provider's ``SageMakerTrigger`` until the endpoint is ``InService``.
    4. Success means ``InService`` on the new configuration: the registry records the live version.
       A create that ends ``Failed``, or an update SageMaker rolled back (the endpoint still runs the
       old configuration), deletes what this deploy created (the endpoint configuration and model,
       and the endpoint if this deploy created it) and fails with SageMaker's ``FailureReason``.
       "Created by this deploy" is read from the resources' ``conveyor:run-id`` tag, so it holds
       across retries and does not depend on what the deferral carried.

    An endpoint already ``InService`` on the same configuration is left as it is (the version is
    recorded again); one with another change in progress makes the task retry later; a ``Failed``
    endpoint serves nothing and cannot be updated, so the task fails and says to delete it. Before
    anything is created, the archive's sha256 is checked against the registry's record (a mismatch,
    or no record, fails the task: SageMaker would run the archive's code).
    Returns ``{"endpoint", "endpoint_arn", "config", "model", "version", "previous"}``.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param model: the resolve task's result (templated XCom): ``version`` and ``model_uri`` (S3).
    :param tracking_uri: the MLflow tracking URI, for ``registry: mlflow`` (the default store when None).
    """

    template_fields = ("spec", "model")
    template_fields_renderers = {"spec": "json"}

    def __init__(self, *, spec: Any, model: Any, tracking_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.providers.amazon.aws.triggers.sagemaker import SageMakerTrigger

        from conveyor.aws import hosting
        from conveyor.aws.common import aws_errors

        spec = pipeline_spec(self.spec)
        hook = hosting.sagemaker_hook(spec)
        conn_id = spec.sagemaker.aws_conn_id
        run_id = context["run_id"]
        version = str(self.model["version"])
        endpoint = hosting.endpoint_name(spec)
        with aws_errors(f"deploy {spec.name} version {version} to endpoint {endpoint}", conn_id):
            model, config = self._requests(spec, hook, run_id)
            current = hosting.describe_or_none(hook.describe_endpoint, endpoint)
            if current is not None:
                status = current["EndpointStatus"]
                if status == "InService" and current["EndpointConfigName"] == config["EndpointConfigName"]:
                    self.log.info(
                        "Endpoint %s already serves %s (version %s)", endpoint, config["EndpointConfigName"], version
                    )
                    return self._live(spec, model, config, current)
                if status in hosting.ENDPOINT_BUSY and current["EndpointConfigName"] != config["EndpointConfigName"]:
                    raise EndpointBusy(
                        f"endpoint {endpoint} is {status} (another change is in progress); "
                        "the deploy is retried once it ends"
                    )
                if status == "Failed":
                    raise AirflowFailException(
                        f"endpoint {endpoint} is Failed ({current.get('FailureReason') or 'no reason given'}): it "
                        "serves nothing and SageMaker cannot update it; delete it (aws sagemaker delete-endpoint "
                        f"--endpoint-name {endpoint}) and deploy again"
                    )
            if current is None or current["EndpointStatus"] not in hosting.ENDPOINT_BUSY:
                self._verify(spec)
                self._start(hook, spec, run_id, endpoint, model, config, current)
            else:
                self.log.info(
                    "Endpoint %s is %s on %s already (an earlier try): waiting for it",
                    endpoint,
                    current["EndpointStatus"],
                    config["EndpointConfigName"],
                )
        interval = spec.sagemaker.check_interval_seconds
        wait = spec.deploy.endpoint.deploy_timeout_seconds + hosting.rollout_seconds(spec.deploy.endpoint)
        self.defer(
            trigger=SageMakerTrigger(
                job_name=endpoint,
                job_type="endpoint",
                waiter_delay=interval,
                waiter_max_attempts=max(1, math.ceil(wait / interval)),
                aws_conn_id=conn_id,
                region_name=spec.sagemaker.region,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=wait + 10 * interval),
        )

    def _verify(self, spec: PipelineSpec) -> None:
        """Refuse to hand SageMaker an archive whose bytes are not the ones the registry recorded.

        SageMaker runs the archive's ``code/inference.py``: its sha256 (streamed from S3) must be the
        one recorded at registration, before any model, configuration or endpoint is created.

        :param spec: the pipeline.
        :raises IntegrityError: the hashes differ, or none was recorded (unless unhashed versions are allowed).
        """
        from conveyor.model.artifacts import RegisteredArchive, archive_sha256

        uri = self.model["model_uri"]
        actual = archive_sha256(uri, Lake.from_env().conn_id)
        RegisteredArchive.of({"model_name": spec.name, **self.model}).verify(actual, uri)
        self.log.info(
            "%s version %s: archive %s has the registered sha256 %s", spec.name, self.model["version"], uri, actual
        )

    def _requests(self, spec: PipelineSpec, hook: SageMakerHook, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The CreateModel and CreateEndpointConfig requests of this deploy (their names derive from the content).

        :param spec: the pipeline.
        :param hook: the SageMaker hook (for the region).
        :param run_id: the Airflow run.
        """
        from conveyor.aws import hosting

        model = hosting.model_request(spec, self.model, hook.conn_region_name, run_id)
        config = hosting.endpoint_config_request(
            spec, Lake.from_env(), model["ModelName"], str(self.model["version"]), run_id
        )
        return model, config

    def _start(
        self,
        hook: SageMakerHook,
        spec: PipelineSpec,
        run_id: str,
        endpoint: str,
        model: dict[str, Any],
        config: dict[str, Any],
        current: dict[str, Any] | None,
    ) -> None:
        """Create the model and configuration if missing, then create or update the endpoint.

        :param hook: the SageMaker hook.
        :param spec: the pipeline.
        :param run_id: the Airflow run (its tag marks what it creates).
        :param endpoint: the endpoint's name.
        :param model: the CreateModel request.
        :param config: the CreateEndpointConfig request.
        :param current: the endpoint as described, or None when it does not exist.
        """
        from conveyor.aws import hosting

        try:
            if hosting.ensure_model(hook, model):
                self.log.info(
                    "Created SageMaker model %s from %s", model["ModelName"], model["PrimaryContainer"]["ModelDataUrl"]
                )
            if hosting.ensure_endpoint_config(hook, config):
                self.log.info("Created endpoint configuration %s", config["EndpointConfigName"])
            if current is None:
                hook.create_endpoint(
                    {
                        "EndpointName": endpoint,
                        "EndpointConfigName": config["EndpointConfigName"],
                        "Tags": config["Tags"],
                    },
                    wait_for_completion=False,
                )
                self.log.info("Creating endpoint %s on %s", endpoint, config["EndpointConfigName"])
            else:
                hook.update_endpoint(
                    {
                        "EndpointName": endpoint,
                        "EndpointConfigName": config["EndpointConfigName"],
                        "DeploymentConfig": hosting.deployment_config(spec.deploy.endpoint),
                    },
                    wait_for_completion=False,
                )
                self.log.info(
                    "Updating endpoint %s from %s to %s (blue/green, %s)",
                    endpoint,
                    current["EndpointConfigName"],
                    config["EndpointConfigName"],
                    spec.deploy.endpoint.traffic_routing,
                )
        except BaseException:
            try:
                self._clean_up(hook, run_id, endpoint, model["ModelName"], config["EndpointConfigName"], None)
            except Exception:  # the first error is the one to report
                self.log.warning("Could not clean up after the failed deploy", exc_info=True)
            raise

    @translate_errors
    def execute_complete(self, context: Any, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        """Check what the wait ended on: the new configuration in service, or a failure to clean up after.

        :param context: the task context.
        :param event: the trigger's event (``status``: success, failed, timeout or error; ``message``).
        """
        from conveyor.aws import hosting
        from conveyor.aws.common import aws_errors

        spec = pipeline_spec(self.spec)
        hook = hosting.sagemaker_hook(spec)
        run_id = context["run_id"]
        endpoint = hosting.endpoint_name(spec)
        event = event or {}
        target = f"{spec.name} version {self.model['version']} to endpoint {endpoint}"
        with aws_errors(f"check the deploy of {target}", spec.sagemaker.aws_conn_id):
            model, config = self._requests(spec, hook, run_id)
            current = hosting.describe_or_none(hook.describe_endpoint, endpoint)
            status = (current or {}).get("EndpointStatus")
            if (
                current is not None
                and status == "InService"
                and (current["EndpointConfigName"] == config["EndpointConfigName"])
            ):
                return self._live(spec, model, config, current)
            reason = (current or {}).get("FailureReason") or event.get("message") or "no reason given"
            if status in hosting.ENDPOINT_BUSY:
                raise AirflowFailException(
                    f"deploy of {target}: the endpoint is still {status} after the deploy's wait "
                    f"({event.get('status')}); nothing was deleted (SageMaker rolls a stuck update back itself): "
                    f"{reason}"
                )
            deleted = self._clean_up(hook, run_id, endpoint, model["ModelName"], config["EndpointConfigName"], current)
        if current is None:
            what = "the endpoint disappeared during the deploy"
        elif status == "InService":
            what = f"SageMaker rolled the update back: the endpoint still serves {current['EndpointConfigName']}"
        else:
            what = f"the endpoint is {status}"
        raise AirflowFailException(
            f"deploy of {target} failed: {what}; reason: {reason}. "
            f"Deleted what this deploy created: {', '.join(deleted) or 'nothing'}"
        )

    def _clean_up(
        self, hook: SageMakerHook, run_id: str, endpoint: str, model: str, config: str, current: dict[str, Any] | None
    ) -> list[str]:
        """Delete what this deploy's run created: a ``Failed`` endpoint, the configuration, the model.

        :param hook: the SageMaker hook.
        :param run_id: the Airflow run whose ``conveyor:run-id`` tag marks what it created.
        :param endpoint: the endpoint's name.
        :param model: the model's name.
        :param config: the endpoint configuration's name.
        :param current: the endpoint as described (None: not described or gone).
        :return: what was deleted.
        """
        from conveyor.aws import hosting

        deleted = []
        if (
            current is not None
            and current.get("EndpointStatus") == "Failed"
            and hosting.created_by_run(hook, current["EndpointArn"], run_id)
        ):
            if hosting.delete_quietly(
                self.log, f"endpoint {endpoint}", hook.conn.delete_endpoint, EndpointName=endpoint
            ):
                deleted.append(f"endpoint {endpoint}")
        found = hosting.describe_or_none(hook.describe_endpoint_config, config)
        if found is not None and hosting.created_by_run(hook, found["EndpointConfigArn"], run_id):
            if hosting.delete_quietly(
                self.log,
                f"endpoint configuration {config}",
                hook.conn.delete_endpoint_config,
                EndpointConfigName=config,
            ):
                deleted.append(f"endpoint configuration {config}")
        found = hosting.describe_or_none(hook.describe_model, model)
        if found is not None and hosting.created_by_run(hook, found["ModelArn"], run_id):
            if hosting.delete_quietly(self.log, f"model {model}", hook.conn.delete_model, ModelName=model):
                deleted.append(f"model {model}")
        return deleted

    def _live(
        self, spec: PipelineSpec, model: dict[str, Any], config: dict[str, Any], described: dict[str, Any]
    ) -> dict[str, Any]:
        """Record the live version in the registry; the task's result.

        :param spec: the pipeline.
        :param model: the CreateModel request.
        :param config: the CreateEndpointConfig request.
        :param described: the endpoint as described.
        """
        from conveyor.registry import registry_hook

        version = str(self.model["version"])
        endpoint = described["EndpointName"]
        registry = registry_hook(spec, self.tracking_uri)
        registry.remember({"model_name": spec.name, **self.model})
        previous = registry.record_deployment(spec.name, version, endpoint)
        self.log.info(
            "Version %s of %s is live on SageMaker endpoint %s (%s); it replaced %s",
            version,
            spec.name,
            endpoint,
            config["EndpointConfigName"],
            previous or "nothing",
        )
        return {
            "endpoint": endpoint,
            "endpoint_arn": described.get("EndpointArn"),
            "config": config["EndpointConfigName"],
            "model": model["ModelName"],
            "version": version,
            "previous": previous,
        }
