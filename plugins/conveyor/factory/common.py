"""What every DAG of a pipeline family shares: dag_id, tags, owner, retries, start date."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, literal

from conveyor.spec import PipelineSpec

START = datetime(2024, 1, 1)


def default_args(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "owner": spec.owner,
        "retries": spec.retries,
        "retry_delay": timedelta(seconds=spec.retry_delay),
        "retry_exponential_backoff": 2.0,  # a multiplier since Airflow 3.3 (True would mean 1: no backoff)
        "max_retry_delay": timedelta(minutes=10),
    }


def tags(spec: PipelineSpec, kind: str) -> list[str]:
    return sorted({"conveyor", spec.name, kind, *spec.tags})


def pipeline_dag(spec: PipelineSpec, kind: str, **kwargs: Any) -> DAG:
    """A DAG of a pipeline's family: ``<name>__<kind>``, tagged, owned, retried, one run at a time."""
    settings_ = {
        "start_date": START,
        "catchup": False,
        "max_active_runs": 1,
        "render_template_as_native_obj": True,
        "tags": tags(spec, kind.split("_")[0]),
        "default_args": default_args(spec),
        # Only the DAG file's globals count: a family that fails half-built leaves no DAG behind.
        "auto_register": False,
        **kwargs,
    }
    return DAG(dag_id=f"{spec.name}__{kind}", **settings_)


def monitored(spec: PipelineSpec) -> bool:
    """Monitoring on and something to watch: an endpoint, or batch runs of a tabular pipeline."""
    watched = spec.deploy.endpoint.enabled or (spec.deploy.batch.enabled and spec.data.format != "images")
    return spec.monitor.enabled and watched


def spec_arg(spec: PipelineSpec) -> Any:
    """The spec as operators receive it: its JSON dict, shown in Rendered Template, never Jinja-rendered."""
    return literal(spec.model_dump(mode="json"))
