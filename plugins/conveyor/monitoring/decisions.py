"""The monitor's decisions: the checks of a run, the drift history, and whether (and why) to retrain.

Under ``monitor/<pipeline>/`` (see :mod:`conveyor.monitoring.records` for the whole layout):

```
checks/<source>-<id>.json            the drift check of one source (or its error): never checked twice
history/<run>.json                   one record per monitor run (every source it checked)
triggers/<run>.json                  every retraining decision, fired or not, with its reasons
```

Names derive from run ids and source ids, never from the clock. Importing this module is cheap
(standard library only).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from conveyor.lake import Lake, read_json, safe_name, write_json

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.spec import MonitorSpec, PipelineSpec


def _records(folder: ObjectStoragePath) -> list[dict[str, Any]]:
    """Every JSON record in a folder, in name order (names derive from run ids, not the clock).

    :param folder: the folder.
    """
    if not folder.exists():
        return []
    return [read_json(p) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".json")]


# ------------------------------------------------------------------------------------------ checks


def source_key(source: str, ident: str) -> str:
    """The file stem of a source's records: ``batch-<run>`` or ``capture-<slice>``.

    :param source: ``batch``, ``capture`` or ``input``.
    :param ident: the batch run, capture slice or input URI.
    """
    return safe_name(f"{source}-{ident}")


def save_check(lake: Lake, pipeline: str, check: dict[str, Any]) -> None:
    """Record that a source was checked (its report or error), so it is not checked again.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param check: ``{"source", "id", "run_id", "rows", "report", "error", ...}``.
    """
    write_json(lake.monitor(pipeline, "checks", f"{source_key(check['source'], check['id'])}.json"), check)


def run_checks(lake: Lake, pipeline: str, run_id: str) -> list[dict[str, Any]]:
    """The checks a monitor run recorded (its drift task), in name order.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run_id: the monitor run.
    """
    return [check for check in _records(lake.monitor(pipeline, "checks")) if check.get("run_id") == run_id]


# ----------------------------------------------------------------------------------------- history


def history_record(check: Mapping[str, Any], at: str) -> dict[str, Any]:
    """The line a source's check leaves in the drift history.

    :param check: ``{"source", "id", "rows", "report", "error"}``.
    :param at: the monitor run's time (ISO).
    """
    report = check.get("report") or {}
    features = report.get("features") or {}
    psis = [f["psi"] for f in features.values() if f.get("psi") is not None]
    prediction = report.get("prediction") or {}
    return {
        "at": at,
        "source": check["source"],
        "id": check["id"],
        "rows": check.get("rows", 0),
        "drift_share": report.get("drift_share"),
        "drifted_features": report.get("drifted_features", []),
        "max_psi": max(psis) if psis else None,
        "prediction_psi": prediction.get("psi"),
        "drifted": bool(report.get("drifted")),
        "error": check.get("error"),
    }


def save_history(lake: Lake, pipeline: str, run_id: str, at: str, checks: list[dict[str, Any]]) -> None:
    """Write the monitor run's history record (one line per checked source); a re-run replaces it.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run_id: the monitor run.
    :param at: the run's time (ISO).
    :param checks: the run's checks.
    """
    write_json(
        lake.monitor(pipeline, "history", f"{safe_name(run_id)}.json"),
        {"run_id": run_id, "at": at, "sources": [history_record(c, at) for c in checks]},
    )


def load_history(lake: Lake, pipeline: str) -> list[dict[str, Any]]:
    """Every history line, oldest monitor run first.

    :param lake: the lake.
    :param pipeline: the pipeline.
    """
    lines = []
    for record in _records(lake.monitor(pipeline, "history")):
        lines += record.get("sources", [])
    return sorted(lines, key=lambda line: line["at"])


# ---------------------------------------------------------------------------------------- triggers


def load_triggers(lake: Lake, pipeline: str) -> list[dict[str, Any]]:
    """Every retraining decision, oldest first.

    :param lake: the lake.
    :param pipeline: the pipeline.
    """
    return sorted(_records(lake.monitor(pipeline, "triggers")), key=lambda t: t["at"])


def save_decision(lake: Lake, pipeline: str, run_id: str, decision: dict[str, Any]) -> None:
    """Record a monitor run's retraining decision, fired or not (a re-run replaces it).

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run_id: the monitor run.
    :param decision: what :func:`decide` returned, with the run's additions.
    """
    write_json(lake.monitor(pipeline, "triggers", f"{safe_name(run_id)}.json"), decision)


def last_fired(triggers: list[dict[str, Any]]) -> datetime | None:
    """When retraining last fired, from the trigger records.

    :param triggers: trigger records (``at``, ``retrain``).
    """
    times = [datetime.fromisoformat(t["at"]) for t in triggers if t.get("retrain")]
    return max(times) if times else None


def _drift_reasons(monitor: MonitorSpec, checks: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The drift reasons to retrain, and notes on sources too small for a verdict.

    :param monitor: the pipeline's monitor settings.
    :param checks: this run's source checks.
    """
    reasons, notes = [], []
    for check in checks:
        report = check.get("report")
        if not report:
            continue
        if int(check.get("rows") or report.get("rows") or 0) < monitor.min_rows:
            notes.append(
                f"{check['source']} {check['id']}: {check.get('rows')} rows, fewer than monitor.min_rows "
                f"({monitor.min_rows}): reported, no drift verdict"
            )
            continue
        share = report.get("drift_share") or 0.0
        if report.get("drifted_features") and share > monitor.max_drift_share:
            reasons.append(
                f"data drift in {check['source']} {check['id']}: {len(report['drifted_features'])} of "
                f"{len(report['features'])} features drifted ({share:.0%} > {monitor.max_drift_share:.0%}): "
                f"{', '.join(report['drifted_features'][:10])}"
            )
        prediction = report.get("prediction") or {}
        if monitor.retrain_on_prediction_drift and prediction.get("drifted"):
            reasons.append(
                f"prediction drift in {check['source']} {check['id']}: "
                f"{'; '.join(prediction.get('reasons') or ['distribution moved'])}"
            )
    return reasons, notes


def decide(
    spec: PipelineSpec,
    checks: list[dict[str, Any]],
    live: dict[str, Any],
    triggers: list[dict[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """Whether to retrain now, and why (every reason is kept, fired or not).

    Drift: a source of at least ``monitor.min_rows`` rows whose share of drifted features exceeds
    ``monitor.max_drift_share``, or whose prediction distribution drifted (when
    ``retrain_on_prediction_drift``). Live metric: below
    ``monitor.min_live_metric`` over at least ``monitor.min_new_labels`` labels of the live
    version received since the last trigger. A trigger within ``cooldown_hours`` of the last one
    is suppressed (recorded, not fired).

    :param spec: the pipeline (its ``monitor`` settings).
    :param checks: this run's source checks.
    :param live: ``{"version", "metric", "value", "labels"}`` of the live version's new labels.
    :param triggers: earlier trigger records.
    :param now: the run's time (timezone-aware).
    """
    monitor = spec.monitor
    reasons, notes = _drift_reasons(monitor, checks)
    value, count = live.get("value"), int(live.get("labels") or 0)
    if (
        monitor.min_live_metric is not None
        and value is not None
        and count >= monitor.min_new_labels
        and value < monitor.min_live_metric
    ):
        reasons.append(
            f"live {live['metric']} of version {live.get('version')} is {value:.4f} < "
            f"{monitor.min_live_metric} over {count} new labels (at least {monitor.min_new_labels} needed)"
        )
    last = last_fired(triggers)
    until = last + timedelta(hours=monitor.cooldown_hours) if last else None
    suppressed = bool(reasons) and until is not None and now < until
    return {
        "retrain": bool(reasons) and not suppressed,
        "reasons": reasons,
        "notes": notes,
        "suppressed_by_cooldown": suppressed,
        "cooldown_until": until.isoformat() if until else None,
        "last_trigger": last.isoformat() if last else None,
        "at": now.isoformat(),
        "thresholds": {
            "psi": monitor.psi_threshold,
            "ks_pvalue": monitor.ks_pvalue,
            "missing_rate": monitor.missing_rate,
            "max_drift_share": monitor.max_drift_share,
            "min_rows": monitor.min_rows,
            "min_live_metric": monitor.min_live_metric,
            "min_new_labels": monitor.min_new_labels,
            "cooldown_hours": monitor.cooldown_hours,
        },
    }
