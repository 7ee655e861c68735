"""The command line of ``train.py``: every hyperparameter a flag, paths from the SageMaker environment."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from data import MANIFEST
from network import ARCHS, STEMS
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
    model.add_argument(
        "--arch",
        choices=ARCHS,
        default=None,
        help="ResNet depth; planned if unset: resnet10 for small inputs and under 5,000 images, else resnet18",
    )
    model.add_argument(
        "--stem",
        choices=("auto", *STEMS),
        default="auto",
        help="first layers: imagenet (7x7 stride-2 conv and max-pool) or small (3x3 stride-1 conv, no max-pool); "
        "auto: small when --image-size is 64 or less and no pretrained weights",
    )
    model.add_argument(
        "--width",
        type=number_type(int, 4),
        default=None,
        help="channels of the first stage (64 is torchvision's); planned if unset: 64, or 16-32 for small inputs",
    )
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
        default=None,
        help="training crop and evaluation crop in pixels (large inputs: evaluation resizes to size*256/224 "
        "first); planned if unset: the images' own size when it is 64 px or less, else 224",
    )


def add_optimisation(parser: argparse.ArgumentParser) -> None:
    """Epochs, batch, optimizer, LR schedule, loss, early stopping, budget."""
    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--epochs",
        type=number_type(int, 1),
        default=None,
        help="epochs to train at most; planned if unset: as many as the time limit holds (probed)",
    )
    optim.add_argument(
        "--batch-size",
        type=number_type(int, 1),
        default=None,
        help="images per batch and process; planned if unset: 32, or about 1/30 of the images (16-128) "
        "for small inputs",
    )
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    optim.add_argument(
        "--lr",
        type=number_type(float, 0, low_open=True),
        default=None,
        help="learning rate; planned if unset: 0.01 for sgd, 0.001 for adamw (small inputs: 0.1, 0.002)",
    )
    optim.add_argument("--momentum", type=number_type(float, 0, 1, high_open=True), default=0.9, help="SGD momentum")
    flag(optim, "--nesterov", "Nesterov momentum (SGD); planned if unset: on for small inputs", None)
    optim.add_argument(
        "--weight-decay",
        type=number_type(float, 0),
        default=None,
        help="weight decay; planned if unset: 1e-4, or 5e-4 for small inputs",
    )
    optim.add_argument(
        "--norm-weight-decay",
        type=number_type(float, 0),
        default=None,
        help="weight decay of BatchNorm weights and biases; planned if unset: --weight-decay, or 0 for small inputs",
    )
    optim.add_argument("--lr-scheduler", choices=("cosine", "step"), default="cosine", help="LR schedule after warm-up")
    optim.add_argument(
        "--lr-warmup-epochs",
        type=number_type(int, 0),
        default=None,
        help="epochs of linear LR warm-up; planned if unset: 1 when there are 5 epochs or more, else 0",
    )
    optim.add_argument(
        "--lr-warmup-decay",
        type=number_type(float, 0, 1, low_open=True),
        default=None,
        help="LR multiplier at the start of warm-up; planned if unset: 0.01, or 0.1 for small inputs",
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
        default=None,
        help="label smoothing of the training loss; planned if unset: 0.1 from scratch, 0 with pretrained weights",
    )
    optim.add_argument(
        "--augment",
        choices=("auto", "light", "strong"),
        default="auto",
        help="training augmentation: light (random crop; small inputs: padded crop) or strong (wider crops; small "
        "inputs: plus a small rotation and scale); auto: strong for 15+ epochs and under 1,000 images per class",
    )
    optim.add_argument(
        "--flip",
        choices=("auto", "on", "off"),
        default="auto",
        help="random horizontal flips; auto: on, unless mirrored small images stop looking like their class "
        "(digits, text)",
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
        default=None,
        help="stop after this many epochs without a better validation score (0: never); planned if unset: "
        "5, or 0 when the epochs are planned from the time limit",
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
    runtime.add_argument(
        "--workers",
        type=number_type(int, 0),
        default=None,
        help="DataLoader worker processes; planned if unset: 2, or 0 for small inputs on the CPU",
    )
    runtime.add_argument(
        "--threads",
        type=number_type(int, 1),
        default=None,
        help="CPU intra-op threads; planned if unset on the CPU: 1 when the machine is busy, else torch's default",
    )
    flag(
        runtime,
        "--sync-bn",
        "SyncBatchNorm under DDP on CUDA; planned if unset: on when a process's batch is under 16 images",
        None,
    )
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
