"""``<name>__train``: split, train, evaluate, gate, register, approve, publish."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, BaseOperator

from conveyor import settings
from conveyor.factory.common import monitored, pipeline_dag, spec_arg
from conveyor.spec import PipelineSpec


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

    from conveyor.lake import DATASET_VERSION

    params = {
        "dataset_version": Param(
            "",
            type=["null", "string"],
            pattern=f"^({DATASET_VERSION.pattern})?$",  # the form refuses anything but v-<hex> (the operator too)
            title="Dataset version",
            description="Empty: the version that triggered the run, else the latest validated",
        ),
        "labelled_rows": Param(
            "",
            type=["null", "string"],
            title="Newly labelled rows",
            description="Empty: those of the retraining event that started the run, if any; "
            "else a Parquet URI of labelled rows added to the dataset",
        ),
        "time_limit": Param(spec.trainer.time_limit, type="integer", minimum=1, title="Time budget (seconds)"),
        "deploy": Param(spec.deploy.endpoint.enabled, type="boolean", title="Deploy once approved"),
    }
    if spec.trainer.kind == "autogluon":
        presets = ["medium_quality", "good_quality", "high_quality", "best_quality", "optimize_for_deployment"]
        if spec.trainer.presets not in presets:
            presets.append(spec.trainer.presets)
        params["presets"] = Param(spec.trainer.presets, enum=presets, title="AutoGluon presets")
    return params


def _xcom(task_id: str) -> str:
    """A template pulling the return value of ``task_id``.

    :param task_id: the upstream task.
    """
    return f"{{{{ ti.xcom_pull(task_ids='{task_id}') }}}}"


def _tuning_doc(spec: PipelineSpec) -> str:
    """The train task's tuning line of the DAG's doc (empty without ``tuning:``)."""
    tuning = spec.tuning
    if tuning is None:
        return ""
    how = "a SageMaker hyperparameter tuning job" if spec.compute == "sagemaker" else "Optuna trials"
    return (
        f"\n   Tuned first: {tuning.trials} trials ({how}, {tuning.parallel} at a time) of "
        f"{', '.join(tuning.search_space)}, {tuning.goal} validation `{tuning.metric}`; the best trial's model goes on."
    )


def train_doc(spec: PipelineSpec) -> str:
    """The train DAG's ``doc_md``: when it runs and what each task does, for this spec.

    :param spec: the pipeline.
    """
    return f"""
### {spec.name}: train
Runs on new validated data (the `{spec.name}.dataset` Asset), on its retrain schedule
(`{spec.retrain.schedule}`), or by hand with the form (dataset version, time budget, presets, deploy).

1. **split** — seeded ({spec.split.seed}), stratified train/validation/test split under
   `models/{spec.name}/<run>/split/`.
2. **train** — `include/training/` script in SageMaker script mode, {
        "as a SageMaker training job" if spec.compute == "sagemaker" else "as a child process"
    }; writes `models/{spec.name}/<run>/model.tar.gz`.{_tuning_doc(spec)}
3. **evaluate** — test-set metrics and plots: `reports/{spec.name}/<run>/evaluation/index.html`.
4. **gate** — thresholds {dict(spec.gate.thresholds)} and a gain of at least {spec.gate.min_improvement}
   in `{spec.gate.metric}` over the champion, both scored on this test set:
   `reports/{spec.name}/<run>/gate/index.html`. On reject: **{spec.gate.on_reject}**.
5. **register** — a new version of `{spec.name}` in the {
        "SageMaker Model Registry" if spec.registry == "sagemaker" else "MLflow registry"
    } (`PendingManualApproval`).
6. **approve** — **{spec.approval}**: approval sets `Approved` and makes it the champion.
7. **publish** — updates the `{spec.name}.model` Asset (version, deploy flag): it starts `{spec.name}__deploy`.
"""


def _train_task(spec: PipelineSpec, spec_json: str) -> BaseOperator:
    """The ``train`` task: a SageMaker training job (deferred wait), or a local child process.

    :param spec: the pipeline.
    :param spec_json: the validated spec every task of the DAG receives.
    """
    if spec.tuning is not None:
        return _tune_task(spec, spec_json)
    if spec.compute == "sagemaker":  # a SageMaker training job, deferred wait (operators/train_sagemaker.py)
        from conveyor.aws.training import wait_limit_seconds
        from conveyor.operators.train_sagemaker import SageMakerTrainModelOperator

        return SageMakerTrainModelOperator(
            task_id="train",
            spec=spec_json,
            split=_xcom("split"),
            time_limit="{{ params.time_limit }}",
            presets="{{ params.get('presets') }}",
            execution_timeout=timedelta(seconds=wait_limit_seconds(spec) + 1800),
        )
    from conveyor.operators.train import TrainModelOperator

    return TrainModelOperator(
        task_id="train",
        spec=spec_json,
        split=_xcom("split"),
        time_limit="{{ params.time_limit }}",
        presets="{{ params.get('presets') }}",
        execution_timeout=timedelta(seconds=spec.trainer.time_limit * 3 + 900),
        **({"queue": settings.gpu_queue()} if spec.trainer.gpu else {}),  # else the default queue
    )


def _tune_task(spec: PipelineSpec, spec_json: str) -> BaseOperator:
    """The ``train`` task of a pipeline with ``tuning:``: trials, then the best one's model goes on.

    Locally Optuna trials of the training script (``conveyor.training.tuning``); on SageMaker a
    hyperparameter tuning job through the provider's operator (``operators/tune_sagemaker.py``).

    :param spec: the pipeline (with its ``tuning`` block).
    :param spec_json: the validated spec every task of the DAG receives.
    """
    assert spec.tuning is not None
    budget = spec.tuning.budget or spec.trainer.time_limit
    waves = -(-spec.tuning.trials // spec.tuning.parallel)
    if spec.compute == "sagemaker":
        from conveyor.aws.training import wait_limit_seconds
        from conveyor.operators.tune_sagemaker import SageMakerTuneModelOperator

        return SageMakerTuneModelOperator(
            task_id="train",
            spec=spec_json,
            split=_xcom("split"),
            time_limit="{{ params.time_limit }}",
            presets="{{ params.get('presets') }}",
            aws_conn_id=spec.sagemaker.aws_conn_id,
            region_name=spec.sagemaker.region,
            deferrable=True,
            check_interval=spec.sagemaker.check_interval_seconds,
            execution_timeout=timedelta(seconds=waves * wait_limit_seconds(spec) + 1800),
        )
    from conveyor.operators.train import TrainModelOperator
    from conveyor.training.tuning import start_cutoff

    trial = spec.tuning.trial_seconds(budget)
    return TrainModelOperator(
        task_id="train",
        spec=spec_json,
        split=_xcom("split"),
        time_limit="{{ params.time_limit }}",
        presets="{{ params.get('presets') }}",
        # no trial starts after the cut-off; the last ones may take their own limit (1.5 x + 300 s)
        execution_timeout=timedelta(seconds=int(start_cutoff(spec.tuning, budget) + trial * 1.5 + 300) + 900),
        **({"queue": settings.gpu_queue()} if spec.trainer.gpu else {}),
    )


def _approve_task(spec: PipelineSpec, spec_json: str) -> BaseOperator:
    """The ``approve`` task: automatic, or a person's decision (``ModelApprovalOperator``).

    :param spec: the pipeline.
    :param spec_json: the validated spec every task of the DAG receives.
    """
    from conveyor.operators.registry import AutoApproveOperator, ModelApprovalOperator

    if spec.approval == "auto":
        return AutoApproveOperator(task_id="approve", spec=spec_json, registration=_xcom("register"))
    return ModelApprovalOperator(
        task_id="approve",
        spec=spec_json,
        subject=f"Approve {spec.name} model version {{{{ ti.xcom_pull(task_ids='register')['version'] }}}}?",
        body="{{ ti.xcom_pull(task_ids='gate')['summary_md'] }}\n\nReports: "
        "{{ ti.xcom_pull(task_ids='gate')['report'] }}",
        retries=0,
    )


def train_dag(spec: PipelineSpec) -> DAG:
    """``<name>__train``: split, train, evaluate, gate, register, approve."""
    from conveyor.assets import model_asset
    from conveyor.operators.gate import GateModelOperator
    from conveyor.operators.registry import PublishModelOperator, RegisterModelOperator
    from conveyor.operators.train import EvaluateModelOperator, SplitDatasetOperator

    spec_json = spec_arg(spec)  # one per DAG: every task shows the same validated spec
    with pipeline_dag(
        spec,
        "train",
        description=f"Train, evaluate, gate, register and approve a {spec.name} model",
        schedule=train_schedule(spec),
        params=train_params(spec),
        doc_md=train_doc(spec),
    ) as dag:
        split = SplitDatasetOperator(
            task_id="split",
            spec=spec_json,
            dataset_version="{{ params.dataset_version }}",
            labelled_rows="{{ params.get('labelled_rows') or '' }}",
        )
        train = _train_task(spec, spec_json)
        evaluate = EvaluateModelOperator(task_id="evaluate", spec=spec_json, model=_xcom("train"))
        gate = GateModelOperator(task_id="gate", spec=spec_json, model=_xcom("train"), evaluation=_xcom("evaluate"))
        register = RegisterModelOperator(
            task_id="register",
            spec=spec_json,
            model=_xcom("train"),
            gate=_xcom("gate"),
            deploy="{{ params.deploy }}",
            evaluation=_xcom("evaluate"),
        )
        approve = _approve_task(spec, spec_json)
        publish = PublishModelOperator(
            task_id="publish",
            spec=spec_json,
            registration=_xcom("register"),
            deploy="{{ params.deploy }}",
            outlets=[model_asset(spec.name)],
        )
        split >> train >> evaluate >> gate >> register >> approve >> publish
    return dag
