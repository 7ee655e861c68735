"""Build every pipeline's DAG family from its YAML file. Cheap: no heavy imports here."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from conveyor import settings
from conveyor.exceptions import SpecError
from conveyor.spec import PipelineSpec, load_specs

START = datetime(2024, 1, 1)


def default_args(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "owner": spec.owner,
        "retries": spec.retries,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    }


def tags(spec: PipelineSpec, kind: str) -> list[str]:
    return sorted({"conveyor", spec.name, kind, *spec.tags})


def ingest_dag(spec: PipelineSpec) -> DAG:
    """``<name>__ingest``: wait for a complete drop, version it, validate it, publish the dataset."""
    from conveyor.assets import dataset_asset
    from conveyor.operators.ingest import IngestDropOperator
    from conveyor.operators.validate import ValidateDatasetOperator
    from conveyor.sensors.drop import DropSensor

    with DAG(
        dag_id=f"{spec.name}__ingest",
        description=f"Ingest and validate {spec.name} drops",
        schedule=spec.ingest.schedule,
        start_date=START,
        catchup=False,
        max_active_runs=1,
        tags=tags(spec, "ingest"),
        default_args=default_args(spec),
        doc_md=f"""
### {spec.name}: ingest
{spec.description}

1. **wait_for_drop** waits (deferred, in the triggerer) for a complete drop in
   `landing/{spec.name}/<drop>/`: complete means its `{spec.data.marker}` marker exists.
2. **ingest** copies it into `raw/{spec.name}/<version>/`, where the version is a hash of its
   bytes, with `manifest.json` (files, bytes, sha256, rows, schema). Unreadable drops go to
   `quarantine/{spec.name}/<drop>/` with a report.
3. **validate** runs the expectation suite `include/expectations/{spec.suite_name}.json` and
   writes Data Docs to `reports/{spec.name}/<run>/validation/index.html`. A failing drop goes to
   quarantine; a passing one updates the `{spec.name}.dataset` Asset, which starts training.
""",
    ) as dag:
        wait = DropSensor(
            task_id="wait_for_drop",
            pipeline=spec.name,
            marker=spec.data.marker,
            poke_interval=spec.ingest.poke_interval,
            timeout=spec.ingest.timeout,
            soft_fail=True,
            retries=0,
        )
        ingest = IngestDropOperator(
            task_id="ingest",
            pipeline=spec.name,
            drop="{{ ti.xcom_pull(task_ids='wait_for_drop')['drop'] }}",
        )
        validate = ValidateDatasetOperator(
            task_id="validate",
            pipeline=spec.name,
            drop="{{ ti.xcom_pull(task_ids='ingest')['drop'] }}",
            version="{{ ti.xcom_pull(task_ids='ingest')['version'] }}",
            outlets=[dataset_asset(spec.name)],
        )
        wait >> ingest >> validate
    return dag


BUILDERS = (ingest_dag,)


class InvalidPipelinesDag(DAG):
    """Carries the errors of invalid pipeline files into Airflow's import errors.

    The DAG processor validates every DAG before it keeps it; this one fails that check with the
    files' errors, so they show under *Import errors* while every valid pipeline still loads.
    """

    def __init__(self, errors: dict[Path, SpecError]):
        super().__init__(dag_id="conveyor__invalid_pipelines", schedule=None, start_date=START)
        self.spec_errors = [str(err) for err in errors.values()]

    def validate(self) -> None:
        raise SpecError("invalid pipeline file(s): " + " | ".join(self.spec_errors))


def build_all(folder: Path | None = None) -> dict[str, DAG]:
    """Every DAG of every valid pipeline in the folder, by dag_id; invalid files become one error.

    :param folder: the pipelines folder (``include/pipelines`` by default).
    """
    specs, errors = load_specs(folder or settings.pipelines_dir())
    dags: dict[str, DAG] = {}
    for spec in specs.values():
        for builder in BUILDERS:
            dag = builder(spec)
            dags[dag.dag_id] = dag
    if errors:
        dags["conveyor__invalid_pipelines"] = InvalidPipelinesDag(errors)
    return dags
