"""The recipe of a ResNet training run: what ``train.py`` builds from its command line before the
first epoch (output folders, the model on its device, optimisation, data loaders, DDP and compiled
wrappers) and resuming from a checkpoint, held in one :class:`Training`.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from baseline import build_baseline
from checkpoint import Progress, checkpoint_path, read_checkpoint, restore
from conveyor_metadata import Baseline
from data import EpochSampler, Item, ManifestImageDataset, class_weights, make_loader
from network import build_model, build_optimizer, freeze_backbone, load_pretrained, lr_factor, resolve_weights
from plan import wants_sync_bn
from presets import eval_preprocessing, eval_transform, train_transform
from torch import nn
from torch.utils.data import DataLoader, Subset
from utils import Runtime, TrainingInputError, amp_dtype_for, log


@dataclass
class Training:
    """What one training run holds: the model and its DDP / compiled wrappers, optimisation, data, progress.

    :param model: the model (not wrapped): what checkpoints hold.
    :param train_model: what trains (DDP-wrapped and/or compiled).
    :param eval_model: what evaluates (compiled, never DDP-wrapped).
    :param optimizer: the optimizer.
    :param lr_scheduler: the LR schedule (warm-up, then cosine or steps), stepped after every batch.
    :param scaler: the fp16 gradient scaler, or None.
    :param criterion: the training loss (class-weighted with ``--balance loss``).
    :param sampler: the training sampler (this process's shard of every epoch).
    :param train_loader: the training batches.
    :param val_loader: this process's share of the validation batches.
    :param class_to_idx: class id of each label.
    :param preprocessing: the evaluation preprocessing written to ``metadata.json``.
    :param amp_dtype: the autocast dtype, or None.
    :param channels_last: whether batches go in channels_last memory format.
    :param compile_model: whether the models are compiled.
    :param best_path: the best epoch's checkpoint.
    :param last_path: the checkpoint to resume from.
    :param progress: where the training stands.
    """

    model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    class_to_idx: dict[str, int]
    preprocessing: dict[str, Any]
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile_model: bool
    best_path: Path
    last_path: Path
    progress: Progress = field(default_factory=Progress)
    eval_criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)


def check_options(args: argparse.Namespace) -> Path | None:
    """Check the output folders, resolve the checkpoint folder; the weights file (``plan`` fills in the rest).

    :param args: the parsed command line (``checkpoint_dir`` is resolved in place).
    """
    if args.model_dir is None:
        raise TrainingInputError("model dir: none given (set SM_MODEL_DIR or pass --model-dir)")
    if args.output_data_dir is None:
        raise TrainingInputError("output data dir: none given (set SM_OUTPUT_DATA_DIR or pass --output-data-dir)")
    args.checkpoint_dir = Path(args.checkpoint_dir or Path(args.output_data_dir) / "checkpoints")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts
    return resolve_weights(args.pretrained_weights) if args.pretrained_weights else None


def precision_for(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype | None, bool, bool]:
    """The autocast dtype, channels_last and compile for this device (CUDA-only options ignored on CPU).

    :param args: the parsed command line.
    :param device: the training device.
    """
    amp_dtype = amp_dtype_for(args.amp, device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    compile_model = bool(args.compile) and device.type == "cuda"
    if device.type != "cuda":
        options = (("--compile", args.compile), (f"--amp {args.amp}", args.amp in ("bf16", "fp16")))
        ignored = [name for name, on in options if on]
        if ignored:
            log(f"on CPU: ignoring {' and '.join(ignored)} (CUDA only)")
    return amp_dtype, channels_last, compile_model


def prepare_outputs(args: argparse.Namespace, train_items: list[Item], model_dir: Path, output_dir: Path) -> Baseline:
    """(Rank 0) the training baseline; create the output folders and remove a previous run's model.

    :param args: the parsed command line.
    :param train_items: the training images.
    :param model_dir: the model folder.
    :param output_dir: the output data folder.
    """
    started = time.time()
    baseline = build_baseline(train_items, args.seed)
    log(f"baseline: statistics of {baseline['sampled_images']} training images ({time.time() - started:.1f}s)")
    for folder in (model_dir, output_dir, args.checkpoint_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for stale in ("metadata.json", "model.pt"):
        (model_dir / stale).unlink(missing_ok=True)
    return baseline


def prepared_model(
    args: argparse.Namespace, num_classes: int, weights_path: Path | None, device: torch.device, channels_last: bool
) -> nn.Module:
    """The model: built, pretrained weights loaded, backbone frozen if asked, on the device.

    :param args: the parsed command line.
    :param num_classes: the number of classes.
    :param weights_path: the pretrained weights file, or None.
    :param device: the training device.
    :param channels_last: whether to use channels_last memory format.
    """
    model = build_model(args.arch, num_classes, args.stem, args.width)
    if weights_path is not None:
        load_pretrained(model, weights_path, args.arch)
    if args.freeze_backbone:
        freeze_backbone(model)
        if weights_path is None:
            log("warning: --freeze-backbone without --pretrained-weights trains a head on a random backbone")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_training(
    args: argparse.Namespace,
    runtime: Runtime,
    precision: tuple[torch.dtype | None, bool, bool],
    model: nn.Module,
    train_items: list[Item],
    val_items: list[Item],
    classes: list[str],
) -> Training:
    """The optimisation, the data loaders and the wrapped models of a training run.

    :param args: the parsed command line.
    :param runtime: where this process trains.
    :param precision: the autocast dtype, channels_last and compile (see :func:`precision_for`).
    :param model: the model on its device (see :func:`prepared_model`).
    :param train_items: the training images.
    :param val_items: the validation images.
    :param classes: the sorted classes.
    """
    device, (amp_dtype, channels_last, compile_model) = runtime.device, precision
    class_to_idx = {label: i for i, label in enumerate(classes)}
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    small = args.stem == "small"
    train_set = ManifestImageDataset(train_items, class_to_idx, train_transform(args.image_size, small=small))
    preprocessing = eval_preprocessing(args.image_size, small=small)
    val_set = ManifestImageDataset(val_items, class_to_idx, eval_transform(preprocessing))
    weights = class_weights(train_set.targets, len(classes))
    loss_weight = torch.tensor(weights, dtype=torch.float32, device=device) if args.balance == "loss" else None
    draw_weights = [weights[t] for t in train_set.targets] if args.balance == "sampler" else None
    sampler = EpochSampler(len(train_set), args.seed, weights=draw_weights, rank=runtime.rank, world=runtime.world)
    per_process = len(sampler)
    train_loader = make_loader(
        train_set,
        args.batch_size,
        args.workers,
        device,
        sampler,
        drop_last=per_process > 1 and per_process % args.batch_size == 1,
    )  # BatchNorm needs 2
    steps = max(1, len(train_loader))  # the LR follows the schedule step by step (epochs as fractions)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step / steps, args))
    val_shard = Subset(val_set, list(range(runtime.rank, len(val_set), runtime.world)))
    val_loader = make_loader(val_shard, args.batch_size, args.workers, device)
    if wants_sync_bn(args, runtime):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        log(f"SyncBatchNorm: {args.batch_size} images per process and batch")
    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    eval_model: nn.Module = model
    if compile_model:
        train_model, eval_model = torch.compile(train_model), torch.compile(model)
    return Training(
        model=model,
        train_model=train_model,
        eval_model=eval_model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        scaler=scaler,
        criterion=nn.CrossEntropyLoss(weight=loss_weight, label_smoothing=args.label_smoothing),
        sampler=sampler,
        train_loader=train_loader,
        val_loader=val_loader,
        class_to_idx=class_to_idx,
        preprocessing=preprocessing,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        compile_model=compile_model,
        best_path=args.checkpoint_dir / "best.pt",
        last_path=args.checkpoint_dir / "last.pt",
    )


def resume(training: Training, args: argparse.Namespace) -> None:
    """Restore the checkpoint to resume from, if any; the current flags set the optimizer either way.

    :param training: the training run (its progress is replaced by the checkpoint's).
    :param args: the parsed command line.
    """
    resume_from = checkpoint_path(args)
    checkpoint = read_checkpoint(resume_from, args, training.class_to_idx) if resume_from else None
    optimizer = training.optimizer
    if checkpoint is not None and getattr(args, "epochs_planned", False):
        args.epochs = int(checkpoint.get("args", {}).get("epochs") or args.epochs)  # the schedule it started
    if checkpoint is not None:
        progress = restore(checkpoint, training.model, optimizer, training.lr_scheduler, training.scaler)
        training.progress = progress
        left = 0 if progress.stopped else max(0, args.epochs - progress.epoch)
        log(
            f"resuming from {resume_from}: epoch {progress.epoch} done (best {args.gate_metric} "
            f"{progress.best_score:.4f} at epoch {progress.best_epoch}); "
            + (f"continuing at epoch {progress.epoch + 1} of {args.epochs}" if left else "nothing left to train")
        )
    norm_decay = getattr(args, "norm_weight_decay", None)
    for index, group in enumerate(optimizer.param_groups):  # the current flags rule, also after a resume
        decay = norm_decay if index == 1 and norm_decay is not None else args.weight_decay
        group.update(initial_lr=args.lr, lr=args.lr * lr_factor(training.progress.epoch, args), weight_decay=decay)
        if args.optimizer == "sgd":
            group["momentum"] = args.momentum
            group["nesterov"] = bool(args.nesterov) and args.momentum > 0
    training.lr_scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
