"""The fit of the AutoGluon tabular trainer: presets, the metric check, the fit itself (with the model
plan of ``plan.py`` as its ``hyperparameters``), the refit and the scored leaderboard.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pandas as pd
from data import TrainingInputError
from plan import FIT_SHARE, REFIT_SHARE, Plan, plan_models

INFER_LIMIT_BATCH_SIZE = 10_000
BAG_FOLDS = 8  # AutoGluon's folds when presets bag: the plan multiplies its estimates by them
# --refit-full auto: the best model (its base models included) is refit on train + validation when its fit
# time, scaled to the refit's rows and by REFIT_SAFETY, fits what is left of the budget less REFIT_RESERVE of
# it (saving, the deployment clone, the reports). Small tables finish their fit early (boosters stop on
# validation); the refit then gives the served model the validation rows too (measured on gapminder, 1,192
# training rows: test rmse 5.17 -> 4.95; tips, diabetes, wine, digits: level or better).
REFIT_SAFETY = 1.5
REFIT_RESERVE = 0.1


def _presets(text: str) -> str | list[str]:
    """One preset name, or a list for a comma-separated value.

    :param text: the ``--presets`` value.
    """
    names = [item.strip() for item in text.split(",") if item.strip()]
    return names[0] if len(names) == 1 else names


def _bags(presets: str | list[str]) -> bool:
    """Whether these presets turn on bagging (then validation data needs ``use_bag_holdout``).

    :param presets: the presets given to ``fit``.
    """
    from autogluon.tabular.configs.presets_configs import tabular_presets_alias, tabular_presets_dict

    for name in [presets] if isinstance(presets, str) else presets:
        config = tabular_presets_dict.get(tabular_presets_alias.get(name, name), {})
        if config.get("auto_stack") or config.get("num_bag_folds"):
            return True
    return False


def check_eval_metric(name: str | None, problem_type: str) -> None:
    """Refuse a metric name AutoGluon does not know for this problem type.

    :param name: the ``--eval-metric`` value.
    :param problem_type: binary, multiclass or regression.
    """
    if name is None:
        return
    from autogluon.core.metrics import METRICS

    if name not in METRICS[problem_type]:
        known = ", ".join(sorted(METRICS[problem_type]))
        raise TrainingInputError(f"eval metric '{name}' is not an AutoGluon {problem_type} metric (known: {known})")


def fit_predictor(
    args: argparse.Namespace, train: pd.DataFrame, validation: pd.DataFrame | None, path: Path, plan: Plan | None
) -> Any:
    """Fit a TabularPredictor in ``path`` with the options of the command line and the model plan.

    :param args: the parsed command line.
    :param train: the training rows (label included).
    :param validation: the validation rows, if any.
    :param path: the predictor's working folder.
    :param plan: the model plan (:func:`build_plan`), or None when ``--hyperparameters`` chose the models.
    """
    from autogluon.tabular import TabularPredictor

    presets = _presets(args.presets)
    predictor = TabularPredictor(
        label=args.label,
        problem_type=args.problem_type,
        eval_metric=args.eval_metric,
        path=str(path),
        verbosity=args.verbosity,
        learner_kwargs={"random_state": args.seed},
    )
    fit_kwargs: dict[str, Any] = {
        "tuning_data": validation,
        "time_limit": plan.fit_time_limit if plan is not None else fit_time_limit(args),
        "presets": presets,
        "excluded_model_types": args.excluded_model_types,
        "num_gpus": args.num_gpus,
    }
    if plan is not None:
        fit_kwargs["hyperparameters"] = plan.hyperparameters()
        fit_kwargs["num_cpus"] = plan.shape["cores"]
    elif args.hyperparameters is not None:
        fit_kwargs["hyperparameters"] = args.hyperparameters
    if args.infer_limit is not None:
        fit_kwargs.update(infer_limit=args.infer_limit, infer_limit_batch_size=INFER_LIMIT_BATCH_SIZE)
    if validation is not None and _bags(presets):
        fit_kwargs["use_bag_holdout"] = True  # bagged fits refuse tuning_data without it
    return predictor.fit(train, **fit_kwargs)


def fit_time_limit(args: argparse.Namespace) -> float:
    """AutoGluon's ``time_limit``: the budget less the share kept for start-up, scoring and saving.

    :param args: the parsed command line.
    """
    return round(args.time_limit * FIT_SHARE * (REFIT_SHARE if args.refit_full is True else 1.0), 1)


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_plan(
    args: argparse.Namespace, train: pd.DataFrame, validation: pd.DataFrame | None = None, spent: float = 0.0
) -> Plan | None:
    """The model plan for this data and budget (None when ``--hyperparameters`` or ``--model-plan presets``
    leave the choice of models to the user or to AutoGluon's presets).

    :param args: the parsed command line.
    :param train: the training rows (label included, id column excluded).
    :param validation: the validation rows (scored by the fit, and the test set taken to be as big), if any.
    :param spent: seconds of the budget already spent before the fit (reading, imports).
    """
    if args.hyperparameters is not None or args.model_plan == "presets":
        return None
    classes = 0 if args.problem_type == "regression" else int(train[args.label].nunique())
    presets = _presets(args.presets)
    return plan_models(
        rows=len(train),
        columns=train.shape[1] - 1,
        classes=classes,
        cores=cores(),
        budget=args.time_limit,
        excluded=args.excluded_model_types,
        folds=BAG_FOLDS if _bags(presets) else 1,
        refit_full=args.refit_full is True,  # auto refits only with the time the fit left over
        load=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
        scored_rows=len(validation) if validation is not None else None,
        spent=spent,
    )


def refit_decision(
    choice: bool | str, board: pd.DataFrame, model: str, rows: tuple[int, int], budget: float, elapsed: float
) -> tuple[bool, str]:
    """Whether to refit ``model`` on train + validation, and why (``--refit-full``: true, false or auto).

    :param choice: the ``--refit-full`` value.
    :param board: the leaderboard (its ``fit_time`` counts a model's base models).
    :param model: the best model of the fit.
    :param rows: training rows and validation rows.
    :param budget: the whole training budget in seconds.
    :param elapsed: seconds of it spent so far.
    """
    if choice is not True and choice != "auto":
        return False, "not asked (--refit-full false)"
    if choice is True:
        return True, "asked (--refit-full)"
    train_rows, validation_rows = rows
    if validation_rows == 0:
        return False, "auto: no validation rows to add"
    fitted = float(board.set_index("model").loc[model, "fit_time"])
    estimate = fitted * (train_rows + validation_rows) / max(train_rows, 1) * REFIT_SAFETY
    left = budget * (1 - REFIT_RESERVE) - elapsed
    reason = f"auto: {model} fit in {fitted:.1f}s, its refit ~{estimate:.1f}s, {max(left, 0.0):.1f}s of the budget left"
    return estimate <= left, reason


def refit_best(predictor: Any) -> str:
    """Refit the best model (and its ancestors) on train + validation and make it the served model.

    :param predictor: the fitted predictor.
    :return: the refit model's name.
    """
    best = predictor.model_best
    if best in predictor.model_refit_map().values():
        return best  # the presets already refit it
    refit = predictor.refit_full(model="best", set_best_to_refit_full=True)
    name = refit.get(best, best)
    predictor.set_model_best(name, save_trainer=True)
    return name


def score_table(predictor: Any, validation: pd.DataFrame | None) -> pd.DataFrame:
    """The leaderboard, scored on the validation data when there is some (``score_validation``).

    :param predictor: the fitted predictor.
    :param validation: the validation rows, if any.
    """
    refits = set(predictor.model_refit_map().values())
    # A binary metric of predicted classes depends on the decision threshold, calibrated after score_val.
    threshold_bound = predictor.problem_type == "binary" and bool(getattr(predictor.eval_metric, "needs_pred", True))
    if validation is None or (not refits and not threshold_bound):
        # Without a refit the fit already scored every model on the validation rows (its tuning data); a
        # metric of predicted classes of a binary model is scored again, at the calibrated threshold.
        board = predictor.leaderboard(silent=True)
        board["score_validation"] = board["score_val"]
        if validation is not None:
            board["pred_time_validation"] = board["pred_time_val"]
    else:
        board = predictor.leaderboard(validation, silent=True)
        board = board.rename(
            columns=lambda c: c.replace("_test", "_validation") if c.startswith(("score_", "pred_time_")) else c
        )
    board["trained_on_validation"] = board["model"].isin(refits)
    return board
