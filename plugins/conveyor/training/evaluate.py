"""Score a packed model on a run's test set through its own inference code (as serving will)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.lake import Lake

if TYPE_CHECKING:
    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec

# Permutation importance is bounded: it may take IMPORTANCE_SHARE of the model's training budget, and no
# more than what is left of EVALUATE_SHARE of the model's training time once the model is loaded and the test
# set scored (REPORT_SECONDS kept for the report); on at most IMPORTANCE_ROWS test rows, IMPORTANCE_REPEATS
# shuffles per feature (1 when fewer than IMPORTANCE_MIN_ROWS rows fit with more); the rows are sized from
# the model's predict speed (the test set's scoring and one small call, or a probe of IMPORTANCE_PROBE_ROWS
# rows), and a time box stops it at the budget whatever the estimate said.
IMPORTANCE_ROWS = 1000
IMPORTANCE_MIN_ROWS = 200
IMPORTANCE_REPEATS = 3
IMPORTANCE_FLOOR_ROWS = 50  # fewer rows than this fit the budget: importance is skipped (noise, not signal)
IMPORTANCE_SHARE = 0.1
IMPORTANCE_PROBE_ROWS = 200
IMPORTANCE_MARGIN = 0.8  # the sample is sized to this share of the time left (per-call costs, metrics)
EVALUATE_SHARE = 0.2  # the evaluate task's target: this share of the model's training time (issue: <= 25%)
REPORT_SECONDS = 2.0  # kept for the report (plots, HTML) out of the evaluate share


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-value metrics (what a gate compares and a registry stores); counts are left out."""
    from conveyor.model.metrics import HIGHER_IS_BETTER

    return {k: float(v) for k, v in metrics.items() if k in HIGHER_IS_BETTER and isinstance(v, (int, float))}


def predictions(model: Any, frame: Any) -> tuple[Any, Any]:
    """Predicted labels and, for classifiers, a class-probability frame (columns = class labels)."""
    import pandas as pd

    scored = model.predict_frame(frame)
    classes = model.metadata.class_labels
    proba = None
    if classes:
        proba = pd.DataFrame({label: scored[f"proba_{label}"].to_numpy() for label in classes})
    return scored["prediction"].to_numpy(), proba


@dataclass
class Importance:
    """Permutation importance per feature, and what it cost (shown on the evaluation report).

    :param values: feature -> mean drop of the metric when the feature is shuffled (features the time
        box left out are absent).
    :param rows: test rows it was computed on.
    :param available_rows: test rows there were.
    :param repeats: shuffles per feature.
    :param seconds: how long it took (probe included).
    :param budget_seconds: the time it was allowed.
    :param rows_per_second: the model's predict speed measured on the probe.
    :param features: features the model has.
    """

    values: dict[str, float]
    rows: int
    available_rows: int
    repeats: int
    seconds: float
    budget_seconds: float
    rows_per_second: float
    features: int

    def summary(self) -> str:
        """One line a person reads: "permutation importance on N rows, K repeats, T s"."""
        budget = (
            f"budget {self.budget_seconds:.1f} s: at most {IMPORTANCE_SHARE:.0%} of the training budget and what "
            f"is left of {EVALUATE_SHARE:.0%} of the training time"
        )
        if self.rows == 0:
            return (
                f"permutation importance skipped: the time left fits fewer than {IMPORTANCE_FLOOR_ROWS} test rows "
                f"({budget})"
            )
        partial = (
            f"; time box reached: {len(self.values)} of {self.features} features"
            if len(self.values) < self.features
            else ""
        )
        return (
            f"permutation importance on {self.rows:,} of {self.available_rows:,} test rows, {self.repeats} "
            f"repeat{'s' if self.repeats != 1 else ''}, {self.seconds:.1f} s ({budget}; model predicts "
            f"{self.rows_per_second:,.0f} rows/s){partial}"
        )

    def settings(self) -> dict[str, Any]:
        """The cost and settings as JSON (``metrics.json`` ``feature_importance_settings``)."""
        fields = ("rows", "available_rows", "repeats", "seconds", "budget_seconds", "rows_per_second", "features")
        return {name: getattr(self, name) for name in fields} | {
            "share_of_training_budget": IMPORTANCE_SHARE,
            "evaluate_share_of_training_time": EVALUATE_SHARE,
        }


def importance_budget(model: Any, spec: PipelineSpec, spent: float = 0.0) -> float:
    """Seconds permutation importance may take: ``IMPORTANCE_SHARE`` of the model's training budget, and
    at most what is left of ``EVALUATE_SHARE`` of its training time after ``spent`` (and ``REPORT_SECONDS``).

    :param model: a ``LoadedModel`` (its metadata's ``time_limit`` hyperparameter, the run's budget, and
        ``training_seconds``, how long the training took).
    :param spec: the pipeline (its trainer's ``time_limit`` when the metadata has none).
    :param spent: seconds the evaluation has taken so far (loading the model, scoring the test set).
    """
    limit = (model.metadata.hyperparameters or {}).get("time_limit") or spec.trainer.time_limit
    budget = IMPORTANCE_SHARE * float(limit)
    trained = getattr(model.metadata, "training_seconds", None)
    if trained:
        budget = min(budget, EVALUATE_SHARE * float(trained) - spent - REPORT_SECONDS)
    return max(budget, 0.0)


def importance_sample_size(rows_per_second: float, budget: float, features: int, available: int) -> tuple[int, int]:
    """Rows and repeats that fit the budget: ``rows x (1 + features x repeats)`` predictions.

    :param rows_per_second: the model's predict speed.
    :param budget: seconds allowed for the scoring (after the probe).
    :param features: features shuffled one by one.
    :param available: test rows there are.
    """
    cap = min(available, IMPORTANCE_ROWS)
    for repeats in (IMPORTANCE_REPEATS, 1):
        rows = min(cap, int(budget * rows_per_second / (1 + features * repeats)))
        if rows >= min(cap, IMPORTANCE_MIN_ROWS):
            return rows, repeats
    return max(1, min(cap, rows)), 1


def permutation_importance(
    model: Any,
    frame: Any,
    spec: PipelineSpec,
    metric: str,
    seed: int = 0,
    budget: float | None = None,
    scored: tuple[Any, Any, float] | None = None,
) -> Importance:
    """How much the gate metric drops when each feature is shuffled (model-agnostic), within a time budget.

    The rows are sized from the model's predict speed so that ``rows x (1 + features x repeats)``
    predictions fit the budget; a time box stops it at the budget whatever the estimate said.

    :param model: a ``LoadedModel``.
    :param frame: labelled rows.
    :param spec: the pipeline.
    :param metric: the metric to watch (higher is better after the sign flip).
    :param seed: the shuffle seed.
    :param budget: seconds it may take (default: :func:`importance_budget`).
    :param scored: the model's predictions of ``frame`` already made (labels, probabilities) and how long
        that call took: the sample's unshuffled score comes from them, and the speed from them and one
        small call instead of a probe.
    """
    import time

    import numpy as np

    from conveyor.model.metrics import HIGHER_IS_BETTER, compute_metrics

    started = time.perf_counter()
    budget = importance_budget(model, spec) if budget is None else budget
    classes = model.metadata.class_labels
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0

    def score(data: Any, predicted: tuple[Any, Any] | None = None) -> float | None:
        y_pred, proba = predictions(model, data) if predicted is None else predicted
        value = compute_metrics(
            spec.data.problem_type,
            data[spec.data.label].to_numpy(),
            y_pred,
            proba,
            classes,
            model.metadata.positive_class,
        ).get(metric)
        return None if value is None else sign * float(value)

    timed = (len(frame), scored[2]) if scored is not None else None
    per_call, rate = _probe(model, frame, seed, timed)
    features = list(model.feature_names)
    left = IMPORTANCE_MARGIN * max(budget - (time.perf_counter() - started), 0.0)
    calls = (0 if scored is not None else 1) + len(features) * IMPORTANCE_REPEATS  # each call pays per_call
    rows, repeats = importance_sample_size(rate, max(left - calls * per_call, 0.0), len(features), len(frame))
    if rows < min(IMPORTANCE_FLOOR_ROWS, len(frame)):  # a handful of rows says nothing: skip, and say so
        seconds = round(time.perf_counter() - started, 2)
        return Importance({}, 0, len(frame), 0, seconds, round(budget, 1), round(rate, 1), len(features))
    positions = np.sort(np.random.default_rng(seed).choice(len(frame), rows, replace=False))
    sample = frame.iloc[positions].reset_index(drop=True)
    base = None
    if scored is not None:
        y_pred, proba = scored[0], scored[1]
        base = score(sample, (np.asarray(y_pred)[positions], None if proba is None else proba.iloc[positions]))
    drops = _shuffled_drops(score, sample, features, repeats, (np.random.default_rng(seed), started + budget), base)
    seconds = round(time.perf_counter() - started, 2)
    return Importance(drops, rows, len(frame), repeats, seconds, round(budget, 1), round(rate, 1), len(features))


def _probe(model: Any, frame: Any, seed: int, timed: tuple[int, float] | None = None) -> tuple[float, float]:
    """The model's cost of one predict call and its rows per second beyond it, from two timed calls.

    Without ``timed``, a first call of a few rows warms the model up (not timed), then ``t(n) = per_call +
    n / rate`` is solved from a call of ``IMPORTANCE_PROBE_ROWS // 10`` rows and one of
    ``IMPORTANCE_PROBE_ROWS``. With ``timed`` (rows, seconds of a call already made, which warmed the
    model up), only the small call is made.
    """
    import time

    probe = frame.sample(min(len(frame), IMPORTANCE_PROBE_ROWS), random_state=seed)
    small = probe.iloc[: max(1, len(probe) // 10)]
    if timed is None:
        predictions(model, small.iloc[:5])
    started = time.perf_counter()
    predictions(model, small)
    small_seconds = time.perf_counter() - started
    if timed is None:
        started = time.perf_counter()
        predictions(model, probe)
        timed = (len(probe), time.perf_counter() - started)
    return solve_speed((len(small), small_seconds), timed)


def solve_speed(small: tuple[int, float], big: tuple[int, float]) -> tuple[float, float]:
    """Per-call seconds and rows per second from two timed predict calls, ``t(n) = per_call + n / rate``.

    :param small: rows and seconds of the smaller call.
    :param big: rows and seconds of the bigger call (when no bigger, all of its time is per row).
    """
    extra_rows = big[0] - small[0]
    per_row = (big[1] - small[1]) / extra_rows if extra_rows > 0 else big[1] / max(big[0], 1)
    per_row = max(per_row, 1e-7, big[1] / max(big[0], 1) / 100)  # a noisy small call: no more than 100x off
    return max(small[1] - small[0] * per_row, 0.0), 1.0 / per_row


def _shuffled_drops(
    score: Any, sample: Any, features: list[str], repeats: int, box: tuple[Any, float], base: float | None = None
) -> dict:
    """Feature -> mean drop of ``score`` over ``repeats`` shuffles; stops at the deadline (``perf_counter``).

    :param box: the random generator of the shuffles and the deadline.
    :param base: the sample's unshuffled score when already known.
    """
    import time

    rng, deadline = box
    base = score(sample) if base is None else base
    if base is None:
        return {}
    importance: dict[str, float] = {}
    for feature in features:
        if time.perf_counter() >= deadline:
            break
        drops = []
        for _ in range(repeats):
            shuffled = sample.copy()
            shuffled[feature] = rng.permutation(shuffled[feature].to_numpy())
            after = score(shuffled)
            drops.append(base - after if after is not None else 0.0)
        importance[feature] = round(sum(drops) / len(drops), 6)
    return importance


def read_image_part(lake: Lake, pipeline: str, run_id: str, part: str, scratch: Path) -> Any:
    """An image part of a run's split as a frame of local image paths and labels."""
    import pandas as pd

    from conveyor.lake import as_local_folder

    folder = as_local_folder(lake.models(pipeline, run_id) / "split" / part, scratch)
    frame = pd.read_csv(folder / "manifest.csv")
    frame["path"] = [str(folder / rel) for rel in frame["path"]]
    return frame


def save_predictions(path: Path, test: Any, spec: PipelineSpec, y_pred: Any, proba: Any) -> None:
    """The test set's predictions (id, truth, prediction, probabilities): what a deploy's smoke test
    compares the endpoint's answers with."""
    import pandas as pd

    key = "path" if spec.data.format == "images" else spec.data.id_column
    frame = pd.DataFrame({"row": range(len(test)), "truth": test[spec.data.label].to_numpy(), "prediction": y_pred})
    if key and key in test:
        frame.insert(1, "id", [str(v).rsplit("/", 1)[-1] if key == "path" else v for v in test[key]])
    if proba is not None:
        for label in proba.columns:
            frame[f"proba_{label}"] = proba[label].to_numpy()
    frame.to_parquet(path, index=False)


@dataclass
class Scored:
    """A model's answers on a run's test set, the metrics computed from them, and what each step cost.

    :param timings: seconds of each step so far: ``load`` (fetch, unpack, load), ``scoring`` (the test
        set's predict call), then ``importance`` when :func:`bounded_importance` ran.
    """

    model: Any
    test: Any
    y_true: Any
    y_pred: Any
    proba: Any
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def metadata(self) -> ModelMetadata:
        return self.model.metadata

    def cost(self) -> str:
        """The evaluation's cost in one line (the report's context), against its share of the training time."""
        steps = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items())
        rows = len(self.test)
        scoring = self.timings.get("scoring")
        speed = f" ({rows:,} test rows at {rows / scoring:,.0f} rows/s)" if scoring else ""
        trained = getattr(self.metadata, "training_seconds", None)
        target = (
            f"; target {EVALUATE_SHARE:.0%} of the {trained:.0f} s training = {EVALUATE_SHARE * trained:.1f} s"
            if trained
            else ""
        )
        return f"{steps}{speed}{target}"


def score_model(
    lake: Lake, spec: PipelineSpec, run_id: str, model_uri: str, workdir: Path, registered: Any = None
) -> Scored:
    """Load a ``model.tar.gz`` and score the run's test set through the model's own inference code.

    :param lake: the lake.
    :param spec: the pipeline.
    :param run_id: the run whose test set is used.
    :param model_uri: the model artifact's URI.
    :param workdir: a scratch folder (the model is unpacked in ``workdir/model``).
    :param registered: a registered model's ``RegisteredArchive`` (its archive is checked against the
        registry's sha256 before it is loaded); None for the model this run trained.
    """
    import time

    from conveyor.data.splits import read_part
    from conveyor.model.artifacts import LoadedModel, fetch
    from conveyor.model.metrics import compute_metrics

    started = time.perf_counter()
    model = LoadedModel(fetch(model_uri, workdir / "model", lake.conn_id, registered=registered))
    if spec.data.format == "images":
        test = read_image_part(lake, spec.name, run_id, "test", workdir / "test")
    else:
        test = read_part(lake, spec.name, run_id, "test")
    loaded = time.perf_counter()
    y_true = test[spec.data.label].to_numpy()
    y_pred, proba = predictions(model, test)
    timings = {"load": round(loaded - started, 2), "scoring": round(time.perf_counter() - loaded, 2)}
    metrics = compute_metrics(
        spec.data.problem_type, y_true, y_pred, proba, model.metadata.class_labels, model.metadata.positive_class
    )
    return Scored(model, test, y_true, y_pred, proba, metrics, timings)


def bounded_importance(scored: Scored, spec: PipelineSpec, metric: str) -> Importance:
    """Permutation importance of a scored model within what is left of the evaluation's budget
    (:func:`importance_budget` after loading and scoring), reusing the test set's predictions and their
    timing; its seconds go on ``scored.timings``.

    :param scored: what :func:`score_model` returned.
    :param spec: the pipeline.
    :param metric: the metric to watch.
    """
    spent = sum(scored.timings.values())
    budget = importance_budget(scored.model, spec, spent)
    if budget <= 0:
        features = len(scored.model.feature_names)
        scored.timings["importance"] = 0.0
        return Importance({}, 0, len(scored.test), 0, 0.0, 0.0, 0.0, features)
    timed = (scored.y_pred, scored.proba, scored.timings.get("scoring", 0.0))
    importance = permutation_importance(scored.model, scored.test, spec, metric, budget=budget, scored=timed)
    scored.timings["importance"] = importance.seconds
    return importance
