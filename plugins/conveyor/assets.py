"""The Assets a pipeline publishes; DAGs schedule on them (cheap: no heavy imports)."""

from __future__ import annotations

from airflow.sdk import Asset

from conveyor import settings


def dataset_asset(pipeline: str) -> Asset:
    """Updated when a new dataset version of the pipeline passed validation (extra: its version)."""
    return Asset(name=f"{pipeline}.dataset", uri=f"{settings.lake_uri().rstrip('/')}/raw/{pipeline}/", group="conveyor")
