"""Roll an approved model out to the pipeline's endpoint with a smoke test and automatic rollback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor import settings
from conveyor.lake import Lake
from conveyor.operators.base import pipeline_spec, translate_errors

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec


class ResolveModelOperator(BaseOperator):
    """Find the registered version to use: a version number or an alias (``champion``).

    Returns ``{"model_name", "version", "model_uri", "train_run", "status"}``. Refuses a version
    that is not ``Approved``. When the run was started by an approval whose ``deploy`` flag is
    off, the task is skipped with everything after it.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it); its name is
        the registered model's.
    :param version: a version number or an alias (templated).
    :param require_approved: refuse versions that are not approved.
    :param tracking_uri: the MLflow tracking URI (the default store when None; ``registry: mlflow``).
    """

    template_fields = ("spec", "version")
    template_fields_renderers = {"spec": "json"}

    def __init__(
        self,
        *,
        spec: Any,
        version: str = "champion",
        require_approved: bool = True,
        tracking_uri: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.version = version
        self.require_approved = require_approved
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.registry import lookup_errors, registry_hook
        from conveyor.registry.base import APPROVED, STATUS_TAG

        for events in (context.get("triggering_asset_events") or {}).values():
            for event in events:
                if (event.extra or {}).get("deploy") is False:
                    raise AirflowSkipException(f"version {event.extra.get('version')} was approved with deploy off")
        spec = pipeline_spec(self.spec)
        name = spec.name
        hook = registry_hook(spec, self.tracking_uri)
        wanted = str(self.version or "champion")
        try:
            found = hook.resolve(name, wanted)
        except lookup_errors() as exc:
            reason = getattr(exc, "message", None) or str(exc)
            raise AirflowFailException(f"model {name!r} has no version or alias {wanted!r}: {reason}") from None
        status = found.tags.get(STATUS_TAG)
        if self.require_approved and status != APPROVED:
            raise AirflowFailException(f"{name} version {found.version} is {status}, not {APPROVED}: not deployed")
        self.log.info("Resolved %s %r to version %s (%s)", name, wanted, found.version, found.source)
        return {
            "model_name": name,
            "version": str(found.version),
            "model_uri": found.source,
            "train_run": found.tags.get("conveyor_run_id"),
            "status": status,
        }


class DeployEndpointOperator(BaseOperator):
    """Zero-downtime rollout of a model version to the pipeline's local endpoint.

    The endpoint keeps its name and address across retrains (started if it is not running). The
    new version loads beside the live one in every server worker; a smoke test scores held-out
    rows on it and compares them with its evaluation; then traffic switches. If loading or the
    smoke test fails, the candidate is dropped (the old version never stopped serving) and the
    task fails with the reason. The registry records the live version.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param model: the resolve task's result (templated XCom).
    :param load_timeout: seconds every worker has to load the new version.
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = ("spec", "model")
    template_fields_renderers = {"spec": "json"}

    def __init__(
        self, *, spec: Any, model: Any, load_timeout: float = 300, tracking_uri: str | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model
        self.load_timeout = load_timeout
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.model.artifacts import fetch
        from conveyor.registry import registry_hook
        from conveyor.serving import endpoint_state as state
        from conveyor.serving.smoke import smoke_test

        spec = pipeline_spec(self.spec)
        name = spec.deploy.endpoint.name or spec.name
        lake = Lake.from_env()
        version = self.model["version"]
        url = self._endpoint(spec, lake, name)
        control = state.read_control(name)
        live = (control.get("live") or {}).get("version")
        if live == version:
            self.log.info("Version %s is already live on %s (%s)", version, name, url)
            smoke = smoke_test(url, spec, lake, self.model["train_run"], target="live")
            registry_hook(spec, self.tracking_uri).record_deployment(spec.name, version, name)
            return {"endpoint": name, "url": url, "version": version, "previous": live, "smoke": smoke}
        model_dir = state.endpoint_dir(name) / "models" / version
        if not (model_dir / "metadata.json").exists():
            fetch(self.model["model_uri"], model_dir, lake.conn_id)
        self.log.info("Loading version %s beside live version %s on %s", version, live, url)
        state.stage_candidate(name, version, str(model_dir))
        try:
            state.wait_for_workers(name, version, self.load_timeout)
            smoke = smoke_test(url, spec, lake, self.model["train_run"])
            self.log.info("Smoke test passed: %s", smoke)
        except Exception as exc:
            state.drop_candidate(name)
            self.log.error("Rolled back: version %s dropped, version %s keeps serving", version, live)
            raise AirflowFailException(
                f"rollout of {spec.name} version {version} to {name} rolled back: {exc}"
            ) from exc
        state.promote_candidate(name)
        state.wait_for_workers(name, version, timeout=60, live=True)  # every worker has switched
        previous = registry_hook(spec, self.tracking_uri).record_deployment(spec.name, version, name)
        self.log.info("Version %s is live on %s (%s); it replaced %s", version, name, url, previous or live)
        return {"endpoint": name, "url": url, "version": version, "previous": live, "smoke": smoke}

    def _endpoint(self, spec: PipelineSpec, lake: Lake, name: str) -> str:
        """The endpoint's URL: the endpoint service's (``CONVEYOR_ENDPOINT_URL``), else the local server's,
        started when it does not run (writing feedback drops and captured traffic into a local lake).

        :param spec: the pipeline.
        :param lake: the lake.
        :param name: the endpoint's name.
        """
        from conveyor.serving.process import ensure_endpoint

        external = settings.endpoint_service_url()
        if external:  # the endpoint runs as its own service (docker compose), sharing the state folder
            self.log.info("Using the endpoint service at %s (CONVEYOR_ENDPOINT_URL)", external)
            return external
        endpoint = spec.deploy.endpoint
        env = {}
        if lake.conn_id is None:  # the server writes feedback drops straight into the local lake
            env["CONVEYOR_FEEDBACK_DIR"] = str(lake.landing(spec.name, "feedback").path)
        if endpoint.capture_share > 0:
            env |= {
                "CONVEYOR_CAPTURE_DIR": str(lake.capture(spec.name).path) if lake.conn_id is None else "",
                "CONVEYOR_CAPTURE_SHARE": str(endpoint.capture_share),
            }
            env = {k: v for k, v in env.items() if v}
        return ensure_endpoint(name, endpoint.port, endpoint.workers, env=env)["url"]
