"""The Assets a pipeline publishes; DAGs schedule on them (cheap: no heavy imports).

Their URIs name the pipeline and the kind of data (``conveyor://<pipeline>/<kind>``), not a place in
the lake: moving the lake (a new root, a bucket) must not turn them into new assets. Where the data
lives travels in each event's extra.
"""

from __future__ import annotations

from airflow.sdk import Asset


def _asset(pipeline: str, kind: str) -> Asset:
    return Asset(name=f"{pipeline}.{kind}", uri=f"conveyor://{pipeline}/{kind}", group="conveyor")


def dataset_asset(pipeline: str) -> Asset:
    """Updated when a new dataset version of the pipeline passed validation (extra: its version)."""
    return _asset(pipeline, "dataset")


def model_asset(pipeline: str) -> Asset:
    """Updated when a model version is approved (extra: its version and whether to deploy it)."""
    return _asset(pipeline, "model")


def predictions_asset(pipeline: str) -> Asset:
    """Updated when a batch prediction run has written its rows (extra: run, rows, model version)."""
    return _asset(pipeline, "predictions")


def inference_asset(pipeline: str) -> Asset:
    """Updated by producers (or their DAGs) when new data to score lands in ``landing/<name>/inference/``."""
    return _asset(pipeline, "inference")


def retrain_asset(pipeline: str) -> Asset:
    """Updated by ``<name>__monitor`` when drift or live accuracy calls for retraining (extra: the reasons
    and the newly labelled rows); it schedules ``<name>__train``."""
    return _asset(pipeline, "retrain")
