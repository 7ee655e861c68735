"""Benchmark: the ResNet image trainer's training throughput against a plain PyTorch loop.

What is compared, in one run, on the same generated images (``conveyor.demo.shape_image``:
circles, squares, triangles on noisy backgrounds, written as PNG files with a ``manifest.csv``
into a temporary folder; by default exactly ``batch size x (warm-up + measured steps)`` images,
so one timed run is one epoch: 256 images of 64 px with ``--quick``, 320 of 96 px without):

* ours: ``include/training/resnet_image/train.py`` imported from its path, everything built with
  its own functions as its ``run()`` builds it: ``read_manifest``, ``ManifestImageDataset`` with
  ``train_transform`` (``load_rgb``: decode, EXIF transpose, RGB; RandomResizedCrop, flip,
  ColorJitter, normalise), ``EpochSampler`` (seeded shuffle, ``set_epoch``), ``make_loader``
  (``--workers`` processes, persistent, pinned memory only on CUDA, its drop_last rule),
  ``build_model`` (torchvision ResNet, random init), ``build_optimizer`` (SGD lr 0.01, momentum
  0.9, weight decay 1e-4: the script's defaults), ``CrossEntropyLoss``,
  ``setup_runtime``/``seed_everything``/``amp_dtype_for``, and trained by ``train_one_epoch``
  itself (its running loss and confusion matrix every step, its metrics and progress line at the
  end of the epoch);
* baseline: written here, the minimal plain loop: a ``Dataset`` that reads the same
  ``manifest.csv`` with ``csv`` and opens each file with PIL (``.convert("RGB")``), the same
  torchvision transforms written out again, ``DataLoader(shuffle=True)`` with the same batch size
  and workers (not persistent; pinned memory on CUDA), ``torchvision.models.<arch>(num_classes=3)``,
  ``SGD(lr=0.01, momentum=0.9, weight_decay=1e-4)``, ``CrossEntropyLoss`` and
  ``for x, y in loader: opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()``.

Before anything is timed the two sides must agree: same classes, the transforms print the same,
the same image under the same torch seed gives the same tensor from both datasets, and one
training step on the same batch from the same initial weights gives the same weights. Otherwise
it stops. Then ours' extra work is timed piece by piece on its own (``costs``: per step, per
image, per epoch; best of many calls) and turned into ``expected_ratio_from_costs``.

Timing: both sides get the same ``torch.set_num_threads`` (``--threads``; default: torch's own,
which is what train.py runs with), a fresh model from the same seed every run, and the same
wrapper around their loader that notes when each batch is asked for. The first ``--warmup``
steps of each run are excluded (worker start, first batches); images/s counts the next
``--steps`` steps (on CUDA the wrapper synchronises at both ends of that window, nowhere else).
Runs are interleaved (ours first in odd runs, the baseline first in even ones) ``--repeats``
times; the best run of each side counts. ``ratio`` is ours images/s / baseline images/s
(target >= 0.95 on CPU). Also reported: the same ratio over whole runs (warm-up included) and
ours' images/s as ``train_one_epoch`` itself reports it.

On a shared CPU, runs a minute apart see different loads, so the bench adds a lock-step mode on
CPU (``lockstep``, ``--lockstep-epochs``): one epoch of ``train_one_epoch`` whose loader, between
two of its steps, advances the plain loop by one step; each side's step (its batch fetch and its
compute) is timed, and ``lockstep.ratio`` is the median over step pairs of baseline seconds /
ours seconds (``ratio_of_sums`` too). Both sides then see the same load within seconds.

On CUDA both sides run with AMP (bf16 where supported, else fp16 with a GradScaler) and
channels_last, as train.py does there, and the bench adds ResNet-50 at batch 256 and 224 px
(1,000 classes) for both sides on synthetic in-memory batches (pinned CPU tensors copied to the
GPU every step, no decoding), because decoding and augmenting PNGs on a few CPU cores could not
feed the GPU: ``gpu_resnet50`` in the figures.

Output: progress lines, then as the last line one JSON object.

Quality mode, ``--small`` (``bench/_small_images.py``): the trainer's test accuracy on
scikit-learn's digits written as an ImageFolder drop, at the pipeline's default budget, against
logistic regression and HistGradientBoosting on raw pixels on the same split; ``ratio`` = ours'
accuracy / the best baseline's (target >= 1.0).

Usage: ``python bench/train_images.py --small [--quick] [--budget S] [--image-px PX]``, or
``python bench/train_images.py [--quick] [--arch A] [--batch-size N] [--image-size PX]
[--steps N] [--warmup N] [--workers N] [--threads N] [--repeats N] [--images N]
[--lockstep-epochs N] [--cpu]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAINER_DIR = ROOT / "include" / "training" / "resnet_image"
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.insert(0, str(TRAINER_DIR))
sys.path.append(str(ROOT / "tests"))  # scripts.load_script: the shared loader of the standalone scripts

from _small_images import add_arguments as add_small_arguments  # noqa: E402
from _small_images import run_small  # noqa: E402

TARGET_RATIO = 0.95
SEED = 0
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4  # train.py's defaults for --optimizer sgd
QUICK = {"image_size": 64, "steps": 6, "repeats": 2, "lockstep_epochs": 2}
FULL = {"image_size": 96, "steps": 8, "repeats": 2, "lockstep_epochs": 1}
GPU_RESNET50 = {"batch_size": 256, "image_size": 224, "classes": 1000, "warmup": 5}


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[train_images bench] {message}", flush=True)


def import_trainer() -> ModuleType:
    """Import ``include/training/resnet_image/train.py`` from its path (registered in sys.modules)."""
    from scripts import load_script

    return load_script("include/training/resnet_image/train.py", "resnet_image_train")


# --- data ----------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, size: int, seed: int) -> list[str]:
    """Write ``count`` PNG shape images (classes in turn) and a ``manifest.csv`` (path,label).

    :return: the classes, sorted.
    """
    import numpy as np

    from conveyor.demo import SHAPES, shape_image

    rng = np.random.default_rng(seed)
    rows = []
    for n in range(count):
        shape = SHAPES[n % len(SHAPES)]
        (folder / shape).mkdir(parents=True, exist_ok=True)
        name = f"{shape}/{n:05d}.png"
        shape_image(shape, size, rng).save(folder / name, "PNG")
        rows.append((name, shape))
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return sorted(SHAPES)


# --- the plain baseline --------------------------------------------------------------------------


def plain_transform(image_size: int) -> Any:
    """The training transforms, written out as a plain script would (same as train.py's)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )


class PlainManifestDataset:
    """``manifest.csv`` rows (path,label) opened with PIL and transformed: the baseline's Dataset."""

    def __init__(self, folder: Path, transform: Callable[[Any], Any]):
        with (folder / "manifest.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        self.classes = sorted({row["label"] for row in rows})
        index = {label: i for i, label in enumerate(self.classes)}
        self.samples = [(folder / row["path"], index[row["label"]]) for row in rows]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        path, target = self.samples[i]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), target


# --- timing --------------------------------------------------------------------------------------


class TimedBatches:
    """A loader's first ``limit`` batches, noting (``time.perf_counter``) when each one is asked for.

    ``marks[i]`` is when step ``i`` asked for its batch, i.e. when step ``i - 1`` had finished;
    ``marks[limit]`` is when the consumer asked for one more (its last step done). On CUDA it
    synchronises at ``marks[warmup]`` and ``marks[limit]`` only, so the window between them holds
    finished GPU work and no other sync point is added to the loop.
    """

    def __init__(self, loader: Any, limit: int, warmup: int, cuda: bool):
        self.loader, self.limit, self.warmup, self.cuda = loader, limit, warmup, cuda
        self.marks: list[float] = []

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)

    def _mark(self, index: int) -> None:
        if self.cuda and index in (self.warmup, len(self)):
            import torch

            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())

    def __iter__(self) -> Iterator[Any]:
        self.marks = []
        batches = iter(self.loader)
        for index in range(len(self)):
            self._mark(index)
            yield next(batches)
        self._mark(len(self))

    def figures(self, batch_size: int) -> dict[str, Any]:
        """images/s over the measured window and over the whole run, and the step times."""
        steps = len(self.marks) - 1
        measured = steps - self.warmup
        window = self.marks[-1] - self.marks[self.warmup]
        whole = self.marks[-1] - self.marks[0]
        step_seconds = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return {
            "images_per_second": measured * batch_size / window,
            "whole_run_images_per_second": steps * batch_size / whole,
            "measured_seconds": window,
            "whole_run_seconds": whole,
            "step_seconds": step_seconds[self.warmup :],
            "warmup_step_seconds": step_seconds[: self.warmup],
        }


class SyntheticBatches:
    """``length`` batches cycling over a few fixed in-memory (pinned) tensors: a loader with no I/O."""

    def __init__(self, batch_size: int, image_size: int, classes: int, length: int, distinct: int = 4):
        import torch

        generator = torch.Generator().manual_seed(SEED)
        self.batches = [
            (
                torch.randn(batch_size, 3, image_size, image_size, generator=generator).pin_memory(),
                torch.randint(0, classes, (batch_size,), generator=generator).pin_memory(),
            )
            for _ in range(distinct)
        ]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        return (self.batches[i % len(self.batches)] for i in range(self.length))


# --- the two sides -------------------------------------------------------------------------------


class Setting(SimpleNamespace):
    """What both sides share: device, AMP dtype, channels_last, sizes, seed."""


def ours_parts(trainer: ModuleType, folder: Path, setting: Setting) -> SimpleNamespace:
    """Dataset, sampler and loader built by train.py's own functions, as its run() builds them."""
    items = trainer.read_manifest(folder, "train", "SM_CHANNEL_TRAIN")
    classes = sorted({item.label for item in items})
    class_to_idx = {label: i for i, label in enumerate(classes)}
    dataset = trainer.ManifestImageDataset(items, class_to_idx, trainer.train_transform(setting.image_size))
    sampler = trainer.EpochSampler(len(dataset), setting.seed)
    per_process = len(sampler)
    loader = trainer.make_loader(
        dataset,
        setting.batch_size,
        setting.workers,
        setting.device,
        sampler,
        drop_last=per_process > 1 and per_process % setting.batch_size == 1,
    )
    return SimpleNamespace(classes=classes, dataset=dataset, sampler=sampler, loader=loader)


def ours_training(trainer: ModuleType, arch: str, num_classes: int, setting: Setting) -> SimpleNamespace:
    """Model, optimizer, loss and scaler as train.py's run() makes them (fresh, from the seed)."""
    import torch
    from torch import nn

    torch.manual_seed(setting.seed)
    model = trainer.build_model(arch, num_classes)
    model.to(setting.device)
    if setting.channels_last:
        model.to(memory_format=torch.channels_last)
    options = argparse.Namespace(optimizer="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    optimizer = trainer.build_optimizer(model, options)
    criterion = nn.CrossEntropyLoss(weight=None, label_smoothing=0.0)
    scaler = torch.amp.GradScaler("cuda") if setting.amp_dtype == torch.float16 else None
    return SimpleNamespace(model=model, optimizer=optimizer, criterion=criterion, scaler=scaler)


def run_ours(
    trainer: ModuleType, loader: Any, arch: str, num_classes: int, setting: Setting, epoch: int, log_lines: list[str]
) -> dict[str, Any]:
    """One timed epoch of ``train_one_epoch`` on a fresh model; the wrapper's figures and its own."""
    parts = ours_training(trainer, arch, num_classes, setting)
    timed = TimedBatches(loader, setting.warmup + setting.steps, setting.warmup, setting.device.type == "cuda")
    result = trainer.train_one_epoch(
        parts.model,
        parts.criterion,
        parts.optimizer,
        timed,
        setting.device,
        epoch,
        num_classes,
        scaler=parts.scaler,
        amp_dtype=setting.amp_dtype,
        channels_last=setting.channels_last,
        gate_metric="balanced_accuracy",
        log_fn=log_lines.append,
    )
    return {
        **timed.figures(setting.batch_size),
        "trainer_images_per_second": result["images_per_second"],
        "trainer_seconds": result["seconds"],
        "loss": result["loss"],
    }


def plain_training(arch: str, num_classes: int, setting: Setting) -> SimpleNamespace:
    """The baseline's model, optimizer and loss (fresh, from the seed)."""
    import torch
    import torchvision

    torch.manual_seed(setting.seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes).to(setting.device)
    if setting.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda") if setting.amp_dtype == torch.float16 else None
    return SimpleNamespace(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), scaler=scaler)


def plain_steps(parts: SimpleNamespace, batches: Any, setting: Setting) -> Iterator[Any]:
    """The plain training loop over ``batches``, as a generator that yields each step's loss tensor.

    ``for _ in plain_steps(...): pass`` is the plain loop; the lock-step mode advances it one step
    at a time between two of ours' steps.
    """
    import torch

    model, opt, crit = parts.model, parts.optimizer, parts.criterion
    model.train()
    cuda = setting.device.type == "cuda"
    for x, y in batches:
        if cuda:
            x, y = x.to(setting.device, non_blocking=True), y.to(setting.device, non_blocking=True)
            if setting.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        with torch.autocast(setting.device.type, dtype=setting.amp_dtype, enabled=setting.amp_dtype is not None):
            loss = crit(model(x), y)
        if parts.scaler is not None:
            parts.scaler.scale(loss).backward()
            parts.scaler.step(opt)
            parts.scaler.update()
        else:
            loss.backward()
            opt.step()
        yield loss


def plain_loop(parts: SimpleNamespace, batches: Any, setting: Setting) -> float:
    """The plain training loop over ``batches``; the last loss."""
    loss = None
    for loss in plain_steps(parts, batches, setting):  # noqa: B007
        pass
    return float(loss.detach()) if loss is not None else float("nan")


def plain_loader(dataset: Any, setting: Setting, epoch: int) -> Any:
    """The baseline's DataLoader: shuffled (seeded per epoch), same batch size and workers."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=setting.batch_size,
        shuffle=True,
        num_workers=setting.workers,
        pin_memory=setting.device.type == "cuda",
        generator=torch.Generator().manual_seed(setting.seed + epoch),
    )


def run_plain(loader: Any, arch: str, num_classes: int, setting: Setting) -> dict[str, Any]:
    """One timed pass of the plain loop on a fresh model."""
    parts = plain_training(arch, num_classes, setting)
    timed = TimedBatches(loader, setting.warmup + setting.steps, setting.warmup, setting.device.type == "cuda")
    loss = plain_loop(parts, timed, setting)
    return {**timed.figures(setting.batch_size), "loss": loss}


class Lockstep:
    """Ours' loader wrapped so that one baseline step runs between two of ours' steps (CPU only).

    Cycle ``i``: ours asks for batch ``i`` (its step ``i - 1`` is done), the baseline fetches and
    takes its step ``i - 1``, then ours' batch ``i`` is fetched and handed over. Ours' step ``i`` is
    timed from that fetch to its next request, the baseline's from the start to the end of its own
    fetch and step: both sides' steps alternate, so a load change on a shared machine hits both.
    """

    def __init__(self, loader: Any, limit: int, baseline_step: Callable[[], None]):
        self.loader, self.limit, self.baseline_step = loader, limit, baseline_step
        self.ours: list[float] = []
        self.baseline: list[float] = []

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        fetched = None
        for index in range(len(self) + 1):
            asked = time.perf_counter()
            if fetched is not None:
                self.ours.append(asked - fetched)
            if index:
                self.baseline_step()
                self.baseline.append(time.perf_counter() - asked)
            if index == len(self):
                return
            fetched = time.perf_counter()
            yield next(batches)


def run_lockstep(
    trainer: ModuleType, ours_loader: Any, plain_batches: Any, arch: str, num_classes: int, setting: Setting
) -> list[tuple[float, float]]:
    """One epoch of ``train_one_epoch`` with the plain loop advanced one step between two of its steps.

    :return: (ours, baseline) seconds of each step pair after the warm-up.
    """
    ours = ours_training(trainer, arch, num_classes, setting)
    plain = plain_training(arch, num_classes, setting)
    plain_gen = plain_steps(plain, plain_batches, setting)
    lockstep = Lockstep(ours_loader, setting.warmup + setting.steps, lambda: next(plain_gen))
    trainer.train_one_epoch(
        ours.model, ours.criterion, ours.optimizer, lockstep, setting.device, 0, num_classes, log_fn=lambda _: None
    )
    return list(zip(lockstep.ours, lockstep.baseline))[setting.warmup :]


def summarise_lockstep(pairs: list[tuple[float, float]], batch_size: int, epochs: int) -> dict[str, Any]:
    """Ratios of the step pairs: median of paired ratios and ratio of sums."""
    ours_sum, plain_sum = sum(o for o, _ in pairs), sum(b for _, b in pairs)
    return {
        "ratio": statistics.median(b / o for o, b in pairs),
        "ratio_of_sums": plain_sum / ours_sum,
        "ours_images_per_second": len(pairs) * batch_size / ours_sum,
        "baseline_images_per_second": len(pairs) * batch_size / plain_sum,
        "epochs": epochs,
        "pairs": len(pairs),
        "ours_step_seconds": [round(o, 4) for o, _ in pairs],
        "baseline_step_seconds": [round(b, 4) for _, b in pairs],
    }


def best_seconds(fn: Callable[[], Any], number: int, repeat: int = 5) -> float:
    """Seconds per call of ``fn``: the best of ``repeat`` timings of ``number`` calls (noise only adds)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - started) / number)
    return best


def cost_breakdown(
    trainer: ModuleType, ours: SimpleNamespace, plain: PlainManifestDataset, setting: Setting, num_classes: int
) -> dict[str, Any]:
    """What ours does that the plain loop does not, each piece timed on its own on the CPU (best of many).

    Per step: the running loss and confusion-matrix update of ``train_one_epoch`` and its autocast
    context (disabled on CPU). Per image: ``ManifestImageDataset`` (``load_rgb``: EXIF transpose,
    RGB; the transforms) against the plain Dataset, and the decode alone. Per epoch: model.train()
    with the frozen-BatchNorm walk, the sampler's permutation, the metrics and the progress line.
    """
    import torch
    from PIL import Image

    batch = setting.batch_size
    output, targets = torch.randn(batch, num_classes), torch.randint(0, num_classes, (batch,))
    loss = torch.tensor(1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)

    def bookkeeping() -> None:
        nonlocal loss_sum
        loss_sum += loss.detach().double() * batch
        trainer._count(confusion, targets, output.detach(), num_classes)

    def autocast_off() -> None:
        with torch.autocast("cpu", dtype=None, enabled=False):
            pass

    count = min(64, len(plain))
    paths = [item.path for item in ours.dataset.items[:count]]

    def per_image(gets: dict[str, Callable[[int], Any]], passes: int = 5) -> dict[str, float]:
        """Best seconds per image of each getter over ``passes`` passes, the getters taking turns."""
        best = dict.fromkeys(gets, float("inf"))
        for _ in range(passes):
            for name, get in gets.items():
                torch.manual_seed(0)
                started = time.perf_counter()
                for i in range(count):
                    get(i)
                best[name] = min(best[name], (time.perf_counter() - started) / count)
        return best

    def plain_decode(path: Path) -> Any:
        with Image.open(path) as image:
            return image.convert("RGB")

    model = trainer.build_model("resnet18", num_classes)

    def epoch_start() -> None:
        model.train()
        trainer._keep_frozen_batchnorm_in_eval(model)

    images = per_image(
        {
            "ours": lambda i: ours.dataset[i],
            "baseline": lambda i: plain[i],
            "decode_ours": lambda i: trainer.load_rgb(paths[i]),
            "decode_baseline": lambda i: plain_decode(paths[i]),
        }
    )
    figures = {
        "step_bookkeeping_seconds": best_seconds(bookkeeping, 200),
        "step_autocast_disabled_seconds": best_seconds(autocast_off, 1000),
        "image_ours_seconds": images["ours"],
        "image_baseline_seconds": images["baseline"],
        "decode_ours_load_rgb_seconds": images["decode_ours"],
        "decode_baseline_seconds": images["decode_baseline"],
        "epoch_model_train_and_frozen_bn_walk_seconds": best_seconds(epoch_start, 20),
        "epoch_sampler_seconds": best_seconds(lambda: list(ours.sampler), 20),
        "epoch_metrics_seconds": best_seconds(
            lambda: trainer.metrics_from_confusion(confusion.view(num_classes, num_classes).cpu().numpy()), 50
        ),
    }
    figures["step_extra_seconds"] = figures["step_bookkeeping_seconds"] + figures["step_autocast_disabled_seconds"]
    figures["step_extra_loading_cpu_seconds"] = batch * (
        figures["image_ours_seconds"] - figures["image_baseline_seconds"]
    )
    figures["step_loading_cpu_seconds_ours"] = batch * figures["image_ours_seconds"]
    figures["epoch_extra_seconds"] = (
        figures["epoch_model_train_and_frozen_bn_walk_seconds"]
        + figures["epoch_sampler_seconds"]
        + figures["epoch_metrics_seconds"]
    )
    return figures


# --- agreement -----------------------------------------------------------------------------------


def check_agreement(
    trainer: ModuleType, ours: SimpleNamespace, plain: PlainManifestDataset, arch: str, setting: Setting
) -> dict[str, Any]:
    """Stop unless both sides read the same data the same way and take the same training step."""
    import torch

    if ours.classes != plain.classes:
        raise SystemExit(f"classes differ: ours {ours.classes}, baseline {plain.classes}")
    if repr(trainer.train_transform(setting.image_size)) != repr(plain.transform):
        raise SystemExit(f"transforms differ:\n{trainer.train_transform(setting.image_size)}\n{plain.transform}")
    indices = list(range(min(4, len(plain))))
    for i in indices:
        torch.manual_seed(1000 + i)
        ours_image, ours_target = ours.dataset[i]
        torch.manual_seed(1000 + i)
        plain_image, plain_target = plain[i]
        if ours_target != plain_target or not torch.equal(ours_image, plain_image):
            raise SystemExit(f"image {i}: the two datasets give different tensors or labels under the same seed")
    images = torch.stack([plain[i][0] for i in range(min(setting.batch_size, len(plain)))])
    targets = torch.tensor([plain.samples[i][1] for i in range(len(images))])
    trained = ours_training(trainer, arch, len(ours.classes), setting)
    ours_step = trainer.train_one_epoch(
        trained.model,
        trained.criterion,
        trained.optimizer,
        [(images, targets)],
        setting.device,
        0,
        len(ours.classes),
        scaler=trained.scaler,
        amp_dtype=setting.amp_dtype,
        channels_last=setting.channels_last,
        log_fn=lambda _: None,
    )
    plain_parts = plain_training(arch, len(plain.classes), setting)
    plain_loss = plain_loop(plain_parts, [(images.to(setting.device), targets.to(setting.device))], setting)
    tolerance = 1e-4 if setting.amp_dtype is None else 5e-2
    worst = 0.0
    for a, b in zip(trained.model.state_dict().values(), plain_parts.model.state_dict().values()):
        if a.is_floating_point():
            worst = max(worst, float((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)))
    loss_difference = abs(ours_step["loss"] - plain_loss) / max(abs(plain_loss), 1e-12)
    if worst > tolerance or loss_difference > tolerance:
        raise SystemExit(
            f"one training step on the same batch differs: loss {ours_step['loss']} vs {plain_loss}, "
            f"weights (relative difference {worst:.2e})"
        )
    progress(
        f"agreement: same classes {plain.classes}, same transforms, same tensors for images {indices} under "
        f"the same seed, same loss ({plain_loss:.4f}) and weights after one step (relative difference {worst:.1e})"
    )
    return {
        "images_checked": len(indices),
        "weights_relative_difference": worst,
        "step_loss": plain_loss,
        "ours_step_loss": ours_step["loss"],
    }


# --- runs ----------------------------------------------------------------------------------------


def interleaved(sides: dict[str, Callable[[int], dict[str, Any]]], repeats: int, label: str) -> dict[str, list]:
    """Run every side ``repeats`` times, alternating which goes first; all runs per side."""
    runs: dict[str, list] = {name: [] for name in sides}
    names = list(sides)
    for attempt in range(1, repeats + 1):
        for name in names if attempt % 2 else reversed(names):
            figures = sides[name](attempt)
            runs[name].append(figures)
            progress(
                f"{label} run {attempt}/{repeats} {name}: {figures['images_per_second']:.1f} images/s over "
                f"{len(figures['step_seconds'])} steps ({figures['measured_seconds']:.2f} s; whole run "
                f"{figures['whole_run_images_per_second']:.1f} images/s"
                + (
                    f"; train_one_epoch says {figures['trainer_images_per_second']:.1f}"
                    if "trainer_images_per_second" in figures
                    else ""
                )
                + ")"
            )
    return runs


def summarise(runs: dict[str, list]) -> dict[str, Any]:
    """Best runs, ratios and the median-step ratio of two sides named ours and baseline."""
    best = {name: max(side, key=lambda r: r["images_per_second"]) for name, side in runs.items()}
    best_whole = {name: max(r["whole_run_images_per_second"] for r in side) for name, side in runs.items()}
    median_step = {name: statistics.median(s for r in side for s in r["step_seconds"]) for name, side in runs.items()}
    figures = {
        "ratio": best["ours"]["images_per_second"] / best["baseline"]["images_per_second"],
        "ours_images_per_second": best["ours"]["images_per_second"],
        "baseline_images_per_second": best["baseline"]["images_per_second"],
        "ratio_whole_run": best_whole["ours"] / best_whole["baseline"],
        "ours_whole_run_images_per_second": best_whole["ours"],
        "baseline_whole_run_images_per_second": best_whole["baseline"],
        "ours_median_step_seconds": median_step["ours"],
        "baseline_median_step_seconds": median_step["baseline"],
        "all_ours_images_per_second": [r["images_per_second"] for r in runs["ours"]],
        "all_baseline_images_per_second": [r["images_per_second"] for r in runs["baseline"]],
    }
    if "trainer_images_per_second" in best["ours"]:
        figures["ours_train_one_epoch_images_per_second"] = max(r["trainer_images_per_second"] for r in runs["ours"])
    return figures


def gpu_resnet50(trainer: ModuleType, setting: Setting, quick: bool) -> dict[str, Any]:
    """ResNet-50, batch 256, 224 px, 1,000 classes, AMP + channels_last, synthetic batches: both sides."""
    cfg = GPU_RESNET50
    big = Setting(
        **{
            **vars(setting),
            "batch_size": cfg["batch_size"],
            "image_size": cfg["image_size"],
            "warmup": cfg["warmup"],
            "steps": 10 if quick else 30,
        }
    )
    length = big.warmup + big.steps
    data = SyntheticBatches(big.batch_size, big.image_size, cfg["classes"], length)

    def ours(attempt: int) -> dict[str, Any]:
        lines: list[str] = []
        return run_ours(trainer, data, "resnet50", cfg["classes"], big, attempt, lines)

    def baseline(attempt: int) -> dict[str, Any]:
        return run_plain(data, "resnet50", cfg["classes"], big)

    runs = interleaved({"ours": ours, "baseline": baseline}, 2, "GPU resnet50")
    import torch

    return {
        **summarise(runs),
        "arch": "resnet50",
        "batch_size": big.batch_size,
        "image_size": big.image_size,
        "classes": cfg["classes"],
        "steps": big.steps,
        "warmup": big.warmup,
        "data": "synthetic in-memory pinned CPU tensors (no decoding)",
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# --- command line --------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK['image_size']} px, {QUICK['steps']} measured steps instead of "
        f"{FULL['image_size']} px, {FULL['steps']}",
    )
    parser.add_argument("--arch", choices=("resnet18", "resnet34", "resnet50"), default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=None, help="generated image and crop size in pixels")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps per run before the measured ones")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (train.py's default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per side; the best counts")
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images to generate (default: batch size x (warm-up + steps), one epoch per run)",
    )
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is available")
    parser.add_argument(
        "--lockstep-epochs",
        type=int,
        default=None,
        help="lock-step epochs on CPU (0: none; default 2 with --quick, else 1)",
    )
    add_small_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison and return the figures (the JSON line)."""
    defaults = QUICK if args.quick else FULL
    image_size = args.image_size or defaults["image_size"]
    steps = args.steps or defaults["steps"]
    repeats = args.repeats or defaults["repeats"]
    images = args.images or args.batch_size * (args.warmup + steps)
    if images < args.batch_size * (args.warmup + steps):
        raise SystemExit(
            f"--images {images}: fewer than batch size x (warm-up + steps) = {args.batch_size * (args.warmup + steps)}"
        )
    import torch

    trainer = import_trainer()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = trainer.setup_runtime(argparse.Namespace(num_gpus=0 if args.cpu else None))
    device = runtime.device
    trainer.seed_everything(SEED, False, device)  # on CUDA also cudnn.benchmark and TF32, for both sides
    setting = Setting(
        device=device,
        amp_dtype=trainer.amp_dtype_for("auto", device),
        channels_last=device.type == "cuda",
        batch_size=args.batch_size,
        image_size=image_size,
        workers=args.workers,
        warmup=args.warmup,
        steps=steps,
        seed=SEED,
    )
    amp_name = str(setting.amp_dtype).removeprefix("torch.") if setting.amp_dtype else "off"
    load_before = os.getloadavg()
    progress(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, load {load_before[0]:.1f}; amp {amp_name}, channels_last {setting.channels_last}"
    )

    with tempfile.TemporaryDirectory(prefix="conveyor-bench-images-") as tmp_name:
        folder = Path(tmp_name) / "train"
        started = time.perf_counter()
        write_images(folder, images, image_size, SEED)
        progress(
            f"wrote {images} PNG images of {image_size} px and manifest.csv in {time.perf_counter() - started:.1f} s"
        )
        ours = ours_parts(trainer, folder, setting)
        plain = PlainManifestDataset(folder, plain_transform(image_size))
        agreement = check_agreement(trainer, ours, plain, args.arch, setting)
        num_classes = len(ours.classes)
        costs = cost_breakdown(trainer, ours, plain, setting, num_classes)
        progress(
            "ours' extra work, timed apart: per step {:.0f} us (running loss, confusion matrix, autocast off); "
            "per image {:.2f} ms vs baseline {:.2f} ms (decode alone {:.2f} vs {:.2f} ms); per epoch {:.1f} ms".format(
                costs["step_extra_seconds"] * 1e6,
                costs["image_ours_seconds"] * 1e3,
                costs["image_baseline_seconds"] * 1e3,
                costs["decode_ours_load_rgb_seconds"] * 1e3,
                costs["decode_baseline_seconds"] * 1e3,
                costs["epoch_extra_seconds"] * 1e3,
            )
        )
        trainer_lines: list[str] = []

        def run_ours_epoch(attempt: int) -> dict[str, Any]:
            ours.sampler.set_epoch(attempt)
            return run_ours(trainer, ours.loader, args.arch, num_classes, setting, attempt, trainer_lines)

        def run_plain_epoch(attempt: int) -> dict[str, Any]:
            return run_plain(plain_loader(plain, setting, attempt), args.arch, num_classes, setting)

        progress(
            f"{args.arch}, batch {args.batch_size}, {image_size} px, {args.workers} workers: {repeats} interleaved "
            f"runs per side, {args.warmup} warm-up + {steps} measured steps each"
        )
        runs = interleaved({"ours": run_ours_epoch, "baseline": run_plain_epoch}, repeats, device.type)
        if trainer_lines:
            progress(f"train_one_epoch's own line (last run): {trainer_lines[-1]}")
        lockstep = None
        lockstep_epochs = defaults["lockstep_epochs"] if args.lockstep_epochs is None else args.lockstep_epochs
        if device.type == "cpu" and lockstep_epochs > 0:
            pairs: list[tuple[float, float]] = []
            for epoch in range(1, lockstep_epochs + 1):
                ours.sampler.set_epoch(repeats + epoch)
                pairs += run_lockstep(
                    trainer, ours.loader, plain_loader(plain, setting, repeats + epoch), args.arch, num_classes, setting
                )
                progress(
                    f"lock-step epoch {epoch}/{lockstep_epochs} (a baseline step between two of "
                    f"train_one_epoch's): median paired ratio so far {statistics.median(b / o for o, b in pairs):.3f}"
                )
            lockstep = summarise_lockstep(pairs, args.batch_size, lockstep_epochs)
            progress(
                f"lock-step: ours {lockstep['ours_images_per_second']:.1f} images/s, baseline "
                f"{lockstep['baseline_images_per_second']:.1f} images/s over {lockstep['pairs']} step pairs; "
                f"median of paired ratios {lockstep['ratio']:.3f}, ratio of sums {lockstep['ratio_of_sums']:.3f}"
            )
        del ours.loader  # ends the persistent workers before the GPU part
    figures = summarise(runs)
    # what the extra work alone would cost: on 2 saturated cores, loader CPU time displaces compute
    step = figures["baseline_median_step_seconds"]
    extra = (
        costs["step_extra_seconds"]
        + max(0.0, costs["step_extra_loading_cpu_seconds"])
        + costs["epoch_extra_seconds"] / (args.warmup + steps)
    )
    costs["expected_ratio_from_costs"] = step / (step + extra) if device.type == "cpu" else None
    figures["costs"] = costs
    figures["lockstep"] = lockstep or {
        "measured": False,
        "reason": "CPU only" if device.type != "cpu" else "--lockstep-epochs 0",
    }
    progress(
        f"ratio {figures['ratio']:.3f} (best runs), whole runs {figures['ratio_whole_run']:.3f}"
        + (f", lock-step {lockstep['ratio']:.3f}" if lockstep else "")
    )

    if device.type == "cuda":
        progress("GPU: ResNet-50, batch 256, 224 px, synthetic batches, both sides")
        gpu = gpu_resnet50(trainer, setting, args.quick)
        progress(
            f"GPU ResNet-50: ours {gpu['ours_images_per_second']:.0f} images/s, baseline "
            f"{gpu['baseline_images_per_second']:.0f} images/s, ratio {gpu['ratio']:.3f}"
        )
    else:
        gpu = {
            "measured": False,
            "reason": "no CUDA device: ResNet-50 at batch 256 with AMP + channels_last is "
            "measured only where torch.cuda.is_available()",
        }
    ratio = figures["ratio"]
    return {
        "bench": "train_images",
        "baseline": f"plain PyTorch loop: PIL manifest Dataset + same transforms, DataLoader, torchvision "
        f"{args.arch}, SGD, CrossEntropyLoss",
        **figures,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": amp_name,
        "channels_last": setting.channels_last,
        "arch": args.arch,
        "batch_size": args.batch_size,
        "image_size": image_size,
        "images": images,
        "steps": steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "agreement": agreement,
        "gpu_resnet50": gpu,
        "targets": {"ratio": f">= {TARGET_RATIO}"},
        "met": {"ratio": ratio >= TARGET_RATIO},
    }


if __name__ == "__main__":
    options = get_args_parser().parse_args()
    print(json.dumps(run_small(options) if options.small else main(options)), flush=True)
