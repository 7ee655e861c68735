"""Benchmark: the pipeline's trained model against scikit-learn baselines on the same test rows.

What is compared, in one run, on one split of the generated churn table (``churn_frame``, 20,000
rows; 5,000 with ``--quick``) made as the pipeline makes it (``splits.write_split`` with the churn
spec: seed 42, 70/15/15, stratified) in a temporary lake; every model is scored on the same test
part with the same ``compute_metrics``:

* ours: ``TrainModelOperator(...).execute(context)`` (``include/training/autogluon_tabular/train.py``
  as a child process with the spec's trainer options: medium_quality, roc_auc, NN_TORCH and FASTAI
  excluded, train part to fit, validation part to tune; budget: the spec's 120 s, 20 s with
  ``--quick``), then ``score_model`` as the evaluate task calls it (``model.tar.gz`` fetched,
  loaded through its own ``code/inference.py``, test part scored), without the HTML report;
* ``hist_gradient_boosting``: ``HistGradientBoostingClassifier(random_state=0)`` with default
  parameters and native categorical support (the object columns as pandas categories, categories
  taken from the train part); default ``early_stopping="auto"`` holds out 10% of the train part when
  it has more than 10,000 rows (the full size does, ``--quick`` does not);
* ``logistic_regression``: median imputation + standard scaling of numeric columns, constant
  ``"missing"`` imputation + one-hot encoding (unknown categories ignored) of the object columns,
  ``LogisticRegression(max_iter=1000)``.

Both baselines are fit on the train part only: the validation part is used for nothing (ours uses
it for early stopping and ensemble weights, as the pipeline does). They predict labels with
``predict`` (0.5 threshold) and probabilities with ``predict_proba``; ours uses the served model's
predictions and its decision threshold (``decision_threshold`` in the figures).

``ratio`` is ours roc_auc / the best baseline's roc_auc (target: >= 1.0, i.e. ours at least as good
as the best baseline on the gate metric). A paired bootstrap of the test rows (1,000 resamples)
gives the 95% interval of ours minus the best baseline, to tell a real gap from test-set noise.
``oracle_roc_auc`` is a ceiling: the test rows ranked by the generator's own logit without its
noise term (the formula of ``conveyor.demo.churn_frame``, repeated here), which no model of these
features can beat in expectation. The generator is a logistic model, linear in the features
after one-hot encoding, so logistic regression is correctly specified for this data.

The many-class case (``--case many_classes``, run with ``both``, the default): a 26-class table
of 20,000 rows x 16 numeric features (``sklearn.datasets.make_classification``, 12 informative,
class_sep 1.5, seed 0; 5,000 rows with ``--quick``), labels ``A``..``Z``, split as the pipeline
splits (churn's split settings), trained by the train task with a multiclass accuracy spec made
from churn's (budget 90 s, 30 s with ``--quick``), then the real evaluate task
(``EvaluateModelOperator``: scoring, bounded permutation importance, report). Figures: accuracy of
ours / the best of HistGradientBoostingClassifier (defaults) and logistic regression on the same
test part, the train task's wall time against its budget (and the start-up: wall - the script's own
``training_seconds``), the evaluate task's wall time against the train task's, and the model plan.
The baselines fit with one OpenMP thread (``threadpoolctl``): on a shared 2-core machine under load,
HistGradientBoosting's two spinning threads took 433 s for what one thread does in seconds; their
fit time is reported, their accuracy does not depend on it.

The last line's ``ratio`` is the worst of the cases' ratios (``ratio_churn``, ``ratio_many_classes``).

The suite (``--case suite``, the default) runs the pipeline against the same baselines on public data sets
that ship inside installed packages: see ``bench/quality_suite.py`` and ``bench/quality_data.py``.

Usage: ``python bench/model_quality.py [--quick] [--case suite|churn|many_classes|both] [--sets A,B]
[--rows N] [--time-limit S]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
from _common import isolate  # noqa: E402

PIPELINE = "churn"
FULL_ROWS, QUICK_ROWS = 20_000, 5_000
QUICK_LIMIT = 20
RUN_ID = "bench__model_quality"
GATE_METRIC = "roc_auc"
TARGET_RATIO = 1.0
BOOTSTRAP = 1000
SEED = 0


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[model_quality bench] {message}", flush=True)


class QuietLog:
    """A task log that keeps the child's lines and shows only train.py's own ones."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _keep(self, message: str, *args: Any, **_: Any) -> None:
        line = message % args if args else message
        self.lines.append(line)
        if line.startswith("[train] [train.py]"):
            progress(f"  ours: {line[len('[train] ') :][:160]}")

    info = warning = error = debug = exception = _keep


# --- ours -----------------------------------------------------------------------------------------


def train_and_score_ours(record: dict[str, Any], time_limit: int, workdir: Path) -> dict[str, Any]:
    """Train with the train task, then score the test part as the evaluate task does."""
    from conveyor.lake import Lake
    from conveyor.operators.train import TrainModelOperator
    from conveyor.spec import get_spec
    from conveyor.training.evaluate import score_model

    operator = TrainModelOperator(
        task_id="train",
        spec=get_spec(PIPELINE).model_dump(mode="json"),
        split={"dataset_version": "bench", "parts": record["parts"]},
        time_limit=time_limit,
    )
    operator._cached_logger = QuietLog()  # keep AutoGluon's chatter out of the output
    started = time.perf_counter()
    trained = operator.execute({"run_id": RUN_ID})
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = score_model(Lake.from_env(), get_spec(PIPELINE), RUN_ID, trained["model_uri"], workdir)
    return {
        "metrics": result.metrics,
        "train_seconds": train_seconds,
        "score_seconds": time.perf_counter() - started,
        "best_model": trained["best_model"],
        "validation_score": trained["validation_score"],
        "decision_threshold": result.metadata.decision_threshold,
        "positive_class": result.metadata.positive_class,
        "class_labels": result.metadata.class_labels,
    }


def ours_test_proba(workdir: Path, test: Any, positive: Any) -> Any:
    """P(positive) of ours on the test rows, from the model score_model extracted (for the bootstrap)."""
    from conveyor.model.artifacts import LoadedModel
    from conveyor.training.evaluate import predictions

    _, proba = predictions(LoadedModel(workdir / "model"), test)
    return proba[positive].to_numpy()


# --- baselines --------------------------------------------------------------------------------------


def feature_columns(frame: Any, label: str, id_column: str | None) -> tuple[list[str], list[str]]:
    """Numeric and object (categorical) feature columns."""
    import pandas as pd

    features = [c for c in frame.columns if c not in (label, id_column)]
    numeric = [c for c in features if pd.api.types.is_numeric_dtype(frame[c])]
    return numeric, [c for c in features if c not in numeric]


def hist_gradient_boosting(numeric: list[str], categorical: list[str], train: Any) -> Any:
    """HistGradientBoostingClassifier with native categorical support; categories fixed from train."""
    import pandas as pd
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    dtypes = {c: pd.CategoricalDtype(sorted(train[c].dropna().unique())) for c in categorical}

    def as_categories(frame: Any) -> Any:
        frame = frame[numeric + categorical].copy()
        for column, dtype in dtypes.items():
            frame[column] = frame[column].astype(dtype)  # unseen values become missing
        return frame

    return make_pipeline(
        FunctionTransformer(as_categories),
        HistGradientBoostingClassifier(categorical_features="from_dtype", random_state=SEED),
    )


def logistic_regression(numeric: list[str], categorical: list[str]) -> Any:
    """One-hot + standard scaling + median imputation, then LogisticRegression(max_iter=1000)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = ColumnTransformer(
        [
            ("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (
                "categorical",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value="missing"), OneHotEncoder(handle_unknown="ignore")
                ),
                categorical,
            ),
        ]
    )
    return make_pipeline(columns, LogisticRegression(max_iter=1000, random_state=SEED))


def fit_and_score(model: Any, train: Any, test: Any, label: str, positive: Any) -> dict[str, Any]:
    """Fit on the train part, score the test part with compute_metrics."""
    import pandas as pd

    from conveyor.model.metrics import compute_metrics

    started = time.perf_counter()
    model.fit(train.drop(columns=[label]), train[label])
    fit_seconds = time.perf_counter() - started
    features = test.drop(columns=[label])
    classes = list(model.classes_)
    proba = pd.DataFrame(model.predict_proba(features), columns=classes)
    metrics = compute_metrics("binary", test[label].to_numpy(), model.predict(features), proba, classes, positive)
    return {"metrics": metrics, "fit_seconds": fit_seconds, "proba_positive": proba[positive].to_numpy()}


# --- comparison -------------------------------------------------------------------------------------


def oracle_logit(frame: Any) -> Any:
    """The generator's own logit without its noise term (``conveyor.demo.churn_logit``).

    P(churn | features) is the mean of sigmoid(logit + noise) over the noise, which rises with this
    value, so ranking by it is the best roc_auc any model of these features can reach: a ceiling.
    """
    from conveyor.demo import churn_logit

    return churn_logit(frame)


def paired_bootstrap(y_true: Any, ours: Any, other: Any, positive: Any) -> dict[str, float]:
    """95% interval of roc_auc(ours) - roc_auc(other) over resampled test rows, and how often ours >= other."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    truth = (np.asarray(y_true) == positive).astype(int)
    rng = np.random.default_rng(SEED)
    differences = []
    for _ in range(BOOTSTRAP):
        rows = rng.integers(0, len(truth), len(truth))
        if truth[rows].min() == truth[rows].max():
            continue
        differences.append(roc_auc_score(truth[rows], ours[rows]) - roc_auc_score(truth[rows], other[rows]))
    values = np.asarray(differences)
    return {
        "difference": float(roc_auc_score(truth, ours) - roc_auc_score(truth, other)),
        "ci95_low": float(np.quantile(values, 0.025)),
        "ci95_high": float(np.quantile(values, 0.975)),
        "share_ours_at_least_as_good": float((values >= 0).mean()),
        "resamples": int(len(values)),
    }


def table(models: dict[str, dict[str, float]]) -> list[str]:
    """The metrics of every model as aligned text lines."""
    names = list(models)
    metrics = [m for m in next(iter(models.values())) if all(m in scores for scores in models.values())]
    width = max(len(m) for m in metrics)
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n:>22}" for n in names)]
    for metric in metrics:
        lines.append(f"{metric:<{width}}  " + "  ".join(f"{models[n][metric]:>22.4f}" for n in names))
    return lines


# --- the many-class case ---------------------------------------------------------------------------

MANY_CLASSES, MANY_FEATURES, MANY_LIMIT, MANY_QUICK_LIMIT = 26, 16, 90, 30
BASELINE_THREADS = 1


def many_class_frame(rows: int) -> Any:
    """26 classes (labels A..Z) of 16 numeric features, from ``make_classification`` (seed 0)."""
    import pandas as pd
    from sklearn.datasets import make_classification

    features, labels = make_classification(
        n_samples=rows,
        n_features=MANY_FEATURES,
        n_informative=12,
        n_redundant=2,
        n_classes=MANY_CLASSES,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=SEED,
    )
    frame = pd.DataFrame(features, columns=[f"f{i:02d}" for i in range(MANY_FEATURES)])
    frame["letter"] = [chr(ord("A") + int(v)) for v in labels]
    return frame


def many_class_spec(time_limit: int) -> Any:
    """The churn spec turned into a 26-class accuracy pipeline (same split, trainer defaults)."""
    from conveyor.spec import PipelineSpec, get_spec

    document = get_spec(PIPELINE).model_dump(mode="json")
    document["name"] = PIPELINE  # the lake paths of the operators
    document["data"] |= {"label": "letter", "problem_type": "multiclass", "id_column": None}
    document["trainer"] |= {"eval_metric": "accuracy", "time_limit": time_limit}
    document["gate"] |= {"metric": "accuracy", "thresholds": {}}
    return PipelineSpec.model_validate(document)


def train_and_evaluate(spec: Any, record: dict[str, Any], time_limit: int) -> dict[str, Any]:
    """The train task, then the evaluate task (report included), each timed; the artifact's metadata."""
    from airflow.sdk import ObjectStoragePath

    from conveyor.operators.train import EvaluateModelOperator, TrainModelOperator

    document = spec.model_dump(mode="json")
    train = TrainModelOperator(
        task_id="train",
        spec=document,
        split={"dataset_version": "bench", "parts": record["parts"]},
        time_limit=time_limit,
    )
    train._cached_logger = QuietLog()
    started = time.perf_counter()
    trained = train.execute({"run_id": RUN_ID})
    train_seconds = time.perf_counter() - started
    evaluate = EvaluateModelOperator(task_id="evaluate", spec=document, model=trained)
    evaluate._cached_logger = QuietLog()
    started = time.perf_counter()
    evaluated = evaluate.execute({"run_id": RUN_ID})
    evaluate_seconds = time.perf_counter() - started
    metadata = json.loads((ObjectStoragePath(trained["model_uri"]).parent / "metadata.json").read_text())
    report = json.loads((ObjectStoragePath(evaluated["report"]).parent / "metrics.json").read_text())
    return {
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
        "metadata": metadata,
        "report": report,
        "metrics": evaluated["metrics"],
        "accuracy": evaluated["metrics"].get("accuracy"),
    }


def many_classes_case(args: argparse.Namespace) -> dict[str, Any]:
    """Ours (train + evaluate tasks) against HistGradientBoosting and logistic regression, 26 classes."""
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    time_limit = args.time_limit or (MANY_QUICK_LIMIT if args.quick else MANY_LIMIT)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-many-") as tmp_name:
        isolate(Path(tmp_name))
        from conveyor.data.splits import read_part, write_split
        from conveyor.lake import Lake

        spec = many_class_spec(time_limit)
        lake = Lake.from_env()
        record = write_split(lake, spec, "bench", RUN_ID, many_class_frame(rows))
        parts = {name: read_part(lake, PIPELINE, RUN_ID, name) for name in ("train", "test")}
        progress(f"many classes: {rows:,} rows, 26 classes; ours: train ({time_limit} s budget), then evaluate")
        ours = train_and_evaluate(spec, record, time_limit)
    for line in (ours["report"].get("context") or {}).get("model plan", "").split("; "):
        progress(f"  plan: {line}")
    started_at = ours["metadata"].get("training_seconds") or 0.0
    from threadpoolctl import threadpool_limits

    train, test = parts["train"], parts["test"]
    numeric, _ = feature_columns(train, "letter", None)
    scores = {}
    for name, model in (
        ("hist_gradient_boosting", hist_gradient_boosting(numeric, [], train)),
        ("logistic_regression", logistic_regression(numeric, [])),
    ):
        started = time.perf_counter()
        with threadpool_limits(BASELINE_THREADS):  # OpenMP on a shared, oversubscribed machine: see the docstring
            model.fit(train[numeric], train["letter"])
        accuracy = float((model.predict(test[numeric]) == test["letter"].to_numpy()).mean())
        scores[name] = {"accuracy": accuracy, "fit_seconds": time.perf_counter() - started}
        progress(f"many classes: {name} accuracy {accuracy:.4f} (fit {scores[name]['fit_seconds']:.1f} s)")
    best = max(scores, key=lambda n: scores[n]["accuracy"])
    ratio = ours["accuracy"] / scores[best]["accuracy"]
    importance = ours["report"].get("feature_importance_settings") or {}
    figures = {
        "ratio": ratio,
        "ours_accuracy": ours["accuracy"],
        "best_baseline": best,
        "baselines": scores,
        "time_limit": time_limit,
        "train_task_seconds": ours["train_seconds"],
        "train_wall_over_budget": ours["train_seconds"] / time_limit,
        "script_training_seconds": started_at,
        "startup_seconds": ours["train_seconds"] - started_at,
        "evaluate_task_seconds": ours["evaluate_seconds"],
        "evaluate_over_train": ours["evaluate_seconds"] / ours["train_seconds"],
        "importance": {
            k: importance.get(k) for k in ("rows", "available_rows", "repeats", "seconds", "budget_seconds")
        },
        "ours_best_model": ours["metadata"].get("best_model"),
        "plan": [m["key"] for m in ours["metadata"].get("model_plan", {}).get("models", [])],
        "rows": rows,
    }
    progress(
        f"many classes: ours accuracy {ours['accuracy']:.4f} vs {best} {scores[best]['accuracy']:.4f} "
        f"(ratio {ratio:.4f}); train task {ours['train_seconds']:.1f} s on a {time_limit} s budget "
        f"(start-up {figures['startup_seconds']:.1f} s), evaluate {ours['evaluate_seconds']:.1f} s "
        f"({figures['evaluate_over_train']:.0%} of train); {importance.get('summary', 'no importance')}"
    )
    return figures


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"suite: 20 s budgets; churn: {QUICK_ROWS:,} rows and {QUICK_LIMIT} s instead of {FULL_ROWS:,} rows",
    )
    parser.add_argument("--rows", type=int, default=None, help="rows to generate (overrides --quick)")
    parser.add_argument(
        "--case",
        choices=("suite", "churn", "many_classes", "both"),
        default="suite",
        help="suite: the public data sets (quality_suite); churn / many_classes / both: the generated tables",
    )
    parser.add_argument(
        "--sets", type=lambda text: [s for s in text.split(",") if s], default=None, help="suite: sets to run"
    )
    parser.add_argument(
        "--time-limit", type=int, default=None, help="our training budget in seconds (overrides --quick)"
    )
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the cases asked for and return the figures (the JSON line): ``ratio`` is the worst case's."""
    if args.case == "suite":
        from quality_suite import run_suite

        return run_suite(args)
    figures: dict[str, Any] = churn_case(args) if args.case in ("churn", "both") else {"bench": "model_quality"}
    if args.case in ("many_classes", "both"):
        many = many_classes_case(args)
        figures["many_classes"] = many
        figures["ratio_many_classes"] = many["ratio"]
        figures["ratio"] = min(figures.get("ratio_churn", many["ratio"]), many["ratio"])
        figures["baseline"] = "best of sklearn HistGradientBoostingClassifier and LogisticRegression, per case"
        figures.setdefault("met", {})["ratio"] = figures["ratio"] >= TARGET_RATIO
    return figures


def churn_case(args: argparse.Namespace) -> dict[str, Any]:
    """The churn comparison (the module docstring's first part); its figures."""
    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-quality-") as tmp_name:
        tmp = Path(tmp_name)
        isolate(tmp)
        from conveyor.data.splits import read_part, write_split
        from conveyor.demo import churn_frame
        from conveyor.lake import Lake
        from conveyor.spec import get_spec
        from conveyor.training.evaluate import scalar_metrics

        spec = get_spec(PIPELINE)
        label, id_column = spec.data.label, spec.data.id_column
        time_limit = args.time_limit or (QUICK_LIMIT if args.quick else int(spec.trainer.time_limit))
        progress(f"generating {rows:,} rows and splitting them as the pipeline does (seed {spec.split.seed})")
        lake = Lake.from_env()
        record = write_split(lake, spec, "bench", RUN_ID, churn_frame(rows))
        parts = {name: read_part(lake, PIPELINE, RUN_ID, name) for name in ("train", "validation", "test")}
        progress(f"split: { ({k: v['rows'] for k, v in record['parts'].items()}) }")

        progress(f"ours: train task (AutoGluon {spec.trainer.presets}, {time_limit} s budget), then evaluate")
        ours = train_and_score_ours(record, time_limit, tmp / "evaluate")
        positive = ours["positive_class"]
        progress(
            f"ours: trained in {ours['train_seconds']:.1f} s (best model {ours['best_model']}), "
            f"scored in {ours['score_seconds']:.1f} s; {GATE_METRIC} {ours['metrics'][GATE_METRIC]:.4f}"
        )
        test = parts["test"].drop(columns=[id_column])
        ours_proba = ours_test_proba(tmp / "evaluate", parts["test"], positive)

    train = parts["train"].drop(columns=[id_column])
    numeric, categorical = feature_columns(train, label, None)
    baselines = {
        "hist_gradient_boosting": hist_gradient_boosting(numeric, categorical, train),
        "logistic_regression": logistic_regression(numeric, categorical),
    }
    scored: dict[str, dict[str, Any]] = {}
    for name, model in baselines.items():
        progress(f"{name}: fit on the train part ({len(train):,} rows)")
        scored[name] = fit_and_score(model, train, test, label, positive)
        progress(
            f"{name}: fit in {scored[name]['fit_seconds']:.2f} s; "
            f"{GATE_METRIC} {scored[name]['metrics'][GATE_METRIC]:.4f}"
        )

    metrics = {"ours": scalar_metrics(ours["metrics"])} | {n: scalar_metrics(s["metrics"]) for n, s in scored.items()}
    for line in table(metrics):
        progress(line)
    best_name = max(scored, key=lambda n: metrics[n][GATE_METRIC])
    ours_score, best_score = metrics["ours"][GATE_METRIC], metrics[best_name][GATE_METRIC]
    bootstrap = paired_bootstrap(test[label].to_numpy(), ours_proba, scored[best_name]["proba_positive"], positive)
    progress(
        f"ours - {best_name} {GATE_METRIC}: {bootstrap['difference']:+.4f}, 95% interval "
        f"[{bootstrap['ci95_low']:+.4f}, {bootstrap['ci95_high']:+.4f}] over {bootstrap['resamples']} resamples"
    )
    if abs(bootstrap["difference"] - (ours_score - best_score)) > 1e-9:
        raise SystemExit("the bootstrap's roc_auc does not match compute_metrics': the probabilities differ")
    from sklearn.metrics import roc_auc_score

    oracle = float(roc_auc_score((test[label] == positive).astype(int), oracle_logit(test)))
    progress(f"ceiling: the generator's noise-free logit ranks the test rows at {GATE_METRIC} {oracle:.4f}")
    ratio = ours_score / best_score
    return {
        "bench": "model_quality",
        "baseline": f"best of sklearn HistGradientBoostingClassifier and LogisticRegression ({best_name})",
        "ratio": ratio,
        "ratio_churn": ratio,
        "gate_metric": GATE_METRIC,
        "ours_roc_auc": ours_score,
        "best_baseline": best_name,
        "best_baseline_roc_auc": best_score,
        "roc_auc_difference_bootstrap": bootstrap,
        "oracle_roc_auc": oracle,
        "metrics": metrics,
        "ours_best_model": ours["best_model"],
        "ours_validation_roc_auc": ours["validation_score"],
        "ours_decision_threshold": ours["decision_threshold"],
        "ours_train_seconds": ours["train_seconds"],
        "ours_score_seconds": ours["score_seconds"],
        "baseline_fit_seconds": {n: s["fit_seconds"] for n, s in scored.items()},
        "time_limit": time_limit,
        "rows": rows,
        "split_rows": {k: v["rows"] for k, v in record["parts"].items()},
        "positive_class": positive,
        "targets": {"ratio": f">= {TARGET_RATIO}"},
        "met": {"ratio": ratio >= TARGET_RATIO},
    }


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args())), flush=True)
