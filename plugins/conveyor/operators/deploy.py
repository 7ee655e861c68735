"""Roll an approved model out to the pipeline's endpoint with a smoke test and automatic rollback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor import settings
from conveyor.lake import Lake
from conveyor.operators.base import pipeline_spec, translate_errors

if TYPE_CHECKING:
    from conveyor.model.artifacts import RegisteredArchive
    from conveyor.spec import PipelineSpec


def model_cache_dir(endpoint_dir: Path, registered: RegisteredArchive) -> Path:
    """Where an endpoint keeps an extracted model: keyed by the model's name and its archive's sha256.

    A version number alone is not a key: a registry that was reset numbers a different model 1
    again. A version registered before hashes were recorded (allowed by
    ``CONVEYOR_ALLOW_UNHASHED_MODELS``) gets a folder of its own that is fetched afresh every time.

    :param endpoint_dir: the endpoint's state folder.
    :param registered: the model, version and recorded sha256.
    """
    from conveyor.lake import safe_name

    key = registered.sha256 or f"v{registered.version}-unhashed"
    return endpoint_dir / "models" / f"{safe_name(registered.model)}-{key}"


def wait_for_model_dir(name: str, role: str, model_dir: Path, timeout: float, poll: float = 0.1) -> None:
    """Wait until every worker of an endpoint has the model extracted in ``model_dir`` as ``role``.

    :param name: the endpoint.
    :param role: ``candidate`` or ``live``.
    :param model_dir: the extracted model's folder.
    :param timeout: seconds to wait at most.
    :param poll: seconds between looks at the heartbeats.
    :raises RolloutFailed: not every worker has it within ``timeout``.
    """
    import time

    from conveyor.serving import endpoint_state as state

    wanted = str(Path(model_dir).resolve())
    deadline = time.monotonic() + timeout
    while True:
        states = state.worker_states(name)
        if states and all((worker.get(role) or {}).get("model_dir") == wanted for worker in states):
            return
        if time.monotonic() >= deadline:
            raise state.RolloutFailed(f"endpoint {name}: {model_dir} not loaded as {role} within {timeout:g}s")
        time.sleep(poll)


class ResolveModelOperator(BaseOperator):
    """Find the registered version to use: a version number or an alias (``champion``).

    Returns ``{"model_name", "version", "model_uri", "train_run", "status", "sha256", "arn"}``
    (``sha256``: the archive's hash the registry recorded, None for a version registered before
    hashes were; every task that loads the model checks the archive against it; ``arn``: the
    SageMaker model package, None on MLflow). Refuses a version that is not
    ``Approved``. When the run was started by an approval whose ``deploy`` flag is
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
        from conveyor.registry.base import APPROVED, SHA256_TAG, STATUS_TAG

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
            "sha256": found.tags.get(SHA256_TAG) or None,
            "arn": getattr(found, "arn", None) or None,  # SageMaker's package (the deploy need not list it)
        }


class DeployEndpointOperator(BaseOperator):
    """Zero-downtime rollout of a model version to the pipeline's local endpoint.

    The endpoint keeps its name and address across retrains (started if it is not running). The
    new version loads beside the live one in every server worker; a smoke test scores held-out
    rows on it and compares them with its evaluation; then traffic switches. If loading or the
    smoke test fails, the candidate is dropped (the old version never stopped serving) and the
    task fails with the reason. The registry records the live version.

    The archive is checked against the sha256 the registry recorded before it is extracted (a
    mismatch fails the task, not retried). Extracted models are kept per model name and sha256
    (``models/<name>-<sha256>``), so a registry reset that reuses a version number never serves
    the model cached under it.

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
        from conveyor.model.artifacts import RegisteredArchive, fetch
        from conveyor.registry import registry_hook
        from conveyor.serving import endpoint_state as state
        from conveyor.serving.smoke import smoke_test

        spec = pipeline_spec(self.spec)
        name = spec.deploy.endpoint.name or spec.name
        lake = Lake.from_env()
        version = self.model["version"]
        registered = RegisteredArchive.of({"model_name": spec.name, **self.model})
        url = self._endpoint(spec, lake, name)
        control = state.read_control(name)
        live = (control.get("live") or {}).get("version")
        model_dir = model_cache_dir(state.endpoint_dir(name), registered)
        live_dir = (control.get("live") or {}).get("model_dir")
        if live == version and live_dir and Path(live_dir).resolve() == model_dir.resolve():
            self.log.info("Version %s is already live on %s (%s)", version, name, url)
            smoke = smoke_test(url, spec, lake, self.model["train_run"], target="live")
            registry_hook(spec, self.tracking_uri).record_deployment(spec.name, version, name)
            return {"endpoint": name, "url": url, "version": version, "previous": live, "smoke": smoke}
        if registered.sha256 is None or not (model_dir / "metadata.json").exists():
            fetch(self.model["model_uri"], model_dir, lake.conn_id, registered=registered)
        self.log.info("Loading version %s beside live version %s on %s", version, live, url)
        state.stage_candidate(name, version, str(model_dir))
        # The same number live from another archive (a registry reset): wait for this folder, not the number.
        same_number = live == version
        try:
            if same_number:
                wait_for_model_dir(name, "candidate", model_dir, self.load_timeout)
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
        if same_number:
            wait_for_model_dir(name, "live", model_dir, timeout=60)
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
        env = {  # adaptive micro-batching of each worker (serving/batching.py)
            "CONVEYOR_MAX_BATCH_SIZE": str(endpoint.max_batch_size),
            "CONVEYOR_MAX_BATCH_WAIT_MS": str(endpoint.max_batch_wait_ms),
        }
        if lake.conn_id is None:  # the server writes feedback drops straight into the local lake
            env["CONVEYOR_FEEDBACK_DIR"] = str(lake.landing(spec.name, "feedback").path)
        if endpoint.capture_share > 0:
            env |= {
                "CONVEYOR_CAPTURE_DIR": str(lake.capture(spec.name).path) if lake.conn_id is None else "",
                "CONVEYOR_CAPTURE_SHARE": str(endpoint.capture_share),
            }
            env = {k: v for k, v in env.items() if v}
        return ensure_endpoint(name, endpoint.port, endpoint.workers, env=env)["url"]
