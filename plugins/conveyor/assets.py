"""The Assets a pipeline publishes; DAGs schedule on them (cheap: no heavy imports)."""

from __future__ import annotations

from airflow.sdk import Asset

from conveyor import settings


def dataset_asset(pipeline: str) -> Asset:
    """Updated when a new dataset version of the pipeline passed validation (extra: its version)."""
    return Asset(name=f"{pipeline}.dataset", uri=f"{settings.lake_uri().rstrip('/')}/raw/{pipeline}/", group="conveyor")


def model_asset(pipeline: str) -> Asset:
    """Updated when a model version is approved (extra: its version and whether to deploy it)."""
    return Asset(name=f"{pipeline}.model", uri=f"{settings.lake_uri().rstrip('/')}/models/{pipeline}/", group="conveyor")


def predictions_asset(pipeline: str) -> Asset:
    """Updated when a batch prediction run has written its rows (extra: run, rows, model version)."""
    return Asset(name=f"{pipeline}.predictions", uri=f"{settings.lake_uri().rstrip('/')}/predictions/{pipeline}/",
                 group="conveyor")


def inference_asset(pipeline: str) -> Asset:
    """Updated by producers (or their DAGs) when new data to score lands in ``landing/<name>/inference/``."""
    return Asset(name=f"{pipeline}.inference", uri=f"{settings.lake_uri().rstrip('/')}/landing/{pipeline}/inference/",
                 group="conveyor")
