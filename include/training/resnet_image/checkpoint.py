"""Checkpoints of the ResNet trainer: where a training stands (:class:`Progress`), which checkpoint
to resume from, whether it belongs to this training, and restoring its states.

``train.py`` writes two checkpoint dicts per epoch: ``best.pt`` (``model``, ``epoch``, ``metric``,
``score``, ``class_to_idx``, ``arch``) when the epoch is the best so far, and ``last.pt`` (``model``,
``optimizer``, ``lr_scheduler``, ``epoch``, ``best_metric``, the :meth:`Progress.counters`, ``args``,
``class_to_idx``, ``scaler``, ``rng``, ``history``) to resume from.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from conveyor_metadata import finite
from torch import nn
from utils import METRICS, TrainingInputError, log


def checkpoint_path(args: argparse.Namespace) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    :param args: the parsed command line (``--resume``, checkpoint folder resolved).
    """
    if args.resume == "never":
        return None
    if args.resume == "auto":
        path = args.checkpoint_dir / "last.pt"
        return path if path.is_file() else None
    path = Path(args.resume)
    if not path.is_file():
        raise TrainingInputError(f"--resume {path}: no such checkpoint")
    return path


def read_checkpoint(path: Path, args: argparse.Namespace, class_to_idx: dict[str, int]) -> dict[str, Any] | None:
    """Load a checkpoint and check it belongs to this training; with ``--resume auto`` a foreign one is ignored.

    :param path: the checkpoint.
    :param args: the parsed command line.
    :param class_to_idx: this training's classes.
    """
    explicit = args.resume != "auto"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - an unreadable file is reported or skipped below
        text = str(error).strip()
        problem = f"cannot read it ({text.splitlines()[0] if text else type(error).__name__})"
    else:
        problem = _mismatch(checkpoint, args, class_to_idx)
        if problem is None:
            return checkpoint
    if explicit:
        raise TrainingInputError(f"--resume {path}: {problem}")
    log(f"ignoring checkpoint {path}: {problem}; training from the start")
    return None


def _mismatch(checkpoint: Any, args: argparse.Namespace, class_to_idx: dict[str, int]) -> str | None:
    """Why a loaded checkpoint is not one of this training (None when it is).

    :param checkpoint: what ``torch.load`` returned.
    :param args: the parsed command line.
    :param class_to_idx: this training's classes.
    """
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
        return "it is not a checkpoint of this script"
    if checkpoint.get("class_to_idx") != class_to_idx:
        return f"it was trained on other classes ({sorted(checkpoint.get('class_to_idx') or {})})"
    saved = checkpoint.get("args", {})
    before = {"stem": "imagenet", "width": 64}  # what checkpoints written before these options had
    for key in ("arch", "stem", "width", "optimizer", "freeze_backbone", "balance"):
        if saved.get(key, before.get(key)) != getattr(args, key):
            value = saved.get(key, before.get(key))
            return f"it was trained with --{key.replace('_', '-')} {value}, not {getattr(args, key)}"
    return None


@dataclass
class Progress:
    """Where a training stands: epochs done, the best epoch so far, early-stopping count, history.

    :param epoch: epochs done.
    :param best_score: the best validation score so far (the gate metric).
    :param best_loss: the validation loss of that epoch (breaks ties of the score).
    :param best_epoch: the 1-based epoch of the best score (0: none yet).
    :param stale_epochs: epochs since the score last improved.
    :param stopped: why training stopped early (``early_stopping``, ``time_limit``), or None.
    :param history: one row of metrics per epoch.
    """

    epoch: int = 0
    best_score: float = -math.inf
    best_loss: float = math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, train: dict[str, Any], val: dict[str, Any], gate_metric: str, seconds: float) -> bool:
        """Count one finished epoch; whether it is the best so far (higher score, or the same with lower loss).

        :param train: what :func:`train_one_epoch` returned.
        :param val: what :func:`evaluate` returned.
        :param gate_metric: the gate metric's name.
        :param seconds: the epoch's wall time.
        """
        self.epoch += 1
        improved = val["score"] > self.best_score or (val["score"] == self.best_score and val["loss"] < self.best_loss)
        if improved:
            self.best_score, self.best_loss, self.best_epoch = val["score"], val["loss"], self.epoch
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        self.history.append(
            {
                "epoch": self.epoch,
                "lr": train["lr"],
                "train_loss": train["loss"],
                "train_accuracy": train["accuracy"],
                f"train_{gate_metric}": train[gate_metric],
                "train_images_per_second": train["images_per_second"],
                "val_loss": finite(val["loss"]),
                **{f"val_{name}": val[name] for name in METRICS},
                "val_score": val["score"],
                "val_predicted": val.get("predicted"),
                "best": improved,
                "seconds": round(seconds, 3),
            }
        )
        return improved

    def counters(self) -> dict[str, Any]:
        """What a checkpoint keeps besides ``epoch``, ``best_metric`` and ``history``."""
        return {
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "stale_epochs": self.stale_epochs,
            "stopped": self.stopped,
        }


def restore(
    checkpoint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
) -> Progress:
    """Load a checkpoint's states into the training objects; the progress it records.

    A run stopped by early stopping stays stopped; one stopped by the time limit goes on.

    :param checkpoint: the checkpoint dict (see :func:`read_checkpoint`).
    :param model: the model (not wrapped).
    :param optimizer: the optimizer.
    :param lr_scheduler: the LR scheduler.
    :param scaler: the fp16 gradient scaler, or None.
    """
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint.get("rng") is not None:
        torch.set_rng_state(checkpoint["rng"])
    return Progress(
        epoch=int(checkpoint["epoch"]),
        best_score=float(checkpoint["best_metric"]),
        best_loss=float(checkpoint.get("best_loss", math.inf)),
        best_epoch=int(checkpoint.get("best_epoch", 0)),
        stale_epochs=int(checkpoint.get("stale_epochs", 0)),
        stopped="early_stopping" if checkpoint.get("stopped") == "early_stopping" else None,
        history=list(checkpoint.get("history", [])),
    )
