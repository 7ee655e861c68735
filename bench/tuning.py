"""Benchmark: the tuning step against the untuned train task, on the same split and the same budget.

What is compared, in one run, on the same split of the same generated churn table (``churn_frame``,
10,000 rows, 80 s budget, 4 trials; 3,000 rows, 40 s, 2 trials with ``--quick``), split as the
pipeline splits it (``include/pipelines/churn.yaml``):

* baseline: the untuned local train task (``conveyor.training.local.train_locally``: the trainer's
  model plan on the whole budget);
* ours: the tuning step (``conveyor.training.tuning.tune_locally``) on the same budget: trials of
  LightGBM (``GBM.num_leaves``, ``GBM.learning_rate``, ``GBM.min_data_in_leaf``), each a fresh
  child process with its share of the budget, each a child MLflow run (a private SQLite store).

Both models are scored on the same test part through their own inference code
(``conveyor.training.evaluate.score_model``). ``ratio`` is the trial overhead: the tuning step's wall
time / the untuned train task's wall time, both at the same budget (each trial pays the child
process's start-up and AutoGluon's imports again). ``overhead_seconds_per_trial`` is (tuning wall
- untuned wall) / trials; ``test_roc_auc`` of both and each trial's validation value are the quality.

Usage: ``python bench/tuning.py [--quick] [--rows N] [--budget S] [--trials N] [--parallel N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
from _common import isolate  # noqa: E402

PIPELINE = "churn"
SPACE = {
    "GBM.num_leaves": {"type": "int", "low": 8, "high": 128, "log": True},
    "GBM.learning_rate": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
    "GBM.min_data_in_leaf": {"type": "int", "low": 5, "high": 60},
}


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[tuning bench] {message}", flush=True)


def quiet_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    return logger


def copy_split(lake: Any, source: str, target: str) -> None:
    """Give a run the same split parts as another (each run reads its own)."""
    src, dst = lake.models(PIPELINE, source) / "split", lake.models(PIPELINE, target) / "split"
    shutil.copytree(src.path, dst.path, dirs_exist_ok=True)


def test_metric(lake: Any, spec: Any, run_id: str, model_uri: str, scratch: Path) -> float:
    from conveyor.training.evaluate import score_model

    return float(score_model(lake, spec, run_id, model_uri, scratch / run_id).metrics["roc_auc"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--budget", type=int)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args(argv)
    rows = args.rows or (3_000 if args.quick else 10_000)
    budget = args.budget or (40 if args.quick else 80)
    trials = args.trials or (2 if args.quick else 4)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-tuning-") as tmp:
        isolate(Path(tmp))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"  # MLflow 3 refuses a new file store
        from conveyor.data.splits import write_split
        from conveyor.demo import churn_frame
        from conveyor.lake import Lake
        from conveyor.spec import PipelineSpec, get_spec
        from conveyor.training.local import LocalTrainingBackend, train_locally
        from conveyor.training.tuning import LocalTuning, tune_locally
        from conveyor.training.tuning_tracking import TrialTracker

        spec = get_spec(PIPELINE)
        block = {
            "metric": "roc_auc",
            "trials": trials,
            "parallel": args.parallel,
            "budget": budget,
            "search_space": SPACE,
        }
        tuned_spec = PipelineSpec.model_validate({**spec.model_dump(mode="json"), "tuning": block})
        lake = Lake.from_env()
        record = write_split(lake, spec, "bench", "untuned", churn_frame(rows, seed=11))
        split = {"dataset_version": "bench", "parts": record["parts"]}
        copy_split(lake, "untuned", "tuned")
        presets = spec.trainer.presets
        tracker = TrialTracker(tuned_spec, "tuned")  # the MLflow store first: a broken one fails at once

        progress(f"untuned train task: {rows} rows, {budget} s budget")
        started = time.perf_counter()
        untuned = train_locally(
            spec, lake, "untuned", split, budget, presets, LocalTrainingBackend(quiet_logger("bench.untuned"))
        )
        untuned_wall = time.perf_counter() - started

        progress(f"tuning step: {trials} trials, {args.parallel} at a time, {budget} s budget")
        logger = quiet_logger("bench.tuned")
        search = LocalTuning(tuned_spec, logger, tracker)
        started = time.perf_counter()
        tuned = tune_locally(tuned_spec, lake, "tuned", split, budget, presets, search)
        tuned_wall = time.perf_counter() - started

        scratch = Path(tmp) / "score"
        untuned_auc = test_metric(lake, spec, "untuned", untuned["model_uri"], scratch)
        tuned_auc = test_metric(lake, tuned_spec, "tuned", tuned["model_uri"], scratch)
    result = {
        "bench": "tuning",
        "baseline": f"the untuned local train task on the same split and budget ({budget} s)",
        "ratio": round(tuned_wall / untuned_wall, 3),
        "rows": rows,
        "budget_seconds": budget,
        "trials": trials,
        "parallel": args.parallel,
        "untuned_wall_seconds": round(untuned_wall, 1),
        "tuned_wall_seconds": round(tuned_wall, 1),
        "overhead_seconds_per_trial": round((tuned_wall - untuned_wall) / trials, 1),
        "untuned_test_roc_auc": round(untuned_auc, 4),
        "tuned_test_roc_auc": round(tuned_auc, 4),
        "untuned_best_model": untuned["best_model"],
        "trial_values": [t["value"] for t in tuned["tuning"]["trials"]],
        "trial_seconds": [t["seconds"] for t in tuned["tuning"]["trials"]],
        "best_trial": tuned["tuning"]["best_trial"],
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
