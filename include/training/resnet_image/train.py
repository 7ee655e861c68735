"""Train a torchvision ResNet image classifier (SageMaker script mode).

Reads the ``train`` and ``validation`` channels, each a folder holding ``manifest.csv`` (columns
``path,label``, paths relative to the folder) and the image files, fine-tunes a ResNet and writes:

    <model_dir>/model.pt                  state_dict of the best epoch's model (validation gate metric)
    <model_dir>/metadata.json             class labels, eval preprocessing, scores, training baseline statistics
    <output_data_dir>/history.json        per-epoch metrics
    <checkpoint_dir>/last.pt, best.pt     checkpoints (default <output_data_dir>/checkpoints); a run that
                                          finds last.pt resumes from it (``--resume auto``)

Every path defaults to its SageMaker environment variable (``SM_CHANNEL_TRAIN``,
``SM_CHANNEL_VALIDATION``, ``SM_MODEL_DIR``, ``SM_OUTPUT_DATA_DIR``, ``SM_NUM_GPUS``) and every
hyperparameter is a flag. It runs as ``python train.py`` on CPU or one GPU and under ``torchrun``
(DDP, one process per GPU; only rank 0 writes). It never downloads weights: ``--pretrained-weights``
takes a local file. This script imports nothing from Airflow or Conveyor.

Laid out as torchvision's reference classification recipe: this file holds the command line,
:func:`main`, :func:`train_one_epoch`, :func:`evaluate` and the checkpoint dicts; its siblings,
imported as plain modules from the script's folder, hold the rest: ``arguments`` (the command
line), ``presets`` (preprocessing), ``data`` (manifests, datasets, sampler), ``network`` (model,
weights, optimizer, LR schedule), ``plan`` (the options left unset, planned from the data, the
device and the budget), ``recipe`` (what a run builds before the first epoch),
``checkpoint`` (progress, resuming), ``baseline`` (drift statistics) and ``utils`` (errors, logging,
DDP, precision, files, metrics). ``metadata.json`` is a ``ModelMetadata`` of ``conveyor_metadata``.

The training loop is reusable (a benchmark imports :func:`train_one_epoch`, :func:`build_model`,
:class:`ManifestImageDataset` and :func:`make_loader`, all in ``__all__``); it keeps no global state.

Bad input ends the process with ``train.py: <what is wrong>`` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import conveyor_metadata
import torch
import torch.distributed as dist
from arguments import get_args_parser
from baseline import build_baseline, with_predictions
from checkpoint import Progress, checkpoint_path, read_checkpoint
from conveyor_metadata import Feature, ModelMetadata, finite
from data import EpochSampler, Item, ManifestImageDataset, load_channels, load_rgb, make_loader, read_manifest
from network import build_model, build_optimizer, load_pretrained, resolve_weights
from plan import fit_epochs_to_budget, plan_epochs, plan_options
from presets import eval_transform, train_transform
from recipe import (
    Training,
    build_training,
    check_options,
    precision_for,
    prepare_outputs,
    prepared_model,
    resume,
)
from torch import nn
from torch.utils.data import DataLoader
from utils import (
    METRICS,
    ImageDecodeError,
    Runtime,
    TrainingInputError,
    agree,
    amp_dtype_for,
    clean_message,
    clock,
    describe_device,
    epoch_summary,
    json_args,
    log,
    metrics_from_confusion,
    quiet,
    reduce_sum,
    save_atomic,
    seed_everything,
    setup_runtime,
    versions,
    write_json,
)

__all__ = [
    "EpochSampler",
    "ImageDecodeError",
    "Item",
    "ManifestImageDataset",
    "TrainingInputError",
    "amp_dtype_for",
    "build_baseline",
    "build_model",
    "build_optimizer",
    "checkpoint_path",
    "clean_message",
    "eval_transform",
    "evaluate",
    "get_args_parser",
    "load_pretrained",
    "load_rgb",
    "main",
    "make_loader",
    "metrics_from_confusion",
    "read_checkpoint",
    "read_manifest",
    "resolve_weights",
    "run",
    "seed_everything",
    "setup_runtime",
    "train_one_epoch",
    "train_transform",
]

TRAINER = "resnet_image"
PROBLEM_TYPE = "image_classification"


# ------------------------------------------------------------------------------------------ loop


def _keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """Keep BatchNorm layers whose parameters are all frozen in eval mode (their statistics stay too).

    :param model: the model, just put in train mode.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()


def _count(confusion: torch.Tensor, targets: torch.Tensor, output: torch.Tensor, num_classes: int) -> None:
    """Add a batch to a flat confusion matrix, on the device and without waiting for it.

    :param confusion: counts of ``true * num_classes + predicted``.
    :param targets: the true classes.
    :param output: the logits.
    :param num_classes: the number of classes.
    """
    cells = targets * num_classes + output.argmax(1)
    confusion.scatter_add_(0, cells, torch.ones_like(cells))


def _to_device(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the training device (images in channels_last memory format if asked).

    :param images: the images.
    :param targets: their classes.
    :param device: where the model is.
    :param channels_last: whether images go in channels_last memory format.
    """
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets


def _train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    targets: torch.Tensor,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch (autocast, fp16 gradient scaling); the logits and the loss.

    :param model: the model to train.
    :param criterion: the training loss.
    :param optimizer: the optimizer.
    :param images: the batch, on the model's device.
    :param targets: its classes.
    :param scaler: the fp16 gradient scaler, or None.
    :param amp_dtype: the autocast dtype, or None for full precision.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        output = model(images)
        loss = criterion(output, targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return output, loss


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    device: torch.device,
    epoch: int,
    num_classes: int,
    *,
    epochs: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    gate_metric: str = "balanced_accuracy",
    max_steps: int | None = None,
    print_freq: int = 0,
    distributed: bool = False,
    log_fn: Callable[[str], None] = log,
    lr_step: Callable[[], Any] | None = None,
) -> dict[str, float]:
    """Train one epoch and print its progress line: loss, train metric, images/s, LR, ETA.

    Keeps no state outside its arguments, so a benchmark can time it on its own loader.

    :param model: the model to train (maybe DDP-wrapped or compiled).
    :param criterion: the training loss.
    :param optimizer: the optimizer.
    :param loader: the training batches.
    :param device: where the model is.
    :param epoch: the 1-based epoch, for the progress line.
    :param num_classes: the number of classes.
    :param epochs: the total number of epochs, for the ETA (None: no ETA).
    :param scaler: the fp16 gradient scaler, or None.
    :param amp_dtype: the autocast dtype, or None for full precision.
    :param channels_last: whether batches go in channels_last memory format.
    :param gate_metric: the metric shown for the training batches.
    :param max_steps: stop after this many batches (None: the whole loader).
    :param print_freq: also print progress every N steps (0: never).
    :param distributed: whether to sum the figures over every process.
    :param log_fn: where progress lines go.
    :param lr_step: called after every optimisation step (the per-step LR schedule), or None.
    :return: loss, accuracy, balanced_accuracy, f1_macro, images, seconds, images_per_second, and lr: the
        LR the epoch started with.
    """
    model.train()
    _keep_frozen_batchnorm_in_eval(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    seen = 0
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    started, start_lr = time.perf_counter(), float(optimizer.param_groups[0]["lr"])
    for step, (images, targets) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        images, targets = _to_device(images, targets, device, channels_last)
        output, loss = _train_step(model, criterion, optimizer, images, targets, scaler, amp_dtype)
        if lr_step is not None:
            lr_step()
        loss_sum += loss.detach().double() * images.shape[0]
        _count(confusion, targets, output.detach(), num_classes)
        seen += images.shape[0]
        if print_freq and (step + 1) % print_freq == 0 and step + 1 < steps:
            elapsed = time.perf_counter() - started
            log_fn(
                f"epoch {epoch} step {step + 1}/{steps}: loss {loss_sum.item() / seen:.4f} | "
                f"{seen / elapsed:.1f} images/s | eta epoch {clock(elapsed / (step + 1) * (steps - step - 1))}"
            )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    result = epoch_summary(loss_sum, confusion, seen, num_classes, seconds, optimizer, distributed) | {"lr": start_lr}
    eta = f" | eta {clock(seconds * (epochs - epoch))}" if epochs is not None else ""
    total = f"/{epochs}" if epochs is not None else ""
    log_fn(
        f"epoch {epoch}{total} train: loss {result['loss']:.4f} {gate_metric} {result[gate_metric]:.4f} "
        f"accuracy {result['accuracy']:.4f} | {result['images_per_second']:.1f} images/s ({result['images']} in "
        f"{seconds:.1f}s) | lr {result['lr']:.6g}{eta}"
    )
    return result


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    *,
    gate_metric: str = "balanced_accuracy",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    distributed: bool = False,
) -> dict[str, Any]:
    """Score the model on a loader; ``score`` is the gate metric (higher is better).

    :param model: the model (not DDP-wrapped: processes may hold different numbers of batches).
    :param criterion: the loss reported (unweighted cross-entropy).
    :param loader: the batches (each process its own share).
    :param device: where the model is.
    :param num_classes: the number of classes.
    :param gate_metric: which metric is the score.
    :param amp_dtype: the autocast dtype, or None.
    :param channels_last: whether batches go in channels_last memory format.
    :param distributed: whether to sum the figures over every process.
    :return: score, metric, loss, accuracy, balanced_accuracy, f1_macro, images, and ``predicted``: how
        many images were predicted as each class (in class index order).
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
    for images, targets in loader:
        images, targets = _to_device(images, targets, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        loss_sum += criterion(output.float(), targets).double() * images.shape[0]
        _count(confusion, targets, output, num_classes)
        seen += images.shape[0]
    reduce_sum([loss_sum, confusion, seen], distributed)
    count = int(seen.item())
    matrix = confusion.view(num_classes, num_classes).cpu().numpy()
    metrics = metrics_from_confusion(matrix)
    return {
        "score": metrics[gate_metric],
        "metric": gate_metric,
        "loss": loss_sum.item() / count if count else float("nan"),
        **metrics,
        "images": count,
        "predicted": [int(v) for v in matrix.sum(axis=0)],
    }


# ------------------------------------------------------------------------------------------ main


def _epoch(
    training: Training, args: argparse.Namespace, runtime: Runtime, log_fn: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one epoch, step the LR schedule and evaluate; the training and validation figures.

    :param training: the training run.
    :param args: the parsed command line.
    :param runtime: where this process trains.
    :param log_fn: where progress lines go.
    """
    epoch, num_classes = training.progress.epoch + 1, len(training.class_to_idx)
    try:
        train = train_one_epoch(
            training.train_model,
            training.criterion,
            training.optimizer,
            training.train_loader,
            runtime.device,
            epoch,
            num_classes,
            epochs=args.epochs,
            scaler=training.scaler,
            amp_dtype=training.amp_dtype,
            channels_last=training.channels_last,
            gate_metric=args.gate_metric,
            print_freq=args.print_freq,
            distributed=runtime.distributed,
            log_fn=log_fn,
            lr_step=training.lr_scheduler.step,
        )
    except ImageDecodeError as error:
        raise ImageDecodeError(f"train channel: {clean_message(str(error))}") from None
    if not math.isfinite(train["loss"]):
        raise TrainingInputError(f"training diverged: the loss is {train['loss']} in epoch {epoch} (lower --lr)")
    try:
        val = evaluate(
            training.eval_model,
            training.eval_criterion,
            training.val_loader,
            runtime.device,
            num_classes,
            gate_metric=args.gate_metric,
            amp_dtype=training.amp_dtype,
            channels_last=training.channels_last,
            distributed=runtime.distributed,
        )
    except ImageDecodeError as error:
        raise ImageDecodeError(f"validation channel: {clean_message(str(error))}") from None
    return train, val


def _save_checkpoints(training: Training, args: argparse.Namespace, improved: bool) -> None:
    """Write ``best.pt`` (when the epoch is the best so far) and ``last.pt``.

    :param training: the training run.
    :param args: the parsed command line.
    :param improved: whether the epoch just done is the best so far.
    """
    model, progress, scaler = training.model, training.progress, training.scaler
    if improved:
        save_atomic(
            {
                "model": model.state_dict(),
                "epoch": progress.epoch,
                "metric": args.gate_metric,
                "score": progress.best_score,
                "class_to_idx": training.class_to_idx,
                "arch": args.arch,
            },
            training.best_path,
        )
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": training.optimizer.state_dict(),
            "lr_scheduler": training.lr_scheduler.state_dict(),
            "epoch": progress.epoch,
            "best_metric": progress.best_score,
            **progress.counters(),
            "args": json_args(args),
            "class_to_idx": training.class_to_idx,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": torch.get_rng_state(),
            "history": progress.history,
        },
        training.last_path,
    )


def _train_epochs(
    training: Training, args: argparse.Namespace, runtime: Runtime, started: float, output_dir: Path
) -> None:
    """Train until the last epoch, early stopping or the time limit; (rank 0) checkpoint every epoch.

    :param training: the training run.
    :param args: the parsed command line.
    :param runtime: where this process trains.
    :param started: when the run started (``time.monotonic``), for the time limit.
    :param output_dir: the output data folder (``history.json``).
    """
    progress = training.progress
    log_fn = log if runtime.is_main else quiet
    while progress.stopped is None and progress.epoch < args.epochs:
        epoch_started = time.monotonic()
        training.sampler.set_epoch(progress.epoch)
        train, val = _epoch(training, args, runtime, log_fn)
        improved = progress.record(train, val, args.gate_metric, time.monotonic() - epoch_started)
        fit_epochs_to_budget(args, progress.history, started, runtime)
        log_fn(
            f"epoch {progress.epoch}/{args.epochs} validation: loss {val['loss']:.4f} {args.gate_metric} "
            f"{val['score']:.4f} accuracy {val['accuracy']:.4f}"
            + (" (best so far)" if improved else f" (best {progress.best_score:.4f} at epoch {progress.best_epoch})")
        )
        if args.early_stopping_patience and progress.stale_epochs >= args.early_stopping_patience:
            progress.stopped = "early_stopping"
            log_fn(f"early stopping: no better {args.gate_metric} for {progress.stale_epochs} epochs")
        elif args.time_limit is not None and agree(
            time.monotonic() - started >= args.time_limit, runtime, runtime.device
        ):
            progress.stopped = "time_limit"
            log_fn(f"time limit: {args.time_limit:g}s reached after epoch {progress.epoch}; stopping")
        if runtime.is_main:
            _save_checkpoints(training, args, improved)
            write_json(progress.history, output_dir / "history.json")


def run(args: argparse.Namespace) -> ModelMetadata | None:
    """Check the inputs, train, and (rank 0) write the model, metadata and history; return the metadata.

    :param args: the parsed command line.
    """
    started = time.monotonic()
    weights_path = check_options(args)
    runtime = setup_runtime(args)
    device = runtime.device
    seed_everything(args.seed, args.deterministic, device)
    precision = precision_for(args, device)
    train_items, val_items, classes = load_channels(args, runtime)
    plan_options(args, train_items, classes, runtime, weights_path is not None)
    model_dir, output_dir = Path(args.model_dir), Path(args.output_data_dir)
    baseline = prepare_outputs(args, train_items, model_dir, output_dir) if runtime.is_main else None
    model = prepared_model(args, len(classes), weights_path, device, precision[1])
    training = build_training(args, runtime, precision, model, train_items, val_items, classes)
    plan_epochs(training, args, runtime, started)
    resume(training, args)
    amp_dtype, channels_last, compile_model = precision
    log(
        f"start: {args.arch} ({args.stem} stem, width {args.width}), {len(classes)} classes, {len(train_items)} "
        f"training and {len(val_items)} validation "
        f"images, device {device}{f' x{runtime.world} processes' if runtime.distributed else ''}, amp "
        f"{str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'}, channels_last {channels_last}, compile "
        f"{compile_model}, batch {args.batch_size}, {args.optimizer} lr {args.lr:g}, epochs {args.epochs}"
    )
    _train_epochs(training, args, runtime, started, output_dir)
    if not runtime.is_main:
        return None
    return finish(
        args,
        model_dir,
        output_dir,
        training.best_path,
        training.progress,
        {
            "classes": classes,
            "preprocessing": training.preprocessing,
            "baseline": baseline,
            "device": device,
            "world": runtime.world,
            "rows": {"train": len(train_items), "validation": len(val_items)},
            "seconds": time.monotonic() - started,
        },
    )


def finish(
    args: argparse.Namespace,
    model_dir: Path,
    output_dir: Path,
    best_path: Path,
    progress: Progress,
    state: dict[str, Any],
) -> ModelMetadata:
    """Write ``model.pt`` (the best epoch's weights), ``history.json`` and, last, ``metadata.json``.

    :param args: the parsed command line.
    :param model_dir: the model folder.
    :param output_dir: the output data folder.
    :param best_path: the best epoch's checkpoint.
    :param progress: where training ended (best epoch and score, history).
    :param state: the classes, preprocessing, baseline, device, processes, rows and seconds.
    """
    if not best_path.is_file():
        raise TrainingInputError(f"no best model to save: {best_path} is missing (was the checkpoint folder cleared?)")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    save_atomic(best["model"], model_dir / "model.pt")
    write_json(progress.history, output_dir / "history.json")
    best_row = next((row for row in progress.history if row["epoch"] == progress.best_epoch), {})
    stopped = progress.stopped or "epochs"
    fields: dict[str, Any] = {
        "trainer": TRAINER,
        "problem_type": PROBLEM_TYPE,
        "label": "label",
        "features": (Feature(name="image", dtype="image"),),
        "arch": args.arch,
        "class_labels": state["classes"],
        "image_size": args.image_size,
        "preprocessing": state["preprocessing"],
        "best_model": f"{args.arch}_epoch{progress.best_epoch}",
        "best_epoch": progress.best_epoch,
        "validation_score": finite(progress.best_score),
        "validation_metric": args.gate_metric,
        "eval_metric": args.gate_metric,
        "validation_metrics": {name: best_row.get(f"val_{name}") for name in METRICS}
        | {"loss": best_row.get("val_loss")},
        "epochs_run": progress.epoch,
        "stopped": stopped,
        "hyperparameters": json_args(args),
        "rows": state["rows"],
        "training_seconds": round(state["seconds"], 1),
        "device": describe_device(state["device"], state["world"]),
        "versions": versions(),
        # best_row has no val_predicted in the history of a run resumed from an older checkpoint
        "baseline": with_predictions(
            state["baseline"], state["classes"], best_row.get("val_predicted"), progress.best_epoch
        ),
    }
    metadata = ModelMetadata(**fields)
    conveyor_metadata.write_fields(metadata, model_dir / conveyor_metadata.FILENAME, fields)
    size_mb = (model_dir / "model.pt").stat().st_size / 2**20
    log(
        f"saved: {model_dir / 'model.pt'} ({size_mb:.1f} MB, epoch {progress.best_epoch}, {args.gate_metric} "
        f"{progress.best_score:.4f}), {model_dir / 'metadata.json'}, {output_dir / 'history.json'}; "
        f"stopped by {stopped} after {progress.epoch} epochs"
    )
    return metadata


def main(args: argparse.Namespace) -> None:
    """Run the training; bad input exits with ``train.py: <message>`` and status 1.

    :param args: the parsed command line (see :func:`get_args_parser`).
    """
    try:
        run(args)
    except TrainingInputError as error:
        sys.exit(f"train.py: {clean_message(str(error))}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
