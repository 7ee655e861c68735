"""Train an AutoGluon tabular model (SageMaker script mode).

Reads the ``train`` and ``validation`` channels (folders of ``.parquet`` / ``.csv`` files), fits a
``TabularPredictor`` with neural networks excluded, optionally refits the best model on
train + validation, and writes a small deployment clone of the predictor:

    <model_dir>/predictor/        the predictor, pruned to what the best model needs to predict
    <model_dir>/metadata.json     feature schema, class labels, scores, training baseline statistics
    <output_data_dir>/leaderboard.csv, fit_summary.json

Every path defaults to its SageMaker environment variable (``SM_CHANNEL_TRAIN``,
``SM_CHANNEL_VALIDATION``, ``SM_MODEL_DIR``, ``SM_OUTPUT_DATA_DIR``, ``SM_NUM_GPUS``) and every
hyperparameter is a flag. This script imports nothing from Airflow or Conveyor: it runs as a child
process on a laptop and unchanged inside a SageMaker training container.

This file holds the command line, the fit and :func:`main`; its siblings, imported as plain modules
from the script's folder (SageMaker puts the source folder on ``sys.path``, ``python train.py``
puts the script's folder there), hold the rest: ``data`` (channels, label checks) and ``baseline``
(drift statistics). ``metadata.json`` is a ``ModelMetadata`` of the shipped contract module
``conveyor_metadata``, on ``sys.path`` beside the scripts.

Bad input ends the process with ``train.py: <what is wrong>`` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import conveyor_metadata
import numpy as np
import pandas as pd
from baseline import (
    build_baseline,
    categorical_baseline,
    numeric_baseline,
    prediction_baseline,
    validation_predictions,
)
from conveyor_metadata import Feature, ModelMetadata, finite
from data import TrainingInputError, log, prepare_data, read_channel
from fit import (
    INFER_LIMIT_BATCH_SIZE,
    build_plan,
    check_eval_metric,
    fit_predictor,
    refit_best,
    refit_decision,
    score_table,
)
from plan import Plan

__all__ = [
    "TrainingInputError",
    "build_baseline",
    "build_plan",
    "categorical_baseline",
    "get_args_parser",
    "main",
    "numeric_baseline",
    "prediction_baseline",
    "run",
    "validation_predictions",
]

TRAINER = "autogluon_tabular"
PROBLEM_TYPES = ("binary", "multiclass", "regression")


# --------------------------------------------------------------------------------------- options


def _positive_int(text: str) -> int:
    """Parse an integer greater than 0 (argparse ``type``).

    :param text: the option's value.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    """Parse a number greater than 0 (argparse ``type``).

    :param text: the option's value.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """Parse an integer of 0 or more (argparse ``type``).

    :param text: the option's value.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object (argparse ``type``).

    :param text: the option's value, e.g. ``'{"GBM": {}, "CAT": {"iterations": 200}}'``.
    """

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _comma_list(text: str) -> list[str]:
    """Parse a comma-separated list; an empty string or ``none`` gives an empty list.

    :param text: the option's value, e.g. ``NN_TORCH,FASTAI``.
    """
    if text.strip().lower() in ("", "none"):
        return []
    return [item.strip() for item in text.split(",") if item.strip()]


def _flag(text: str) -> bool:
    """true/false, yes/no, 1/0 for a boolean option given a value (argparse ``type``).

    :param text: the option's value.
    """
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


def _refit_choice(text: str) -> bool | str:
    """``--refit-full``'s value: auto, or a boolean (:func:`_flag`).

    :param text: the option's value.
    """
    return "auto" if text.strip().lower() == "auto" else _flag(text)


def add_paths(parser: argparse.ArgumentParser, env: Any) -> None:
    """The input channels and output folders (SageMaker environment defaults).

    :param parser: the parser.
    :param env: the environment the defaults come from.
    """
    paths = parser.add_argument_group("paths (default: the SageMaker environment variables)")
    paths.add_argument(
        "--train",
        type=Path,
        default=env.get("SM_CHANNEL_TRAIN"),
        help="folder of .parquet/.csv training files (SM_CHANNEL_TRAIN)",
    )
    paths.add_argument(
        "--validation",
        type=Path,
        default=env.get("SM_CHANNEL_VALIDATION"),
        help="folder of .parquet/.csv validation files (SM_CHANNEL_VALIDATION); "
        "without one AutoGluon holds out part of the training data",
    )
    paths.add_argument(
        "--model-dir",
        type=Path,
        default=env.get("SM_MODEL_DIR"),
        help="where the predictor and metadata.json are written (SM_MODEL_DIR)",
    )
    paths.add_argument(
        "--output-data-dir",
        type=Path,
        default=env.get("SM_OUTPUT_DATA_DIR"),
        help="where leaderboard.csv and fit_summary.json are written (SM_OUTPUT_DATA_DIR)",
    )


def add_model(parser: argparse.ArgumentParser, env: Any) -> None:
    """The label, problem, metric, budget and AutoGluon settings (GPUs from ``SM_NUM_GPUS``).

    :param parser: the parser.
    :param env: the environment the defaults come from.
    """
    model = parser.add_argument_group("model")
    model.add_argument("--label", required=True, help="name of the label column")
    model.add_argument("--problem-type", required=True, choices=PROBLEM_TYPES, help="kind of prediction")
    model.add_argument(
        "--eval-metric",
        default=None,
        help="AutoGluon metric name (e.g. roc_auc, f1, accuracy, rmse); AutoGluon's default if unset",
    )
    model.add_argument(
        "--presets",
        default="medium_quality",
        help="AutoGluon presets, comma-separated (e.g. medium_quality, good_quality)",
    )
    model.add_argument("--time-limit", type=_positive_int, default=600, help="fit time budget in seconds (> 0)")
    model.add_argument(
        "--excluded-model-types",
        type=_comma_list,
        default="NN_TORCH,FASTAI",
        help="comma-separated AutoGluon model types never trained ('none' for none); "
        "neural nets are excluded because AutoGluon's torch extras are not installed",
    )
    model.add_argument(
        "--hyperparameters",
        type=_json_object,
        default=None,
        help='AutoGluon hyperparameters as a JSON object, e.g. \'{"GBM": {}, "CAT": {}}\'; '
        "the presets' model set if unset",
    )
    model.add_argument(
        "--model-plan",
        choices=("auto", "presets"),
        default="auto",
        help="auto: plan the models from rows, columns, classes, cores and the budget (plan.py); "
        "presets: the presets' model set; ignored when --hyperparameters is given",
    )
    model.add_argument("--id-column", default=None, help="row identifier column: dropped, never a feature")
    model.add_argument(
        "--refit-full",
        type=_refit_choice,
        nargs="?",
        const=True,
        default="auto",
        help="refit the best model on train + validation and serve the refit model: a bare flag or true, "
        "false, or auto (the default: refit when the fit left the time for it; SageMaker passes every "
        "hyperparameter a value)",
    )
    model.add_argument(
        "--infer-limit",
        type=_positive_float,
        default=None,
        help=f"max prediction seconds per row (measured on batches of {INFER_LIMIT_BATCH_SIZE})",
    )
    model.add_argument("--seed", type=int, default=0, help="random seed of data splits and folds")
    model.add_argument(
        "--num-gpus",
        type=_non_negative_int,
        default=int(env.get("SM_NUM_GPUS") or 0),
        help="GPUs AutoGluon may use (SM_NUM_GPUS)",
    )
    model.add_argument(
        "--verbosity", type=int, default=2, choices=range(5), metavar="{0..4}", help="AutoGluon log verbosity"
    )


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this script; paths default to the SageMaker environment variables."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an AutoGluon TabularPredictor (SageMaker script mode).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_paths(parser, os.environ)
    add_model(parser, os.environ)
    return parser


# ------------------------------------------------------------------------------------------ main


def train_and_clone(
    args: argparse.Namespace,
    data: tuple[pd.DataFrame, pd.DataFrame | None],
    work_dir: Path,
    final_dir: Path,
    plan: Plan | None = None,
    run_started: float | None = None,
) -> tuple[Any, pd.DataFrame, str, str, Any, dict[str, Any] | None]:
    """Fit, score on validation, refit if asked (or, for auto, if the time is left), and write the
    deployment clone.

    :param args: the parsed command line.
    :param data: the training rows (label included) and the validation rows, if any.
    :param work_dir: the predictor's working folder.
    :param final_dir: where the deployment clone goes.
    :param plan: the model plan (None: ``--hyperparameters`` or the presets choose the models).
    :param run_started: when the run started (``time.time``; default: now), for the auto refit's budget.
    :return: the predictor, the leaderboard, the served model, the scored model, its validation score, and
        the distribution of its validation predictions (:func:`prediction_baseline`; None without validation).
    """
    (train, validation), started = data, time.time()
    run_started = started if run_started is None else run_started
    predictor = fit_predictor(args, train, validation, work_dir, plan)
    fitted_best = predictor.model_best
    board = score_table(predictor, validation)
    scored_model = predictor.model_refit_map(inverse=True).get(fitted_best, fitted_best)
    score = board.set_index("model").loc[scored_model, "score_validation"]
    log(
        f"fit done in {time.time() - started:.1f}s: best model {fitted_best}, validation "
        f"{predictor.eval_metric.name} = {finite(score) if pd.notna(score) else None} ({scored_model})"
    )
    predictions = None
    if validation is not None:  # before any refit: the scored model never saw these rows
        predicted = validation_predictions(predictor, validation, args.label, scored_model)
        predictions = prediction_baseline(predictor, validation, args.label, args.problem_type, scored_model, predicted)
    best = fitted_best
    rows = (len(train), len(validation) if validation is not None else 0)
    refit, why = refit_decision(args.refit_full, board, fitted_best, rows, args.time_limit, time.time() - run_started)
    if refit:
        best = refit_best(predictor)
        board = score_table(predictor, validation)
        log(f"refit: {scored_model} refit on train + validation as {best} ({why})")
    elif args.refit_full == "auto":
        log(f"refit: none ({why})")
    predictor.clone_for_deployment(path=str(final_dir))
    return predictor, board, best, scored_model, score, predictions


def _reset_dir(path: Path) -> None:
    """Remove a folder this script writes, so a re-run replaces it instead of failing.

    :param path: the folder.
    """
    if path.exists():
        shutil.rmtree(path)


def _native(value: Any) -> Any:
    """A numpy scalar as the Python value JSON can hold.

    :param value: any value.
    """
    return value.item() if isinstance(value, np.generic) else value


def _read_data(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Read and check both channels (see :func:`data.prepare_data`).

    :param args: the parsed command line.
    """
    train = read_channel(args.train, "train", "SM_CHANNEL_TRAIN")
    validation = None
    if args.validation is not None:
        validation = read_channel(args.validation, "validation", "SM_CHANNEL_VALIDATION")
    train, validation = prepare_data(train, validation, args.label, args.problem_type, args.id_column)
    log(
        f"data: train {train.shape[0]} rows x {train.shape[1] - 1} features; "
        + (f"validation {validation.shape[0]} rows" if validation is not None else "no validation channel")
    )
    return train, validation


def run(args: argparse.Namespace) -> ModelMetadata:
    """Check the inputs, train, write the artifact and reports; return the metadata written.

    :param args: the parsed command line.
    """
    started = time.time()
    if args.model_dir is None:
        raise TrainingInputError("model dir: none given (set SM_MODEL_DIR or pass --model-dir)")
    if args.output_data_dir is None:
        raise TrainingInputError("output data dir: none given (set SM_OUTPUT_DATA_DIR or pass --output-data-dir)")
    log(
        f"start: label={args.label!r} problem_type={args.problem_type} presets={args.presets} "
        f"time_limit={args.time_limit}s"
    )
    train, validation = _read_data(args)
    check_eval_metric(args.eval_metric, args.problem_type)
    import autogluon.tabular  # noqa: F401  (imported before the plan: its seconds count against the budget)

    plan = build_plan(args, train, validation, spent=time.time() - started)
    for line in plan.lines() if plan is not None else ["model plan: none (--hyperparameters or --model-plan presets)"]:
        log(line)

    model_dir, output_dir = Path(args.model_dir).resolve(), Path(args.output_data_dir).resolve()
    model_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir, final_dir = model_dir / "predictor-work", model_dir / "predictor"
    _reset_dir(work_dir)
    _reset_dir(final_dir)
    (model_dir / "metadata.json").unlink(missing_ok=True)

    try:
        predictor, board, best, scored_model, score, predictions = train_and_clone(
            args, (train, validation), work_dir, final_dir, plan, run_started=started
        )
    except BaseException:
        _reset_dir(work_dir)  # nothing half-written stays behind
        _reset_dir(final_dir)
        raise
    _reset_dir(work_dir)
    size_mb = sum(p.stat().st_size for p in final_dir.rglob("*") if p.is_file()) / 2**20
    log(f"saved: {final_dir} ({size_mb:.1f} MB), serving model {best}")

    fields = _metadata_fields(
        args, predictor, (train, validation), (best, scored_model, score, predictions), started, size_mb
    )
    extra = {"model_plan": plan.as_dict()} if plan is not None else {}  # written as a top-level key
    metadata = ModelMetadata(**fields, extra=extra)
    conveyor_metadata.write_fields(metadata, model_dir / conveyor_metadata.FILENAME, fields)
    write_reports(board, metadata, output_dir, plan)
    log(f"wrote {model_dir / 'metadata.json'}, {output_dir / 'leaderboard.csv'}, {output_dir / 'fit_summary.json'}")
    return metadata


def _metadata_fields(
    args: argparse.Namespace,
    predictor: Any,
    data: tuple[pd.DataFrame, pd.DataFrame | None],
    fitted: tuple[str, str, Any, Any],
    started: float,
    size_mb: float,
) -> dict[str, Any]:
    """The ``ModelMetadata`` fields this trainer sets (a regressor has no classes, only binary a threshold).

    :param args: the parsed command line.
    :param predictor: the fitted predictor.
    :param data: the training rows (label included, id column excluded) and the validation rows, if any.
    :param fitted: what :func:`train_and_clone` returned about the models: the served model, the model
        scored on validation, its validation score and the distribution of its validation predictions.
    :param started: when the run started (``time.time``).
    :param size_mb: the size of the deployment clone.
    """
    (train, validation), (best, scored_model, score, predictions) = data, fitted
    metric = predictor.eval_metric.name
    fields: dict[str, Any] = {
        "trainer": TRAINER,
        "label": args.label,
        "problem_type": args.problem_type,
        "eval_metric": metric,
        "id_column": args.id_column,
        "features": tuple(Feature(name=str(c), dtype=str(train[c].dtype)) for c in train.columns if c != args.label),
    }
    if args.problem_type != "regression":
        fields["class_labels"] = [_native(c) for c in predictor.class_labels]
        if args.problem_type == "binary":
            fields["positive_class"] = _native(predictor.positive_class)
            fields["decision_threshold"] = finite(predictor.decision_threshold)
    baseline = build_baseline(train, args.label, args.problem_type)
    if predictions is not None:
        baseline["predictions"] = predictions
        baseline["predictions_source"] = {"channel": "validation", "rows": int(len(validation)), "model": scored_model}
    return fields | {
        "best_model": best,
        "validation_score": finite(score) if pd.notna(score) else None,
        "validation_metric": metric,
        "validation_model": scored_model,
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": {"train": int(len(train)), "validation": int(len(validation)) if validation is not None else 0},
        "training_seconds": round(time.time() - started, 1),
        "artifact_mb": round(size_mb, 2),
        "versions": _versions(),
        "baseline": baseline,
    }


def _versions() -> dict[str, str]:
    """Versions of the libraries the artifact needs to load."""
    from autogluon.tabular import __version__ as autogluon_version

    return {"autogluon": autogluon_version, "pandas": pd.__version__, "python": platform.python_version()}


def _cell(value: Any) -> float | None:
    """A leaderboard number as JSON (None when missing or not finite).

    :param value: the cell.
    """
    return finite(value) if pd.notna(value) else None


def write_reports(board: pd.DataFrame, metadata: ModelMetadata, output_dir: Path, plan: Plan | None = None) -> None:
    """Write ``leaderboard.csv``, a small ``fit_summary.json`` and the model plan (``model_plan.json``).

    :param board: the leaderboard from :func:`score_table`.
    :param metadata: the metadata written next to the model.
    :param output_dir: the output data folder.
    :param plan: the model plan (its per-model time limits go beside each model's fit time), or None.
    """
    board.to_csv(output_dir / "leaderboard.csv", index=False)
    limits = {m.name: m.max_time_limit for m in plan.models} if plan is not None else {}
    models = [
        {
            "model": str(row["model"]),
            "score_validation": _cell(row["score_validation"]),
            "score_val": _cell(row["score_val"]),
            "fit_time": _cell(row["fit_time"]),
            "time_limit": next((v for k, v in limits.items() if str(row["model"]).startswith(k)), None),
            "stack_level": int(row["stack_level"]),
            "trained_on_validation": bool(row["trained_on_validation"]),
        }
        for _, row in board.iterrows()
    ]
    summary = {
        key: getattr(metadata, key)
        for key in ("best_model", "eval_metric", "validation_score", "validation_model", "rows", "training_seconds")
    } | {"models": models, "plan": plan.as_dict() if plan is not None else None}
    (output_dir / "fit_summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    if plan is not None:
        (output_dir / "model_plan.json").write_text(json.dumps(plan.as_dict(), indent=2, allow_nan=False))


def main(args: argparse.Namespace) -> None:
    """Run the training; bad input exits with ``train.py: <message>`` and status 1.

    :param args: the parsed command line (see :func:`get_args_parser`).
    """
    try:
        run(args)
    except TrainingInputError as error:
        sys.exit(f"train.py: {error}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
    # Everything is written and closed; skip tearing down thousands of modules and fitted models
    # (1-3 s of interpreter shutdown that the caller would wait for).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
