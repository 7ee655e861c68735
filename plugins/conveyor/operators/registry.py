"""Register a model that passed the gate, and approve it (automatically or by a person)."""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseOperator

from conveyor.lake import Lake
from conveyor.operators.base import first_try, pipeline_spec, translate_errors


class RegisterModelOperator(BaseOperator):
    """Make the model a new version of the pipeline's registered model, ``PendingManualApproval``.

    The registry is the pipeline's (``registry: mlflow`` or ``sagemaker``). A retry of the same run
    returns the version it registered before (no duplicates); the first try does not look for one on
    SageMaker (its create is idempotent by the run's token).
    The archive's sha256 is read from the lake and recorded with the version (``model_sha256``):
    deploy, batch, monitor and the gate refuse an archive whose bytes differ.
    Returns ``{"model_name", "version", "mlflow_run_id", "model_uri", "sha256"}``.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory); its name is
        the registered model's.
    :param model: the train task's result (templated XCom).
    :param gate: the gate task's result (templated XCom).
    :param deploy: whether the approved model should be rolled out (templated; recorded as a tag).
    :param evaluation: the evaluate task's result (templated XCom): its metrics go with the version.
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = ("spec", "model", "gate", "deploy", "evaluation")
    template_fields_renderers = {"spec": "json"}

    def __init__(
        self,
        *,
        spec: Any,
        model: Any,
        gate: Any,
        deploy: Any = True,
        evaluation: Any = None,
        tracking_uri: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model
        self.gate = gate
        self.deploy = deploy
        self.evaluation = evaluation
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.model.artifacts import archive_sha256, checked_sha256
        from conveyor.registry import registry_hook
        from conveyor.registry.mlflow import MlflowRegistryHook

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        evaluation = self.evaluation if isinstance(self.evaluation, dict) else {}
        metrics_uri = None
        if evaluation.get("report"):
            metrics_uri = str(lake.reports(spec.name, context["run_id"]) / "evaluation" / "metrics.json")
        if self.model.get("sha256"):  # hashed by the train task as it wrote the archive (no second read)
            sha256 = checked_sha256(self.model["sha256"], f"the train task's sha256 of {self.model['model_uri']}")
        else:  # a result from before the train task recorded it
            sha256 = archive_sha256(self.model["model_uri"], lake.conn_id)
        version = registry_hook(spec, self.tracking_uri).register(
            spec.name,
            self.model["model_uri"],
            self.gate["mlflow_run_id"],
            tags={
                "dataset_version": self.model["dataset_version"],
                "code_version": self.model["code_version"],
                "backend": spec.compute,
                "gate_decision": "passed",
                "conveyor_run_id": context["run_id"],
                "deploy": str(self.deploy).lower(),
            },
            metrics=evaluation.get("metrics"),
            metrics_uri=metrics_uri,
            sha256=sha256,
            first_try=first_try(context),  # no earlier attempt to find
        )
        MlflowRegistryHook(self.tracking_uri).finish_run(self.gate["mlflow_run_id"])
        self.log.info(
            "Registered %s version %s (PendingManualApproval, %s registry) from %s (sha256 %s)",
            spec.name,
            version.version,
            spec.registry,
            self.model["model_uri"],
            sha256,
        )
        return {
            "model_name": spec.name,
            "version": str(version.version),
            "mlflow_run_id": self.gate["mlflow_run_id"],
            "model_uri": self.model["model_uri"],
            "sha256": sha256,
            "arn": getattr(version, "arn", None) or None,  # SageMaker's package (the next tasks need not list it)
        }


class AutoApproveOperator(BaseOperator):
    """``approval: auto``: approve a registered version that passed the gate and make it champion.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param registration: the register task's result (templated XCom).
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = ("spec", "registration")
    template_fields_renderers = {"spec": "json"}

    def __init__(self, *, spec: Any, registration: Any, tracking_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.registration = registration
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.registry import registry_hook
        from conveyor.registry.base import APPROVED

        name, version = self.registration["model_name"], self.registration["version"]
        hook = registry_hook(pipeline_spec(self.spec), self.tracking_uri)
        hook.remember(self.registration)
        # Registered by this run moments ago, and the pipeline's train runs never overlap (max_active_runs 1): on
        # the first try no newer version can be approved, so none is looked for (a cleared task, later, looks).
        hook.promote(name, version, newest=first_try(context))
        self.log.info("Approved %s version %s automatically; it is now the champion", name, version)
        return {"model_name": name, "version": version, "status": APPROVED, "approved_by": "auto"}


class ModelApprovalOperator(ApprovalOperator):
    """``approval: manual``: a person approves or rejects in the Airflow UI (Required Actions).

    The request shows the gate's comparison. Approve sets ``Approved`` and moves ``champion``;
    reject sets ``Rejected`` and skips what follows.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param registration_task: the task whose XCom holds the registration.
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = (*ApprovalOperator.template_fields, "spec")
    template_fields_renderers = {**ApprovalOperator.template_fields_renderers, "spec": "json"}

    def __init__(
        self, *, spec: Any, registration_task: str = "register", tracking_uri: str | None = None, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.spec = spec
        self.registration_task = registration_task
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from airflow.sdk.exceptions import DownstreamTasksSkipped

        from conveyor.registry import registry_hook
        from conveyor.registry.base import REJECTED

        skipped: DownstreamTasksSkipped | None = None
        try:
            result = super().execute_complete(context=context, event=event)  # validates the answer
        except DownstreamTasksSkipped as exc:  # a rejection: Airflow skips what follows by raising this
            skipped, result = exc, {"chosen_options": [self.REJECT]}
        registration = context["ti"].xcom_pull(task_ids=self.registration_task)
        name, version = registration["model_name"], registration["version"]
        hook = registry_hook(pipeline_spec(self.spec), self.tracking_uri)
        hook.remember(registration)
        user = event.get("responded_by_user") or {}
        who = str(user.get("name") or user.get("id") or "unknown") if isinstance(user, dict) else str(user)
        if result["chosen_options"][0] == self.APPROVE:
            hook.promote(name, version)
            self.log.info("%s version %s approved by %s; it is now the champion", name, version, who)
        else:
            hook.set_status(name, version, REJECTED)
            self.log.info("%s version %s rejected by %s", name, version, who)
        hook.set_version_tags(name, version, {"decided_by": who})
        if skipped is not None:
            raise skipped
        return result


class PublishModelOperator(BaseOperator):
    """Announce an approved version: updates the ``<name>.model`` Asset, which starts the deploy DAG.

    Runs only after an approval (a rejection skips it). The event's extra carries the version and
    the run's ``deploy`` choice.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param registration: the register task's result (templated XCom).
    :param deploy: whether the version should be rolled out (templated).
    """

    template_fields = ("spec", "registration", "deploy")
    template_fields_renderers = {"spec": "json"}

    def __init__(self, *, spec: Any, registration: Any, deploy: Any = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.registration = registration
        self.deploy = deploy

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.assets import model_asset

        name = pipeline_spec(self.spec).name
        deploy = str(self.deploy).lower() not in {"false", "0", "no", "none"}
        extra = {"version": self.registration["version"], "deploy": deploy, "model_uri": self.registration["model_uri"]}
        context["outlet_events"][model_asset(name)].extra = extra
        self.log.info("Published %s version %s (deploy: %s)", name, extra["version"], deploy)
        return extra
