"""The training scripts' command line, from the pipeline spec (every hyperparameter is a flag).

The same flags go to the script on every backend: as its arguments on the local backend, as
SageMaker hyperparameters (``conveyor.aws.training.hyperparameters``) in a training job.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

UNSET = (None, "", "None")  # what an empty form field or an absent Param renders to


class TrainingSettingsError(ConveyorError):
    """A training setting of the run breaks a rule (names the setting and the rule); not retried."""


def time_budget(spec: PipelineSpec, requested: Any = None) -> int:
    """The run's training budget in seconds: the one asked for (the form's), else the spec's.

    :param spec: the pipeline.
    :param requested: the budget the run asks for (templated; empty means the spec's).
    :raises TrainingSettingsError: the budget is not positive.
    """
    time_limit = int(spec.trainer.time_limit if requested in UNSET else requested)
    if time_limit <= 0:
        raise TrainingSettingsError(f"time budget {time_limit}s: rule 'time_limit > 0' (a model needs time to train)")
    return time_limit


def presets(spec: PipelineSpec, requested: Any = None) -> str:
    """The trainer's presets for the run: the ones asked for, else the spec's.

    :param spec: the pipeline.
    :param requested: the presets the run asks for (templated; empty means the spec's).
    """
    return spec.trainer.presets if requested in UNSET else str(requested)


def trainer_args(spec: PipelineSpec, time_limit: int, presets: str, num_gpus: int) -> list[str]:
    """The training script's flags (``include/training/<trainer>/train.py``).

    :param spec: the pipeline (data, split seed, trainer).
    :param time_limit: the training budget in seconds.
    :param presets: the AutoGluon presets (the ResNet trainer has none).
    :param num_gpus: GPUs the script may use (AutoGluon's ``--num-gpus``).
    """
    trainer = spec.trainer
    if trainer.kind == "resnet":
        return _resnet_args(spec, time_limit)
    args = [
        "--label",
        spec.data.label,
        "--problem-type",
        spec.data.problem_type,
        "--presets",
        presets,
        "--time-limit",
        str(time_limit),
        "--excluded-model-types",
        ",".join(trainer.excluded_model_types),
        "--seed",
        str(spec.split.seed),
        "--num-gpus",
        str(num_gpus),
    ]
    if trainer.eval_metric:
        args += ["--eval-metric", trainer.eval_metric]
    if trainer.hyperparameters:
        args += ["--hyperparameters", json.dumps(trainer.hyperparameters)]
    if spec.data.id_column:
        args += ["--id-column", spec.data.id_column]
    if trainer.refit_full is True:
        args.append("--refit-full")
    elif trainer.refit_full is False:
        args += ["--refit-full", "false"]  # the script's default is auto
    if trainer.infer_limit:
        args += ["--infer-limit", str(trainer.infer_limit)]
    return args


def _resnet_args(spec: PipelineSpec, time_limit: int) -> list[str]:
    """The ResNet trainer's flags: budget, seed, each hyperparameter (``True`` as a bare flag)."""
    trainer = spec.trainer
    args = ["--time-limit", str(time_limit), "--seed", str(spec.split.seed)]
    for key, value in trainer.hyperparameters.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (False, None):
            args += [flag, str(value)]
    if trainer.pretrained_weights:
        args += ["--pretrained-weights", trainer.pretrained_weights]
    return args
