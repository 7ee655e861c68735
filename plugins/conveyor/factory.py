"""Build every pipeline's DAG family from its YAML file. Cheap: no heavy imports here."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from conveyor import settings
from conveyor.exceptions import SpecError
from conveyor.spec import PipelineSpec, load_specs

START = datetime(2024, 1, 1)
# The Celery queue of tasks that need a GPU (docker-compose.yaml's airflow-worker-gpu serves it).
GPU_QUEUE_ENV = "CONVEYOR_GPU_QUEUE"
GPU_QUEUE_DEFAULT = "gpu"


def gpu_queue() -> str:
    """The Celery queue of tasks that need a GPU: ``CONVEYOR_GPU_QUEUE``, ``gpu`` by default."""
    return os.environ.get(GPU_QUEUE_ENV) or GPU_QUEUE_DEFAULT


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
    settings_ = {"start_date": START, "catchup": False, "max_active_runs": 1, "render_template_as_native_obj": True,
                 "tags": tags(spec, kind.split("_")[0]), "default_args": default_args(spec), **kwargs}
    return DAG(dag_id=f"{spec.name}__{kind}", **settings_)


def ingest_dag(spec: PipelineSpec) -> DAG:
    """``<name>__ingest``: wait for a complete drop, version it, validate it, publish the dataset."""
    from conveyor.assets import dataset_asset
    from conveyor.operators.ingest import IngestDropOperator
    from conveyor.operators.validate import ValidateDatasetOperator
    from conveyor.sensors.drop import DropSensor

    with pipeline_dag(
        spec, "ingest",
        description=f"Ingest and validate {spec.name} drops",
        schedule=spec.ingest.schedule,
        render_template_as_native_obj=False,
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


def train_schedule(spec: PipelineSpec) -> Any:
    """New validated data (the dataset Asset), the retrain schedule, both, or neither."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from conveyor.assets import dataset_asset, retrain_asset

    assets = [dataset_asset(spec.name)] if spec.retrain.on_new_data else []
    if monitored(spec):
        assets.append(retrain_asset(spec.name))
    cron = spec.retrain.schedule
    if assets and cron:
        condition = assets[0] if len(assets) == 1 else assets[0] | assets[1]
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=condition)
    if len(assets) > 1:
        return assets[0] | assets[1]  # either event starts a run (a list would wait for both)
    return assets or cron


def train_params(spec: PipelineSpec) -> dict[str, Any]:
    """The form a person fills in to train by hand."""
    from airflow.sdk import Param

    params = {
        "dataset_version": Param("", type=["null", "string"], title="Dataset version",
                                 description="Empty: the version that triggered the run, else the latest validated"),
        "labelled_rows": Param("", type=["null", "string"], title="Newly labelled rows",
                               description="Empty: those of the retraining event that started the run, if any; "
                                           "else a Parquet URI of labelled rows added to the dataset"),
        "time_limit": Param(spec.trainer.time_limit, type="integer", minimum=1, title="Time budget (seconds)"),
        "deploy": Param(spec.deploy.endpoint.enabled, type="boolean", title="Deploy once approved"),
    }
    if spec.trainer.kind == "autogluon":
        presets = ["medium_quality", "good_quality", "high_quality", "best_quality", "optimize_for_deployment"]
        if spec.trainer.presets not in presets:
            presets.append(spec.trainer.presets)
        params["presets"] = Param(spec.trainer.presets, enum=presets, title="AutoGluon presets")
    return params


def train_dag(spec: PipelineSpec) -> DAG:
    """``<name>__train``: split, train, evaluate, gate, register, approve."""
    from conveyor.operators.gate import GateModelOperator
    from conveyor.assets import model_asset
    from conveyor.operators.registry import (
        AutoApproveOperator,
        ModelApprovalOperator,
        PublishModelOperator,
        RegisterModelOperator,
    )
    from conveyor.operators.train import EvaluateModelOperator, SplitDatasetOperator, TrainModelOperator

    xcom = "{{{{ ti.xcom_pull(task_ids='{}') }}}}".format
    with pipeline_dag(
        spec, "train",
        description=f"Train, evaluate, gate, register and approve a {spec.name} model",
        schedule=train_schedule(spec),
        params=train_params(spec),
        doc_md=f"""
### {spec.name}: train
Runs on new validated data (the `{spec.name}.dataset` Asset), on its retrain schedule
(`{spec.retrain.schedule}`), or by hand with the form (dataset version, time budget, presets, deploy).

1. **split** — seeded ({spec.split.seed}), stratified train/validation/test split under
   `models/{spec.name}/<run>/split/`.
2. **train** — `include/training/` script in SageMaker script mode, {"as a SageMaker training job"
   if spec.compute == "sagemaker" else "as a child process"}; writes `models/{spec.name}/<run>/model.tar.gz`.
3. **evaluate** — test-set metrics and plots: `reports/{spec.name}/<run>/evaluation/index.html`.
4. **gate** — thresholds {dict(spec.gate.thresholds)} and a gain of at least {spec.gate.min_improvement}
   in `{spec.gate.metric}` over the champion, both scored on this test set:
   `reports/{spec.name}/<run>/gate/index.html`. On reject: **{spec.gate.on_reject}**.
5. **register** — a new version of `{spec.name}` in the {"SageMaker Model Registry" if spec.registry == "sagemaker"
   else "MLflow registry"} (`PendingManualApproval`).
6. **approve** — **{spec.approval}**: approval sets `Approved` and makes it the champion.
7. **publish** — updates the `{spec.name}.model` Asset (version, deploy flag): it starts `{spec.name}__deploy`.
""",
    ) as dag:
        split = SplitDatasetOperator(task_id="split", pipeline=spec.name, dataset_version="{{ params.dataset_version }}",
                                     labelled_rows="{{ params.get('labelled_rows') or '' }}")
        if spec.compute == "sagemaker":  # a SageMaker training job, deferred wait (operators/train_sagemaker.py)
            from conveyor.backends.sagemaker import wait_limit_seconds
            from conveyor.operators.train_sagemaker import SageMakerTrainModelOperator

            train = SageMakerTrainModelOperator(
                task_id="train", pipeline=spec.name, split=xcom("split"),
                time_limit="{{ params.time_limit }}", presets="{{ params.get('presets') }}",
                execution_timeout=timedelta(seconds=wait_limit_seconds(spec) + 1800),
            )
        else:
            train = TrainModelOperator(
                task_id="train", pipeline=spec.name, split=xcom("split"),
                time_limit="{{ params.time_limit }}", presets="{{ params.get('presets') }}",
                execution_timeout=timedelta(seconds=spec.trainer.time_limit * 3 + 900),
                **({"queue": gpu_queue()} if spec.trainer.gpu else {}),  # else the default queue
            )
        evaluate = EvaluateModelOperator(task_id="evaluate", pipeline=spec.name, model=xcom("train"))
        gate = GateModelOperator(task_id="gate", pipeline=spec.name, model=xcom("train"), evaluation=xcom("evaluate"))
        register = RegisterModelOperator(task_id="register", pipeline=spec.name, model=xcom("train"),
                                         gate=xcom("gate"), deploy="{{ params.deploy }}", evaluation=xcom("evaluate"))
        if spec.approval == "auto":
            approve = AutoApproveOperator(task_id="approve", registration=xcom("register"))
        else:
            approve = ModelApprovalOperator(
                task_id="approve",
                subject=f"Approve {spec.name} model version {{{{ ti.xcom_pull(task_ids='register')['version'] }}}}?",
                body="{{ ti.xcom_pull(task_ids='gate')['summary_md'] }}\n\nReports: "
                     "{{ ti.xcom_pull(task_ids='gate')['report'] }}",
                retries=0,
            )
        publish = PublishModelOperator(task_id="publish", pipeline=spec.name, registration=xcom("register"),
                                       deploy="{{ params.deploy }}", outlets=[model_asset(spec.name)])
        split >> train >> evaluate >> gate >> register >> approve >> publish
    return dag


def deploy_dag(spec: PipelineSpec) -> DAG:
    """``<name>__deploy``: roll an approved version out to the endpoint (smoke test, rollback)."""
    from airflow.sdk import Param

    from conveyor.assets import model_asset
    from conveyor.operators.deploy import DeployEndpointOperator, ResolveModelOperator

    endpoint = spec.deploy.endpoint.name or spec.name
    with pipeline_dag(
        spec, "deploy",
        description=f"Roll an approved {spec.name} model out to the {endpoint} endpoint",
        schedule=[model_asset(spec.name)],
        params={"version": Param("champion", type="string", title="Version or alias",
                                 description="A registered version number, or an alias such as champion")},
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
        resolve = ResolveModelOperator(task_id="resolve", pipeline=spec.name, version="{{ params.version }}")
        if spec.compute == "sagemaker":  # blue/green SageMaker endpoint, deferred wait (docs/aws.md)
            from conveyor.operators.deploy_sagemaker import SageMakerDeployEndpointOperator

            deploy = SageMakerDeployEndpointOperator(task_id="deploy", pipeline=spec.name,
                                                     model="{{ ti.xcom_pull(task_ids='resolve') }}")
        else:
            deploy = DeployEndpointOperator(task_id="deploy", pipeline=spec.name,
                                            model="{{ ti.xcom_pull(task_ids='resolve') }}")
        resolve >> deploy
    return dag


def batch_schedule(spec: PipelineSpec) -> Any:
    """Its schedule, or new inference data (the inference Asset), or either."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from conveyor.assets import inference_asset

    cron = spec.deploy.batch.schedule
    if cron:
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=inference_asset(spec.name))
    return [inference_asset(spec.name)]


def batch_dag(spec: PipelineSpec) -> DAG:
    """``<name>__batch_predict``: score new data with the live model into Parquet and a SQL table."""
    from airflow.sdk import Param

    from conveyor.assets import predictions_asset
    from conveyor.operators.batch import BatchPredictOperator
    from conveyor.operators.deploy import ResolveModelOperator

    batch = spec.deploy.batch
    table = batch.table or f"{spec.name}_predictions"
    with pipeline_dag(
        spec, "batch_predict",
        description=f"Score new {spec.name} data in batch into Parquet and the {table} table",
        schedule=batch_schedule(spec),
        params={
            "input": Param(batch.input or "", type=["null", "string"], title="Input location",
                           description="A file or folder URI; empty: the oldest complete drop in landing/"
                                       f"{spec.name}/inference/ not scored yet"),
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
        resolve = ResolveModelOperator(task_id="resolve", pipeline=spec.name, version="{{ params.model }}")
        if spec.compute == "sagemaker":  # a SageMaker batch transform job, then the same files and table
            from conveyor.operators.batch_sagemaker import SageMakerBatchPredictOperator

            score = SageMakerBatchPredictOperator(task_id="score", pipeline=spec.name, input_uri="{{ params.input }}",
                                                  model="{{ ti.xcom_pull(task_ids='resolve') }}",
                                                  outlets=[predictions_asset(spec.name)])
        else:
            score = BatchPredictOperator(task_id="score", pipeline=spec.name, input_uri="{{ params.input }}",
                                         model="{{ ti.xcom_pull(task_ids='resolve') }}", outlets=[predictions_asset(spec.name)])
        resolve >> score
    return dag


def monitored(spec: PipelineSpec) -> bool:
    """Monitoring on and something to watch: an endpoint, or batch runs of a tabular pipeline."""
    watched = spec.deploy.endpoint.enabled or (spec.deploy.batch.enabled and spec.data.format != "images")
    return spec.monitor.enabled and watched


def monitor_schedule(spec: PipelineSpec) -> Any:
    """Its schedule (captured endpoint traffic, feedback drops), or a finished batch run, or either."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from conveyor.assets import predictions_asset

    cron = spec.monitor.schedule
    if not spec.deploy.batch.enabled:
        return cron
    if cron:
        return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=predictions_asset(spec.name))
    return [predictions_asset(spec.name)]


def monitor_dag(spec: PipelineSpec) -> DAG:
    """``<name>__monitor``: drift, feedback labels, live metric, and the event that retrains."""
    from airflow.sdk import Param

    from conveyor.assets import retrain_asset
    from conveyor.operators.monitor import (
        CheckDriftOperator,
        IngestFeedbackOperator,
        RetrainDecisionOperator,
        TriggerRetrainOperator,
    )

    xcom = "{{{{ ti.xcom_pull(task_ids='{}') }}}}".format
    m = spec.monitor
    live_rule = (f"below {m.min_live_metric} over at least {m.min_new_labels} new labels"
                 if m.min_live_metric is not None else "not used (no `monitor.min_live_metric`)")
    with pipeline_dag(
        spec, "monitor",
        description=f"Drift, feedback and live {m.metric or spec.gate.metric} of {spec.name}; retrains when needed",
        schedule=monitor_schedule(spec),
        params={"input": Param("", type=["null", "string"], title="Also check this input",
                               description="Optional: a CSV/Parquet file or folder URI compared with the live "
                                           "model's training baseline")},
        doc_md=f"""
### {spec.name}: monitor
Runs on `{m.schedule}` and after every batch prediction run, or by hand.

1. **drift** — every new batch run and new slice of captured endpoint traffic is compared with the
   training baseline of the model version that scored it (PSI {m.psi_threshold}, KS/chi-square
   p < {m.ks_pvalue}, missing rate ± {m.missing_rate}).
2. **feedback** — label drops in `landing/{spec.name}/feedback/<drop>/` (`id,label`, marker
   `{m.feedback_marker}`) and `POST /feedback` on the endpoint; bad rows are kept in quarantine.
3. **decide** — live `{m.metric or spec.gate.metric}` per day; retrain when more than
   {m.max_drift_share:.0%} of features drift, the predictions drift, or the live metric is {live_rule};
   at most once per {m.cooldown_hours} h. Report: `reports/{spec.name}/<run>/monitor/index.html`.
4. **trigger_retrain** — updates the `{spec.name}.retrain` Asset, which starts `{spec.name}__train` on the
   latest dataset plus the newly labelled rows.
""",
    ) as dag:
        drift = CheckDriftOperator(task_id="drift", pipeline=spec.name, input_uri="{{ params.input }}")
        feedback = IngestFeedbackOperator(task_id="feedback", pipeline=spec.name)
        decide = RetrainDecisionOperator(task_id="decide", pipeline=spec.name, drift=xcom("drift"),
                                         feedback=xcom("feedback"), trigger_rule="none_failed")
        trigger = TriggerRetrainOperator(task_id="trigger_retrain", pipeline=spec.name, decision=xcom("decide"),
                                         outlets=[retrain_asset(spec.name)])
        drift >> feedback >> decide >> trigger
    return dag


def build_for(spec: PipelineSpec) -> list[DAG]:
    """The DAG family of one pipeline: what its spec turns on."""
    dags = [ingest_dag(spec), train_dag(spec)]
    if spec.deploy.endpoint.enabled:
        dags.append(deploy_dag(spec))
    if spec.deploy.batch.enabled:
        dags.append(batch_dag(spec))
    if monitored(spec):
        dags.append(monitor_dag(spec))
    return dags


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
        for dag in build_for(spec):
            dags[dag.dag_id] = dag
    if errors:
        dags["conveyor__invalid_pipelines"] = InvalidPipelinesDag(errors)
    return dags
