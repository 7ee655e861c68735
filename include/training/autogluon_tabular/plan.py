"""The model plan of the AutoGluon tabular trainer: which models to fit, in which order, with which
sizes and per-model time limits, from the data's shape, the cores and the time budget.

A pure function (:func:`plan_models`) of rows, columns, classes, cores and budget; ``train.py``
turns the plan into AutoGluon's ``hyperparameters`` dict (:meth:`Plan.hyperparameters`), logs it
and writes it to ``model_plan.json`` and ``metadata.json`` (``extra.model_plan``) so a user sees why
a model was fit, shrunk or left out.

How it decides, in four rules a person can check by hand:

1. **Order**: LightGBM (``GBM``) first: the strongest fast model on tables (what scikit-learn's
   HistGradientBoosting is), then CatBoost, XGBoost, ExtraTrees, RandomForest.
2. **Cost**: each model's fit time is estimated as ``(COST[model] x rows x columns + TREE_OVERHEAD) x
   trees / cores x SAFETY``, where a boosting round of a multiclass problem grows one tree per class
   (``trees = rounds x classes``). The constants were measured on 2 cores (see the README).
3. **Shares**: the fit budget (``FIT_SHARE`` of the time budget, the rest is start-up, scoring and
   saving) is split by ``WEIGHT`` among the models kept; a model's share is its
   ``ag_args_fit.max_time_limit``. Boosting rounds and forest sizes are sized to fit the share
   (LightGBM's learning rate goes from 0.05 to 0.1 when fewer than 2,000 rounds fit).
4. **Model size**: a forest stores a value per class in every leaf; its trees are capped so that
   it holds at most ``FOREST_VALUES`` leaf values (``FOREST_LEAVES`` leaves a tree at most, about
   half the rows), which bounds the artifact, its load time and its predict time.
5. **Scoring cost**: a fitted model is scored on the validation rows inside the fit, and on as many
   test rows by the evaluate task; both cost ``PREDICT_COST[model] x scored rows x trees / cores x
   SAFETY``. Each model's share pays for its validation scoring (its ``max_time_limit`` is the share
   less that), and its size is capped so that scoring the validation and test rows takes at most its
   weight's part of ``SCORING_SHARE`` of the budget: a many-class booster grows a tree per class and
   round, and 10,000 trees predicted 150 rows/s, which made the evaluate task cost a third of training.
6. **Busy machine**: when the 1-minute load average is already at or above the cores, the fit uses
   half of them (at least 1): OpenMP threads waiting for a core spin, and LightGBM measured 3x
   slower with 2 threads than with 1 on a 2-core machine at load 8. Its threads then get about
   ``cores / (load + threads)`` of a core each (the scheduler shares the cores among the runnable
   threads), and every estimate is divided by that share (``core_share_percent``), so the plan
   shrinks instead of overrunning the budget. Each model also costs ``MODEL_SECONDS`` whatever its
   size (its library's import, preprocessing, saving), paid out of its share (LightGBM's is the fit's own).
7. **Cheap models**: a linear model (``LR``: logistic / linear regression) and k-nearest neighbours
   (``KNN``) win where trees do not (linear signals, pixels: scikit-learn's logistic regression beat
   LightGBM on the 8x8 digits); they have no size, cost little on a small table, and are fitted right
   after LightGBM with ``CHEAP_SHARE`` of the fit each (a limit of up to three times that if their estimate
   needs it), when the table is at most ``CHEAP_CELLS[model]``
   rows x columns (KNN also at most ``KNN_ROWS`` rows: it predicts by comparing with every row).
8. **Left out**: a model whose smallest useful size (``MIN_SIZE``) does not fit its share or the
   forest cap, and
   CatBoost / XGBoost on more than ``MAX_CLASSES_SLOW`` classes (their multiclass fit grows
   deep trees per class and ate whole budgets), and any model type the user excluded.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Core-seconds per (row x column x tree), measured with the libraries' defaults on 2 cores.
COST = {"GBM": 2.0e-8, "CAT": 1.0e-7, "XGB": 2.0e-7, "XT": 2.5e-7, "RF": 6.0e-7}
ORDER = ("GBM", "CAT", "XGB", "XT", "RF")
WEIGHT = {"GBM": 4.0, "CAT": 2.0, "XGB": 1.5, "XT": 1.0, "RF": 1.5}
NAMES = {"GBM": "LightGBM", "CAT": "CatBoost", "XGB": "XGBoost", "XT": "ExtraTrees", "RF": "RandomForest"}
# Rounds / trees: the library default in AutoGluon (boosters stop early on validation) and the smallest
# size worth fitting.
DEFAULT_SIZE = {"GBM": 10_000, "CAT": 10_000, "XGB": 10_000, "XT": 300, "RF": 300}
MIN_SIZE = {"GBM": 50, "CAT": 200, "XGB": 50, "XT": 50, "RF": 50}
SIZE_PARAM = {
    "GBM": "num_boost_round",
    "CAT": "iterations",
    "XGB": "n_estimators",
    "XT": "n_estimators",
    "RF": "n_estimators",
}
BOOSTERS = ("GBM", "CAT", "XGB")
MAX_CLASSES_SLOW = 10  # CatBoost and XGBoost are left out above this many classes
TREE_OVERHEAD = 2.0e-4  # core-seconds per tree whatever the data (small data: many fast rounds)
# Core-seconds a model costs whatever its size (import, preprocessing, saving): 4 models and the ensemble
# took 18.9 s of wall time at 11% of a core (load 17.8 on 2 cores), 1.0 left out models that would have fit.
MODEL_SECONDS = 0.4
SAFETY = 1.5  # estimates are multiplied by this (feature preprocessing, validation scoring, a loaded machine)
FIT_SHARE = 0.8  # share of the time budget given to AutoGluon's fit (less what start-up already spent)
MIN_FIT_SHARE = 0.4  # the fit's share whatever start-up spent
REFIT_SHARE = 0.6  # share of the fit budget when the best model is refit on train + validation afterwards
PRIORITY_TOP = 100
CHEAP = ("LR", "KNN")
CHEAP_NAMES = {"LR": "LinearModel", "KNN": "KNeighbors"}
CHEAP_SHARE = 0.05  # of the fit, each
CHEAP_CELLS = {"LR": 20_000_000, "KNN": 2_000_000}  # rows x columns at most
KNN_ROWS = 50_000
CHEAP_COST = {"LR": 5.0e-7, "KNN": 1.0e-7}  # core-seconds per row x column (x class for LR) to fit
KNN_PREDICT_COST = 2.0e-9  # core-seconds per scored row x training row x column
FORESTS = ("XT", "RF")
FOREST_LEAVES = 4000  # max_leaf_nodes of each forest tree
FOREST_VALUES = 5_000_000  # leaf values a forest may hold (8 bytes each: about 40 MB)
# Core-seconds per (scored row x tree), measured on 2 cores (LightGBM: 10,192 trees of 19 leaves predicted
# 1,000 rows in 3.3 CPU-seconds); forests' deep trees cost more a tree, CatBoost's oblivious trees less.
PREDICT_COST = {"GBM": 3.0e-7, "CAT": 1.0e-7, "XGB": 3.0e-7, "XT": 1.0e-6, "RF": 1.0e-6}
SCORING_SHARE = 0.15  # share of the budget that scoring the validation rows and as many test rows may take
VALIDATION_SHARE = 0.2  # validation rows per training row when there is no validation channel (AutoGluon's holdout)


@dataclass(frozen=True)
class PlannedModel:
    """One model of the plan.

    :param key: AutoGluon's model type key (``GBM``, ``CAT``, ``XGB``, ``XT``, ``RF``).
    :param name: the readable name.
    :param size: boosting rounds or trees it may grow.
    :param params: the hyperparameters given to AutoGluon (size, learning rate).
    :param estimated_seconds: the estimated fit time at ``size``.
    :param max_time_limit: the per-model time limit AutoGluon enforces (``ag_args_fit.max_time_limit``): its
        share of the fit less its estimated validation scoring.
    :param reason: why this size.
    :param scoring_seconds: the estimated time to score the validation rows and as many test rows (at the
        threads' full cores: the evaluate task runs later, at whatever load there is then).
    """

    key: str
    name: str
    size: int
    params: dict[str, Any]
    estimated_seconds: float
    max_time_limit: float
    reason: str
    scoring_seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """The models to fit (in order) and those left out, with the budget they were planned for.

    :param budget: the time budget of the whole training, in seconds.
    :param fit_time_limit: the ``time_limit`` given to AutoGluon's fit.
    :param shape: rows, columns, classes, cores and bagging folds planned for.
    :param models: the models kept, fitted first to last.
    :param left_out: model key -> why it is left out.
    """

    budget: float
    fit_time_limit: float
    shape: dict[str, int]
    models: list[PlannedModel]
    left_out: dict[str, str] = field(default_factory=dict)

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        """AutoGluon's ``hyperparameters`` argument: each model with its size, priority and time limit."""
        return {
            model.key: model.params
            | {
                "ag_args": {"priority": PRIORITY_TOP - index},
                "ag_args_fit": {"max_time_limit": model.max_time_limit, "num_cpus": self.shape["cores"]},
            }
            for index, model in enumerate(self.models)
        }

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON (``model_plan.json``, ``metadata.json`` ``extra.model_plan``)."""
        return asdict(self)

    def lines(self) -> list[str]:
        """The plan as the log lines a person reads."""
        shape = self.shape
        head = (
            f"model plan: {shape['rows']} rows x {shape['columns']} columns, {shape['classes']} classes, "
            f"{shape['cores']} cores (of {shape['machine_cores']}, load {shape['load_percent'] / 100:.1f}, "
            f"{shape.get('core_share_percent', 100)}% of a core each), "
            f"budget {self.budget:.0f}s (fit {self.fit_time_limit:.0f}s), "
            f"{shape['scored_rows']} validation rows scored"
        )
        kept = [
            f"  {i + 1}. {m.key} ({m.name}) {SIZE_PARAM.get(m.key, 'models')}={m.size}: ~{m.estimated_seconds:.1f}s, "
            f"limit {m.max_time_limit:.1f}s, scoring ~{m.scoring_seconds:.1f}s; {m.reason}"
            for i, m in enumerate(self.models)
        ]
        dropped = [f"  left out {key}: {why}" for key, why in self.left_out.items()]
        return [head, *kept, *dropped]


def estimate_seconds(key: str, rows: int, columns: int, classes: int, cores: int, size: int, folds: int = 1) -> float:
    """The estimated fit time of one model (see rule 2 of the module docstring).

    :param key: the model type key.
    :param rows: training rows.
    :param columns: feature columns.
    :param classes: classes (0 or 1 for regression, 2 for binary).
    :param cores: CPU cores.
    :param size: boosting rounds or trees.
    :param folds: bagging folds (each fold fits the model once).
    """
    trees = trees_of(key, classes, size)
    per_tree = COST[key] * rows * max(columns, 1) + TREE_OVERHEAD
    return per_tree * trees / max(cores, 0.01) * SAFETY * max(folds, 1)


def trees_of(key: str, classes: int, size: int) -> int:
    """The trees a model of ``size`` holds: a booster grows one a class and round on a multiclass problem.

    :param key: the model type key.
    :param classes: classes (0 or 1 for regression, 2 for binary).
    :param size: boosting rounds or trees.
    """
    return size * (classes if key in BOOSTERS and classes > 2 else 1)


def predict_seconds(key: str, scored_rows: int, classes: int, cores: int, size: int, folds: int = 1) -> float:
    """The estimated time to score ``scored_rows`` rows with one model (rule 5 of the module docstring).

    :param key: the model type key.
    :param scored_rows: rows scored.
    :param classes: classes (0 or 1 for regression, 2 for binary).
    :param cores: CPU cores.
    :param size: boosting rounds or trees.
    :param folds: bagging folds (each fold's model predicts).
    """
    trees = trees_of(key, classes, size)
    return PREDICT_COST[key] * max(scored_rows, 0) * trees / max(cores, 0.01) * SAFETY * max(folds, 1)


def _size_for(key: str, seconds: float, shape: dict[str, int], scoring: float | None = None) -> int:
    """The largest size (rounds / trees, at most the default) whose fit and validation scoring fit ``seconds``,
    and whose scoring of the validation and test rows fits ``scoring`` seconds (when given)."""
    rows, columns, classes, folds = (shape[k] for k in ("rows", "columns", "classes", "folds"))
    scored, cores = shape["scored_rows"], effective_cores(shape)
    seconds -= fixed_seconds(shape, key)
    one = estimate_seconds(key, rows, columns, classes, cores, 1, folds) + predict_seconds(
        key, scored, classes, cores, 1, folds
    )
    size = min(DEFAULT_SIZE[key], int(seconds / one)) if one > 0 else DEFAULT_SIZE[key]
    if scoring is not None:
        size = min(size, scoring_cap(key, scoring, shape))
    return min(size, forest_cap(rows, classes)) if key in FORESTS else size


def effective_cores(shape: dict[str, int]) -> float:
    """The cores the fit's threads really get: its threads x their share of a core (rule 6).

    :param shape: the plan's shape (``cores``, ``core_share_percent``).
    """
    return shape["cores"] * shape.get("core_share_percent", 100) / 100


def fixed_seconds(shape: dict[str, int], key: str) -> float:
    """What a model costs whatever its size (``MODEL_SECONDS`` at the cores' share), in seconds; none for
    LightGBM, always fit first: its fixed cost is the fit's own, left by ``FIT_SHARE``.

    :param shape: the plan's shape.
    :param key: the model type key.
    """
    if key == ORDER[0]:
        return 0.0
    return MODEL_SECONDS / max(effective_cores(shape) / shape["cores"], 0.01)


def scoring_cap(key: str, seconds: float, shape: dict[str, int]) -> int:
    """The most rounds / trees whose scoring of the validation rows and as many test rows fits ``seconds``.

    :param key: the model type key.
    :param seconds: the scoring time this model may take.
    :param shape: the plan's shape (``scored_rows``: validation rows; test rows are taken to be as many).
    """
    # At the threads' full cores: the evaluate task runs later, at whatever load there is then.
    one = predict_seconds(key, 2 * shape["scored_rows"], shape["classes"], shape["cores"], 1, shape["folds"])
    return int(seconds / one) if one > 0 else DEFAULT_SIZE[key]


def forest_cap(rows: int, classes: int) -> int:
    """The most trees a forest may grow under ``FOREST_VALUES`` (rule 4 of the module docstring).

    :param rows: training rows.
    :param classes: classes (0 for regression: one value a leaf).
    """
    leaves = max(1, min(FOREST_LEAVES, rows // 2))
    return FOREST_VALUES // (leaves * max(classes, 1))


def _candidates(shape: dict[str, int], excluded: set[str]) -> tuple[list[str], dict[str, str]]:
    """The model keys considered (in order) and those left out by rule (excluded, classes, forest size)."""
    keep, left_out = [], {}
    classes = shape["classes"]
    for key in ORDER:
        if key in excluded:
            left_out[key] = "excluded by --excluded-model-types"
        elif key in ("CAT", "XGB") and classes > MAX_CLASSES_SLOW:
            left_out[key] = f"{classes} classes > {MAX_CLASSES_SLOW}: its multiclass fit is slow per class"
        elif key in FORESTS and forest_cap(shape["rows"], classes) < MIN_SIZE[key]:
            left_out[key] = (
                f"{MIN_SIZE[key]} trees would hold more than {FOREST_VALUES:,} leaf values "
                f"({max(classes, 1)} a leaf): too big to load and predict fast"
            )
        else:
            keep.append(key)
    return keep, left_out


def plan_models(
    rows: int,
    columns: int,
    classes: int,
    cores: int,
    budget: float,
    excluded: list[str] | tuple[str, ...] = (),
    folds: int = 1,
    refit_full: bool = False,
    load: float = 0.0,
    scored_rows: int | None = None,
    spent: float = 0.0,
) -> Plan:
    """Plan the models to fit within ``budget`` (see the module docstring for the rules).

    :param rows: training rows.
    :param columns: feature columns.
    :param classes: distinct classes of the label (0 for regression).
    :param cores: CPU cores the fit may use.
    :param budget: the training time budget in seconds (> 0).
    :param excluded: AutoGluon model type keys never fitted.
    :param folds: bagging folds of the presets (1 without bagging).
    :param refit_full: whether the best model is refit on train + validation after the fit.
    :param load: the machine's 1-minute load average before the fit (rule 6).
    :param scored_rows: validation rows (the test set is taken to be as big); default: ``VALIDATION_SHARE``
        of ``rows``, what AutoGluon holds out without a validation channel.
    :param spent: seconds of the budget already spent (reading the data, importing AutoGluon): the fit
        gets ``FIT_SHARE`` of the budget less them (at least ``MIN_FIT_SHARE`` of it).
    :raises ValueError: a count or the budget is not positive.
    """
    if rows <= 0 or columns <= 0 or cores <= 0 or not budget > 0 or folds <= 0:
        raise ValueError(f"plan_models: rows, columns, cores, folds and budget must be > 0, got {locals()}")
    usable = max(1, cores // 2) if load >= cores else cores
    shape = {"rows": rows, "columns": columns, "classes": classes, "cores": usable, "folds": folds}
    shape |= {"machine_cores": cores, "load_percent": round(100 * load)}
    shape["core_share_percent"] = round(100 * min(1.0, cores / (load + usable))) if load >= cores else 100
    speed = effective_cores(shape)
    shape["scored_rows"] = int(scored_rows) if scored_rows is not None else max(1, round(rows * VALIDATION_SHARE))
    fit_limit = max(budget * FIT_SHARE - spent, budget * MIN_FIT_SHARE) * (REFIT_SHARE if refit_full else 1.0)
    keys, left_out = _candidates(shape, set(excluded))
    cheap = _cheap_models(shape, set(excluded), fit_limit, left_out)
    trees_limit, fit_limit = fit_limit * (1 - CHEAP_SHARE * len(cheap)), fit_limit
    while keys:
        total = sum(WEIGHT[k] for k in keys)
        shares = {k: trees_limit * WEIGHT[k] / total for k in keys}
        scoring = {k: budget * SCORING_SHARE * WEIGHT[k] / total for k in keys}
        too_big = [k for k in keys if _size_for(k, shares[k], shape, scoring[k]) < MIN_SIZE[k]]
        if not too_big:
            break
        key = too_big[-1]  # leave out the last (weakest) model that does not fit, then share again
        smallest = estimate_seconds(key, rows, columns, classes, speed, MIN_SIZE[key], folds) + fixed_seconds(
            shape, key
        )
        smallest += predict_seconds(key, shape["scored_rows"], classes, speed, MIN_SIZE[key], folds)
        if _size_for(key, shares[key], shape) < MIN_SIZE[key]:
            why = f"needs ~{smallest:.0f}s to fit and score validation at its smallest"
            left_out[key] = why + f" ({SIZE_PARAM[key]}={MIN_SIZE[key]}), more than its share of {shares[key]:.0f}s"
        else:
            scored = predict_seconds(key, 2 * shape["scored_rows"], classes, usable, MIN_SIZE[key], folds)
            left_out[key] = (
                f"scoring validation and test rows would take ~{scored:.0f}s at its smallest "
                f"({SIZE_PARAM[key]}={MIN_SIZE[key]}), more than its share of {scoring[key]:.0f}s"
            )
        keys.remove(key)
    if not keys:  # even one small LightGBM does not fit: fit it anyway with what there is, it stops on time
        keys, shares, scoring = ["GBM"], {"GBM": trees_limit}, {"GBM": budget * SCORING_SHARE}
        left_out.pop("GBM", None)
    models = [_planned(key, shares[key], scoring[key], shape) for key in keys]
    models[1:1] = cheap  # right after the first (LightGBM)
    return Plan(budget=float(budget), fit_time_limit=round(fit_limit, 1), shape=shape, models=models, left_out=left_out)


def _cheap_models(
    shape: dict[str, int], excluded: set[str], fit_limit: float, left_out: dict[str, str]
) -> list[PlannedModel]:
    """The cheap models kept (rule 7); those the table is too big for go to ``left_out``."""
    rows, columns, classes = shape["rows"], shape["columns"], max(shape["classes"], 1)
    cores, kept = effective_cores(shape), []
    for key in CHEAP:
        if key in excluded:
            left_out[key] = "excluded by --excluded-model-types"
        elif rows * columns > CHEAP_CELLS[key] or (key == "KNN" and rows > KNN_ROWS):
            left_out[key] = f"{rows:,} rows x {columns} columns: too big for a cheap model"
        else:
            fit = CHEAP_COST[key] * rows * columns * (classes if key == "LR" else 1) / max(cores, 0.01) * SAFETY
            scoring = KNN_PREDICT_COST * rows * columns * 2 * shape["scored_rows"] if key == "KNN" else 0.0
            why = "linear signals" if key == "LR" else "neighbours in feature space (e.g. pixels)"
            kept.append(
                PlannedModel(
                    key=key,
                    name=CHEAP_NAMES[key],
                    size=1,
                    params={},
                    estimated_seconds=round(fit, 2),
                    max_time_limit=round(min(fit_limit * 3 * CHEAP_SHARE, max(fit_limit * CHEAP_SHARE, fit)), 1),
                    reason=f"cheap on {rows:,} rows x {columns} columns: {why}",
                    scoring_seconds=round(scoring * SAFETY / shape["cores"], 2),
                )
            )
    return kept


def _planned(key: str, share: float, scoring: float, shape: dict[str, int]) -> PlannedModel:
    """One kept model, sized to its share of the fit and of the scoring time."""
    size = max(MIN_SIZE[key], _size_for(key, share, shape, scoring))
    params: dict[str, Any] = {SIZE_PARAM[key]: size}
    reason = "library default size fits its share" if size >= DEFAULT_SIZE[key] else "sized to fit its share"
    if size == scoring_cap(key, scoring, shape) and size < _size_for(key, share, shape):
        reason = f"capped so that scoring {shape['scored_rows']:,} validation and as many test rows fits {scoring:.0f}s"
    if key in FORESTS:
        params["max_leaf_nodes"] = FOREST_LEAVES
        if size == forest_cap(shape["rows"], shape["classes"]):
            reason = f"capped at {FOREST_VALUES:,} leaf values (model size)"
    if key == "GBM" and size < 2000:
        params["learning_rate"] = 0.1  # fewer rounds: a larger step, as HistGradientBoosting's default
        reason += "; learning_rate 0.1 (fewer rounds)"
    if key in BOOSTERS:
        reason += "; stops early on validation"
    rows, columns, classes, folds = (shape[k] for k in ("rows", "columns", "classes", "folds"))
    cores = effective_cores(shape)
    estimate = estimate_seconds(key, rows, columns, classes, cores, size, folds)
    validation = predict_seconds(key, shape["scored_rows"], classes, cores, size, folds)
    return PlannedModel(
        key=key,
        name=NAMES[key],
        size=size,
        params=params,
        estimated_seconds=round(estimate, 2),
        max_time_limit=round(min(share, max(share - validation - fixed_seconds(shape, key), estimate)), 1),
        reason=reason,
        scoring_seconds=round(predict_seconds(key, 2 * shape["scored_rows"], classes, shape["cores"], size, folds), 2),
    )
