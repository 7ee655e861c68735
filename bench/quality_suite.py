"""The model-quality suite (``bench/model_quality.py --case suite``, the default): the pipeline against
scikit-learn baselines on public data sets that ship inside installed packages (``quality_data``).

For each set, in a fresh temporary lake: the table is split as the pipeline splits (the churn
spec's split settings: seed 42, 70/15/15, stratified for classes; the shapes spec's for images),
then the real train task (``TrainModelOperator``: ``train.py`` as a child process, the trainer's
defaults: medium_quality, the model plan) and the real evaluate task (``EvaluateModelOperator``:
scoring, bounded permutation importance, report) run with the set's gate metric and the budget
(``--time-limit``; default 90 s, the issue's new-user trial; 20 s with ``--quick``). The baselines
fit on the same train part and are scored on the same test part with the same ``compute_metrics``:

* classes: ``HistGradientBoostingClassifier`` (defaults, native categorical support) and
  ``LogisticRegression(max_iter=1000)`` after median imputation + scaling / one-hot encoding;
* regression: ``HistGradientBoostingRegressor`` (defaults) and ``Ridge`` (same preprocessing);
* the image set: both classifiers on the raw pixels of the same split's images.

Baselines fit with one OpenMP thread (see ``model_quality``); their fit time is reported.

Per set: ``ratio`` = ours / best baseline on the gate metric (best baseline / ours for an error
metric such as rmse), the train task's wall time against its budget (and ``budget x 1.1 +
start-up``, start-up = wall - the script's own ``training_seconds``), and the evaluate task's wall
time against the train task's. Headline: the worst set's ratio (target >= 1.0 on every set).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from model_quality import (
    BASELINE_THREADS,
    PIPELINE,
    RUN_ID,
    TARGET_RATIO,
    feature_columns,
    hist_gradient_boosting,
    logistic_regression,
    progress,
    train_and_evaluate,
)

from _common import isolate

FULL_LIMIT, QUICK_LIMIT = 90, 20
IMAGE_PIPELINE = "shapes"
WALL_SLACK = 1.1  # the train task's wall time may be budget x this + its measured start-up


def suite_spec(data: Any, time_limit: int) -> Any:
    """The churn spec turned into this set's pipeline (same split settings, trainer defaults)."""
    from conveyor.spec import PipelineSpec, get_spec

    document = get_spec(PIPELINE).model_dump(mode="json")
    document["data"] |= {"label": data.label, "problem_type": data.problem_type, "id_column": None}
    document["trainer"] |= {"eval_metric": data.metric, "time_limit": time_limit}
    document["gate"] |= {"metric": data.metric, "thresholds": {}}
    return PipelineSpec.model_validate(document)


def image_spec(time_limit: int) -> Any:
    """The shapes pipeline (the project's image pipeline) with this budget and no hyperparameters: what a
    new user's file for these images would hold; the trainer plans epochs, size and augmentation."""
    from conveyor.spec import PipelineSpec, get_spec

    document = get_spec(IMAGE_PIPELINE).model_dump(mode="json")
    document["trainer"] |= {"time_limit": time_limit, "hyperparameters": {}}  # the trainer plans the rest
    document["gate"] |= {"metric": "accuracy", "thresholds": {}}
    return PipelineSpec.model_validate(document)


def ridge(numeric: list[str], categorical: list[str]) -> Any:
    """The logistic-regression preprocessing (``model_quality.logistic_regression``) then ``Ridge``."""
    from sklearn.linear_model import Ridge

    pipeline = logistic_regression(numeric, categorical)
    pipeline.steps[-1] = ("ridge", Ridge())
    return pipeline


def hgb_regressor(numeric: list[str], categorical: list[str], train: Any) -> Any:
    """``hist_gradient_boosting``'s pipeline with ``HistGradientBoostingRegressor`` (defaults)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    pipeline = hist_gradient_boosting(numeric, categorical, train)
    pipeline.steps[-1] = ("regressor", HistGradientBoostingRegressor(categorical_features="from_dtype", random_state=0))
    return pipeline


def score_baselines(problem: str, metric: str, parts: tuple[Any, Any], label: str) -> dict[str, dict[str, Any]]:
    """Fit both baselines on the train part, score the test part with ``compute_metrics``."""
    import pandas as pd
    from threadpoolctl import threadpool_limits

    from conveyor.model.metrics import compute_metrics

    train, test = parts
    numeric, categorical = feature_columns(train, label, None)
    if problem == "regression":
        models = {
            "hist_gradient_boosting": hgb_regressor(numeric, categorical, train),
            "ridge": ridge(numeric, categorical),
        }
    else:
        models = {
            "hist_gradient_boosting": hist_gradient_boosting(numeric, categorical, train),
            "logistic_regression": logistic_regression(numeric, categorical),
        }
    scores = {}
    for name, model in models.items():
        started = time.perf_counter()
        with threadpool_limits(BASELINE_THREADS):
            model.fit(train[numeric + categorical], train[label])
        fit_seconds = time.perf_counter() - started
        features = test[numeric + categorical]
        proba, classes, positive = None, None, None
        if problem != "regression":
            classes = [str(c) for c in model.classes_]
            proba = pd.DataFrame(model.predict_proba(features), columns=classes)
            positive = classes[-1] if problem == "binary" else None
        truth = test[label].to_numpy() if problem == "regression" else test[label].astype(str).to_numpy()
        predicted = model.predict(features) if problem == "regression" else model.predict(features).astype(str)
        metrics = compute_metrics(problem, truth, predicted, proba, classes, positive)
        scores[name] = {"score": float(metrics[metric]), "fit_seconds": round(fit_seconds, 2)}
        progress(f"  {name}: {metric} {scores[name]['score']:.4f} (fit {fit_seconds:.1f} s)")
    return scores


def compare(name: str, metric: str, ours: dict[str, Any], baselines: dict[str, dict[str, Any]], limit: int) -> dict:
    """One set's figures: the ratio against the best baseline, and the tasks' times against the budget."""
    from conveyor.model.metrics import HIGHER_IS_BETTER

    higher = HIGHER_IS_BETTER[metric]
    ours_score = float(ours["metrics"][metric])
    best = (max if higher else min)(baselines, key=lambda n: baselines[n]["score"])
    best_score = baselines[best]["score"]
    ratio = ours_score / best_score if higher else best_score / ours_score
    script = float(ours["metadata"].get("training_seconds") or 0.0)
    startup = ours["train_seconds"] - script
    figures = {
        "metric": metric,
        "ratio": round(ratio, 4),
        "ours": round(ours_score, 4),
        "best_baseline": best,
        "baselines": baselines,
        "time_limit": limit,
        "train_task_seconds": round(ours["train_seconds"], 1),
        "train_wall_over_budget": round(ours["train_seconds"] / limit, 3),
        "startup_seconds": round(startup, 1),
        "within_budget": ours["train_seconds"] <= limit * WALL_SLACK + startup,
        "evaluate_task_seconds": round(ours["evaluate_seconds"], 1),
        "evaluate_over_train": round(ours["evaluate_seconds"] / ours["train_seconds"], 3),
        "importance": {
            k: (ours["report"].get("feature_importance_settings") or {}).get(k)
            for k in ("rows", "repeats", "seconds", "budget_seconds")
        },
        "evaluation_cost": (ours["report"].get("context") or {}).get("evaluation cost"),
        "best_model": ours["metadata"].get("best_model"),
        "plan": [m["key"] for m in (ours["metadata"].get("model_plan") or {}).get("models", [])],
    }
    progress(
        f"{name}: ours {metric} {ours_score:.4f} vs {best} {best_score:.4f} -> ratio {ratio:.4f}; train task "
        f"{ours['train_seconds']:.1f} s / {limit} s budget (start-up {startup:.1f} s), evaluate "
        f"{ours['evaluate_seconds']:.1f} s ({figures['evaluate_over_train']:.0%} of train)"
    )
    return figures


def tabular_case(name: str, limit: int) -> dict[str, Any]:
    """One tabular set: split, train and evaluate tasks, baselines, figures."""
    import quality_data

    data = quality_data.TABULAR[name]()
    with tempfile.TemporaryDirectory(prefix=f"conveyor-bench-{name}-") as tmp_name:
        isolate(Path(tmp_name))
        from conveyor.data.splits import read_part, write_split
        from conveyor.lake import Lake

        spec = suite_spec(data, limit)
        lake = Lake.from_env()
        record = write_split(lake, spec, "bench", RUN_ID, data.frame)
        parts = tuple(read_part(lake, PIPELINE, RUN_ID, part) for part in ("train", "test"))
        progress(f"{name} ({data.source}, {data.problem_type}, {len(data.frame):,} rows): train + evaluate, {limit} s")
        ours = train_and_evaluate(spec, record, limit)
    baselines = score_baselines(data.problem_type, data.metric, parts, data.label)
    return compare(name, data.metric, ours, baselines, limit) | {"rows": len(data.frame), "source": data.source}


def image_case(limit: int) -> dict[str, Any]:
    """The digits as PNG files through the image pipeline (ResNet), against pixel baselines."""
    import numpy as np
    import pandas as pd
    import quality_data

    with tempfile.TemporaryDirectory(prefix="conveyor-bench-images-") as tmp_name:
        isolate(Path(tmp_name))
        from conveyor.data.splits import split_frame, write_split
        from conveyor.lake import Lake

        spec = image_spec(limit)
        lake = Lake.from_env()
        folder = Path((lake.raw(IMAGE_PIPELINE, "bench") / "data").path)  # a local lake: its folder
        frame, pixels = quality_data.digit_images(folder)
        record = write_split(lake, spec, "bench", RUN_ID, frame)
        split = split_frame(frame[frame["decodes"]].reset_index(drop=True), spec, "bench")
        progress(f"digits_images (scikit-learn, {len(frame):,} PNG files, 10 classes): image pipeline, {limit} s")
        ours = train_and_evaluate(spec, record, limit)

    def table(part: Any) -> Any:
        matrix = pd.DataFrame(np.stack([pixels[p] for p in part["path"]]), columns=[f"p{i:02d}" for i in range(64)])
        return matrix.assign(label=part["label"].astype(str).to_numpy())

    baselines = score_baselines("multiclass", "accuracy", (table(split["train"]), table(split["test"])), "label")
    return compare("digits_images", "accuracy", ours, baselines, limit) | {"rows": len(frame), "source": "scikit-learn"}


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    """Every set asked for (``--sets``); the figures, with the worst ratio as the headline."""
    import os

    import quality_data

    limit = args.time_limit or (QUICK_LIMIT if args.quick else FULL_LIMIT)
    names = args.sets or list(quality_data.ALL)
    sets: dict[str, Any] = {}
    for name in names:
        load = os.getloadavg()[0]
        sets[name] = image_case(limit) if name in quality_data.IMAGE_SETS else tabular_case(name, limit)
        sets[name]["load_before"] = round(load, 1)
    worst = min(sets, key=lambda n: sets[n]["ratio"])
    figures = {
        "bench": "model_quality",
        "case": "suite",
        "baseline": "best of sklearn HistGradientBoosting and LogisticRegression / Ridge, per data set",
        "ratio": sets[worst]["ratio"],
        "worst_set": worst,
        "ratios": {n: s["ratio"] for n, s in sets.items()},
        "train_wall_over_budget": {n: s["train_wall_over_budget"] for n, s in sets.items()},
        "evaluate_over_train": {n: s["evaluate_over_train"] for n, s in sets.items()},
        "time_limit": limit,
        "sets": sets,
        "targets": {"ratio": f">= {TARGET_RATIO} on every set", "evaluate_over_train": "<= 0.25"},
        "met": {
            "ratio": all(s["ratio"] >= TARGET_RATIO for s in sets.values()),
            "within_budget": all(s["within_budget"] for s in sets.values()),
            "evaluate_over_train": all(s["evaluate_over_train"] <= 0.25 for s in sets.values()),
        },
    }
    for name, s in sets.items():
        progress(
            f"summary {name:>15}: ratio {s['ratio']:.4f} ({s['metric']}), train {s['train_task_seconds']:.0f} s / "
            f"{limit} s, evaluate {s['evaluate_over_train']:.0%} of train, load {s['load_before']}"
        )
    return figures
