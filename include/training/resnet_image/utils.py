"""Helpers of the ResNet trainer: its errors, progress lines, option types, the runtime (device, DDP,
mixed precision), atomic files and the metrics of a confusion matrix.

A sibling of ``train.py``, imported as a plain module (SageMaker puts the source folder on
``sys.path``; ``python train.py`` puts the script's folder there). It imports nothing from Airflow or
Conveyor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

METRICS = ("accuracy", "balanced_accuracy", "f1_macro")


class TrainingInputError(ValueError):
    """Bad input data or options: the CLI reports it as ``train.py: <message>`` and exits 1."""


class ImageDecodeError(TrainingInputError):
    """An image of a channel does not decode."""


def log(message: str) -> None:
    """Print one progress line to stdout at once (rank 0 only), so a parent process can stream it.

    :param message: the line to print.
    """
    if os.environ.get("RANK", "0") == "0":
        print(f"[train.py] {message}", flush=True)


def quiet(message: str) -> None:
    """Drop a progress line (the log function of ranks other than 0).

    :param message: the line not printed.
    """


def clean_message(message: str) -> str:
    """The message of an error re-raised from a DataLoader worker, without the worker's traceback.

    :param message: the error's text.
    """
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split("Error: ", 1)[-1] if "Error: " in last else last


def clock(seconds: float) -> str:
    """Seconds as ``H:MM:SS``.

    :param seconds: a duration.
    """
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# --------------------------------------------------------------------------------- option types


def number_type(
    kind: type, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type`` that parses a finite number within bounds.

    :param kind: ``int`` or ``float``.
    :param low: the smallest value allowed (None: no bound).
    :param high: the largest value allowed (None: no bound).
    :param low_open: whether ``low`` itself is refused.
    :param high_open: whether ``high`` itself is refused.
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value

    return parse


def boolean(text: str) -> bool:
    """Parse true/false, yes/no, 1/0 (argparse ``type``; SageMaker passes every flag a value).

    :param text: the option's value.
    """
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def resume_option(text: str) -> str:
    """Parse ``--resume``: ``auto``, ``never`` or a checkpoint path (argparse ``type``).

    :param text: the option's value.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("expected auto, never or a checkpoint path")
    return text.strip()


def json_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as JSON values (paths as text).

    :param args: the parsed command line.
    """
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


# -------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """Where this process trains.

    :param device: the device.
    :param rank: the process rank (0 without DDP).
    :param world: the number of processes.
    :param distributed: whether a process group runs.
    """

    device: torch.device
    rank: int
    world: int
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Choose the device and start the process group under ``torchrun`` (``WORLD_SIZE`` > 1).

    :param args: the parsed command line.
    """
    use_cuda = torch.cuda.is_available() and (args.num_gpus is None or int(args.num_gpus) > 0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # rank 0 checks every image before the first collective: give it time on large channels
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=1))
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return Runtime(device=device, rank=rank, world=world, distributed=True)
    if use_cuda and torch.cuda.device_count() > 1:
        log(
            f"{torch.cuda.device_count()} GPUs visible, this process uses one: run under "
            f"torchrun --nproc_per_node {torch.cuda.device_count()} to use them all"
        )
    return Runtime(
        device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"), rank=0, world=1, distributed=False
    )


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch; set the determinism flags.

    :param seed: the seed.
    :param deterministic: whether to ask for deterministic algorithms.
    :param device: the training device.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def amp_dtype_for(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None on CPU or when off; bf16 for auto where the GPU supports it, else fp16.

    :param choice: the ``--amp`` value.
    :param device: the training device.
    """
    if device.type != "cuda" or choice == "off":
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def agree(decision: bool, runtime: Runtime, device: torch.device) -> bool:
    """Whether any process decided to stop (so every process stops after the same epoch).

    :param decision: this process's decision.
    :param runtime: where this process trains.
    :param device: the device collectives run on.
    """
    if not runtime.distributed:
        return decision
    flag = torch.tensor(int(decision), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def reduce_sum(tensors: list[torch.Tensor], distributed: bool) -> None:
    """Sum tensors over every process, in place (nothing to do in a single process).

    :param tensors: the tensors.
    :param distributed: whether a process group is running.
    """
    if distributed:
        for tensor in tensors:
            dist.all_reduce(tensor)


def versions() -> dict[str, str]:
    """Versions of the libraries the artifact needs to load."""
    import PIL
    import torchvision

    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


def describe_device(device: torch.device, processes: int) -> dict[str, Any]:
    """What trained the model, for ``metadata.json``.

    :param device: the training device.
    :param processes: the number of processes.
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "processes": processes}


# ---------------------------------------------------------------------------------------- files


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename, so a killed run never leaves half a file.

    :param obj: what to save.
    :param path: the target file.
    """
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def write_json(document: Any, path: Path) -> None:
    """Write JSON through a temporary file (NaN refused).

    :param document: the JSON document.
    :param path: the target file.
    """
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2, allow_nan=False))
    os.replace(temporary, path)


# -------------------------------------------------------------------------------------- metrics


def metrics_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over classes present) and macro F1 (as scikit-learn).

    :param confusion: counts, rows the true class, columns the predicted class.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    hits = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = support > 0
    seen = present | (predicted > 0)
    f1 = np.divide(2 * hits, support + predicted, out=np.zeros_like(hits), where=(support + predicted) > 0)
    return {
        "accuracy": float(hits.sum() / total) if total else 0.0,
        "balanced_accuracy": float((hits[present] / support[present]).mean()) if present.any() else 0.0,
        "f1_macro": float(f1[seen].mean()) if seen.any() else 0.0,
    }


def epoch_summary(
    loss_sum: Any, confusion: Any, seen: int, num_classes: int, seconds: float, optimizer: Any, distributed: bool
) -> dict[str, float]:
    """An epoch's training figures, summed over every process when distributed.

    :param loss_sum: this process's summed loss (a float64 tensor).
    :param confusion: this process's flat confusion counts (an int64 tensor).
    :param seen: the images this process trained on.
    :param num_classes: the number of classes.
    :param seconds: the epoch's wall time.
    :param optimizer: the optimizer (its current LR is reported).
    :param distributed: whether to sum the figures over every process.
    """
    import torch

    count = torch.tensor(seen, dtype=torch.int64, device=loss_sum.device)
    reduce_sum([loss_sum, confusion, count], distributed)
    images_total = int(count.item())
    metrics = metrics_from_confusion(confusion.view(num_classes, num_classes).cpu().numpy())
    return {
        "loss": loss_sum.item() / images_total if images_total else float("nan"),
        **metrics,
        "images": images_total,
        "seconds": seconds,
        "images_per_second": images_total / seconds if seconds > 0 else 0.0,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }
