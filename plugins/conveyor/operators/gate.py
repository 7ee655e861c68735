"""The gate task: judge the challenger against thresholds and the live model, and track the run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import GateReportLink


class GateModelOperator(BaseOperator):
    """Apply the pipeline's gate and log the run (params, metrics, reports, decision) to MLflow.

    The champion (of the pipeline's registry: MLflow's ``champion`` alias or SageMaker's latest
    approved package) is re-scored on this run's test set so both models
    are judged on the same rows. Writes ``reports/<pipeline>/<run>/gate/``. A rejected model is
    not registered: the task fails (``on_reject: fail``) or is skipped with everything after it
    (``on_reject: skip``), the reason in the log and the report either way.

    :param pipeline: the pipeline's name.
    :param model: the train task's result (templated XCom).
    :param evaluation: the evaluate task's result (templated XCom).
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = ("pipeline", "model", "evaluation")
    operator_extra_links = (GateReportLink(),)

    def __init__(self, *, pipeline: str, model: Any, evaluation: Any, tracking_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.model = model
        self.evaluation = evaluation
        self.tracking_uri = tracking_uri

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.training.evaluate import scalar_metrics, score_model
        from conveyor.reports.gate import write_report
        from conveyor.training.gate import decide, markdown
        from conveyor.registry.mlflow import MlflowRegistryHook
        from conveyor.lake import as_local_folder, upload_tree
        from conveyor.registry import registry_hook
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        hook = MlflowRegistryHook(self.tracking_uri)  # experiment runs: MLflow tracking with either registry
        champion = registry_hook(spec, self.tracking_uri).champion(self.pipeline)
        champion_metrics = None
        with tempfile.TemporaryDirectory(prefix="conveyor-gate-") as tmp:
            scratch = Path(tmp)
            if champion is not None:
                self.log.info("Re-scoring champion v%s (%s) on this run's test set", champion.version, champion.source)
                try:
                    scored = score_model(lake, spec, run_id, champion.source, scratch / "champion")
                    champion_metrics = scalar_metrics(scored.metrics)
                except (KeyError, ValueError) as exc:  # e.g. the features changed since the champion
                    self.log.warning("Champion v%s cannot score this test set (%s): judged on thresholds only",
                                     champion.version, exc)
            decision = decide(spec.gate, self.evaluation["metrics"], champion_metrics,
                              str(champion.version) if champion is not None else None)
            report_context = {"pipeline": self.pipeline, "run": run_id, "model": self.model["model_uri"],
                              "dataset version": self.model["dataset_version"]}
            write_report(scratch / "gate", decision, report_context)
            report_dir = lake.reports(self.pipeline, run_id)
            upload_tree(scratch / "gate", report_dir / "gate")
            report_uri = str(report_dir / "gate" / "index.html")
            self.log.info("%s", decision.summary)
            self.log.info("Gate report: %s", report_uri)

            mlflow_run = hook.ensure_run(self.pipeline, run_id, run_name=run_id, tags={"pipeline": self.pipeline})
            hook.log_run(
                mlflow_run,
                params={**spec.trainer.model_dump(), "dataset_version": self.model["dataset_version"],
                        "code_version": self.model["code_version"], "split_seed": spec.split.seed},
                metrics={**{f"test_{k}": v for k, v in self.evaluation["metrics"].items()},
                         "train_seconds": self.model.get("train_seconds") or 0},
                tags={"gate_decision": "passed" if decision.passed else "rejected",
                      "gate_reasons": "; ".join(decision.reasons)[:4900], "dataset_version": self.model["dataset_version"],
                      "code_version": self.model["code_version"], "backend": spec.compute,
                      "model_uri": self.model["model_uri"]},
            )
            hook.log_artifacts(mlflow_run, as_local_folder(report_dir / "evaluation", scratch / "ev"), "reports/evaluation")
            hook.log_artifacts(mlflow_run, scratch / "gate", "reports/gate")
        result = {"passed": decision.passed, "reasons": decision.reasons, "report": report_uri,
                  "mlflow_run_id": mlflow_run, "champion_version": decision.champion_version,
                  "summary_md": markdown(decision)}
        if not decision.passed:
            hook.finish_run(mlflow_run)
            message = f"{self.pipeline}: model of run {run_id} rejected by the gate: {'; '.join(decision.reasons)}; report: {report_uri}"
            if spec.gate.on_reject == "fail":
                raise AirflowFailException(message)
            raise AirflowSkipException(message)
        return result
