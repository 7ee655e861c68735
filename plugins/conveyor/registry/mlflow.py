"""MLflow tracking and model registry, as Conveyor uses them.

Tracking URI: ``MLFLOW_TRACKING_URI``, or a SQLite store in the project's state folder with
artifacts beside it. Approval status lives in a model-version tag (the SageMaker vocabulary:
``PendingManualApproval``, ``Approved``, ``Rejected``) and the alias ``champion`` always names the
approved live version. Every write is idempotent for a given Airflow run: a retry finds the
MLflow run and the model version it created before instead of creating new ones.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from conveyor import settings
from conveyor.registry.base import (
    APPROVED,
    CHAMPION,
    PENDING,
    RUN_TAG,
    SHA256_TAG,
    STATUS_TAG,
    RegistryUnavailable,
    check_retry,
    check_status,
    registered_sha256,
)


class MlflowRegistryHook(BaseHook):
    """Talks to one MLflow tracking server and registry; keeps no per-run state.

    :param tracking_uri: the tracking (and registry) URI; the default store when None.
    """

    def __init__(self, tracking_uri: str | None = None):
        super().__init__()
        self.tracking_uri = tracking_uri or settings.mlflow_tracking_uri()

    @cached_property
    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS"}:
                raise
            where, why = settings.mask_url(self.tracking_uri), settings.mask_url(str(exc))  # no credentials
            raise RegistryUnavailable(f"MLflow store at {where} failed to {what}: {why}") from None
        except (OSError, ConnectionError) as exc:
            where, why = settings.mask_url(self.tracking_uri), settings.mask_url(f"{type(exc).__name__}: {exc}")
            raise RegistryUnavailable(f"MLflow store at {where} is unreachable ({what}): {why}") from None

    def experiment_id(self, name: str) -> str:
        """The id of an experiment, created (artifacts in the state folder by default) if missing."""
        found = self._call("read experiment", self.client.get_experiment_by_name, name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            location = (settings.state_dir() / "mlflow" / "artifacts" / name).as_uri()
        return self._call("create experiment", self.client.create_experiment, name, artifact_location=location)

    def ensure_run(self, experiment: str, run_key: str, run_name: str, tags: dict[str, str]) -> str:
        """The MLflow run of an Airflow run, created on first call (idempotent by ``run_key``)."""
        exp_id = self.experiment_id(experiment)
        found = self._call(
            "search runs",
            self.client.search_runs,
            [exp_id],
            filter_string=f"tags.{RUN_TAG} = '{run_key}'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = self._call(
            "create run", self.client.create_run, exp_id, run_name=run_name, tags={RUN_TAG: run_key, **tags}
        )
        return run.info.run_id

    def log_run(self, run_id: str, params: dict[str, Any], metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Log params (stringified, 6,000 characters at most), numeric metrics and tags to a run."""
        from mlflow.entities import Metric, Param, RunTag

        existing = self._call("read run", self.client.get_run, run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        numbers = [Metric(k, float(v), 0, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        labels = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("log run", self.client.log_batch, run_id, metrics=numbers, params=fresh, tags=labels)

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str) -> None:
        self._call("log artifacts", self.client.log_artifacts, run_id, str(local_dir), artifact_path)

    def finish_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("end run", self.client.set_terminated, run_id, status)

    def find_version(self, model_name: str, run_id: str) -> Any | None:
        """The model version an MLflow run registered before, if any."""
        found = self._call(
            "search model versions", self.client.search_model_versions, f"name='{model_name}' and run_id='{run_id}'"
        )
        return found[0] if found else None

    def register(
        self,
        model_name: str,
        source: str,
        run_id: str,
        tags: dict[str, str],
        metrics: dict[str, float] | None = None,
        metrics_uri: str | None = None,
        sha256: str | None = None,
        first_try: bool = False,
    ) -> Any:
        """Register a model version (status ``PendingManualApproval``); a retry returns the same one.

        The archive's sha256 is recorded as the version's ``model_sha256`` tag; loaders refuse an
        archive whose bytes differ. ``metrics`` and ``metrics_uri`` are not stored on the version:
        the MLflow run has them.

        :param model_name: the registered model (pipeline).
        :param source: the ``model.tar.gz`` URI.
        :param run_id: the MLflow run that judged the model (a retry with it returns the same version).
        :param tags: the version's tags.
        :param metrics: unused (the MLflow run has them).
        :param metrics_uri: unused (the MLflow run has it).
        :param sha256: the archive's sha256 (read from ``source`` through the lake's connection when None).
        :param first_try: unused: MLflow's create has no idempotency token, so an earlier version of
            ``run_id`` is always looked for.
        :raises ArchiveMissing: no archive at ``source``.
        :raises IntegrityError: a retry names an archive whose bytes differ from the version's record.
        """
        from mlflow.exceptions import MlflowException

        digest = registered_sha256(model_name, source, sha256)
        existing = self.find_version(model_name, run_id)
        if existing is not None:
            check_retry(model_name, existing, source, digest)
            return existing
        try:
            self._call("create registered model", self.client.create_registered_model, model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return self._call(
            "create model version",
            self.client.create_model_version,
            model_name,
            source,
            run_id=run_id,
            tags={STATUS_TAG: PENDING, **tags, SHA256_TAG: digest},
        )

    def set_status(self, model_name: str, version: str, status: str) -> None:
        check_status(status)
        self._call("tag model version", self.client.set_model_version_tag, model_name, version, STATUS_TAG, status)

    def promote(self, model_name: str, version: str, newest: bool = False) -> None:
        """Approve a version and point ``champion`` at it (``newest`` is unused: the alias names it either way)."""
        self.set_status(model_name, version, APPROVED)
        self._call("move alias", self.client.set_registered_model_alias, model_name, CHAMPION, version)

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self._call("tag model version", self.client.set_model_version_tag, model_name, version, key, str(value))

    def champion(self, model_name: str) -> Any | None:
        """The version the ``champion`` alias names, or None when there is none yet."""
        from mlflow.exceptions import MlflowException

        try:
            return self._call("read alias", self.client.get_model_version_by_alias, model_name, CHAMPION)
        except MlflowException as exc:
            if exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}:
                return None
            raise

    def version(self, model_name: str, version: str) -> Any:
        return self._call("read model version", self.client.get_model_version, model_name, version)

    def record_deployment(self, model_name: str, version: str, endpoint: str) -> str | None:
        """Record which version is live on an endpoint; returns the version it replaced.

        The registered model keeps ``live_on_<endpoint>``; the version gets ``live_on`` and the one
        it replaced loses it.
        """
        key = f"live_on_{endpoint}"
        model = self._call("read registered model", self.client.get_registered_model, model_name)
        previous = model.tags.get(key)
        if previous and previous != str(version):
            self._call("tag model version", self.client.delete_model_version_tag, model_name, previous, "live_on")
        self._call("tag model version", self.client.set_model_version_tag, model_name, version, "live_on", endpoint)
        self._call("tag registered model", self.client.set_registered_model_tag, model_name, key, str(version))
        return previous

    def remember(self, entry: dict[str, Any]) -> None:
        """Nothing to keep: MLflow's versions are addressed by name and number (``RegistryHook.remember``)."""

    def live_version(self, model_name: str, endpoint: str) -> str | None:
        """The version the registry records as live on an endpoint."""
        model = self._call("read registered model", self.client.get_registered_model, model_name)
        return model.tags.get(f"live_on_{endpoint}")

    def resolve(self, model_name: str, version_or_alias: str) -> Any:
        """A model version by number, or by alias (``champion``)."""
        if str(version_or_alias).isdigit():
            return self.version(model_name, str(version_or_alias))
        return self._call("read alias", self.client.get_model_version_by_alias, model_name, version_or_alias)
