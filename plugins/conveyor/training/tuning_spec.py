"""The pipeline file's optional ``tuning:`` block: a search space over the trainer's hyperparameters.

Imported by ``conveyor.spec`` (cheap: pydantic only). The block's own rules (distributions, trials,
parallel trials) are checked by the models here; the rules across sections (a hyperparameter the
trainer has, a metric it reports on validation, a budget each trial can train in) by
:func:`tuning_problems`, which ``PipelineSpec`` calls. Every error names its field and the rule.

Tunable hyperparameters:

- ``resnet``: the training script's flags (``include/training/resnet_image/arguments.py``), written
  with ``_`` as in ``trainer.hyperparameters`` (``lr``, ``epochs``, ``optimizer`` ...);
- ``autogluon``: ``<model key>.<parameter>`` of one AutoGluon model (``GBM.learning_rate``,
  ``CAT.depth`` ...): a trial fits the tuned models with those values (plus the models of
  ``trainer.hyperparameters``), so the trainer's model plan gives way to the search.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

SAGEMAKER_MAX_VALUES = 30  # values of one categorical range in a SageMaker tuning job
MIN_TRIAL_SECONDS = 10  # a trial's share of the budget must be at least this (start-up alone takes seconds)

# The ResNet script's tunable flags: kind, and the choices or the lower bound the script accepts
# (tests/unit/training/test_tuning_spec.py checks this table against the script's own parser).
RESNET_HYPERPARAMETERS: dict[str, tuple[str, Any]] = {
    "arch": ("choice", ("resnet10", "resnet18", "resnet34", "resnet50")),
    "freeze_backbone": ("choice", (True, False)),
    "image_size": ("int", 32),
    "epochs": ("int", 1),
    "batch_size": ("int", 1),
    "optimizer": ("choice", ("sgd", "adamw")),
    "lr": ("positive", 0.0),
    "momentum": ("float", 0.0),
    "weight_decay": ("float", 0.0),
    "lr_scheduler": ("choice", ("cosine", "step")),
    "lr_warmup_epochs": ("int", 0),
    "lr_warmup_decay": ("positive", 0.0),
    "lr_step_size": ("int", 1),
    "lr_gamma": ("positive", 0.0),
    "label_smoothing": ("float", 0.0),
    "balance": ("choice", ("none", "sampler", "loss")),
    "early_stopping_patience": ("int", 0),
}
# AutoGluon model keys and the parameters of theirs a search may set (the model libraries ignore a
# misspelt parameter with a warning, so an unknown one is refused here instead).
AUTOGLUON_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "GBM": (
        "learning_rate",
        "num_leaves",
        "num_boost_round",
        "feature_fraction",
        "bagging_fraction",
        "bagging_freq",
        "min_data_in_leaf",
        "lambda_l1",
        "lambda_l2",
        "max_depth",
        "extra_trees",
    ),
    "CAT": ("learning_rate", "depth", "iterations", "l2_leaf_reg", "border_count", "random_strength"),
    "XGB": (
        "learning_rate",
        "max_depth",
        "n_estimators",
        "min_child_weight",
        "subsample",
        "colsample_bytree",
        "reg_alpha",
        "reg_lambda",
        "gamma",
    ),
    "RF": ("n_estimators", "max_features", "max_depth", "min_samples_leaf", "max_leaf_nodes", "criterion"),
    "XT": ("n_estimators", "max_features", "max_depth", "min_samples_leaf", "max_leaf_nodes", "criterion"),
    "KNN": ("n_neighbors", "weights"),
    "LR": ("C", "penalty"),
}
# Validation metrics each trainer can rank trials by (its --gate-metric / --eval-metric values).
RESNET_METRICS = ("accuracy", "balanced_accuracy", "f1_macro")
AUTOGLUON_METRICS: dict[str, tuple[str, ...]] = {
    "binary": ("accuracy", "balanced_accuracy", "roc_auc", "log_loss", "f1", "precision", "recall", "mcc"),
    "multiclass": ("accuracy", "balanced_accuracy", "log_loss", "f1_macro", "f1_weighted", "mcc"),
    "regression": ("rmse", "mae", "r2"),
}
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatRange(_Strict):
    """A real value in ``[low, high]``, drawn on a log scale with ``log``, or on a grid of ``step``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> FloatRange:
        _check_bounds(self.low, self.high, self.log, self.step)
        return self


class IntRange(_Strict):
    """An integer in ``[low, high]``, on a log scale with ``log``, or every ``step``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self) -> IntRange:
        _check_bounds(self.low, self.high, self.log, self.step)
        return self


class Categorical(_Strict):
    """One of ``choices`` (strings, numbers or booleans, each once)."""

    type: Literal["categorical"]
    choices: list[str | bool | int | float] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _unique(self) -> Categorical:
        seen = [(type(c).__name__, c) for c in self.choices]
        if len(set(seen)) != len(seen):
            raise ValueError(f"choices {self.choices!r}: rule 'each choice once'")
        return self


Distribution = Annotated[FloatRange | IntRange | Categorical, Field(discriminator="type")]


def _check_bounds(low: float, high: float, log: bool, step: float | None) -> None:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"low {low} and high {high}: rule 'finite bounds'")
    if low >= high:
        raise ValueError(f"low {low} and high {high}: rule 'low < high'")
    if log and low <= 0:
        raise ValueError(f"low {low} with log: true: rule 'low > 0 on a log scale'")
    if log and step is not None:
        raise ValueError(
            "log: true with a step: rule 'either log or step, not both' (Optuna and SageMaker refuse both)"
        )
    if step is not None and step > high - low:
        raise ValueError(f"step {step}: rule 'step <= high - low' ({high - low})")


class TuningSpec(_Strict):
    """``tuning:``: trials of the trainer with hyperparameters drawn from ``search_space``.

    The trials run before the gate; the best one's model goes on to evaluate, gate and register.
    ``budget`` (seconds for all trials; the run's time budget when unset) is split between them:
    each trial trains for ``budget x parallel / trials`` seconds.
    """

    # The validation metric trials are ranked by (the trainer's --gate-metric / --eval-metric).
    metric: str
    # maximize or minimize; unset: the metric's own (log_loss, rmse and mae are minimized).
    direction: Literal["maximize", "minimize"] | None = None
    trials: int = Field(8, ge=1, le=500)
    parallel: int = Field(1, ge=1, le=100)
    budget: int | None = Field(None, ge=1)
    # tpe: Optuna's TPE sampler locally, SageMaker's Bayesian strategy; random: random search on both.
    strategy: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    search_space: dict[str, Distribution] = Field(min_length=1, max_length=30)  # SageMaker's most

    @model_validator(mode="after")
    def _parallel(self) -> TuningSpec:
        if self.parallel > self.trials:
            raise ValueError(f"parallel {self.parallel} > trials {self.trials}: rule 'parallel <= trials'")
        natural = "minimize" if self.metric in LOWER_IS_BETTER else "maximize"
        if self.direction is not None and self.direction != natural:
            raise ValueError(
                f"direction {self.direction!r} with metric {self.metric!r}: rule 'the metric's own direction' "
                f"({natural}: {'lower' if natural == 'minimize' else 'higher'} is better)"
            )
        return self

    @property
    def goal(self) -> Literal["maximize", "minimize"]:
        """``maximize`` or ``minimize``: the direction, else the metric's own."""
        return self.direction or ("minimize" if self.metric in LOWER_IS_BETTER else "maximize")

    def settings(self, budget: int) -> dict[str, Any]:
        """The search's settings as the model's metadata keeps them (``tuning``), on every backend.

        :param budget: seconds for all trials.
        """
        return {
            "metric": self.metric,
            "direction": self.goal,
            "strategy": self.strategy,
            "budget": budget,
            "trial_seconds": self.trial_seconds(budget),
            "parallel": self.parallel,
        }

    def trial_seconds(self, budget: int) -> int:
        """Each trial's training budget: its share of ``budget`` (``budget x parallel / trials``).

        :param budget: seconds for all trials.
        """
        return max(1, budget * self.parallel // self.trials)


def flag_name(name: str) -> str:
    """A ResNet hyperparameter's name with ``_`` (``batch-size`` and ``batch_size`` are one flag).

    :param name: as written in the pipeline file.
    """
    return name.replace("-", "_")


def _space_problems(spec: PipelineSpec, tuning: TuningSpec) -> list[str]:
    """The search space's hyperparameters the trainer does not have, or ranges its flags refuse."""
    problems = []
    for name, dist in tuning.search_space.items():
        where = f"field 'tuning.search_space.{name}'"
        if spec.trainer.kind == "resnet":
            known = RESNET_HYPERPARAMETERS.get(flag_name(name))
            if known is None:
                problems.append(
                    f"{where}: unknown hyperparameter of the resnet trainer "
                    f"(one of: {', '.join(sorted(RESNET_HYPERPARAMETERS))})"
                )
                continue
            problems += _range_problems(where, flag_name(name), known, dist)
            continue
        model, _, param = name.partition(".")
        if model not in AUTOGLUON_HYPERPARAMETERS or not param:
            problems.append(
                f"{where}: an autogluon hyperparameter is '<model>.<parameter>' with a model key of "
                f"{', '.join(AUTOGLUON_HYPERPARAMETERS)} (e.g. GBM.learning_rate)"
            )
        elif param not in AUTOGLUON_HYPERPARAMETERS[model]:
            problems.append(
                f"{where}: unknown hyperparameter of AutoGluon's {model} "
                f"(one of: {', '.join(AUTOGLUON_HYPERPARAMETERS[model])})"
            )
        elif model in spec.trainer.excluded_model_types:
            problems.append(f"{where}: model {model} is in trainer.excluded_model_types: it is never trained")
    return problems


def _range_problems(where: str, name: str, known: tuple[str, Any], dist: Any) -> list[str]:
    """A range the ResNet flag cannot take: a wrong kind, a choice it refuses, a bound below its minimum."""
    kind, rule = known
    if kind == "choice":
        if not isinstance(dist, Categorical):
            return [f"{where}: {name} takes one of {list(rule)}: rule 'type: categorical'"]
        bad = [c for c in dist.choices if c not in rule or type(c) is not type(rule[0])]
        return [f"{where}: choices {bad} are not values of {name} (one of: {list(rule)})"] if bad else []
    if isinstance(dist, Categorical):
        numbers = [c for c in dist.choices if not isinstance(c, bool | str) and (kind != "int" or isinstance(c, int))]
        if len(numbers) < len(dist.choices):
            return [f"{where}: every choice of {name} must be {'an integer' if kind == 'int' else 'a number'}"]
        low = min(numbers)
    elif kind == "int" and isinstance(dist, FloatRange):
        return [f"{where}: {name} is an integer: rule 'type: int'"]
    else:
        low = dist.low
    if low < rule or (kind == "positive" and low <= rule):
        return [f"{where}: lowest value {low}: rule '{name} {'>' if kind == 'positive' else '>='} {rule}'"]
    return []


def _sagemaker_problems(spec: PipelineSpec, tuning: TuningSpec) -> list[str]:
    """What a SageMaker hyperparameter tuning job cannot take (``conveyor.aws.tuning``)."""
    if spec.trainer.kind != "resnet":
        return [
            "field 'tuning': compute 'sagemaker' tunes the resnet trainer's flags only: AutoGluon's model "
            "hyperparameters are one --hyperparameters JSON flag, which a SageMaker parameter range cannot reach into "
            "(tune it with compute 'local')"
        ]
    problems = []
    for name, dist in tuning.search_space.items():
        count = len(dist.choices) if isinstance(dist, Categorical) else None
        if not isinstance(dist, Categorical) and dist.step is not None:
            count = int((dist.high - dist.low) / dist.step + 1e-9) + 1  # a stepped range goes as its values
        if count is not None and count > SAGEMAKER_MAX_VALUES:
            problems.append(
                f"field 'tuning.search_space.{name}': {count} values: rule 'at most {SAGEMAKER_MAX_VALUES} "
                "on SageMaker' (a categorical or stepped range)"
            )
    return problems


def tuning_problems(spec: PipelineSpec) -> list[str]:
    """The ``tuning:`` block's problems across sections (none without the block).

    :param spec: the pipeline (its trainer, problem type, budget and compute).
    """
    tuning = spec.tuning
    if tuning is None:
        return []
    problems = _space_problems(spec, tuning)
    kind = spec.trainer.kind
    metrics = RESNET_METRICS if kind == "resnet" else AUTOGLUON_METRICS.get(spec.data.problem_type, ())
    if tuning.metric not in metrics:
        problems.append(
            f"field 'tuning.metric': {tuning.metric!r} is not a validation metric of the {kind} trainer "
            f"for {spec.data.problem_type} (one of: {', '.join(metrics)})"
        )
    if kind == "autogluon" and spec.trainer.eval_metric not in (None, tuning.metric):
        problems.append(
            f"field 'tuning.metric': {tuning.metric!r} differs from trainer.eval_metric "
            f"{spec.trainer.eval_metric!r}: rule 'trials are ranked by the metric they are fit for'"
        )
    fixed = {flag_name(n): v for n, v in spec.trainer.hyperparameters.items()}
    if kind == "resnet" and fixed.get("gate_metric", tuning.metric) != tuning.metric:
        problems.append("field 'tuning.metric': differs from trainer.hyperparameters.gate_metric")
    clash = sorted({flag_name(n) for n in tuning.search_space} & {flag_name(n) for n in spec.trainer.hyperparameters})
    if clash:
        problems.append(
            f"field 'tuning.search_space': {', '.join(clash)} also set in trainer.hyperparameters: "
            "rule 'a hyperparameter is fixed or tuned, not both'"
        )
    budget = tuning.budget or spec.trainer.time_limit
    share = budget * tuning.parallel / tuning.trials
    if share < MIN_TRIAL_SECONDS:
        problems.append(
            f"field 'tuning.budget': {budget}s for {tuning.trials} trials, {tuning.parallel} at a time, is "
            f"{share:.1f}s per trial: rule 'budget x parallel / trials >= {MIN_TRIAL_SECONDS}s'"
        )
    if spec.compute == "sagemaker":
        problems += _sagemaker_problems(spec, tuning)
    if spec.compute == "sagemaker" and tuning.trial_seconds(budget) >= spec.sagemaker.max_run_seconds:
        problems.append(
            f"field 'tuning.budget': {tuning.trial_seconds(budget)}s per trial: rule "
            f"'below sagemaker.max_run_seconds' ({spec.sagemaker.max_run_seconds}s)"
        )
    return problems
