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

The training loop is reusable (a benchmark imports :func:`train_one_epoch`, :func:`build_model`,
:class:`ManifestImageDataset` and :func:`make_loader`); it keeps no global state.

Bad input ends the process with ``train.py: <what is wrong>`` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import posixpath
import random
import re
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms

TRAINER = "resnet_image"
PROBLEM_TYPE = "image_classification"
ARCHS = ("resnet18", "resnet34", "resnet50")
METRICS = ("accuracy", "balanced_accuracy", "f1_macro")
MANIFEST = "manifest.csv"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BASELINE_IMAGES = 500
QUANTILES = {"p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95, "p99": 0.99}
HISTOGRAM_BINS = 10
PIXEL_BINS = 16
DEFAULT_LR = {"sgd": 0.01, "adamw": 0.001}
WEIGHT_NAME = re.compile(r"(resnet\d+(_weights)?\.)?(imagenet1k_v\d+|default)|resnet\d+", re.IGNORECASE)
# resnet variants by (bottleneck blocks?, blocks per stage), to name what a weights file holds.
KNOWN_ARCHS = {
    (False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152",
}


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


def _quiet(message: str) -> None:
    """Drop a progress line (the log function of ranks other than 0).

    :param message: the line not printed.
    """


# --------------------------------------------------------------------------------------- options


def _number_type(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> Callable[[str], Any]:
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


def _boolean(text: str) -> bool:
    """Parse true/false, yes/no, 1/0 (argparse ``type``; SageMaker passes every flag a value).

    :param text: the option's value.
    """
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _resume(text: str) -> str:
    """Parse ``--resume``: ``auto``, ``never`` or a checkpoint path (argparse ``type``).

    :param text: the option's value.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("expected auto, never or a checkpoint path")
    return text.strip()


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this script; paths default to the SageMaker environment variables."""
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a torchvision ResNet image classifier (SageMaker script mode).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def flag(group: Any, name: str, help_text: str, default: bool | None = False) -> None:
        """A boolean option: ``--name`` alone means true; ``--name false`` also works."""
        group.add_argument(name, nargs="?", const=True, default=default, type=_boolean, metavar="BOOL", help=help_text)

    paths = parser.add_argument_group("paths (default: the SageMaker environment variables)")
    paths.add_argument("--train", type=Path, default=env.get("SM_CHANNEL_TRAIN"),
                       help=f"folder with {MANIFEST} (path,label) and the training images (SM_CHANNEL_TRAIN)")
    paths.add_argument("--validation", type=Path, default=env.get("SM_CHANNEL_VALIDATION"),
                       help="the same for validation (SM_CHANNEL_VALIDATION); without one, --validation-split "
                            "of the training images is held out")
    paths.add_argument("--model-dir", type=Path, default=env.get("SM_MODEL_DIR"),
                       help="where model.pt and metadata.json are written (SM_MODEL_DIR)")
    paths.add_argument("--output-data-dir", type=Path, default=env.get("SM_OUTPUT_DATA_DIR"),
                       help="where history.json is written (SM_OUTPUT_DATA_DIR)")
    paths.add_argument("--checkpoint-dir", type=Path, default=None,
                       help="where last.pt and best.pt are written; <output-data-dir>/checkpoints if unset "
                            "(on SageMaker, /opt/ml/checkpoints survives spot interruptions)")
    paths.add_argument("--num-gpus", type=_number_type(int, 0), default=env.get("SM_NUM_GPUS") or None,
                       help="GPUs this process may use (SM_NUM_GPUS); 0 forces the CPU; every visible GPU if unset")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", choices=ARCHS, default="resnet18", help="torchvision architecture")
    model.add_argument("--pretrained-weights", default=None,
                       help="local file (path or file:// URI) holding a state_dict or checkpoint for --arch; "
                            "never downloaded; a different class count in fc is replaced by a new head")
    flag(model, "--freeze-backbone", "train only the new fc head (backbone weights and BatchNorm statistics frozen)")
    model.add_argument("--image-size", type=_number_type(int, 32), default=224,
                       help="training crop and evaluation crop in pixels (evaluation resizes to size*256/224 first)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=_number_type(int, 1), default=15, help="epochs to train at most")
    optim.add_argument("--batch-size", type=_number_type(int, 1), default=32, help="images per batch and process")
    optim.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    optim.add_argument("--lr", type=_number_type(float, 0, low_open=True), default=None,
                       help=f"learning rate; {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adamw']} for adamw if unset")
    optim.add_argument("--momentum", type=_number_type(float, 0, 1, high_open=True), default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=_number_type(float, 0), default=1e-4, help="weight decay")
    optim.add_argument("--lr-scheduler", choices=("cosine", "step"), default="cosine", help="LR schedule after warm-up")
    optim.add_argument("--lr-warmup-epochs", type=_number_type(int, 0), default=0, help="epochs of linear LR warm-up")
    optim.add_argument("--lr-warmup-decay", type=_number_type(float, 0, 1, low_open=True), default=0.01,
                       help="LR multiplier at the start of warm-up")
    optim.add_argument("--lr-step-size", type=_number_type(int, 1), default=10, help="epochs between LR steps (step)")
    optim.add_argument("--lr-gamma", type=_number_type(float, 0, 1, low_open=True), default=0.1,
                       help="LR multiplier at every step (step)")
    optim.add_argument("--label-smoothing", type=_number_type(float, 0, 1, high_open=True), default=0.0,
                       help="label smoothing of the training loss")
    optim.add_argument("--balance", choices=("none", "sampler", "loss"), default="none",
                       help="class imbalance: draw images by inverse class frequency (sampler) or weight the loss")
    optim.add_argument("--early-stopping-patience", type=_number_type(int, 0), default=5,
                       help="stop after this many epochs without a better validation score (0: never)")
    optim.add_argument("--gate-metric", choices=METRICS, default="balanced_accuracy",
                       help="validation metric that picks the best epoch and is reported as validation_score")
    optim.add_argument("--time-limit", type=_number_type(float, 0, low_open=True), default=None,
                       help="seconds; training stops after the epoch that crosses it")
    optim.add_argument("--validation-split", type=_number_type(float, 0, 0.5, low_open=True, high_open=True),
                       default=0.15, help="share of training images held out when there is no validation channel")

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--workers", type=_number_type(int, 0), default=2, help="DataLoader worker processes")
    runtime.add_argument("--seed", type=int, default=0, help="random seed")
    flag(runtime, "--deterministic", "deterministic algorithms (torch.use_deterministic_algorithms, cudnn flags)")
    runtime.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                         help="mixed precision on CUDA (auto: bf16 where supported, else fp16); always off on CPU")
    flag(runtime, "--channels-last", "channels_last memory format (default: on for CUDA, off for CPU)", None)
    flag(runtime, "--compile", "torch.compile the model (CUDA only)")
    runtime.add_argument("--resume", type=_resume, default="auto",
                         help="auto: resume from <checkpoint-dir>/last.pt when it exists; never; or a checkpoint path")
    flag(runtime, "--verify-images", "decode every image once before training so a bad file fails fast", True)
    runtime.add_argument("--print-freq", type=_number_type(int, 0), default=0,
                         help="also print progress every N training steps (0: once per epoch)")
    return parser


# ------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Item:
    """One labelled image of a channel.

    :param path: the file.
    :param name: its path as the manifest gives it (normalised), for messages.
    :param label: its class.
    :param line: its line in the manifest, for messages.
    """

    path: Path
    name: str
    label: str
    line: int


def read_manifest(folder: Path | None, channel: str, env_name: str) -> list[Item]:
    """The labelled images a channel's ``manifest.csv`` lists; every path must stay in the folder and exist.

    :param folder: the channel folder.
    :param channel: the channel's name, for messages.
    :param env_name: the environment variable that names it, for messages.
    """
    if folder is None:
        raise TrainingInputError(f"{channel} channel: no folder given (set {env_name} or pass --{channel})")
    if not folder.is_dir():
        raise TrainingInputError(f"{channel} channel: folder {folder} does not exist")
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise TrainingInputError(f"{channel} channel: {folder} has no {MANIFEST} (columns path,label)")
    items = []
    try:
        with manifest.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            if not {"path", "label"} <= set(columns):
                raise TrainingInputError(f"{channel} channel: {MANIFEST} needs columns path,label; found {columns}")
            reader.fieldnames = columns
            for row in reader:
                where = f"{channel} channel: {MANIFEST} line {reader.line_num}"
                raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not raw and not label:
                    continue
                if not raw or not label:
                    raise TrainingInputError(f"{where}: every row needs a path and a label, got {raw!r}, {label!r}")
                normal = posixpath.normpath(raw.replace("\\", "/"))
                if raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or "://" in raw or normal.startswith(".."):
                    raise TrainingInputError(f"{where}: path {raw!r} points outside the channel folder: refused")
                path = folder / normal
                if not path.is_file():
                    raise TrainingInputError(f"{where}: image {raw!r} does not exist in {folder}")
                items.append(Item(path=path, name=normal, label=label, line=reader.line_num))
    except (UnicodeDecodeError, csv.Error) as error:
        raise TrainingInputError(f"{channel} channel: {MANIFEST} is not a readable UTF-8 CSV file ({error})") from None
    if not items:
        raise TrainingInputError(f"{channel} channel: {MANIFEST} lists no image")
    return items


def load_rgb(path: Path) -> Image.Image:
    """Open an image file as the model sees it: EXIF orientation applied, RGB.

    :param path: the file.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image) or image
        return image.convert("RGB")


def check_image(path: Path) -> tuple[int, int] | str:
    """Decode an image once (JPEG at reduced scale, which is cheap): its size, or why it does not decode.

    :param path: the file.
    """
    try:
        if path.stat().st_size == 0:
            return "zero bytes"
        with Image.open(path) as image:
            size = image.size
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
        return size
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__


def verify_images(items: list[Item], channel: str) -> None:
    """Decode every image of a channel (in threads); refuse the channel naming the files that fail.

    :param items: the channel's images.
    :param channel: the channel's name, for messages.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check_image, [item.path for item in items]))
    bad = [(item, result) for item, result in zip(items, results) if isinstance(result, str)]
    if bad:
        shown = "; ".join(f"{item.name!r} ({MANIFEST} line {item.line}): {reason}" for item, reason in bad[:10])
        more = f"; ... ({len(bad)} in all)" if len(bad) > 10 else ""
        noun = "image does" if len(bad) == 1 else "images do"
        raise ImageDecodeError(f"{channel} channel: {len(bad)} {noun} not decode: {shown}{more}")


def hold_out(items: list[Item], share: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split training images into train and validation, stratified by class (classes of one image stay in train).

    :param items: the training images.
    :param share: the share held out.
    :param seed: the shuffle seed.
    """
    rng = random.Random(seed)
    train, validation = [], []
    for label in sorted({item.label for item in items}):
        group = [item for item in items if item.label == label]
        rng.shuffle(group)
        count = min(len(group) - 1, max(1, round(share * len(group)))) if len(group) > 1 else 0
        validation += group[:count]
        train += group[count:]
    if not validation:
        raise TrainingInputError("no validation channel, and too few training images to hold some out")
    return train, validation


class ManifestImageDataset(Dataset):
    """Labelled images of a channel, decoded with :func:`load_rgb` and transformed.

    :param items: the images.
    :param class_to_idx: class id of each label.
    :param transform: the transform from a PIL image to a tensor.
    """

    def __init__(self, items: list[Item], class_to_idx: dict[str, int], transform: Callable[[Image.Image], torch.Tensor]):
        self.items = items
        self.targets = [class_to_idx[item.label] for item in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        try:
            image = load_rgb(item.path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ImageDecodeError(f"image {item.name!r} ({MANIFEST} line {item.line}) does not decode: {error}") from None
        return self.transform(image), self.targets[index]


def eval_preprocessing(image_size: int) -> dict[str, Any]:
    """The evaluation preprocessing, as written to ``metadata.json`` for inference to reproduce.

    :param image_size: the crop size.
    """
    return {
        "resize": int(image_size * 256 / 224),
        "crop": image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize_mode": "shorter_side",
        "interpolation": "bilinear",
        "color_mode": "RGB",
        "exif_transpose": True,
    }


def eval_transform(preprocessing: dict[str, Any]) -> transforms.Compose:
    """Resize the shorter side, centre-crop, scale to [0, 1] and normalise.

    :param preprocessing: the dict from :func:`eval_preprocessing`.
    """
    return transforms.Compose([
        transforms.Resize(preprocessing["resize"], interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(preprocessing["crop"]),
        transforms.ToTensor(),
        transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
    ])


def train_transform(image_size: int) -> transforms.Compose:
    """Training augmentation: random resized crop, horizontal flip, light colour jitter, normalise.

    :param image_size: the crop size.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one process: shuffled, or drawn with replacement by weight; the same
    permutation on every process for a seed and epoch, then sharded ``rank::world`` (padded so every
    process gets as many).

    :param size: the dataset's length.
    :param seed: the base seed (``seed + epoch`` draws an epoch).
    :param shuffle: whether to shuffle (ignored with weights).
    :param weights: per-image draw weights (class balancing), or None.
    :param rank: this process's rank.
    :param world: the number of processes.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, weights: list[float] | None = None,
                 rank: int = 0, world: int = 1):
        self.size, self.seed, self.shuffle, self.rank, self.world = size, seed, shuffle, rank, world
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose draw the next iteration gives.

        :param epoch: the epoch.
        """
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        total = len(self) * self.world
        order = (order * math.ceil(total / max(1, len(order))))[:total]
        return iter(order[self.rank::self.world])


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader: pinned memory on CUDA, persistent workers when there are workers.

    :param dataset: the dataset.
    :param batch_size: images per batch.
    :param workers: worker processes (0: load in this process).
    :param device: where batches go.
    :param sampler: the sampler; sequential if None.
    :param drop_last: whether to drop a last, incomplete batch.
    """
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


# -------------------------------------------------------------------------------------- baseline


def _number(value: Any) -> float | None:
    """A JSON-safe float: None for NaN or infinity.

    :param value: a number.
    """
    value = float(value)
    return value if math.isfinite(value) else None


def numeric_summary(values: list[float]) -> dict[str, Any]:
    """Moments, quantiles and a decile histogram, in the format of the tabular trainer's numeric baseline.

    :param values: the values.
    """
    array = np.asarray(values, dtype="float64")
    if not len(array):
        return {"kind": "numeric", "count": 0, "missing_rate": None, "mean": None, "std": None, "min": None,
                "max": None, "quantiles": {}, "histogram": None}
    edges = np.unique(np.quantile(array, np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)))
    if len(edges) == 1:
        edges, counts = np.array([edges[0], edges[0]]), np.array([len(array)])
    else:
        counts, _ = np.histogram(array, bins=edges)
    return {
        "kind": "numeric",
        "count": int(len(array)),
        "missing_rate": 0.0,
        "mean": _number(array.mean()),
        "std": _number(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": _number(array.min()),
        "max": _number(array.max()),
        "quantiles": {name: _number(np.quantile(array, q)) for name, q in QUANTILES.items()},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def build_baseline(items: list[Item], seed: int, limit: int = BASELINE_IMAGES) -> dict[str, Any]:
    """Training-image statistics the drift monitor compares live images with.

    On at most ``limit`` images (a seeded sample), decoded as the model sees them (:func:`load_rgb`):
    per-channel mean and std of pixel intensity in [0, 1] over all pixels, a 16-bin histogram per
    channel, and per image its brightness (mean of PIL's ``L`` luma, in [0, 1]), width and height.
    The label distribution counts every training image.

    :param items: the training images.
    :param seed: the sampling seed.
    :param limit: the most images decoded.
    """
    if len(items) > limit:
        chosen = sorted(np.random.default_rng(seed).choice(len(items), size=limit, replace=False).tolist())
        sample = [items[i] for i in chosen]
    else:
        sample = items
    channel_counts = np.zeros((3, 256), dtype=np.int64)
    brightness, widths, heights = [], [], []
    levels = np.arange(256, dtype=np.float64)
    for item in sample:
        try:
            image = load_rgb(item.path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ImageDecodeError(f"train channel: image {item.name!r} ({MANIFEST} line {item.line}) "
                                   f"does not decode: {error}") from None
        channel_counts += np.asarray(image.histogram(), dtype=np.int64).reshape(3, 256)
        luma = np.asarray(image.convert("L").histogram(), dtype=np.float64)
        brightness.append(float((luma * levels).sum() / luma.sum() / 255.0))
        widths.append(image.width)
        heights.append(image.height)
    pixels = channel_counts.sum(axis=1).astype(np.float64)
    mean = (channel_counts * levels).sum(axis=1) / pixels
    variance = (channel_counts * levels**2).sum(axis=1) / pixels - mean**2
    binned = channel_counts.reshape(3, PIXEL_BINS, 256 // PIXEL_BINS).sum(axis=2)
    labels = [item.label for item in items]
    return {
        "kind": "image",
        "rows": len(items),
        "sampled_images": len(sample),
        "pixel": {
            "channels": ["red", "green", "blue"],
            "mean": [float(v) / 255.0 for v in mean],
            "std": [float(math.sqrt(max(v, 0.0))) / 255.0 for v in variance],
            "histogram": {
                "edges": [i / PIXEL_BINS for i in range(PIXEL_BINS + 1)],
                "counts": {name: [int(c) for c in binned[i]] for i, name in enumerate(("red", "green", "blue"))},
            },
        },
        "brightness": numeric_summary(brightness),
        "width": numeric_summary(widths),
        "height": numeric_summary(heights),
        "label_distribution": {label: labels.count(label) / len(labels) for label in sorted(set(labels))},
    }


# ----------------------------------------------------------------------------------------- model


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision ResNet with ``num_classes`` outputs (never downloads weights).

    :param arch: resnet18, resnet34 or resnet50.
    :param num_classes: the number of classes.
    """
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def resolve_weights(value: str) -> Path:
    """The local file a ``--pretrained-weights`` value names; anything to download is refused.

    :param value: a path, a ``file://`` URI, or a folder holding exactly one ``.pt``/``.pth`` file.
    """
    if "://" in value:
        parsed = urllib.parse.urlparse(value)
        if parsed.scheme.lower() != "file":
            raise TrainingInputError(
                f"--pretrained-weights {value}: will not download weights at run time; give a local file "
                "(a path or file:// URI, e.g. in an input channel)"
            )
        path = Path(urllib.parse.unquote(parsed.path))
    else:
        path = Path(value).expanduser()
    if not path.exists():
        if WEIGHT_NAME.fullmatch(value.strip()):
            raise TrainingInputError(
                f"--pretrained-weights {value!r} looks like a torchvision weight name: will not download weights "
                "at run time; give a local file"
            )
        raise TrainingInputError(f"pretrained weights file {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".pt", ".pth"))
        if len(files) != 1:
            raise TrainingInputError(f"pretrained weights folder {path} must hold exactly one .pt/.pth file, "
                                     f"found {len(files)}")
        path = files[0]
    return path


def _state_dict_of(loaded: Any) -> dict[str, torch.Tensor] | None:
    """The state_dict in what ``torch.load`` returned: a state_dict, or a checkpoint dict holding one.

    Prefixes added by DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) are removed.

    :param loaded: the loaded object.
    """
    if isinstance(loaded, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return None
    clean = {}
    for key, value in loaded.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        clean[key] = value
    return clean


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """Which ResNet a state_dict belongs to, from its block structure (None when unknown).

    :param state: the state_dict.
    """
    bottleneck = any(re.match(r"layer\d\.\d+\.conv3\.weight$", key) for key in state)
    blocks = tuple(len({key.split(".")[1] for key in state if key.startswith(f"layer{i}.")}) for i in range(1, 5))
    return KNOWN_ARCHS.get((bottleneck, blocks))


def _examples(keys: list[str], limit: int = 3) -> str:
    """A few keys, for messages.

    :param keys: the keys.
    :param limit: how many to show.
    """
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def describe_mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], ignore_head: bool) -> str:
    """What differs between a weights file and the model: keys missing, unexpected, or of another shape.

    :param state: the file's state_dict.
    :param own: the model's state_dict.
    :param ignore_head: whether the fc layer is left out of the comparison.
    """
    def counted(key: str) -> bool:
        return not (ignore_head and key.startswith("fc."))

    missing = [k for k in own if k not in state and counted(k)]
    unexpected = [k for k in state if k not in own and counted(k)]
    shapes = [k for k in own if k in state and counted(k) and state[k].shape != own[k].shape]
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
    if missing:
        parts.append(f"{len(missing)} missing keys ({_examples(missing)})")
    if shapes:
        shown = ", ".join(f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model" for k in shapes[:3])
        parts.append(f"{len(shapes)} shape mismatches ({shown}{', ...' if len(shapes) > 3 else ''})")
    return "; ".join(parts) or "the keys match but loading failed"


def load_pretrained(model: nn.Module, path: Path, arch: str) -> None:
    """Load a weights file into the model; an fc layer for another class count (or none) is left new.

    :param model: the model built for ``arch``.
    :param path: the weights file.
    :param arch: the architecture asked for, for messages.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure means the file is not usable weights
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainingInputError(f"pretrained weights {path}: not a PyTorch weights file ({first})") from None
    state = _state_dict_of(loaded)
    if state is None:
        raise TrainingInputError(f"pretrained weights {path}: holds no state_dict (a dict of tensors)")
    own = model.state_dict()
    head_differs = any(
        key not in state or state[key].shape != own[key].shape for key in ("fc.weight", "fc.bias")
    )
    guess = guess_arch(state)
    looks = f" (the file looks like {guess})" if guess and guess != arch else ""
    if head_differs:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(state, strict=not head_differs)
    except RuntimeError:
        raise TrainingInputError(
            f"pretrained weights {path} do not fit --arch {arch}{looks}: {describe_mismatch(state, own, head_differs)}"
        ) from None
    if head_differs:
        other = [k for k in result.missing_keys + result.unexpected_keys if not k.startswith("fc.")]
        if other:
            raise TrainingInputError(
                f"pretrained weights {path} do not fit --arch {arch}{looks}: {describe_mismatch(state, own, True)}"
            )
        classes = model.fc.out_features
        log(f"pretrained weights {path}: loaded everything but fc (the file's head does not have {classes} "
            f"classes); fc starts new for {classes} classes")
    else:
        log(f"pretrained weights {path}: loaded (fc included)")


def freeze_backbone(model: nn.Module) -> None:
    """Leave only the fc layer trainable.

    :param model: the model.
    """
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("fc.")


def _keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """Keep BatchNorm layers whose parameters are all frozen in eval mode (their statistics stay too).

    :param model: the model, just put in train mode.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()


def lr_factor(epoch: int, args: argparse.Namespace) -> float:
    """The LR multiplier of a 0-based epoch: linear warm-up, then cosine to 0 or steps.

    :param epoch: the epoch.
    :param args: the parsed command line.
    """
    warm = args.lr_warmup_epochs
    if epoch < warm:
        return args.lr_warmup_decay + (1.0 - args.lr_warmup_decay) * epoch / warm
    if args.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / max(1, args.epochs - warm)))
    return args.lr_gamma ** ((epoch - warm) // args.lr_step_size)


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


# --------------------------------------------------------------------------------------- metrics


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


def _reduce(tensors: list[torch.Tensor], distributed: bool) -> None:
    """Sum tensors over every process, in place (nothing to do in a single process).

    :param tensors: the tensors.
    :param distributed: whether a process group is running.
    """
    if distributed:
        for tensor in tensors:
            dist.all_reduce(tensor)


def _count(confusion: torch.Tensor, targets: torch.Tensor, output: torch.Tensor, num_classes: int) -> None:
    """Add a batch to a flat confusion matrix, on the device and without waiting for it.

    :param confusion: counts of ``true * num_classes + predicted``.
    :param targets: the true classes.
    :param output: the logits.
    :param num_classes: the number of classes.
    """
    cells = targets * num_classes + output.argmax(1)
    confusion.scatter_add_(0, cells, torch.ones_like(cells))


def _clock(seconds: float) -> str:
    """Seconds as ``H:MM:SS``.

    :param seconds: a duration.
    """
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_one_epoch(
    model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
    device: torch.device, epoch: int, num_classes: int, *, epochs: int | None = None,
    scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
    gate_metric: str = "balanced_accuracy", max_steps: int | None = None, print_freq: int = 0,
    distributed: bool = False, log_fn: Callable[[str], None] = log,
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
    :return: loss, accuracy, balanced_accuracy, f1_macro, images, seconds, images_per_second, lr.
    """
    model.train()
    _keep_frozen_batchnorm_in_eval(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    seen = 0
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    started = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if max_steps is not None and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
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
        loss_sum += loss.detach().double() * images.shape[0]
        _count(confusion, targets, output.detach(), num_classes)
        seen += images.shape[0]
        if print_freq and (step + 1) % print_freq == 0 and step + 1 < steps:
            elapsed = time.perf_counter() - started
            log_fn(f"epoch {epoch} step {step + 1}/{steps}: loss {loss_sum.item() / seen:.4f} | "
                   f"{seen / elapsed:.1f} images/s | eta epoch {_clock(elapsed / (step + 1) * (steps - step - 1))}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    count = torch.tensor(seen, dtype=torch.int64, device=device)
    _reduce([loss_sum, confusion, count], distributed)
    images_total = int(count.item())
    metrics = metrics_from_confusion(confusion.view(num_classes, num_classes).cpu().numpy())
    result = {
        "loss": loss_sum.item() / images_total if images_total else float("nan"),
        **metrics,
        "images": images_total,
        "seconds": seconds,
        "images_per_second": images_total / seconds if seconds > 0 else 0.0,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }
    eta = f" | eta {_clock(seconds * (epochs - epoch))}" if epochs is not None else ""
    total = f"/{epochs}" if epochs is not None else ""
    log_fn(f"epoch {epoch}{total} train: loss {result['loss']:.4f} {gate_metric} {result[gate_metric]:.4f} "
           f"accuracy {result['accuracy']:.4f} | {result['images_per_second']:.1f} images/s ({images_total} in "
           f"{seconds:.1f}s) | lr {result['lr']:.6g}{eta}")
    return result


@torch.inference_mode()
def evaluate(
    model: nn.Module, criterion: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, *,
    gate_metric: str = "balanced_accuracy", amp_dtype: torch.dtype | None = None, channels_last: bool = False,
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
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output = model(images)
        loss_sum += criterion(output.float(), targets).double() * images.shape[0]
        _count(confusion, targets, output, num_classes)
        seen += images.shape[0]
    _reduce([loss_sum, confusion, seen], distributed)
    count = int(seen.item())
    matrix = confusion.view(num_classes, num_classes).cpu().numpy()
    metrics = metrics_from_confusion(matrix)
    return {"score": metrics[gate_metric], "metric": gate_metric,
            "loss": loss_sum.item() / count if count else float("nan"), **metrics, "images": count,
            "predicted": [int(v) for v in matrix.sum(axis=0)]}


# ------------------------------------------------------------------------------------ checkpoints


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
        problem = f"cannot read it ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})"
    else:
        saved = checkpoint.get("args", {}) if isinstance(checkpoint, dict) else {}
        problem = None
        if not isinstance(checkpoint, dict) or "model" not in checkpoint or "epoch" not in checkpoint:
            problem = "it is not a checkpoint of this script"
        elif checkpoint.get("class_to_idx") != class_to_idx:
            problem = f"it was trained on other classes ({sorted(checkpoint.get('class_to_idx') or {})})"
        else:
            for key in ("arch", "optimizer", "freeze_backbone", "balance"):
                if saved.get(key) != getattr(args, key):
                    problem = f"it was trained with --{key.replace('_', '-')} {saved.get(key)}, not {getattr(args, key)}"
                    break
        if problem is None:
            return checkpoint
    if explicit:
        raise TrainingInputError(f"--resume {path}: {problem}")
    log(f"ignoring checkpoint {path}: {problem}; training from the start")
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
            self.best_score, self.best_loss, self.best_epoch, self.stale_epochs = val["score"], val["loss"], self.epoch, 0
        else:
            self.stale_epochs += 1
        self.history.append({
            "epoch": self.epoch, "lr": train["lr"], "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            f"train_{gate_metric}": train[gate_metric], "train_images_per_second": train["images_per_second"],
            "val_loss": _number(val["loss"]), **{f"val_{name}": val[name] for name in METRICS},
            "val_score": val["score"], "val_predicted": val.get("predicted"), "best": improved,
            "seconds": round(seconds, 3),
        })
        return improved

    def counters(self) -> dict[str, Any]:
        """What a checkpoint keeps besides ``epoch``, ``best_metric`` and ``history``."""
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "stale_epochs": self.stale_epochs,
                "stopped": self.stopped}


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters.

    :param model: the model (frozen parameters are left out).
    :param args: the parsed command line.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)


def restore(checkpoint: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            lr_scheduler: Any, scaler: torch.amp.GradScaler | None) -> Progress:
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
        epoch=int(checkpoint["epoch"]), best_score=float(checkpoint["best_metric"]),
        best_loss=float(checkpoint.get("best_loss", math.inf)), best_epoch=int(checkpoint.get("best_epoch", 0)),
        stale_epochs=int(checkpoint.get("stale_epochs", 0)),
        stopped="early_stopping" if checkpoint.get("stopped") == "early_stopping" else None,
        history=list(checkpoint.get("history", [])),
    )


# ------------------------------------------------------------------------------------------ main


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
        log(f"{torch.cuda.device_count()} GPUs visible, this process uses one: run under "
            f"torchrun --nproc_per_node {torch.cuda.device_count()} to use them all")
    return Runtime(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"), rank=0, world=1,
                   distributed=False)


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


def load_channels(args: argparse.Namespace, runtime: Runtime) -> tuple[list[Item], list[Item], list[str]]:
    """Read and check both channels; the training images, the validation images and the sorted classes.

    :param args: the parsed command line.
    :param runtime: where this process trains.
    """
    train = read_manifest(args.train, "train", "SM_CHANNEL_TRAIN")
    classes = sorted({item.label for item in train})
    if len(classes) < 2:
        raise TrainingInputError(
            f"train channel: a classifier needs at least 2 classes; {MANIFEST} has only {classes[0]!r} "
            f"({len(train)} images)"
        )
    if args.validation is not None:
        validation = read_manifest(args.validation, "validation", "SM_CHANNEL_VALIDATION")
        unseen = sorted({item.label for item in validation} - set(classes))
        if unseen:
            raise TrainingInputError(
                f"validation channel: classes never seen in training: {', '.join(map(repr, unseen))} "
                f"(training has {', '.join(map(repr, classes))})"
            )
    else:
        train, validation = hold_out(train, args.validation_split, args.seed)
        log(f"no validation channel: holding out {len(validation)} of the training images (stratified)")
    if args.verify_images and runtime.is_main:
        started = time.time()
        verify_images(train, "train")
        verify_images(validation, "validation")
        log(f"checked {len(train) + len(validation)} images decode ({time.time() - started:.1f}s)")
    return train, validation, classes


def class_weights(targets: list[int], num_classes: int) -> list[float]:
    """Inverse class frequency, scaled so a balanced set has weight 1 per class.

    :param targets: the class id of every training image.
    :param num_classes: the number of classes.
    """
    counts = np.bincount(np.asarray(targets), minlength=num_classes).astype(np.float64)
    return [len(targets) / (num_classes * c) if c else 0.0 for c in counts]


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Check the inputs, train, and (rank 0) write the model, metadata and history; return the metadata.

    :param args: the parsed command line.
    """
    started = time.monotonic()
    if args.model_dir is None:
        raise TrainingInputError("model dir: none given (set SM_MODEL_DIR or pass --model-dir)")
    if args.output_data_dir is None:
        raise TrainingInputError("output data dir: none given (set SM_OUTPUT_DATA_DIR or pass --output-data-dir)")
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    args.checkpoint_dir = Path(args.checkpoint_dir or Path(args.output_data_dir) / "checkpoints")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts
    weights_path = resolve_weights(args.pretrained_weights) if args.pretrained_weights else None
    runtime = setup_runtime(args)
    device = runtime.device
    seed_everything(args.seed, args.deterministic, device)
    amp_dtype = amp_dtype_for(args.amp, device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    compile_model = bool(args.compile) and device.type == "cuda"
    if device.type != "cuda":
        ignored = [name for name, on in (("--compile", args.compile), (f"--amp {args.amp}", args.amp in ("bf16", "fp16")))
                   if on]
        if ignored:
            log(f"on CPU: ignoring {' and '.join(ignored)} (CUDA only)")

    train_items, val_items, classes = load_channels(args, runtime)
    class_to_idx = {label: i for i, label in enumerate(classes)}
    num_classes = len(classes)
    model_dir, output_dir = Path(args.model_dir), Path(args.output_data_dir)
    baseline = None
    if runtime.is_main:
        started_baseline = time.time()
        baseline = build_baseline(train_items, args.seed)
        log(f"baseline: statistics of {baseline['sampled_images']} training images ({time.time() - started_baseline:.1f}s)")
        for folder in (model_dir, output_dir, args.checkpoint_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in ("metadata.json", "model.pt"):
            (model_dir / stale).unlink(missing_ok=True)

    model = build_model(args.arch, num_classes)
    if weights_path is not None:
        load_pretrained(model, weights_path, args.arch)
    if args.freeze_backbone:
        freeze_backbone(model)
        if weights_path is None:
            log("warning: --freeze-backbone without --pretrained-weights trains a head on a random backbone")
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, args))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    train_set = ManifestImageDataset(train_items, class_to_idx, train_transform(args.image_size))
    preprocessing = eval_preprocessing(args.image_size)
    val_set = ManifestImageDataset(val_items, class_to_idx, eval_transform(preprocessing))
    weights = class_weights(train_set.targets, num_classes)
    loss_weight = torch.tensor(weights, dtype=torch.float32, device=device) if args.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=loss_weight, label_smoothing=args.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    sampler = EpochSampler(
        len(train_set), args.seed, weights=[weights[t] for t in train_set.targets] if args.balance == "sampler" else None,
        rank=runtime.rank, world=runtime.world,
    )
    per_process = len(sampler)
    train_loader = make_loader(train_set, args.batch_size, args.workers, device, sampler,
                               drop_last=per_process > 1 and per_process % args.batch_size == 1)  # BatchNorm needs 2
    val_shard = Subset(val_set, list(range(runtime.rank, len(val_set), runtime.world)))
    val_loader = make_loader(val_shard, args.batch_size, args.workers, device)

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    eval_model: nn.Module = model
    if compile_model:
        train_model, eval_model = torch.compile(train_model), torch.compile(model)

    progress = Progress()
    resume_from = checkpoint_path(args)
    checkpoint = read_checkpoint(resume_from, args, class_to_idx) if resume_from else None
    if checkpoint is not None:
        progress = restore(checkpoint, model, optimizer, lr_scheduler, scaler)
        left = 0 if progress.stopped else max(0, args.epochs - progress.epoch)
        log(f"resuming from {resume_from}: epoch {progress.epoch} done (best {args.gate_metric} "
            f"{progress.best_score:.4f} at epoch {progress.best_epoch}); "
            + (f"continuing at epoch {progress.epoch + 1} of {args.epochs}" if left else "nothing left to train"))
    for group in optimizer.param_groups:  # the current flags rule, also after a resume
        group.update(initial_lr=args.lr, lr=args.lr * lr_factor(progress.epoch, args), weight_decay=args.weight_decay)
        if args.optimizer == "sgd":
            group["momentum"] = args.momentum
    lr_scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)

    log(f"start: {args.arch}, {num_classes} classes, {len(train_items)} training and {len(val_items)} validation "
        f"images, device {device}{f' x{runtime.world} processes' if runtime.distributed else ''}, amp "
        f"{str(amp_dtype).removeprefix('torch.') if amp_dtype else 'off'}, channels_last {channels_last}, compile "
        f"{compile_model}, batch {args.batch_size}, {args.optimizer} lr {args.lr:g}, epochs {args.epochs}")
    best_path, last_path = args.checkpoint_dir / "best.pt", args.checkpoint_dir / "last.pt"
    log_fn = log if runtime.is_main else _quiet
    while progress.stopped is None and progress.epoch < args.epochs:
        epoch_started = time.monotonic()
        sampler.set_epoch(progress.epoch)
        try:
            train = train_one_epoch(
                train_model, criterion, optimizer, train_loader, device, progress.epoch + 1, num_classes,
                epochs=args.epochs, scaler=scaler, amp_dtype=amp_dtype, channels_last=channels_last,
                gate_metric=args.gate_metric, print_freq=args.print_freq, distributed=runtime.distributed,
                log_fn=log_fn,
            )
        except ImageDecodeError as error:
            raise ImageDecodeError(f"train channel: {_clean(str(error))}") from None
        if not math.isfinite(train["loss"]):
            raise TrainingInputError(
                f"training diverged: the loss is {train['loss']} in epoch {progress.epoch + 1} (lower --lr)")
        lr_scheduler.step()
        try:
            val = evaluate(eval_model, eval_criterion, val_loader, device, num_classes, gate_metric=args.gate_metric,
                           amp_dtype=amp_dtype, channels_last=channels_last, distributed=runtime.distributed)
        except ImageDecodeError as error:
            raise ImageDecodeError(f"validation channel: {_clean(str(error))}") from None
        improved = progress.record(train, val, args.gate_metric, time.monotonic() - epoch_started)
        log_fn(f"epoch {progress.epoch}/{args.epochs} validation: loss {val['loss']:.4f} {args.gate_metric} "
               f"{val['score']:.4f} accuracy {val['accuracy']:.4f}" + (
                   " (best so far)" if improved else f" (best {progress.best_score:.4f} at epoch {progress.best_epoch})"))
        if args.early_stopping_patience and progress.stale_epochs >= args.early_stopping_patience:
            progress.stopped = "early_stopping"
            log_fn(f"early stopping: no better {args.gate_metric} for {progress.stale_epochs} epochs")
        elif args.time_limit is not None and _agree(time.monotonic() - started >= args.time_limit, runtime, device):
            progress.stopped = "time_limit"
            log_fn(f"time limit: {args.time_limit:g}s reached after epoch {progress.epoch}; stopping")
        if runtime.is_main:
            if improved:
                save_atomic({"model": model.state_dict(), "epoch": progress.epoch, "metric": args.gate_metric,
                             "score": progress.best_score, "class_to_idx": class_to_idx, "arch": args.arch}, best_path)
            save_atomic({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "epoch": progress.epoch,
                "best_metric": progress.best_score, **progress.counters(), "args": _json_args(args),
                "class_to_idx": class_to_idx, "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": torch.get_rng_state(), "history": progress.history,
            }, last_path)
            write_json(progress.history, output_dir / "history.json")
    if not runtime.is_main:
        return None
    return finish(args, model_dir, output_dir, best_path, progress, {
        "classes": classes, "preprocessing": preprocessing, "baseline": baseline, "device": device,
        "world": runtime.world, "rows": {"train": len(train_items), "validation": len(val_items)},
        "seconds": time.monotonic() - started,
    })


def _agree(decision: bool, runtime: Runtime, device: torch.device) -> bool:
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


def _json_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as JSON values (paths as text).

    :param args: the parsed command line.
    """
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _versions() -> dict[str, str]:
    """Versions of the libraries the artifact needs to load."""
    import PIL

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "python": platform.python_version()}


def finish(args: argparse.Namespace, model_dir: Path, output_dir: Path, best_path: Path, progress: Progress,
           state: dict[str, Any]) -> dict[str, Any]:
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
    device = state["device"]
    baseline = state["baseline"]
    predicted = best_row.get("val_predicted")  # absent in the history of a run resumed from an older checkpoint
    if baseline is not None and predicted and sum(predicted):
        # what live predictions are compared with: the best epoch's predictions on held-out images
        baseline = {**baseline,
                    "predictions": {str(c): n / sum(predicted) for c, n in zip(state["classes"], predicted)},
                    "predictions_source": {"channel": "validation", "rows": int(sum(predicted)),
                                           "epoch": progress.best_epoch}}
    metadata: dict[str, Any] = {
        "trainer": TRAINER,
        "problem_type": PROBLEM_TYPE,
        "label": "label",
        "features": [{"name": "image", "dtype": "image"}],
        "arch": args.arch,
        "class_labels": state["classes"],
        "image_size": args.image_size,
        "preprocessing": state["preprocessing"],
        "best_model": f"{args.arch}_epoch{progress.best_epoch}",
        "best_epoch": progress.best_epoch,
        "validation_score": _number(progress.best_score),
        "validation_metric": args.gate_metric,
        "eval_metric": args.gate_metric,
        "validation_metrics": {name: best_row.get(f"val_{name}") for name in METRICS} | {"loss": best_row.get("val_loss")},
        "epochs_run": progress.epoch,
        "stopped": stopped,
        "hyperparameters": _json_args(args),
        "rows": state["rows"],
        "training_seconds": round(state["seconds"], 1),
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                   platform.processor() or platform.machine(), "processes": state["world"]},
        "versions": _versions(),
        "baseline": baseline,
    }
    write_json(metadata, model_dir / "metadata.json")
    size_mb = (model_dir / "model.pt").stat().st_size / 2**20
    log(f"saved: {model_dir / 'model.pt'} ({size_mb:.1f} MB, epoch {progress.best_epoch}, {args.gate_metric} "
        f"{progress.best_score:.4f}), {model_dir / 'metadata.json'}, {output_dir / 'history.json'}; "
        f"stopped by {stopped} after {progress.epoch} epochs")
    return metadata


def _clean(message: str) -> str:
    """The message of an error re-raised from a DataLoader worker, without the worker's traceback.

    :param message: the error's text.
    """
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.strip().splitlines() if line.strip()][-1]
    return last.split("Error: ", 1)[-1] if "Error: " in last else last


def main(args: argparse.Namespace) -> None:
    """Run the training; bad input exits with ``train.py: <message>`` and status 1.

    :param args: the parsed command line (see :func:`get_args_parser`).
    """
    try:
        run(args)
    except TrainingInputError as error:
        sys.exit(f"train.py: {_clean(str(error))}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
