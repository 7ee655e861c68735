"""``<name>__monitor``: drift of batch runs and endpoint traffic, feedback labels, live metric, retraining."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import MonitorReportLink


def registry_for(spec: Any) -> Any:
    """The pipeline's model registry hook."""
    try:
        from conveyor.registry import registry_hook
    except ImportError:  # the registry abstraction is newer than this module's first version
        from conveyor.registry.mlflow import MlflowRegistryHook

        return MlflowRegistryHook()
    return registry_hook(spec)


class ModelCache:
    """Model versions fetched once per task: metadata for baselines, loaded models for parsing captures.

    :param spec: the pipeline.
    :param lake: the lake.
    :param scratch: a folder for the extracted archives.
    """

    def __init__(self, spec: Any, lake: Lake, scratch: Path):
        self.spec, self.lake, self.scratch = spec, lake, scratch
        self._dirs: dict[str, Path] = {}
        self._loaded: dict[str, Any] = {}

    def folder(self, version: str) -> Path:
        from conveyor.model.artifacts import fetch

        if version not in self._dirs:
            source = registry_for(self.spec).version(self.spec.name, version).source
            self._dirs[version] = fetch(source, self.scratch / f"v{version}", self.lake.conn_id)
        return self._dirs[version]

    def metadata(self, version: str) -> dict[str, Any]:
        import json

        return json.loads((self.folder(version) / "metadata.json").read_text())

    def loaded(self, version: str) -> Any:
        from conveyor.model.artifacts import LoadedModel

        if version not in self._loaded:
            self._loaded[version] = LoadedModel(self.folder(version))
        return self._loaded[version]


def evaluation_metric(lake: Lake, pipeline: str, version: Any, metric: str) -> float | None:
    """A registered version's test-set score at evaluation (its training run's ``metrics.json``), if stored."""
    from conveyor.lake import read_json

    run = (getattr(version, "tags", None) or {}).get("conveyor_run_id")
    path = lake.reports(pipeline, run) / "evaluation" / "metrics.json" if run else None
    if path is None or not path.exists():
        return None
    value = read_json(path).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def thresholds(spec: Any) -> dict[str, float]:
    return {"psi": spec.monitor.psi_threshold, "ks_pvalue": spec.monitor.ks_pvalue,
            "missing_rate": spec.monitor.missing_rate}


def feature_names(metadata: dict[str, Any]) -> list[str]:
    return [f["name"] if isinstance(f, dict) else str(f) for f in metadata["features"]]


class CheckDriftOperator(BaseOperator):
    """Compare every new batch run and every new slice of captured endpoint traffic with its model's baseline.

    Each source is checked once: its rows are kept as observations (for feedback) and its drift
    report is recorded under ``monitor/<pipeline>/checks/``. A source that cannot be checked (a
    column missing or renamed, no rows) is recorded with its error, and the run goes on.
    Returns ``{"checks": [{"source", "id", "rows", "drifted", "drift_share", "error"}]}``.

    :param pipeline: the pipeline's name.
    :param input_uri: also check this file or folder against the champion's baseline (templated; optional).
    """

    template_fields = ("pipeline", "input_uri")

    def __init__(self, *, pipeline: str, input_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.input_uri = input_uri

    def _check(self, lake: Lake, spec: Any, run_id: str, source: str, ident: str, compute: Any) -> dict[str, Any]:
        from conveyor.monitoring import records as monitoring
        from conveyor.monitoring.drift import DriftInputError
        from conveyor.registry import lookup_errors

        check: dict[str, Any] = {"source": source, "id": ident, "run_id": run_id, "rows": 0, "report": None, "error": None}
        try:
            check.update(compute())
        except (DriftInputError, ValueError, KeyError, *lookup_errors()) as exc:  # e.g. a version no longer registered
            check["error"] = f"{source} {ident}: {exc}"
            self.log.warning("Drift check failed: %s", check["error"])
        monitoring.save_check(lake, self.pipeline, check)
        report = check["report"] or {}
        self.log.info("%s %s: %s rows, drifted %s (%s)", source, ident, check["rows"], report.get("drifted"),
                      ", ".join(report.get("drifted_features") or []) or "no feature")
        return check

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.monitoring import records as monitoring
        from conveyor.monitoring.drift import drift_report, image_drift
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        limits = thresholds(spec)
        checks = []
        with tempfile.TemporaryDirectory(prefix="conveyor-monitor-") as tmp:
            models = ModelCache(spec, lake, Path(tmp))

            def check_batch(run: str) -> dict[str, Any]:
                inputs, predictions, manifest = monitoring.batch_rows(lake, self.pipeline, run)
                metadata = models.metadata(str(manifest["version"]))
                names = feature_names(metadata)
                report = drift_report(metadata, inputs, predictions["prediction"], limits)
                id_column = metadata.get("id_column")
                ids = predictions[id_column].astype(str) if id_column and id_column in predictions else None
                observed = monitoring.observations(inputs[names], predictions, ids=ids, model_version=str(manifest["version"]),
                                                   scored_at=str(manifest["scored_at"]), source="batch", source_id=run)
                monitoring.write_parquet(lake.monitor(self.pipeline, "observations", f"{monitoring.source_key('batch', run)}.parquet"), observed)
                return {"rows": len(inputs), "report": report, "model_version": str(manifest["version"])}

            for run in monitoring.unchecked_batch_runs(lake, self.pipeline):
                checks.append(self._check(lake, spec, run_id, "batch", run, lambda run=run: check_batch(run)))

            slices, offsets = monitoring.capture_slices(lake, self.pipeline)
            for ident, records in slices:
                by_version: dict[str, list[dict[str, Any]]] = {}
                for record in records:
                    by_version.setdefault(str(record["version"]), []).append(record)
                for version, group in sorted(by_version.items()):
                    def check_capture(version: str = version, group: list = group, ident: str = ident) -> dict[str, Any]:
                        metadata = models.metadata(version)
                        images = spec.data.format == "images"
                        features, predictions, ids, versions, times = monitoring.capture_rows(
                            group, models.loaded, metadata.get("id_column"), images=images)
                        answers = predictions["prediction"] if len(predictions) else None
                        if images:
                            names = list(features.columns)
                            report = image_drift(metadata, features, answers, limits)
                        else:
                            names = feature_names(metadata)
                            report = drift_report(metadata, features, answers, limits)
                        observed = monitoring.observations(features[names], predictions, ids=ids, model_version=versions,
                                                           scored_at=times, source="capture", source_id=f"{ident}/v{version}")
                        key = monitoring.source_key("capture", f"{ident}-v{version}")
                        monitoring.write_parquet(lake.monitor(self.pipeline, "observations", f"{key}.parquet"), observed)
                        return {"rows": len(features), "report": report, "model_version": version}

                    checks.append(self._check(lake, spec, run_id, "capture", f"{ident}/v{version}", check_capture))
            if slices:
                from conveyor.lake import write_json

                write_json(lake.monitor(self.pipeline, "capture_offsets.json"), offsets)

            if self.input_uri:
                def check_input() -> dict[str, Any]:
                    from airflow.sdk import ObjectStoragePath

                    champion = registry_for(spec).champion(self.pipeline)
                    if champion is None:
                        raise ValueError(f"{self.pipeline} has no champion model to compare {self.input_uri} with")
                    metadata = models.metadata(str(champion.version))
                    uri = self.input_uri if "://" in self.input_uri else f"file://{self.input_uri}"
                    frame = monitoring.read_frame(ObjectStoragePath(uri, conn_id=lake.conn_id))
                    return {"rows": len(frame), "report": drift_report(metadata, frame, None, limits),
                            "model_version": str(champion.version)}

                checks.append(self._check(lake, spec, run_id, "input", self.input_uri, check_input))
        return {"checks": [{"source": c["source"], "id": c["id"], "rows": c["rows"], "error": c["error"],
                            "drifted": bool((c["report"] or {}).get("drifted")),
                            "drift_share": (c["report"] or {}).get("drift_share")} for c in checks]}


class IngestFeedbackOperator(BaseOperator):
    """Take the complete feedback drops in ``landing/<pipeline>/feedback/``: check every row, keep the good ones.

    Accepted labels go to ``monitor/<pipeline>/labels/<drop>.parquet``; rejected rows, each with
    the rule it broke, to ``quarantine/<pipeline>/feedback/<drop>/rejected.csv``; an unreadable
    drop is moved to quarantine whole. Drops are marked processed. Returns the counts.

    :param pipeline: the pipeline's name.
    """

    template_fields = ("pipeline",)

    def __init__(self, *, pipeline: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def execute(self, context: Any) -> dict[str, Any]:
        import pandas as pd

        from conveyor.monitoring import feedback
        from conveyor.monitoring import records as monitoring
        from conveyor.data.drops import drop_files, find_complete_drops, mark_processed, quarantine_drop
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        received_at = context["dag_run"].run_after.isoformat()
        root = lake.landing(self.pipeline, "feedback")
        counts = {"drops": 0, "received": 0, "accepted": 0, "unknown_ids": 0, "duplicates": 0, "out_of_set": 0,
                  "rejected_drops": 0, "rejected_examples": []}
        drops = find_complete_drops(root, spec.monitor.feedback_marker)
        if not drops:
            self.log.info("No new feedback drop in %s", root)
            return counts
        champion = registry_for(spec).champion(self.pipeline)
        classes = None
        if spec.data.problem_type != "regression":
            if champion is None:
                raise AirflowSkipException(f"{self.pipeline} has no champion model yet: feedback waits in {root}")
            with tempfile.TemporaryDirectory(prefix="conveyor-feedback-") as tmp:
                metadata = ModelCache(spec, lake, Path(tmp)).metadata(str(champion.version))
            classes = [str(c) for c in metadata.get("class_labels") or []]
        known = monitoring.known_ids(lake, self.pipeline)
        labelled = set(monitoring.load_labels(lake, self.pipeline)["id"].astype(str))
        for drop in drops:
            name = f"feedback/{drop}"
            counts["drops"] += 1
            try:
                rows = feedback.read_drop(drop_files(root / drop, spec.monitor.feedback_marker), spec)
            except feedback.FeedbackDropError as exc:
                counts["rejected_drops"] += 1
                where = quarantine_drop(lake, self.pipeline, name, run_id, {"rule": str(exc), "drop": drop}, 1 << 20)
                self.log.error("Feedback drop %s rejected (%s); kept in %s", drop, exc, where)
                counts["rejected_examples"].append({"id": None, "label": None, "rule": f"drop {drop}: {exc}"})
                continue
            accepted, rejected = feedback.check_rows(rows, classes, known, labelled)
            counts["received"] += len(rows)
            counts["accepted"] += len(accepted)
            for rule, key in ((feedback.RULE_UNKNOWN, "unknown_ids"), (feedback.RULE_CLASS, "out_of_set"),
                              (feedback.RULE_DUPLICATE, "duplicates"), (feedback.RULE_LABELLED, "duplicates")):
                counts[key] += int(rejected["rule"].str.startswith(rule).sum()) if len(rejected) else 0
            if len(accepted):
                labels = accepted[["id", "label"]].assign(received_at=received_at, drop=drop)
                monitoring.write_parquet(lake.monitor(self.pipeline, "labels", f"{drop}.parquet"), labels)
                labelled |= set(labels["id"])
            if len(rejected):
                target = lake.quarantine(self.pipeline, name) / "rejected.csv"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(rejected.to_csv(index=False))
                counts["rejected_examples"] += rejected[["id", "label", "rule"]].head(20).to_dict("records")
                self.log.warning("Feedback drop %s: %s of %s rows rejected (kept with their rule in %s): %s", drop,
                                 len(rejected), len(rows), target, pd.Series(rejected["rule"]).value_counts().to_dict())
            mark_processed(lake, self.pipeline, name, {"run_id": run_id, "accepted": len(accepted), "rejected": len(rejected)})
        counts["rejected_examples"] = counts["rejected_examples"][:20]
        self.log.info("Feedback: %s", {k: v for k, v in counts.items() if k != "rejected_examples"})
        return counts


class RetrainDecisionOperator(BaseOperator):
    """Live metric from feedback, the retraining decision, the history, and the monitor report.

    Writes ``reports/<pipeline>/<run>/monitor/index.html`` (drift per source with plots, drift
    history, live metric over time, labels) and ``monitor/<pipeline>/triggers/<run>.json``. When
    retraining fires, the labelled rows for training go to ``monitor/<pipeline>/retrain/<run>/``.
    Returns the decision with the report's URI (and ``labelled_uri``/``labelled_rows`` when fired).

    :param pipeline: the pipeline's name.
    :param drift: the drift task's result (templated XCom).
    :param feedback: the feedback task's result (templated XCom).
    """

    template_fields = ("pipeline", "drift", "feedback")
    operator_extra_links = (MonitorReportLink(),)

    def __init__(self, *, pipeline: str, drift: Any = None, feedback: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.drift = drift
        self.feedback = feedback

    def execute(self, context: Any) -> dict[str, Any]:
        from datetime import datetime

        from conveyor.monitoring import records as monitoring
        from conveyor.lake import read_json, safe_name, upload_tree, write_json
        from conveyor.reports.monitoring import write_monitor_report
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        now = context["dag_run"].run_after
        at = now.isoformat()
        checks = [c for c in (read_json(p) for p in sorted(lake.monitor(self.pipeline, "checks").iterdir(), key=lambda p: p.name))
                  if c.get("run_id") == run_id] if lake.monitor(self.pipeline, "checks").exists() else []
        write_json(lake.monitor(self.pipeline, "history", f"{safe_name(run_id)}.json"),
                   {"run_id": run_id, "at": at, "sources": [monitoring.history_record(c, at) for c in checks]})
        registry = registry_for(spec)
        champion = registry.champion(self.pipeline)
        metric = spec.monitor.metric or spec.gate.metric
        live: dict[str, Any] = {"metric": metric, "value": None, "labels": 0, "version": None}
        series: list[dict[str, Any]] = []
        triggers = [t for t in monitoring.load_triggers(lake, self.pipeline) if t.get("run_id") != run_id]
        labelled = monitoring.joined(monitoring.load_observations(lake, self.pipeline), monitoring.load_labels(lake, self.pipeline))
        model_info = {"name": self.pipeline, "version": None, "metric": metric, "baseline_metric": None}
        metadata: dict[str, Any] = {}
        if champion is not None:
            version = str(champion.version)
            with tempfile.TemporaryDirectory(prefix="conveyor-monitor-") as tmp:
                metadata = ModelCache(spec, lake, Path(tmp)).metadata(version)
            classes = [str(c) for c in metadata.get("class_labels") or []] or None
            positive = metadata.get("positive_class")
            positive = str(positive) if positive is not None else None
            problem = spec.data.problem_type
            series = monitoring.live_series(labelled, problem, metric, classes, positive)
            last = monitoring.last_fired(triggers)
            current = labelled
            if len(current):
                current = current[current["model_version"].astype(str) == version]
                if last is not None:
                    received = current["received_at"].map(lambda s: datetime.fromisoformat(str(s)))
                    current = current[received > last]
            live = {"metric": metric, "version": version, "labels": int(len(current)),
                    "value": monitoring.score(current, problem, metric, classes, positive) if len(current) else None}
            model_info = {"name": self.pipeline, "version": version, "metric": metric,
                          "baseline_metric": evaluation_metric(lake, self.pipeline, champion, metric)}
        decision = monitoring.decide(spec, checks, live, triggers, now)
        decision |= {"run_id": run_id, "live": live}
        if decision["retrain"] and metadata and len(labelled) and spec.data.format != "images":
            # (image rows are statistics, not the images: image pipelines retrain on the latest dataset)
            rows = monitoring.labelled_training_rows(labelled, feature_names(metadata), spec.data.label, spec.data.id_column)
            target = lake.monitor(self.pipeline, "retrain", safe_name(run_id), "labelled.parquet")
            monitoring.write_parquet(target, rows)
            decision |= {"labelled_uri": str(target), "labelled_rows": int(len(rows))}
        write_json(lake.monitor(self.pipeline, "triggers", f"{safe_name(run_id)}.json"), decision)
        feedback = self.feedback if isinstance(self.feedback, dict) else {}
        labels = {"received": feedback.get("received", 0), "accepted": feedback.get("accepted", 0),
                  "unknown_ids": feedback.get("unknown_ids", 0), "duplicates": feedback.get("duplicates", 0),
                  "out_of_set": feedback.get("out_of_set", 0), "new_since_training": live["labels"],
                  "rejected_examples": feedback.get("rejected_examples", [])}
        with tempfile.TemporaryDirectory(prefix="conveyor-monitor-report-") as tmp:
            write_monitor_report(Path(tmp), pipeline=self.pipeline, model=model_info, sources=checks,
                                 history=monitoring.load_history(lake, self.pipeline), live=series, labels=labels,
                                 decision=decision)
            upload_tree(Path(tmp), lake.reports(self.pipeline, run_id) / "monitor")
        report = str(lake.reports(self.pipeline, run_id) / "monitor" / "index.html")
        self.log.info("Retrain: %s (%s); report: %s", decision["retrain"],
                      "; ".join(decision["reasons"]) or "no reason", report)
        if decision["suppressed_by_cooldown"]:
            self.log.info("Suppressed by the cool-down until %s", decision["cooldown_until"])
        return {"retrain": decision["retrain"], "reasons": decision["reasons"], "report": report,
                "suppressed_by_cooldown": decision["suppressed_by_cooldown"], "live": live,
                "labelled_uri": decision.get("labelled_uri"), "labelled_rows": decision.get("labelled_rows", 0)}


class TriggerRetrainOperator(BaseOperator):
    """Emit the ``<name>.retrain`` Asset event (which schedules ``<name>__train``) when the decision says so.

    Skipped otherwise, so no event is emitted. The event's extra says why and where the newly
    labelled rows are.

    :param pipeline: the pipeline's name.
    :param decision: the decide task's result (templated XCom).
    """

    template_fields = ("pipeline", "decision")

    def __init__(self, *, pipeline: str, decision: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.decision = decision

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.assets import retrain_asset

        if not self.decision or not self.decision.get("retrain"):
            why = "suppressed by the cool-down" if (self.decision or {}).get("suppressed_by_cooldown") else "no reason to"
            raise AirflowSkipException(f"not retraining {self.pipeline}: {why}")
        extra = {"reasons": self.decision["reasons"], "labelled_uri": self.decision.get("labelled_uri"),
                 "labelled_rows": self.decision.get("labelled_rows", 0), "monitor_run": context["run_id"],
                 "report": self.decision.get("report")}
        context["outlet_events"][retrain_asset(self.pipeline)].extra = extra
        self.log.info("Retraining %s: %s", self.pipeline, "; ".join(extra["reasons"]))
        return extra
