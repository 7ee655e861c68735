"""``<name>__deploy`` and ``<name>__batch_predict``: the real-time endpoint and batch scoring."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import DAG

from conveyor.factory.common import pipeline_dag, spec_arg
from conveyor.spec import PipelineSpec

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator


def deploy_dag(spec: PipelineSpec) -> DAG:
    """``<name>__deploy``: roll an approved version out to the endpoint (smoke test, rollback)."""
    from airflow.sdk import Param

    from conveyor.assets import model_asset
    from conveyor.operators.deploy import DeployEndpointOperator, ResolveModelOperator

    endpoint = spec.deploy.endpoint.name or spec.name
    with pipeline_dag(
        spec,
        "deploy",
        description=f"Roll an approved {spec.name} model out to the {endpoint} endpoint",
        schedule=[model_asset(spec.name)],
        params={
            "version": Param(
                "champion",
                type="string",
                title="Version or alias",
                description="A registered version number, or an alias such as champion",
            )
        },
        doc_md=f"""
### {spec.name}: deploy
Starts when a version is approved (the `{spec.name}.model` Asset, unless the training run said not
to deploy), or by hand with a version number or alias.

1. **resolve** — the registered version (it must be `Approved`).
2. **deploy** — the `{endpoint}` endpoint (port {spec.deploy.endpoint.port}) keeps serving while
   the new version loads beside the old one in every worker; held-out rows are scored on it and
   compared with its evaluation; then traffic switches. Any failure rolls back and fails the run.
""",
    ) as dag:
        resolve = ResolveModelOperator(task_id="resolve", spec=spec_arg(spec), version="{{ params.version }}")
        deploy: BaseOperator
        if spec.compute == "sagemaker":  # blue/green SageMaker endpoint, deferred wait (docs/aws.md)
            from conveyor.operators.deploy_sagemaker import SageMakerDeployEndpointOperator

            deploy = SageMakerDeployEndpointOperator(
                task_id="deploy", spec=spec_arg(spec), model="{{ ti.xcom_pull(task_ids='resolve') }}"
            )
        else:
            deploy = DeployEndpointOperator(
                task_id="deploy", spec=spec_arg(spec), model="{{ ti.xcom_pull(task_ids='resolve') }}"
            )
        resolve >> deploy
    return dag


def batch_schedule(spec: PipelineSpec) -> Any:
    """Its schedule, or new inference data (the inference Asset), or either."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from conveyor.assets import inference_asset

    cron = spec.deploy.batch.schedule
    if cron:
        return AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=inference_asset(spec.name)
        )
    return [inference_asset(spec.name)]


def batch_dag(spec: PipelineSpec) -> DAG:
    """``<name>__batch_predict``: score new data with the live model into Parquet and a SQL table."""
    from airflow.sdk import Param

    from conveyor.assets import predictions_asset
    from conveyor.batch.runs import predictions_table
    from conveyor.operators.batch import BatchPredictOperator
    from conveyor.operators.deploy import ResolveModelOperator

    batch = spec.deploy.batch
    table = predictions_table(spec)
    with pipeline_dag(
        spec,
        "batch_predict",
        description=f"Score new {spec.name} data in batch into Parquet and the {table} table",
        schedule=batch_schedule(spec),
        params={
            "input": Param(
                batch.input or "",
                type=["null", "string"],
                title="Input location",
                description="A file or folder URI; empty: the oldest complete drop in landing/"
                f"{spec.name}/inference/ not scored yet",
            ),
            "model": Param("champion", type="string", title="Model version or alias"),
        },
        doc_md=f"""
### {spec.name}: batch predict
Runs on `{batch.schedule}`, when new inference data is announced (the `{spec.name}.inference`
Asset), or by hand (input location, model version or alias).

1. **resolve** — the model version (default: the `champion`).
2. **score** — streams the input in chunks of {batch.chunk_rows} rows to {batch.workers} worker
   processes, writes `predictions/{spec.name}/<run>/part-*.parquet` (then `_SUCCESS.json`) and
   replaces this run's rows in the `{table}` table in one transaction; report in
   `reports/{spec.name}/<run>/batch/`. Updates the `{spec.name}.predictions` Asset.
""",
    ) as dag:
        resolve = ResolveModelOperator(task_id="resolve", spec=spec_arg(spec), version="{{ params.model }}")
        score: BaseOperator
        if spec.compute == "sagemaker":  # a SageMaker batch transform job, then the same files and table
            from conveyor.operators.batch_sagemaker import SageMakerBatchPredictOperator

            score = SageMakerBatchPredictOperator(
                task_id="score",
                spec=spec_arg(spec),
                input_uri="{{ params.input }}",
                model="{{ ti.xcom_pull(task_ids='resolve') }}",
                outlets=[predictions_asset(spec.name)],
            )
        else:
            score = BatchPredictOperator(
                task_id="score",
                spec=spec_arg(spec),
                input_uri="{{ params.input }}",
                model="{{ ti.xcom_pull(task_ids='resolve') }}",
                outlets=[predictions_asset(spec.name)],
            )
        resolve >> score
    return dag
