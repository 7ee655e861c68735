"""``<name>__monitor``: drift, feedback labels, live metric, and the event that retrains."""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG

from conveyor.factory.common import pipeline_dag, spec_arg
from conveyor.spec import PipelineSpec


def monitor_schedule(spec: PipelineSpec) -> Any:
    """Its schedule (captured endpoint traffic, feedback drops), or a finished batch run, or either."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from conveyor.assets import predictions_asset

    cron = spec.monitor.schedule
    if not spec.deploy.batch.enabled:
        return cron
    if cron:
        return AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=predictions_asset(spec.name)
        )
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
    live_rule = (
        f"below {m.min_live_metric} over at least {m.min_new_labels} new labels"
        if m.min_live_metric is not None
        else "not used (no `monitor.min_live_metric`)"
    )
    with pipeline_dag(
        spec,
        "monitor",
        description=f"Drift, feedback and live {m.metric or spec.gate.metric} of {spec.name}; retrains when needed",
        schedule=monitor_schedule(spec),
        params={
            "input": Param(
                "",
                type=["null", "string"],
                title="Also check this input",
                description="Optional: a CSV/Parquet file or folder URI compared with the live "
                "model's training baseline",
            )
        },
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
        drift = CheckDriftOperator(task_id="drift", spec=spec_arg(spec), input_uri="{{ params.input }}")
        feedback = IngestFeedbackOperator(task_id="feedback", spec=spec_arg(spec))
        decide = RetrainDecisionOperator(
            task_id="decide",
            spec=spec_arg(spec),
            drift=xcom("drift"),
            feedback=xcom("feedback"),
            trigger_rule="none_failed",
        )
        trigger = TriggerRetrainOperator(
            task_id="trigger_retrain", spec=spec_arg(spec), decision=xcom("decide"), outlets=[retrain_asset(spec.name)]
        )
        drift >> feedback >> decide >> trigger
    return dag
