"""The gate task: judge the challenger against thresholds and the live model, and track the run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import GateReportLink
from conveyor.operators.base import pipeline_spec, translate_errors


class GateModelOperator(BaseOperator):
    """Apply the pipeline's gate and log the run (params, metrics, its report, decision) to MLflow.

    The champion (of the pipeline's registry: MLflow's ``champion`` alias or SageMaker's latest
    approved package) is re-scored on this run's test set so both models
    are judged on the same rows. Writes ``reports/<pipeline>/<run>/gate/``. A rejected model is
    not registered: the task fails (``on_reject: fail``) or is skipped with everything after it
    (``on_reject: skip``), the reason in the log and the report either way.

    :param spec: the validated pipeline spec (``PipelineSpec`` as JSON, from the factory).
    :param model: the train task's result (templated XCom).
    :param evaluation: the evaluate task's result (templated XCom).
    :param tracking_uri: the MLflow tracking URI (the default store when None).
    """

    template_fields = ("spec", "model", "evaluation")
    template_fields_renderers = {"spec": "json"}
    operator_extra_links = (GateReportLink(),)

    def __init__(self, *, spec: Any, model: Any, evaluation: Any, tracking_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model
        self.evaluation = evaluation
        self.tracking_uri = tracking_uri

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.lake import upload_tree
        from conveyor.registry.mlflow import MlflowRegistryHook
        from conveyor.reports.gate import write_report
        from conveyor.training.gate import decide, markdown

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        run_id = context["run_id"]
        tracking = MlflowRegistryHook(self.tracking_uri)  # experiment runs: MLflow tracking with either registry
        with tempfile.TemporaryDirectory(prefix="conveyor-gate-") as tmp:
            scratch = Path(tmp)
            champion_metrics, champion_version = self._champion(spec, lake, run_id, scratch)
            decision = decide(spec.gate, self.evaluation["metrics"], champion_metrics, champion_version)
            report_context = {
                "pipeline": spec.name,
                "run": run_id,
                "model": self.model["model_uri"],
                "dataset version": self.model["dataset_version"],
            }
            write_report(scratch / "gate", decision, report_context)
            report_dir = lake.reports(spec.name, run_id)
            upload_tree(scratch / "gate", report_dir / "gate")
            report_uri = str(report_dir / "gate" / "index.html")
            self.log.info("%s", decision.summary)
            self.log.info("Gate report: %s", report_uri)
            mlflow_run = self._track(tracking, spec, run_id, decision, scratch / "gate")
        result = {
            "passed": decision.passed,
            "reasons": decision.reasons,
            "report": report_uri,
            "mlflow_run_id": mlflow_run,
            "champion_version": decision.champion_version,
            "summary_md": markdown(decision),
        }
        if not decision.passed:
            tracking.finish_run(mlflow_run)
            message = (
                f"{spec.name}: model of run {run_id} rejected by the gate: {'; '.join(decision.reasons)}; "
                f"report: {report_uri}"
            )
            if spec.gate.on_reject == "fail":
                raise AirflowFailException(message)
            raise AirflowSkipException(message)
        return result

    def _champion(
        self, spec: Any, lake: Lake, run_id: str, scratch: Path
    ) -> tuple[dict[str, float] | None, str | None]:
        """The live model's metrics on this run's test set (None when it cannot score it), and its version."""
        from conveyor.errors import IntegrityError
        from conveyor.model.artifacts import RegisteredArchive
        from conveyor.registry import registry_hook
        from conveyor.training.evaluate import scalar_metrics, score_model

        champion = registry_hook(spec, self.tracking_uri).champion(spec.name)
        if champion is None:
            return None, None
        self.log.info("Re-scoring champion v%s (%s) on this run's test set", champion.version, champion.source)
        try:
            registered = RegisteredArchive.of(champion)
            scored = score_model(lake, spec, run_id, champion.source, scratch / "champion", registered=registered)
        except IntegrityError as exc:
            if exc.expected is not None:
                raise  # its archive is not the one registered: never run its code
            self.log.warning("Champion v%s not re-scored: %s; judged on thresholds only", champion.version, exc)
            return None, str(champion.version)
        except (KeyError, ValueError) as exc:  # e.g. the features changed since the champion
            self.log.warning(
                "Champion v%s cannot score this test set (%s): judged on thresholds only", champion.version, exc
            )
            return None, str(champion.version)
        return scalar_metrics(scored.metrics), str(champion.version)

    def _track(self, tracking: Any, spec: Any, run_id: str, decision: Any, report: Path) -> str:
        """Log the run to MLflow tracking (params, test metrics, the decision, the gate's report); returns its id.

        The evaluate task logged the evaluation report to the same run (``reports/evaluation``).
        """
        mlflow_run = tracking.ensure_run(spec.name, run_id, run_name=run_id, tags={"pipeline": spec.name})
        tracking.log_run(
            mlflow_run,
            params={
                **spec.trainer.model_dump(),
                "dataset_version": self.model["dataset_version"],
                "code_version": self.model["code_version"],
                "split_seed": spec.split.seed,
            },
            metrics={
                **{f"test_{k}": v for k, v in self.evaluation["metrics"].items()},
                "train_seconds": self.model.get("train_seconds") or 0,
            },
            tags={
                "gate_decision": "passed" if decision.passed else "rejected",
                "gate_reasons": "; ".join(decision.reasons)[:4900],
                "dataset_version": self.model["dataset_version"],
                "code_version": self.model["code_version"],
                "backend": spec.compute,
                "model_uri": self.model["model_uri"],
            },
        )
        tracking.log_artifacts(mlflow_run, report, "reports/gate")
        return mlflow_run
