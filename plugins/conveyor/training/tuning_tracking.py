"""Tuning trials in MLflow: each trial a child run of the Airflow run's MLflow run.

The parent is the run the gate and the registry log to (``MlflowRegistryHook.ensure_run`` with the
Airflow run as key, so it is the same run whichever step creates it). A child carries the trial's
values as params, its metric and duration as metrics, and its status (``FINISHED`` or ``FAILED``,
with the error as a tag). A retry of the task creates new children, tagged with its try number.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.registry.mlflow import MlflowRegistryHook
    from conveyor.spec import PipelineSpec
    from conveyor.training.tuning import Trial

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent


class TrialTracker:
    """Records the trials of one train task as child MLflow runs.

    :param spec: the pipeline (its name is the MLflow experiment).
    :param run_id: the Airflow run (the parent MLflow run's key).
    :param hook: the MLflow hook (the default store when None).
    :param try_number: the task's try (tagged on every child).
    """

    def __init__(self, spec: PipelineSpec, run_id: str, hook: MlflowRegistryHook | None = None, try_number: int = 1):
        from conveyor.registry.mlflow import MlflowRegistryHook

        self.spec, self.run_id, self.try_number = spec, run_id, try_number
        self.hook = hook or MlflowRegistryHook()
        self.parent_run_id = self.hook.ensure_run(spec.name, run_id, run_name=run_id, tags={"pipeline": spec.name})
        self._experiment = self.hook.experiment_id(spec.name)
        self._lock = threading.Lock()  # MlflowClient on SQLite: one write at a time from the trial threads

    def start(self, trial: Trial, seconds: int) -> str:
        """Create the trial's child run (``RUNNING``) with its values as params; returns its id.

        :param trial: the trial.
        :param seconds: its training budget.
        """
        tags = {
            PARENT_TAG: self.parent_run_id,
            "conveyor_trial_of": self.run_id,
            "pipeline": self.spec.name,
            "trial": str(trial.number),
            "try_number": str(self.try_number),
        }
        with self._lock:
            run = self.hook._call(
                "create run",
                self.hook.client.create_run,
                self._experiment,
                run_name=f"trial-{trial.number}" + (f"-try-{self.try_number}" if self.try_number > 1 else ""),
                tags=tags,
            )
            params = {**trial.params, "trial_seconds": seconds}
            self.hook.log_run(run.info.run_id, params=params, metrics={}, tags={})
        return str(run.info.run_id)

    def finish(self, trial: Trial) -> None:
        """Log the trial's metric and duration and end its run ``FINISHED`` or ``FAILED``.

        :param trial: the ended trial (with its ``mlflow_run_id``).
        """
        if trial.mlflow_run_id is None:
            return
        assert self.spec.tuning is not None
        metrics: dict[str, float] = {"duration_seconds": trial.seconds}
        if trial.value is not None:
            metrics[f"validation_{self.spec.tuning.metric}"] = trial.value
        tags = {"status": trial.status, **({"error": trial.error[-4900:]} if trial.error else {})}
        with self._lock:
            self.hook.log_run(trial.mlflow_run_id, params={}, metrics=metrics, tags=tags)
            self.hook.finish_run(trial.mlflow_run_id, "FINISHED" if trial.status == "complete" else "FAILED")

    def record_best(self, summary: dict[str, Any]) -> None:
        """Tag the parent run with the search's outcome (best trial, its value and run).

        :param summary: ``LocalTuning.summary``.
        """
        best = next(t for t in summary["trials"] if t["number"] == summary["best_trial"])
        with self._lock:
            self.hook.log_run(
                self.parent_run_id,
                params={f"tuned_{k}": v for k, v in summary["best_params"].items()},
                metrics={f"best_trial_validation_{summary['metric']}": summary["best_value"]},
                tags={
                    "tuning_best_trial": str(summary["best_trial"]),
                    "tuning_best_run_id": str(best.get("mlflow_run_id")),
                    "tuning_trials": str(len(summary["trials"])),
                    "tuning_failed_trials": str(sum(t["status"] == "failed" for t in summary["trials"])),
                },
            )
