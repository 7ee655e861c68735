"""The recipe a ResNet training run plans from its data, its device and its time budget: every
option left unset on the command line gets a value here, and a ``plan:`` line says which and why.

- Small inputs (the training images' median shorter side is 64 px or less, no pretrained weights):
  train at the images' own size (at least 32 px) with the small-input stem (3x3 convolution,
  stride 1, no max-pool), a width and depth fitted to the number of images (resnet10 at width 16
  below 5,000 images), SGD with Nesterov momentum at lr 0.1, weight decay 5e-4 but none on
  BatchNorm weights and biases, label smoothing 0.1, a batch of about 1/30 of the images (16-128),
  data loaded in the training process on the CPU, one warm-up epoch then cosine to 0.
- Larger inputs (or pretrained weights): torchvision's recipe as before (ImageNet stem, width 64,
  224 px, batch 32), label smoothing 0.1 only when training from scratch.
- Epochs: with a time limit, from a probe that times a few training and evaluation steps, so the
  whole schedule fits the budget; after every epoch the epochs left are cut when the measured
  epochs say the budget would not hold them (the cosine schedule follows). Early stopping is off
  for planned epochs (the schedule ends at a low LR; the best epoch is kept anyway).
- Augmentation: a random padded crop on small inputs (plus a small rotation and scale when there
  are enough epochs for it and under 1,000 images per class); a horizontal flip unless the flip
  check finds that mirrored images no longer look like their class (digits, text): mirrored
  images are scored by the class means of unmirrored ones.
- BatchNorm: SyncBatchNorm under DDP when a process's batch is under 16 images; a last batch of
  one image is dropped (``recipe``).
- CPU threads: one intra-op thread when the machine is already busy (load average at least the
  number of cores), where OpenMP threads would wait on each other; torch's default otherwise.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from typing import Any

import numpy as np
import torch
from data import DECODE_ERRORS, Item
from PIL import Image
from presets import SMALL_INPUT, train_transform
from torch import nn
from utils import Runtime, log

SMALL_DATA = 5_000  # training images: fewer get resnet10 at width 16 on small inputs
MEDIUM_DATA = 50_000  # fewer get width 32; more the full width
MAX_EPOCHS = {"small": 100, "imagenet": 60}
UNTIMED_EPOCHS = {"small": 30, "imagenet": 15}  # without a time limit
STRONG_AUGMENT_EPOCHS = 15
STRONG_AUGMENT_PER_CLASS = 1_000
FLIP_SAMPLE = 400
FLIP_DROP = 0.1  # mirrored images scored this much worse by class means: no flip
SYNC_BN_BATCH = 16
PROBE_STEPS = 3
BUDGET_SHARE = 0.9  # of the time left after the probe, planned for epochs (the rest: saving, slack)


def native_size(items: list[Item], limit: int = 200) -> int:
    """The median shorter side of the training images (read from their headers; every n-th image).

    :param items: the training images.
    :param limit: the most images read.
    """
    step = max(1, len(items) // limit)
    sides = []
    for item in items[::step][:limit]:
        try:
            with Image.open(item.path) as image:
                sides.append(min(image.size))
        except DECODE_ERRORS:
            continue
    return int(statistics.median(sides)) if sides else 224


def flip_check(items: list[Item], seed: int, limit: int = FLIP_SAMPLE) -> tuple[bool, str]:
    """Whether a horizontal flip keeps images looking like their class, and the figures why.

    Half of a seeded sample gives each class's mean image (16x16 greyscale, standardised); the other
    half is scored by the nearest class mean as it is and mirrored. A flip is refused when mirrored
    images score ``FLIP_DROP`` worse (left and right carry the class).

    :param items: the training images.
    :param seed: the sampling seed.
    :param limit: the most images decoded.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(items))[:limit]
    pixels, labels = [], []
    for index in chosen:
        try:
            with Image.open(items[index].path) as image:
                small = image.convert("L").resize((16, 16), Image.Resampling.BILINEAR)
        except DECODE_ERRORS:
            continue
        pixels.append(np.asarray(small, dtype=np.float64))
        labels.append(items[index].label)
    if len(set(labels)) < 2 or len(labels) < 20:
        return True, "too few images to check: flip on"
    data = np.stack(pixels)
    data = (data - data.mean(axis=(1, 2), keepdims=True)) / (data.std(axis=(1, 2), keepdims=True) + 1e-6)
    half = len(labels) // 2
    fit_labels, test_labels = np.array(labels[:half]), np.array(labels[half:])
    classes = sorted(set(fit_labels))
    means = np.stack([data[:half][fit_labels == c].mean(axis=0) for c in classes]).reshape(len(classes), -1)

    def score(images: np.ndarray) -> float:
        distances = ((images.reshape(len(images), 1, -1) - means[None]) ** 2).sum(axis=2)
        return float((np.array(classes)[distances.argmin(axis=1)] == test_labels).mean())

    plain, mirrored = score(data[half:]), score(data[half:, :, ::-1])
    allowed = plain - mirrored < FLIP_DROP
    return allowed, f"class-mean accuracy {plain:.2f} as is, {mirrored:.2f} mirrored: flip {'on' if allowed else 'off'}"


def plan_options(
    args: argparse.Namespace, train_items: list[Item], classes: list[str], runtime: Runtime, pretrained: bool
) -> None:
    """Fill in every option left unset from the data, the device and pretrained weights; log the plan.

    :param args: the parsed command line (changed in place; ``recipe`` is set to small or imagenet).
    :param train_items: the training images.
    :param classes: the classes.
    :param runtime: where this process trains.
    :param pretrained: whether pretrained weights are loaded.
    """
    notes: list[str] = []
    count, cpu = len(train_items), runtime.device.type == "cpu"
    if args.image_size is None:
        side = native_size(train_items)
        small_data = side <= SMALL_INPUT and not pretrained
        args.image_size = max(32, math.ceil(side / 8) * 8) if small_data else 224
        notes.append(f"image size {args.image_size} (images' median side {side} px)")
    if args.stem == "auto":
        args.stem = "small" if args.image_size <= SMALL_INPUT and not pretrained else "imagenet"
    small = args.stem == "small"
    args.recipe = "small" if small else "imagenet"
    scratch = not pretrained
    if args.width is None:
        args.width = (16 if count < SMALL_DATA else 32 if count < MEDIUM_DATA else 64) if small else 64
    if args.arch is None:
        args.arch = "resnet10" if small and count < SMALL_DATA else "resnet18"
    notes.append(f"{args.arch}, {args.stem} stem, width {args.width} ({count} training images)")
    defaults: dict[str, Any] = {
        "batch_size": min(128, max(16, 2 ** int(math.log2(max(1, count / 30))))) if small else 32,
        "lr": (0.1 if args.optimizer == "sgd" else 0.002) if small else (0.01 if args.optimizer == "sgd" else 0.001),
        "weight_decay": 5e-4 if small else 1e-4,
        "norm_weight_decay": 0.0 if small else None,
        "nesterov": small,
        "label_smoothing": 0.1 if scratch else 0.0,
        "lr_warmup_decay": 0.1 if small else 0.01,
        "workers": 0 if small and cpu else 2,
    }
    planned = [name for name, value in defaults.items() if getattr(args, name, None) is None]
    for name in planned:
        setattr(args, name, defaults[name])
    notes.append(", ".join(f"{name.replace('_', '-')} {getattr(args, name)}" for name in planned) or "")
    if args.flip == "auto":
        allowed, why = flip_check(train_items, args.seed) if small else (True, "large inputs: flip on")
        args.flip = "on" if allowed else "off"
        notes.append(why)
    if args.threads is None and cpu:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        args.threads = 1 if load >= cores else torch.get_num_threads()
        notes.append(f"{args.threads} CPU thread(s) (load {load:.1f} on {cores} cores)")
    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"plan ({args.recipe} inputs, {len(classes)} classes): " + "; ".join(n for n in notes if n))


def _same_everywhere(value: float, runtime: Runtime) -> float:
    """The mean of a figure over every process (so every process plans the same epochs).

    :param value: this process's figure.
    :param runtime: where this process trains.
    """
    if not runtime.distributed:
        return value
    figure = torch.tensor([value], dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(figure)
    return float(figure.item()) / runtime.world


def probe_epoch_seconds(training: Any, args: argparse.Namespace, runtime: Runtime) -> float:
    """Seconds one epoch should take here: a few training steps and one evaluation batch of a copy
    of the model timed, images decoded and augmented as training does.

    :param training: the training run (``recipe.Training``; its model is not changed).
    :param args: the parsed command line.
    :param runtime: where this process trains.
    """
    model = copy.deepcopy(training.model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    dataset = training.train_loader.dataset
    size = min(args.batch_size, len(dataset))
    criterion = nn.CrossEntropyLoss()
    times = []
    model.train()
    for step in range(PROBE_STEPS + 1):
        started = time.perf_counter()
        pairs = [dataset[(step * size + i) % len(dataset)] for i in range(size)]
        images = torch.stack([image for image, _ in pairs]).to(runtime.device)
        targets = torch.tensor([target for _, target in pairs], device=runtime.device)
        if training.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(runtime.device.type, dtype=training.amp_dtype, enabled=training.amp_dtype is not None):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        times.append(time.perf_counter() - started)
    per_train_image = statistics.median(times[1:]) / size  # the first step warms up
    model.eval()
    started = time.perf_counter()
    with torch.inference_mode():
        model(images)
    per_eval_image = (time.perf_counter() - started) / size + per_train_image / 3
    own_train = len(training.sampler)
    own_val = len(training.val_loader.dataset)
    return _same_everywhere(own_train * per_train_image + own_val * per_eval_image, runtime)


def plan_epochs(training: Any, args: argparse.Namespace, runtime: Runtime, started: float) -> None:
    """Set the epochs (when unset) and the augmentation (when ``auto``) for the budget; log them.

    :param training: the training run (``recipe.Training``; its training transform may be replaced).
    :param args: the parsed command line (changed in place; ``epochs_planned`` records whether).
    :param runtime: where this process trains.
    :param started: when the run started (``time.monotonic``).
    """
    args.epochs_planned = args.epochs is None
    if args.epochs is None:
        if args.time_limit is None:
            args.epochs = UNTIMED_EPOCHS[args.recipe]
            why = "no time limit"
        else:
            epoch_seconds = probe_epoch_seconds(training, args, runtime)
            left = args.time_limit - (time.monotonic() - started)
            fit = int(max(0.0, left * BUDGET_SHARE) // max(epoch_seconds, 1e-3))
            args.epochs = max(1, min(MAX_EPOCHS[args.recipe], fit))
            why = f"{epoch_seconds:.1f}s per epoch probed, {left:.0f}s of the {args.time_limit:g}s budget left"
        log(f"plan: {args.epochs} epochs ({why})")
    if args.early_stopping_patience is None:
        args.early_stopping_patience = 0 if args.epochs_planned else 5
    if args.lr_warmup_epochs is None:
        args.lr_warmup_epochs = 1 if args.epochs >= 5 else 0
    if args.augment == "auto":
        per_class = len(training.sampler) * runtime.world / max(1, len(training.class_to_idx))
        strong = args.epochs >= STRONG_AUGMENT_EPOCHS and per_class < STRONG_AUGMENT_PER_CLASS
        args.augment = "strong" if strong else "light"
    training.train_loader.dataset.transform = train_transform(
        args.image_size, flip=args.flip != "off", small=args.recipe == "small", strong=args.augment == "strong"
    )
    log(f"plan: augmentation {args.augment}, flip {args.flip}, early stopping patience {args.early_stopping_patience}")


def fit_epochs_to_budget(
    args: argparse.Namespace, history: list[dict[str, Any]], started: float, runtime: Runtime
) -> None:
    """After an epoch: cut the planned epochs left when the epochs so far say the budget would not hold them.

    :param args: the parsed command line (``epochs`` changed in place).
    :param history: the epochs done (their ``seconds``).
    :param started: when the run started (``time.monotonic``).
    :param runtime: where this process trains.
    """
    if not getattr(args, "epochs_planned", False) or args.time_limit is None or not history:
        return
    done = len(history)
    recent = [row["seconds"] for row in history[-3:]]
    epoch_seconds = _same_everywhere(statistics.mean(recent), runtime)
    left = _same_everywhere(args.time_limit - (time.monotonic() - started), runtime)
    fit = int(max(0.0, left - max(1.0, 0.03 * args.time_limit)) // max(epoch_seconds, 1e-3))
    if done + fit < args.epochs:
        log(f"plan: {done + fit} epochs instead of {args.epochs} ({epoch_seconds:.1f}s per epoch, {left:.0f}s left)")
        args.epochs = done + fit


def wants_sync_bn(args: argparse.Namespace, runtime: Runtime) -> bool:
    """Whether BatchNorm layers sync their statistics over the processes (DDP with small per-process batches).

    :param args: the parsed command line.
    :param runtime: where this process trains.
    """
    if not runtime.distributed or runtime.device.type != "cuda":  # SyncBatchNorm is CUDA only
        return False
    return bool(args.sync_bn) if args.sync_bn is not None else args.batch_size < SYNC_BN_BATCH
