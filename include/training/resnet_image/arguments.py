"""The command line of ``train.py``: every hyperparameter a flag, paths from the SageMaker environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from data import MANIFEST
from network import ARCHS
from recipe import DEFAULT_LR
from utils import METRICS, boolean, number_type, resume_option


def flag(group: Any, name: str, help_text: str, default: bool | None = False) -> None:
    """A boolean option: ``--name`` alone means true; ``--name false`` also works."""
    group.add_argument(name, nargs="?", const=True, default=default, type=boolean, metavar="BOOL", help=help_text)


def add_paths(parser: argparse.ArgumentParser, env: Any) -> None:
    """The input channels, output folders and GPUs (SageMaker environment defaults)."""
    paths = parser.add_argument_group("paths (default: the SageMaker environment variables)")
    paths.add_argument(
        "--train",
        type=Path,
        default=env.get("SM_CHANNEL_TRAIN"),
        help=f"folder with {MANIFEST} (path,label) and the training images (SM_CHANNEL_TRAIN)",
    )
    paths.add_argument(
        "--validation",
        type=Path,
        default=env.get("SM_CHANNEL_VALIDATION"),
        help="the same for validation (SM_CHANNEL_VALIDATION); without one, --validation-split "
        "of the training images is held out",
    )
    paths.add_argument(
        "--model-dir",
        type=Path,
        default=env.get("SM_MODEL_DIR"),
        help="where model.pt and metadata.json are written (SM_MODEL_DIR)",
    )
    paths.add_argument(
        "--output-data-dir",
        type=Path,
        default=env.get("SM_OUTPUT_DATA_DIR"),
        help="where history.json is written (SM_OUTPUT_DATA_DIR)",
    )
    paths.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="where last.pt and best.pt are written; <output-data-dir>/checkpoints if unset "
        "(on SageMaker, /opt/ml/checkpoints survives spot interruptions)",
    )
    paths.add_argument(
        "--num-gpus",
        type=number_type(int, 0),
        default=env.get("SM_NUM_GPUS") or None,
        help="GPUs this process may use (SM_NUM_GPUS); 0 forces the CPU; every visible GPU if unset",
    )


def add_model(parser: argparse.ArgumentParser) -> None:
    """The architecture, pretrained weights and image size."""
    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHS, default="resnet18", help="torchvision architecture")
    model.add_argument(
        "--pretrained-weights",
        default=None,
        help="local file (path or file:// URI) holding a state_dict or checkpoint for --arch; "
        "never downloaded; a different class count in fc is replaced by a new head",
    )
    flag(model, "--freeze-backbone", "train only the new fc head (backbone weights and BatchNorm statistics frozen)")
    model.add_argument(
        "--image-size",
        type=number_type(int, 32),
        default=224,
        help="training crop and evaluation crop in pixels (evaluation resizes to size*256/224 first)",
    )


def add_optimisation(parser: argparse.ArgumentParser) -> None:
    """Epochs, batch, optimizer, LR schedule, loss, early stopping, budget."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=number_type(int, 1), default=15, help="epochs to train at most")
    optim.add_argument("--batch-size", type=number_type(int, 1), default=32, help="images per batch and process")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    optim.add_argument(
        "--lr",
        type=number_type(float, 0, low_open=True),
        default=None,
        help=f"learning rate; {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adamw']} for adamw if unset",
    )
    optim.add_argument("--momentum", type=number_type(float, 0, 1, high_open=True), default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=number_type(float, 0), default=1e-4, help="weight decay")
    optim.add_argument("--lr-scheduler", choices=("cosine", "step"), default="cosine", help="LR schedule after warm-up")
    optim.add_argument("--lr-warmup-epochs", type=number_type(int, 0), default=0, help="epochs of linear LR warm-up")
    optim.add_argument(
        "--lr-warmup-decay",
        type=number_type(float, 0, 1, low_open=True),
        default=0.01,
        help="LR multiplier at the start of warm-up",
    )
    optim.add_argument("--lr-step-size", type=number_type(int, 1), default=10, help="epochs between LR steps (step)")
    optim.add_argument(
        "--lr-gamma",
        type=number_type(float, 0, 1, low_open=True),
        default=0.1,
        help="LR multiplier at every step (step)",
    )
    optim.add_argument(
        "--label-smoothing",
        type=number_type(float, 0, 1, high_open=True),
        default=0.0,
        help="label smoothing of the training loss",
    )
    optim.add_argument(
        "--balance",
        choices=("none", "sampler", "loss"),
        default="none",
        help="class imbalance: draw images by inverse class frequency (sampler) or weight the loss",
    )
    optim.add_argument(
        "--early-stopping-patience",
        type=number_type(int, 0),
        default=5,
        help="stop after this many epochs without a better validation score (0: never)",
    )
    optim.add_argument(
        "--gate-metric",
        choices=METRICS,
        default="balanced_accuracy",
        help="validation metric that picks the best epoch and is reported as validation_score",
    )
    optim.add_argument(
        "--time-limit",
        type=number_type(float, 0, low_open=True),
        default=None,
        help="seconds; training stops after the epoch that crosses it",
    )
    optim.add_argument(
        "--validation-split",
        type=number_type(float, 0, 0.5, low_open=True, high_open=True),
        default=0.15,
        help="share of training images held out when there is no validation channel",
    )


def add_runtime(parser: argparse.ArgumentParser) -> None:
    """Workers, seed, precision, memory format, compile, resume, progress."""
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--workers", type=number_type(int, 0), default=2, help="DataLoader worker processes")
    runtime.add_argument("--seed", type=int, default=0, help="random seed")
    flag(runtime, "--deterministic", "deterministic algorithms (torch.use_deterministic_algorithms, cudnn flags)")
    runtime.add_argument(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="mixed precision on CUDA (auto: bf16 where supported, else fp16); always off on CPU",
    )
    flag(runtime, "--channels-last", "channels_last memory format (default: on for CUDA, off for CPU)", None)
    flag(runtime, "--compile", "torch.compile the model (CUDA only)")
    runtime.add_argument(
        "--resume",
        type=resume_option,
        default="auto",
        help="auto: resume from <checkpoint-dir>/last.pt when it exists; never; or a checkpoint path",
    )
    flag(runtime, "--verify-images", "decode every image once before training so a bad file fails fast", True)
    runtime.add_argument(
        "--print-freq",
        type=number_type(int, 0),
        default=0,
        help="also print progress every N training steps (0: once per epoch)",
    )


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this script; paths default to the SageMaker environment variables."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a torchvision ResNet image classifier (SageMaker script mode).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_paths(parser, os.environ)
    add_model(parser)
    add_optimisation(parser)
    add_runtime(parser)
    return parser
