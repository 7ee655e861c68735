"""The local tuning step: Optuna trials as child processes, failures recorded, the best model published,
every trial a child MLflow run of the Airflow run's MLflow run.

The trials run a small stand-in training script (a real child process through the local backend) that
scores its flags the way a trainer reports ``validation_score``, so the search is tested without
training a model; the real trainers' flags are checked through ``trainer_args``.
"""

from __future__ import annotations

import json
import tarfile
import textwrap
from pathlib import Path

import pytest
import yaml

from conveyor.spec import PipelineSpec
from conveyor.training import tuning
from conveyor.training.arguments import trainer_args
from conveyor.training.local import TrainingJob
from conveyor.training.tuning import LocalTuning, TuningFailed, natural_value, trial_spec, tune_locally
from conveyor.training.tuning_tracking import TrialTracker

PIPELINES = Path(__file__).resolve().parents[3] / "include" / "pipelines"

# Scores lr by its distance to 0.01 (best there); exits 1 for --optimizer adamw (a failed trial).
STAND_IN = textwrap.dedent(
    """
    import argparse, json, math, os, pathlib, sys
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--gate-metric")
    parser.add_argument("--time-limit", type=float)
    args, _ = parser.parse_known_args()
    if args.optimizer == "adamw":
        print("adamw diverged", flush=True)
        sys.exit(1)
    model = pathlib.Path(os.environ["SM_MODEL_DIR"])
    (model / "model.pt").write_text("weights")
    pathlib.Path(os.environ["SM_OUTPUT_DATA_DIR"], "history.json").write_text("[]")
    score = 1.0 - abs(math.log10(args.lr) + 2.0) / 10.0
    (model / "metadata.json").write_text(json.dumps({
        "trainer": "resnet", "problem_type": "image_classification", "label": "label",
        "features": [{"name": "image", "dtype": "image"}], "class_labels": ["a", "b"],
        "validation_score": score, "validation_metric": args.gate_metric, "best_model": "resnet18",
    }))
    print(f"trained: lr {args.lr} time limit {args.time_limit} score {score}", flush=True)
    """
)


def shapes_spec(**tuning_block: object) -> PipelineSpec:
    document = yaml.safe_load((PIPELINES / "shapes.yaml").read_text())
    for name in ("lr", "optimizer"):
        document["trainer"]["hyperparameters"].pop(name)
    document["tuning"] = {
        "metric": "balanced_accuracy",
        "trials": 4,
        "parallel": 2,
        "budget": 40,
        "search_space": {
            "lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True},
            "optimizer": {"type": "categorical", "choices": ["sgd", "adamw"]},
        },
        **tuning_block,
    }
    return PipelineSpec.model_validate(document)


@pytest.fixture(scope="module")
def mlflow_hook(tmp_path_factory):
    from conveyor.registry.mlflow import MlflowRegistryHook

    return MlflowRegistryHook(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture
def stand_in(tmp_path) -> Path:
    script = tmp_path / "train.py"
    script.write_text(STAND_IN)
    return script


def job_maker(spec: PipelineSpec, script: Path, scratch: Path):
    def job_for(trial, seconds):
        folder = scratch / f"trial-{trial.number}"
        return TrainingJob(
            script=script,
            args=trainer_args(trial_spec(spec, trial.params), seconds, "", 0),
            channels={},
            model_dir=folder / "model",
            output_dir=folder / "output",
            timeout_s=60,
        )

    return job_for


def test_a_trial_trains_with_its_values_and_the_tuning_metric():
    spec = shapes_spec()
    args = trainer_args(trial_spec(spec, {"lr": 0.02, "optimizer": "adamw"}), 10, "", 0)
    assert args[args.index("--lr") + 1] == "0.02" and args[args.index("--optimizer") + 1] == "adamw"
    assert args[args.index("--gate-metric") + 1] == "balanced_accuracy"
    assert args[args.index("--time-limit") + 1] == "10"
    assert args[args.index("--batch-size") + 1] == "16"  # the fixed hyperparameters stay
    document = yaml.safe_load((PIPELINES / "churn.yaml").read_text())
    document["trainer"]["hyperparameters"] = {"GBM": {"num_boost_round": 50}, "RF": {}}
    document["tuning"] = {
        "metric": "roc_auc",
        "search_space": {"GBM.learning_rate": {"type": "float", "low": 0.01, "high": 0.3}},
    }
    churn = PipelineSpec.model_validate(document)
    args = trainer_args(trial_spec(churn, {"GBM.learning_rate": 0.05}), 30, "medium_quality", 0)
    assert json.loads(args[args.index("--hyperparameters") + 1]) == {
        "GBM": {"num_boost_round": 50, "learning_rate": 0.05},
        "RF": {},
    }
    assert args[args.index("--eval-metric") + 1] == "roc_auc"
    assert churn.trainer.hyperparameters == {"GBM": {"num_boost_round": 50}, "RF": {}}  # the spec is unchanged


def test_autogluon_error_metrics_are_turned_back_to_their_own_sign():
    assert natural_value("rmse", "autogluon", -0.25) == 0.25
    assert natural_value("roc_auc", "autogluon", 0.8) == 0.8
    assert natural_value("accuracy", "resnet", 0.7) == 0.7


@pytest.mark.slow  # runs the trials' script as child processes
def test_trials_run_in_parallel_failures_are_recorded_and_children_tracked(tmp_path, stand_in, mlflow_hook):
    spec = shapes_spec(trials=6, parallel=2, budget=60, strategy="random", seed=3)
    tracker = TrialTracker(spec, "manual__tuning-1", hook=mlflow_hook)
    search = LocalTuning(spec, tracker=tracker)
    trials = search.search(job_maker(spec, stand_in, tmp_path), 60)
    assert [t.number for t in trials] == list(range(6))
    for trial in trials:
        failed = trial.params["optimizer"] == "adamw"
        assert trial.status == ("failed" if failed else "complete"), trial
        assert (trial.value is None) == failed
        if failed:
            assert "exit code 1" in trial.error and "adamw diverged" in trial.error
    best = search.best()
    assert best.value == max(t.value for t in trials if t.value is not None)
    assert best.params["optimizer"] == "sgd"

    client = mlflow_hook.client
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags["conveyor_run_id"] == "manual__tuning-1"  # the run the gate and registry log to
    assert tracker.parent_run_id == mlflow_hook.ensure_run(spec.name, "manual__tuning-1", "x", {})
    for trial in trials:
        child = client.get_run(trial.mlflow_run_id)
        assert child.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert child.info.status == ("FAILED" if trial.status == "failed" else "FINISHED")
        assert float(child.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert child.data.params["trial_seconds"] == "20"  # 60 s x 2 at a time / 6 trials
        assert child.data.metrics["duration_seconds"] == trial.seconds
        if trial.value is not None:
            assert child.data.metrics["validation_balanced_accuracy"] == pytest.approx(trial.value)


@pytest.mark.slow  # runs the trials' script as child processes
def test_every_trial_failing_fails_the_step_with_each_error(tmp_path, stand_in):
    spec = shapes_spec(trials=2, parallel=1, search_space={"optimizer": {"type": "categorical", "choices": ["adamw"]}})
    search = LocalTuning(spec)
    search.search(job_maker(spec, stand_in, tmp_path), 40)
    with pytest.raises(TuningFailed, match=r"every tuning trial failed \(trial 0: .*exit code 1.*; trial 1: "):
        search.best()


@pytest.mark.slow  # runs the trials' script as child processes
def test_tune_locally_publishes_the_best_trials_model(tmp_path, stand_in, lake, monkeypatch, mlflow_hook):
    from conveyor.model import artifacts

    spec = shapes_spec(
        trials=3, parallel=1, budget=30, search_space={"lr": {"type": "categorical", "choices": [0.1, 0.01, 0.001]}}
    )
    monkeypatch.setattr(artifacts, "training_script", lambda kind: stand_in)
    run_dir = lake.models(spec.name, "run-1")
    for part in ("train", "validation"):
        (run_dir / "split" / part).mkdir(parents=True, exist_ok=True)
        (run_dir / "split" / part / "manifest.csv").write_text("path,label\n")
    split = {"dataset_version": "v-" + "a" * 16, "parts": {"train": 1, "validation": 1, "test": 1}}
    search = LocalTuning(spec, tracker=TrialTracker(spec, "run-1", hook=mlflow_hook))
    result = tune_locally(spec, lake, "run-1", split, 30, "", search)

    best = search.best()
    assert best.params == {"lr": 0.01} and result["tuning"]["best_trial"] == best.number
    assert [t["status"] for t in result["tuning"]["trials"]] == ["complete"] * 3
    assert result["validation_score"] == pytest.approx(1.0)
    with tarfile.open(Path(result["model_uri"].removeprefix("file://"))) as tar:
        metadata = json.load(tar.extractfile("metadata.json"))
    assert metadata["tuning"]["best_params"] == {"lr": 0.01}
    assert metadata["tuning"]["trial_seconds"] == 10 and len(metadata["tuning"]["trials"]) == 3
    assert (run_dir / "output" / "history.json").exists()
    parent = mlflow_hook.client.get_run(search.tracker.parent_run_id)
    assert parent.data.tags["tuning_best_trial"] == str(best.number)
    assert parent.data.tags["tuning_best_run_id"] == best.mlflow_run_id


def test_no_trial_starts_after_the_cutoff(tmp_path, stand_in, monkeypatch):
    spec = shapes_spec(trials=3, parallel=1, budget=30)
    monkeypatch.setattr(tuning, "START_CUTOFF", 0.0)  # the budget is spent before the first trial
    monkeypatch.setattr(tuning, "STARTUP_ALLOWANCE", 0)
    search = LocalTuning(spec)
    trials = search.search(job_maker(spec, stand_in, tmp_path), 30)
    assert [t.status for t in trials] == ["not run"] * 3
    with pytest.raises(TuningFailed, match="trial 0: not run; trial 1: not run; trial 2: not run"):
        search.best()


def test_the_train_dag_of_a_tuned_pipeline_runs_the_search_in_its_train_task():
    from datetime import timedelta

    from conveyor.factory.train import train_dag
    from conveyor.operators.train import TrainModelOperator
    from conveyor.operators.tune_sagemaker import SageMakerTuneModelOperator

    spec = shapes_spec(trials=4, parallel=2, budget=40)
    task = train_dag(spec).get_task("train")
    assert isinstance(task, TrainModelOperator)
    assert task.execution_timeout == timedelta(seconds=int(40 * 1.25 + 2 * 60 + 20 * 1.5 + 300) + 900)
    document = spec.model_dump(mode="json")
    document.update(compute="sagemaker", sagemaker={**document["sagemaker"], "role_arn": "arn:aws:iam::1:role/r"})
    task = train_dag(PipelineSpec.model_validate(document)).get_task("train")
    assert isinstance(task, SageMakerTuneModelOperator) and task.deferrable
    assert task.aws_conn_id == "aws_default" and task.check_interval == 30
    assert task.execution_timeout == timedelta(seconds=2 * 3600 + 1800)  # 2 waves of max_run_seconds
