"""The local tuning step: Optuna trials of the training script before the gate (``tuning:``).

Each trial runs the pipeline's training script as a child process (the local backend), with its
hyperparameters drawn by Optuna from ``tuning.search_space`` and its share of the budget
(``TuningSpec.trial_seconds``); ``tuning.parallel`` trials run at once (Optuna's threads, one
child process each). A trial's value is the metric its model scored on the validation channel
(``metadata.json``'s ``validation_score``, in the metric's own sign). A trial that fails (the
script exits non-zero, times out, or writes no valid model) is recorded as failed and the search
goes on; the step fails only when every trial failed. No trial starts once 1.25 x the budget plus
a start-up allowance per wave of trials (:func:`start_cutoff`) has passed: the rest are recorded as
not run.

Every trial is a child MLflow run (``mlflow.parentRunId``) of the Airflow run's MLflow run (the one
the gate and the registry log to): its parameters, metric, duration and status. The best trial's
model goes on like an untuned one (``model.tar.gz`` of the run), with the trials in its metadata
(``tuning``), which the evaluation report shows (``conveyor.reports.tuning``).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError
from conveyor.training.tuning_spec import LOWER_IS_BETTER, flag_name

if TYPE_CHECKING:
    from conveyor.lake import Lake
    from conveyor.spec import PipelineSpec
    from conveyor.training.tuning_spec import TuningSpec

log = logging.getLogger(__name__)

START_CUTOFF = 1.25  # no trial starts after this many budgets (plus STARTUP_ALLOWANCE a wave) have passed
STARTUP_ALLOWANCE = 60  # seconds a trial may spend outside its fit (a fresh interpreter, imports, packing)
TRIAL_TAG = "conveyor_trial_of"  # a trial's MLflow tag: the Airflow run it belongs to (never RUN_TAG)


class TuningFailed(ConveyorError):
    """Every trial of a tuning step failed (deterministic: their errors are in the message)."""


@dataclass
class Trial:
    """One trial of a search: its hyperparameters, outcome and where its model is."""

    number: int
    params: dict[str, Any]
    status: str = "running"  # complete, failed, not run
    value: float | None = None
    seconds: float = 0.0
    error: str | None = None
    mlflow_run_id: str | None = None
    model_dir: str | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """The trial as the model's metadata and the report keep it (no local paths)."""
        return {k: v for k, v in asdict(self).items() if k != "model_dir"}


def trial_spec(spec: PipelineSpec, params: dict[str, Any]) -> PipelineSpec:
    """The pipeline as one trial trains it: the tuned values set, the metric the trainer's own.

    ResNet: each tuned value is its flag (``trainer.hyperparameters``) and ``gate_metric`` the
    tuning metric. AutoGluon: ``<model>.<param>`` values go into that model's hyperparameters (over
    ``trainer.hyperparameters``) and ``eval_metric`` is the tuning metric.

    :param spec: the pipeline (with its ``tuning`` block).
    :param params: the trial's values by search-space name.
    """
    assert spec.tuning is not None
    trainer = spec.trainer
    update: dict[str, Any]
    if trainer.kind == "resnet":
        fixed = {flag_name(k): v for k, v in trainer.hyperparameters.items()}
        tuned = {flag_name(k): v for k, v in params.items()}
        update = {"hyperparameters": {**fixed, **tuned, "gate_metric": spec.tuning.metric}}
    else:
        models = copy.deepcopy(trainer.hyperparameters)
        for name, value in params.items():
            model, _, param = name.partition(".")
            current = models.get(model)
            models[model] = {**(current if isinstance(current, dict) else {}), param: value}
        update = {"hyperparameters": models, "eval_metric": spec.tuning.metric}
    return spec.model_copy(update={"trainer": trainer.model_copy(update=update)})


def natural_value(metric: str, trainer: str, score: float) -> float:
    """A trial's metric in its own sign: AutoGluon reports error metrics negated (higher is better).

    :param metric: the tuning metric.
    :param trainer: the trainer kind.
    :param score: the ``validation_score`` the trainer wrote.
    """
    return -score if trainer == "autogluon" and metric in LOWER_IS_BETTER else score


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """Draw one trial's values from the search space with Optuna's ``suggest_*``.

    :param trial: the ``optuna.Trial``.
    :param space: ``tuning.search_space``.
    """
    values: dict[str, Any] = {}
    for name, dist in space.items():
        if dist.type == "categorical":
            values[name] = trial.suggest_categorical(name, list(dist.choices))
        elif dist.type == "int":
            values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step or 1, log=dist.log)
        else:
            values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return values


def start_cutoff(tuning: TuningSpec, budget: int) -> float:
    """Seconds into the search after which no trial starts: 1.25 budgets and a start-up allowance a wave.

    Each trial pays a fresh interpreter and the trainer's imports before it fits (tens of seconds on a
    loaded machine), which its share of the budget does not count.

    :param tuning: the search.
    :param budget: seconds for all trials.
    """
    waves = -(-tuning.trials // tuning.parallel)
    return budget * START_CUTOFF + waves * STARTUP_ALLOWANCE


class _TrialLog:
    """The task log with every line of one trial prefixed ``[trial N]`` (parallel trials interleave)."""

    def __init__(self, logger: Any, number: int):
        self.logger, self.prefix = logger, f"[trial {number}] "

    def info(self, message: str, *args: Any) -> None:
        self.logger.info(self.prefix + message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.logger.warning(self.prefix + message, *args)

    def error(self, message: str, *args: Any) -> None:
        self.logger.error(self.prefix + message, *args)


class LocalTuning:
    """Runs the trials of one train task; ``kill`` stops every running trial's script.

    :param spec: the pipeline (with its ``tuning`` block).
    :param logger: the task log.
    :param tracker: records trials (:class:`conveyor.training.tuning_tracking.TrialTracker`), or None.
    """

    def __init__(self, spec: PipelineSpec, logger: Any = None, tracker: Any = None):
        assert spec.tuning is not None, "LocalTuning needs a spec with a tuning block"
        self.spec, self.tuning, self.logger, self.tracker = spec, spec.tuning, logger or log, tracker
        self._backends: list[Any] = []
        self._lock = threading.Lock()
        self.trials: list[Trial] = []

    def kill(self) -> None:
        """Stop the scripts of the trials still running (the task was killed)."""
        with self._lock:
            backends = list(self._backends)
        for backend in backends:
            backend.kill()

    def run_trial(self, trial: Trial, job: Any, seconds: int) -> Trial:
        """Run one trial's script and read its validation score; a failure is recorded, not raised.

        :param trial: the trial (its number and values).
        :param job: its ``TrainingJob``.
        :param seconds: its training budget.
        """
        from conveyor.training.local import LocalTrainingBackend
        from conveyor.training.publish import trained_metadata

        backend = LocalTrainingBackend(_TrialLog(self.logger, trial.number))
        with self._lock:
            self._backends.append(backend)
        started = time.monotonic()
        if self.tracker is not None:
            trial.mlflow_run_id = self.tracker.start(trial, seconds)
        try:
            backend.run(job)
            trained = trained_metadata(job.model_dir, f"trial {trial.number} ({job.script.name})")
            if trained.validation_score is None:
                raise TuningFailed(f"trial {trial.number}: the trainer reported no validation score")
            trial.value = natural_value(self.tuning.metric, self.spec.trainer.kind, float(trained.validation_score))
            trial.status, trial.model_dir = "complete", str(job.model_dir)
        except ConveyorError as exc:  # TrainingFailed / TimedOut / Interrupted, TrainedModelInvalid, no score
            trial.status, trial.error = "failed", str(exc)[-2000:]
            self.logger.warning("Trial %s failed: %s", trial.number, str(exc).splitlines()[0])
        finally:
            with self._lock:
                self._backends.remove(backend)
        trial.seconds = round(time.monotonic() - started, 2)
        if self.tracker is not None:
            self.tracker.finish(trial)
        return trial

    def search(self, job_for: Any, budget: int) -> list[Trial]:
        """Run the search: ``tuning.trials`` trials, ``tuning.parallel`` at a time, on Optuna's sampler.

        :param job_for: ``(trial, seconds) -> TrainingJob`` (the trial's script, flags and folders).
        :param budget: seconds for all trials.
        :returns: every trial, in number order (those the cut-off left out as ``not run``).
        """
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        tuning = self.tuning
        seconds = tuning.trial_seconds(budget)
        sampler_cls = optuna.samplers.TPESampler if tuning.strategy == "tpe" else optuna.samplers.RandomSampler
        study = optuna.create_study(direction=tuning.goal, sampler=sampler_cls(seed=tuning.seed))

        def objective(optuna_trial: Any) -> float:
            trial = Trial(optuna_trial.number, suggest(optuna_trial, tuning.search_space))
            with self._lock:
                self.trials.append(trial)
            self.logger.info("Trial %s: %s (%ss)", trial.number, json.dumps(trial.params, default=str), seconds)
            self.run_trial(trial, job_for(trial, seconds), seconds)
            if trial.value is None:
                raise TuningFailed(trial.error or "failed")
            return trial.value

        self.logger.info(
            "Tuning: %s trials, %s at a time, %ss each of a %ss budget, %s %s (%s)",
            tuning.trials,
            tuning.parallel,
            seconds,
            budget,
            tuning.goal,
            tuning.metric,
            tuning.strategy,
        )
        study.optimize(
            objective,
            n_trials=tuning.trials,
            n_jobs=tuning.parallel,
            timeout=start_cutoff(tuning, budget),
            catch=(TuningFailed,),
        )
        ran = {t.number for t in self.trials}
        self.trials += [Trial(n, {}, status="not run") for n in range(tuning.trials) if n not in ran]
        self.trials.sort(key=lambda t: t.number)
        return self.trials

    def best(self) -> Trial:
        """The best complete trial (the first of equals).

        :raises TuningFailed: no trial completed.
        """
        done = [t for t in self.trials if t.status == "complete" and t.value is not None]
        if not done:
            errors = "; ".join(f"trial {t.number}: {(t.error or t.status).splitlines()[0]}" for t in self.trials)
            raise TuningFailed(f"{self.spec.name}: every tuning trial failed ({errors})")
        sign = -1.0 if self.tuning.goal == "maximize" else 1.0
        return min(done, key=lambda t: (sign * (t.value or 0.0), t.number))

    def summary(self, budget: int, best: Trial, parent: str | None) -> dict[str, Any]:
        """What the model's metadata keeps of the search (``tuning``), and the report shows.

        :param budget: seconds for all trials.
        :param best: the best trial.
        :param parent: the MLflow run the trials are children of.
        """
        tuning = self.tuning
        return {
            "backend": "local",
            **tuning.settings(budget),
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
            "mlflow_parent_run_id": parent,
            "trials": [t.summary() for t in self.trials],
        }


def tune_locally(
    spec: PipelineSpec,
    lake: Lake,
    run_id: str,
    split: dict[str, Any],
    budget: int,
    presets: str,
    tuning: LocalTuning,
) -> dict[str, Any]:
    """The local train task of a pipeline with ``tuning:``: the trials, then the best model into the lake.

    :param spec: the pipeline.
    :param lake: the lake (the split is read from and the model written to the run's folder).
    :param run_id: the Airflow run.
    :param split: the split task's result.
    :param budget: seconds for all trials (``tuning.budget``, else the run's time budget).
    :param presets: the trainer's presets.
    :param tuning: the search (the task keeps it, to kill the trials when it is killed).
    :returns: the task's result (``conveyor.training.publish.train_result``) with ``tuning``.
    :raises TuningFailed: every trial failed.
    """
    from conveyor.lake import as_local_folder, upload_tree
    from conveyor.model import artifacts
    from conveyor.training.arguments import trainer_args
    from conveyor.training.local import TrainingJob, available_gpus
    from conveyor.training.publish import publish, run_metadata, train_result, trained_metadata

    run_dir = lake.models(spec.name, run_id)
    num_gpus = available_gpus() if spec.trainer.gpu else 0
    script = artifacts.training_script(spec.trainer.kind)
    with tempfile.TemporaryDirectory(prefix="conveyor-tune-") as tmp:
        scratch = Path(tmp)
        channels = {
            part: as_local_folder(run_dir / "split" / part, scratch / "split") for part in ("train", "validation")
        }

        def job_for(trial: Trial, seconds: int) -> TrainingJob:
            folder = scratch / f"trial-{trial.number}"
            return TrainingJob(
                script=script,
                args=trainer_args(trial_spec(spec, trial.params), seconds, presets, num_gpus),
                channels=channels,
                model_dir=folder / "model",
                output_dir=folder / "output",
                timeout_s=seconds * 1.5 + 300,
                num_gpus=num_gpus,
            )

        started = time.monotonic()
        tuning.search(job_for, budget)
        best = tuning.best()
        parent = tuning.tracker.parent_run_id if tuning.tracker is not None else None
        summary = tuning.summary(budget, best, parent)
        model_dir = Path(str(best.model_dir))
        trained = trained_metadata(model_dir, f"trial {best.number}")
        seconds = round(time.monotonic() - started, 2)
        metadata = run_metadata(trained, spec, run_id, split, "local", seconds, tuning=summary)
        target, size, sha256 = publish(model_dir, metadata, spec.trainer.kind, run_dir, scratch)
        upload_tree(model_dir.parent / "output", run_dir / "output")
        if tuning.tracker is not None:
            tuning.tracker.record_best(summary)
        tuning.logger.info(
            "Best trial %s (%s %s = %s): %s (%.1f MB)",
            best.number,
            tuning.tuning.metric,
            tuning.tuning.goal,
            best.value,
            target,
            size / 1e6,
        )
        shutil.rmtree(scratch / "split", ignore_errors=True)
    return {**train_result(str(target), metadata, sha256), "tuning": _xcom_summary(summary)}


def _xcom_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The search in the task's small XCom result: the best trial and each trial's outcome (no errors)."""
    keys = ("number", "status", "value", "seconds")
    return {
        **{k: summary[k] for k in ("metric", "direction", "best_trial", "best_value", "mlflow_parent_run_id")},
        "trials": [{k: t[k] for k in keys} for t in summary["trials"]],
    }
