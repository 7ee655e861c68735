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
    ) -> Any: ...

    def set_status(self, model_name: str, version: str, status: str) -> None: ...

    def promote(self, model_name: str, version: str) -> None: ...

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None: ...

    def champion(self, model_name: str) -> Any | None: ...

    def version(self, model_name: str, version: str) -> Any: ...

    def resolve(self, model_name: str, version_or_alias: str) -> Any: ...

    def record_deployment(self, model_name: str, version: str, endpoint: str) -> str | None: ...

    def live_version(self, model_name: str, endpoint: str) -> str | None: ...
