"""``<name>__ingest``: the DAG that waits for drops, versions and validates them."""

from __future__ import annotations

from airflow.sdk import DAG

from conveyor.factory.common import pipeline_dag, spec_arg
from conveyor.spec import PipelineSpec


def ingest_dag(spec: PipelineSpec) -> DAG:
    """``<name>__ingest``: wait for a complete drop, version it, validate it, publish the dataset.

    :param spec: the validated pipeline spec (read once, at parse).
    """
    from conveyor.assets import dataset_asset
    from conveyor.operators.ingest import IngestDropOperator
    from conveyor.operators.validate import ValidateDatasetOperator
    from conveyor.sensors.drop import DropSensor

    with pipeline_dag(
        spec,
        "ingest",
        description=f"Ingest and validate {spec.name} drops",
        schedule=spec.ingest.schedule,
        render_template_as_native_obj=False,
        doc_md=f"""
### {spec.name}: ingest
{spec.description}

1. **wait_for_drop** waits (deferred, in the triggerer) for a complete drop in
   `landing/{spec.name}/<drop>/`: complete means its `{spec.data.marker}` marker exists (the name
   is case-sensitive). Drops waiting without it longer than the timeout are named in its log and
   result.
2. **ingest** copies it into `raw/{spec.name}/<version>/`, where the version is a hash of its
   bytes, with `manifest.json` (files, bytes, sha256, rows, schema, skipped files). Unreadable
   drops go to `quarantine/{spec.name}/<drop>/` with a report; storage errors are retried.
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
            spec=spec_arg(spec),
            drop="{{ ti.xcom_pull(task_ids='wait_for_drop')['drop'] }}",
        )
        validate = ValidateDatasetOperator(
            task_id="validate",
            spec=spec_arg(spec),
            drop="{{ ti.xcom_pull(task_ids='ingest')['drop'] }}",
            version="{{ ti.xcom_pull(task_ids='ingest')['version'] }}",
            outlets=[dataset_asset(spec.name)],
        )
        wait >> ingest >> validate
    return dag
