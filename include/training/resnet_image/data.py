"""Data of the ResNet trainer: a channel's ``manifest.csv`` (``path,label``) and its images, the
held-out validation split, the dataset, the epoch sampler (class balancing, DDP shards) and loaders.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import posixpath
import random
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from utils import ImageDecodeError, Runtime, TrainingInputError, log

MANIFEST = "manifest.csv"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


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
                outside = raw.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", raw) or "://" in raw
                if outside or normal.startswith(".."):
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
    except DECODE_ERRORS as error:
        return str(error) or type(error).__name__


def verify_images(items: list[Item], channel: str) -> None:
    """Decode every image of a channel (in threads); refuse the channel naming the files that fail.

    :param items: the channel's images.
    :param channel: the channel's name, for messages.
    """
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check_image, [item.path for item in items]))
    bad = [(item, result) for item, result in zip(items, results, strict=True) if isinstance(result, str)]
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

    def __init__(
        self, items: list[Item], class_to_idx: dict[str, int], transform: Callable[[Image.Image], torch.Tensor]
    ):
        self.items = items
        self.targets = [class_to_idx[item.label] for item in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        try:
            image = load_rgb(item.path)
        except DECODE_ERRORS as error:
            raise ImageDecodeError(
                f"image {item.name!r} ({MANIFEST} line {item.line}) does not decode: {error}"
            ) from None
        return self.transform(image), self.targets[index]


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

    def __init__(
        self,
        size: int,
        seed: int,
        shuffle: bool = True,
        weights: list[float] | None = None,
        rank: int = 0,
        world: int = 1,
    ):
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
        return iter(order[self.rank :: self.world])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device,
    sampler: Sampler | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader: pinned memory on CUDA, persistent workers when there are workers.

    :param dataset: the dataset.
    :param batch_size: images per batch.
    :param workers: worker processes (0: load in this process).
    :param device: where batches go.
    :param sampler: the sampler; sequential if None.
    :param drop_last: whether to drop a last, incomplete batch.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


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
