"""The model registry of a pipeline: ``registry_hook(spec)`` picks MLflow or SageMaker.

``base`` holds what both share (the protocol, the errors, the approval vocabulary); ``mlflow``
and ``sagemaker`` are the two hooks. See ``base`` for the methods every registry offers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from conveyor.registry.base import ModelVersionNotFound, RegistryHook

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec


def registry_hook(spec: PipelineSpec, tracking_uri: str | None = None) -> RegistryHook:
    """The registry hook of a pipeline (``spec.registry``).

    :param spec: the pipeline.
    :param tracking_uri: the MLflow tracking URI (the default store when None; ``registry: mlflow``).
    """
    if spec.registry == "sagemaker":
        from conveyor.registry.sagemaker import SageMakerRegistryHook

        return SageMakerRegistryHook.for_spec(spec)
    from conveyor.registry.mlflow import MlflowRegistryHook

    return MlflowRegistryHook(tracking_uri)


def lookup_errors() -> tuple[type[Exception], ...]:
    """The exceptions a registry raises for an unknown version or alias (MLflow's and ours)."""
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency; kept for a SageMaker-only worker
        return (ModelVersionNotFound,)
    return (ModelVersionNotFound, MlflowException)
