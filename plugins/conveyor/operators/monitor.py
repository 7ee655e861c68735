"""``<name>__monitor``: drift of batch runs and endpoint traffic, feedback labels, live metric, retraining.

The operators orchestrate; the domain is :mod:`conveyor.monitoring` (``checks``, ``records``,
``feedback``, ``live``, ``decisions``, ``labelled``) and the page :mod:`conveyor.reports.monitoring`.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import MonitorReportLink
from conveyor.operators.base import pipeline_spec, translate_errors

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec


class _SpecOperator(BaseOperator):
    """An operator of the monitor DAG: it holds the validated spec (``spec``, shown in Rendered Template)."""

    template_fields_renderers = {"spec": "json"}
    spec: Any

    @property
    def pipeline(self) -> str:
        """The pipeline's name (the report link finds the report by it)."""
        return pipeline_spec(self.spec).name


class CheckDriftOperator(_SpecOperator):
    """Compare every new batch run and every new slice of captured endpoint traffic with its model's baseline.

    Each source is checked once: its rows are kept as observations (for feedback) and its drift
    report is recorded under ``monitor/<pipeline>/checks/``. A source that cannot be checked (a
    column missing or renamed, no rows) is recorded with its error, and the run goes on.
    Returns ``{"checks": [{"source", "id", "rows", "drifted", "drift_share", "error"}]}``.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param input_uri: also check this file or folder against the champion's baseline (templated; optional):
        inside the lake (``Lake.inside``), anything else fails the task before any check.
    """

    template_fields = ("spec", "input_uri")

    def __init__(self, *, spec: Any, input_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.input_uri = input_uri

    def _check(
        self, lake: Lake, pipeline: str, run_id: str, source: str, ident: str, compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Check one source and record the check (its report, or the error that stopped it)."""
        from conveyor.monitoring.decisions import save_check
        from conveyor.monitoring.drift import DriftInputError
        from conveyor.registry import lookup_errors

        check: dict[str, Any] = {
            "source": source,
            "id": ident,
            "run_id": run_id,
            "rows": 0,
            "report": None,
            "error": None,
        }
        recorded: tuple[type[Exception], ...] = (DriftInputError, ValueError, KeyError, *lookup_errors())
        try:
            check.update(compute())
        except recorded as exc:  # a column renamed, no rows, the input gone, a version no longer registered
            check["error"] = f"{source} {ident}: {exc}"
            self.log.warning("Drift check failed: %s", check["error"])
        save_check(lake, pipeline, check)
        report = check["report"] or {}
        self.log.info(
            "%s %s: %s rows, drifted %s (%s)",
            source,
            ident,
            check["rows"],
            report.get("drifted"),
            ", ".join(report.get("drifted_features") or []) or "no feature",
        )
        return check

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.lake import write_json
        from conveyor.monitoring import checks as sources
        from conveyor.monitoring import records
        from conveyor.registry import registry_hook

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        run_id = context["run_id"]
        limits = sources.thresholds(spec.monitor)
        given = lake.inside(self.input_uri, "Param 'input'") if self.input_uri else None
        checks = []
        with tempfile.TemporaryDirectory(prefix="conveyor-monitor-") as tmp:
            models = sources.ModelCache(registry_hook(spec), spec.name, lake, Path(tmp))
            for run in records.unchecked_batch_runs(lake, spec.name):
                compute = partial(sources.check_batch, lake, spec.name, run, models, limits)
                checks.append(self._check(lake, spec.name, run_id, "batch", run, compute))
            slices, offsets = records.capture_slices(lake, spec.name)
            for ident, version, group in sources.capture_groups(slices):
                compute = partial(sources.check_capture, lake, spec, ident, version, group, models, limits)
                checks.append(self._check(lake, spec.name, run_id, "capture", f"{ident}/v{version}", compute))
            if slices:
                write_json(lake.monitor(spec.name, "capture_offsets.json"), offsets)
            if given:
                compute = partial(sources.check_input, lake, spec, given, models, limits)
                checks.append(self._check(lake, spec.name, run_id, "input", given, compute))
        return {
            "checks": [
                {
                    "source": c["source"],
                    "id": c["id"],
                    "rows": c["rows"],
                    "error": c["error"],
                    "drifted": bool((c["report"] or {}).get("drifted")),
                    "drift_share": (c["report"] or {}).get("drift_share"),
                }
                for c in checks
            ]
        }


def champion_metadata(spec: PipelineSpec, lake: Lake, champion: Any) -> ModelMetadata:
    """The champion's metadata, from the sidecar beside its archive (the model is not downloaded).

    :param spec: the pipeline.
    :param lake: the lake (its connection reads the sidecar).
    :param champion: the registry's champion version.
    """
    from conveyor.model.metadata import read_sidecar
    from conveyor.registry import registry_hook

    source = registry_hook(spec).version(spec.name, str(champion.version)).source
    return read_sidecar(str(source), lake.conn_id)


class IngestFeedbackOperator(_SpecOperator):
    """Take the complete feedback drops in ``landing/<pipeline>/feedback/``: check every row, keep the good ones.

    Accepted labels go to ``monitor/<pipeline>/labels/<drop>.parquet``; rejected rows, each with
    the rule it broke, to ``quarantine/<pipeline>/feedback/<drop>/rejected.csv``; an unreadable
    drop is moved to quarantine whole. Drops are marked processed. Returns the counts.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    """

    template_fields = ("spec",)

    def __init__(self, *, spec: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.data.drops import find_complete_drops
        from conveyor.monitoring import records
        from conveyor.registry import registry_hook

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        root = lake.landing(spec.name, "feedback")
        counts: dict[str, Any] = {
            "drops": 0,
            "received": 0,
            "accepted": 0,
            "unknown_ids": 0,
            "duplicates": 0,
            "out_of_set": 0,
            "rejected_drops": 0,
            "rejected_examples": [],
        }
        drops = find_complete_drops(root, spec.monitor.feedback_marker)
        if not drops:
            self.log.info("No new feedback drop in %s", root)
            return counts
        champion = registry_hook(spec).champion(spec.name)
        classes = None
        if spec.data.problem_type != "regression":
            if champion is None:
                raise AirflowSkipException(f"{spec.name} has no champion model yet: feedback waits in {root}")
            classes = [str(c) for c in champion_metadata(spec, lake, champion).class_labels or []]
        known = records.known_ids(lake, spec.name)
        labelled = set(records.load_labels(lake, spec.name)["id"].astype(str))
        for drop in drops:
            self._take_drop(lake, spec, drop, classes, known, labelled, counts, context)
        counts["rejected_examples"] = counts["rejected_examples"][:20]
        self.log.info("Feedback: %s", {k: v for k, v in counts.items() if k != "rejected_examples"})
        return counts

    def _take_drop(
        self,
        lake: Lake,
        spec: PipelineSpec,
        drop: str,
        classes: list[str] | None,
        known: set[str],
        labelled: set[str],
        counts: dict[str, Any],
        context: Any,
    ) -> None:
        """Check one drop's rows, keep the accepted labels and the rejected rows, mark it processed."""
        import pandas as pd

        from conveyor.data.drops import drop_files, mark_processed, quarantine_drop
        from conveyor.monitoring import feedback, records

        run_id = context["run_id"]
        name = f"feedback/{drop}"
        counts["drops"] += 1
        try:
            rows = feedback.read_drop(drop_files(lake.landing(spec.name, name), spec.monitor.feedback_marker), spec)
        except feedback.FeedbackDropError as exc:
            counts["rejected_drops"] += 1
            where = quarantine_drop(lake, spec.name, name, run_id, {"rule": str(exc), "drop": drop}, 1 << 20)
            self.log.error("Feedback drop %s rejected (%s); kept in %s", drop, exc, where)
            counts["rejected_examples"].append({"id": None, "label": None, "rule": f"drop {drop}: {exc}"})
            return
        accepted, rejected = feedback.check_rows(rows, classes, known, labelled, spec.monitor.feedback_duplicates)
        counts["received"] += len(rows)
        counts["accepted"] += len(accepted)
        for key, value in feedback.rule_counts(rejected).items():
            counts[key] += value
        if len(accepted):
            received_at = context["dag_run"].run_after.isoformat()
            labels = accepted[["id", "label"]].assign(received_at=received_at, drop=drop)
            records.save_labels(lake, spec.name, drop, labels)
            labelled |= set(labels["id"])
        if len(rejected):
            target = feedback.save_rejected(lake, spec.name, drop, rejected)
            counts["rejected_examples"] += rejected[["id", "label", "rule"]].head(20).to_dict("records")
            self.log.warning(
                "Feedback drop %s: %s of %s rows rejected (kept with their rule in %s): %s",
                drop,
                len(rejected),
                len(rows),
                target,
                pd.Series(rejected["rule"]).value_counts().to_dict(),
            )
        mark_processed(lake, spec.name, name, {"run_id": run_id, "accepted": len(accepted), "rejected": len(rejected)})


class RetrainDecisionOperator(_SpecOperator):
    """Live metric from feedback, the retraining decision, the history, and the monitor report.

    Writes ``reports/<pipeline>/<run>/monitor/index.html`` (drift per source with plots, drift
    history, live metric over time, labels) and ``monitor/<pipeline>/triggers/<run>.json``. When
    retraining fires, the labelled rows for training go to ``monitor/<pipeline>/retrain/<run>/``.
    Returns the decision with the report's URI (and ``labelled_uri``/``labelled_rows`` when fired).

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param drift: the drift task's result (templated XCom).
    :param feedback: the feedback task's result (templated XCom).
    """

    template_fields = ("spec", "drift", "feedback")
    operator_extra_links = (MonitorReportLink(),)

    def __init__(self, *, spec: Any, drift: Any = None, feedback: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.drift = drift
        self.feedback = feedback

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.monitoring import decisions, labelled, live, records
        from conveyor.registry import registry_hook

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        run_id = context["run_id"]
        now = context["dag_run"].run_after
        checks = decisions.run_checks(lake, spec.name, run_id)
        decisions.save_history(lake, spec.name, run_id, now.isoformat(), checks)
        champion = registry_hook(spec).champion(spec.name)
        metric = spec.monitor.metric or spec.gate.metric
        current: dict[str, Any] = {"metric": metric, "value": None, "labels": 0, "version": None}
        series: list[dict[str, Any]] = []
        triggers = [t for t in decisions.load_triggers(lake, spec.name) if t.get("run_id") != run_id]
        every = records.joined(records.load_observations(lake, spec.name), records.load_labels(lake, spec.name))
        rows = labelled.current_labels(every, spec.monitor.feedback_duplicates)  # one label per id
        model: dict[str, Any] = {"name": spec.name, "version": None, "metric": metric, "baseline_metric": None}
        metadata = None
        if champion is not None:
            version = str(champion.version)
            metadata = champion_metadata(spec, lake, champion)
            problem = spec.data.problem_type
            series = live.live_series(rows, problem, metric, *live.scoring(metadata))
            current = live.live_metric(rows, problem, metric, version, metadata, decisions.last_fired(triggers))
            trained_in = (getattr(champion, "tags", None) or {}).get("conveyor_run_id")
            model |= {"version": version, "baseline_metric": live.evaluation_score(lake, spec.name, trained_in, metric)}
        decision = decisions.decide(spec, checks, current, triggers, now) | {"run_id": run_id, "live": current}
        if decision["retrain"] and metadata is not None and len(rows) and spec.data.format != "images":
            # (image rows are statistics, not the images: image pipelines retrain on the latest dataset)
            # reject: every label, so the split keeps the conflicting ids aside with a report
            saved = every if spec.monitor.feedback_duplicates == "reject" else rows
            uri, count = labelled.save_labelled_rows(lake, spec, run_id, saved, metadata)
            decision |= {"labelled_uri": uri, "labelled_rows": count}
        decisions.save_decision(lake, spec.name, run_id, decision)
        report = self._report(lake, spec.name, run_id, model, checks, series, decision)
        self.log.info(
            "Retrain: %s (%s); report: %s", decision["retrain"], "; ".join(decision["reasons"]) or "no reason", report
        )
        if decision["suppressed_by_cooldown"]:
            self.log.info("Suppressed by the cool-down until %s", decision["cooldown_until"])
        return {
            "retrain": decision["retrain"],
            "reasons": decision["reasons"],
            "report": report,
            "suppressed_by_cooldown": decision["suppressed_by_cooldown"],
            "live": current,
            "labelled_uri": decision.get("labelled_uri"),
            "labelled_rows": decision.get("labelled_rows", 0),
        }

    def _report(
        self,
        lake: Lake,
        pipeline: str,
        run_id: str,
        model: dict[str, Any],
        checks: list[dict[str, Any]],
        series: list[dict[str, Any]],
        decision: dict[str, Any],
    ) -> str:
        """Write the monitor report into ``reports/<pipeline>/<run>/monitor/``; returns its URI."""
        from conveyor.lake import upload_tree
        from conveyor.monitoring.decisions import load_history
        from conveyor.reports.monitoring import write_monitor_report

        feedback = self.feedback if isinstance(self.feedback, dict) else {}
        labels = {
            "received": feedback.get("received", 0),
            "accepted": feedback.get("accepted", 0),
            "unknown_ids": feedback.get("unknown_ids", 0),
            "duplicates": feedback.get("duplicates", 0),
            "out_of_set": feedback.get("out_of_set", 0),
            "new_since_training": decision["live"]["labels"],
            "rejected_examples": feedback.get("rejected_examples", []),
        }
        target = lake.reports(pipeline, run_id) / "monitor"
        with tempfile.TemporaryDirectory(prefix="conveyor-monitor-report-") as tmp:
            write_monitor_report(
                Path(tmp),
                pipeline=pipeline,
                model=model,
                sources=checks,
                history=load_history(lake, pipeline),
                live=series,
                labels=labels,
                decision=decision,
            )
            upload_tree(Path(tmp), target)
        return str(target / "index.html")


class TriggerRetrainOperator(_SpecOperator):
    """Emit the ``<name>.retrain`` Asset event (which schedules ``<name>__train``) when the decision says so.

    Skipped otherwise, so no event is emitted. The event's extra says why and where the newly
    labelled rows are.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param decision: the decide task's result (templated XCom).
    """

    template_fields = ("spec", "decision")

    def __init__(self, *, spec: Any, decision: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.decision = decision

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.assets import retrain_asset

        name = pipeline_spec(self.spec).name
        if not self.decision or not self.decision.get("retrain"):
            cooled = (self.decision or {}).get("suppressed_by_cooldown")
            why = "suppressed by the cool-down" if cooled else "no reason to"
            raise AirflowSkipException(f"not retraining {name}: {why}")
        extra = {
            "reasons": self.decision["reasons"],
            "labelled_uri": self.decision.get("labelled_uri"),
            "labelled_rows": self.decision.get("labelled_rows", 0),
            "monitor_run": context["run_id"],
            "report": self.decision.get("report"),
        }
        context["outlet_events"][retrain_asset(name)].extra = extra
        self.log.info("Retraining %s: %s", name, "; ".join(extra["reasons"]))
        return extra
