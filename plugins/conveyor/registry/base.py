"""The model registry of a pipeline: MLflow (``registry: mlflow``) or SageMaker (``registry: sagemaker``).

Both hooks offer the same methods, so the register, approve, gate, deploy and batch steps do not
care which one a pipeline uses:

| method | does |
|---|---|
| ``register(model_name, source, run_id, tags, metrics=None, metrics_uri=None)`` | a new version, |
| | ``PendingManualApproval``; a retry with the same ``run_id`` returns the same one |
| ``set_status(model_name, version, status)`` | ``PendingManualApproval`` / ``Approved`` / ``Rejected`` |
| ``promote(model_name, version)`` | ``Approved`` and champion |
| ``set_version_tags(model_name, version, tags)`` | adds or replaces tags of a version |
| ``champion(model_name)`` | the champion version, or None |
| ``version(model_name, version)`` / ``resolve(model_name, version_or_alias)`` | one version, by number |
| | or alias (``champion``) |
| ``record_deployment(model_name, version, endpoint)`` | records the live version; returns the one it replaced |
| ``live_version(model_name, endpoint)`` | the version recorded as live on an endpoint |
| ``remember(entry)`` | takes a version's ``arn`` from an earlier task's result (SageMaker; saves a listing) |

``register`` records the archive's sha256 (``model_sha256``: a version tag in MLflow, a customer
metadata property in SageMaker); ``conveyor.model.artifacts.fetch`` refuses an archive whose bytes
differ from it before anything is extracted or imported.

A version has ``.version`` (its number, as text), ``.source`` (the ``model.tar.gz`` URI),
``.tags`` (including ``approval_status`` and ``conveyor_run_id``) and ``.run_id`` (the MLflow run
that judged it). MLflow's champion is the version its ``champion`` alias names; SageMaker's is the
latest ``Approved`` package of the pipeline's model package group. Experiment runs (parameters,
metrics, reports) are logged to MLflow tracking with either registry.
"""

from __future__ import annotations

from typing import Any, Protocol

from conveyor.errors import ConveyorError, TransientError

STATUS_TAG = "approval_status"
RUN_TAG = "conveyor_run_id"
# The sha256 of a version's model.tar.gz, recorded at registration; loaders refuse an archive that differs.
SHA256_TAG = "model_sha256"
PENDING, APPROVED, REJECTED = "PendingManualApproval", "Approved", "Rejected"
CHAMPION = "champion"


STATUSES = frozenset({PENDING, APPROVED, REJECTED})


class RegistryUnavailable(TransientError):
    """The registry's store could not be reached (transient: the task is retried)."""


class ModelVersionNotFound(ConveyorError, LookupError):
    """No version or alias of that name in the registry (names the model and what was asked)."""


class UnknownApprovalStatus(ConveyorError, ValueError):
    """An approval status outside the vocabulary (``PendingManualApproval``, ``Approved``, ``Rejected``)."""


def check_status(status: str) -> str:
    """The status, if it is one of the vocabulary.

    :param status: an approval status.
    :raises UnknownApprovalStatus: it is not.
    """
    if status not in STATUSES:
        raise UnknownApprovalStatus(f"unknown approval status {status!r} (one of {', '.join(sorted(STATUSES))})")
    return status


def registered_sha256(model_name: str, source: str, sha256: str | None) -> str:
    """The sha256 a registration records: the one given (checked), else read from the archive.

    :param model_name: the registered model (named in errors).
    :param source: the archive's URI (read through the lake's connection when no hash is given).
    :param sha256: the archive's sha256, when the caller computed it.
    :raises ArchiveMissing: no hash given and no archive at ``source``.
    """
    from conveyor import settings
    from conveyor.model.artifacts import archive_sha256, checked_sha256

    if sha256 is not None:
        return checked_sha256(sha256, f"sha256 of {model_name}'s archive {source}")
    return archive_sha256(source, settings.lake_conn_id())


def check_retry(model_name: str, existing: Any, source: str, sha256: str) -> None:
    """A registration retried by the same run must name the same bytes as the version it made.

    :param model_name: the registered model.
    :param existing: the version the first attempt registered.
    :param source: the archive the retry names.
    :param sha256: the sha256 of that archive.
    :raises IntegrityError: the version's recorded sha256 differs.
    """
    from conveyor.errors import IntegrityError

    recorded = (getattr(existing, "tags", None) or {}).get(SHA256_TAG)
    if recorded and recorded != sha256:
        raise IntegrityError(
            model_name, str(existing.version), source, recorded, sha256, ": the archive changed since it was registered"
        )


class RegistryHook(Protocol):
    """What Conveyor's operators ask of a model registry."""

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
    ) -> Any: ...

    def set_status(self, model_name: str, version: str, status: str) -> None: ...

    def promote(self, model_name: str, version: str, newest: bool = False) -> None: ...

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None: ...

    def champion(self, model_name: str) -> Any | None: ...

    def version(self, model_name: str, version: str) -> Any: ...

    def resolve(self, model_name: str, version_or_alias: str) -> Any: ...

    def record_deployment(self, model_name: str, version: str, endpoint: str) -> str | None: ...

    def live_version(self, model_name: str, endpoint: str) -> str | None: ...

    def remember(self, entry: dict[str, Any]) -> None:
        """Take what an earlier task of the run learnt of a version (its result: ``model_name``,
        ``version``, ``arn``), so this hook need not ask the registry again; a no-op where nothing is saved."""
