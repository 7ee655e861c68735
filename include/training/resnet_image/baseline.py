"""The drift baseline of the ResNet trainer: training-image statistics, and the best epoch's
predictions on held-out images, in the layout of the shipped contract (``conveyor_metadata``).

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import math

import numpy as np
from conveyor_metadata import IMAGE_CHANNELS, PIXEL_BINS, Baseline, numeric_summary
from data import DECODE_ERRORS, MANIFEST, Item, load_rgb
from utils import ImageDecodeError

BASELINE_IMAGES = 500


def _sample(items: list[Item], seed: int, limit: int) -> list[Item]:
    """At most ``limit`` of the images, a seeded sample in manifest order.

    :param items: the training images.
    :param seed: the sampling seed.
    :param limit: the most images kept.
    """
    if len(items) <= limit:
        return items
    chosen = sorted(np.random.default_rng(seed).choice(len(items), size=limit, replace=False).tolist())
    return [items[i] for i in chosen]


def build_baseline(items: list[Item], seed: int, limit: int = BASELINE_IMAGES) -> Baseline:
    """Training-image statistics the drift monitor compares live images with.

    On at most ``limit`` images (a seeded sample), decoded as the model sees them (:func:`load_rgb`):
    per-channel mean and std of pixel intensity in [0, 1] over all pixels, a ``PIXEL_BINS``-bin
    histogram per channel, and per image its brightness (mean of PIL's ``L`` luma, in [0, 1]), width
    and height. The label distribution counts every training image.

    :param items: the training images.
    :param seed: the sampling seed.
    :param limit: the most images decoded.
    """
    sample = _sample(items, seed, limit)
    channel_counts = np.zeros((3, 256), dtype=np.int64)
    brightness, widths, heights = [], [], []
    levels = np.arange(256, dtype=np.float64)
    for item in sample:
        try:
            image = load_rgb(item.path)
        except DECODE_ERRORS as error:
            raise ImageDecodeError(
                f"train channel: image {item.name!r} ({MANIFEST} line {item.line}) does not decode: {error}"
            ) from None
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
            "channels": list(IMAGE_CHANNELS),
            "mean": [float(v) / 255.0 for v in mean],
            "std": [float(math.sqrt(max(v, 0.0))) / 255.0 for v in variance],
            "histogram": {
                "edges": [i / PIXEL_BINS for i in range(PIXEL_BINS + 1)],
                "counts": {name: [int(c) for c in binned[i]] for i, name in enumerate(IMAGE_CHANNELS)},
            },
        },
        "brightness": numeric_summary(brightness),
        "width": numeric_summary(widths),
        "height": numeric_summary(heights),
        "label_distribution": {label: labels.count(label) / len(labels) for label in sorted(set(labels))},
    }


def with_predictions(
    baseline: Baseline | None, classes: list[str], predicted: list[int] | None, epoch: int
) -> Baseline | None:
    """The baseline plus what live predictions are compared with: the best epoch's predictions on
    held-out images (unchanged without them, e.g. in the history of a run resumed from an older checkpoint).

    :param baseline: the training-image baseline (None on ranks other than 0).
    :param classes: the classes, in class index order.
    :param predicted: how many validation images the best epoch predicted as each class.
    :param epoch: the best epoch.
    """
    if baseline is None or not predicted or not sum(predicted):
        return baseline
    total = sum(predicted)
    return {
        **baseline,
        "predictions": {str(c): n / total for c, n in zip(classes, predicted, strict=True)},
        "predictions_source": {"channel": "validation", "rows": int(total), "epoch": epoch},
    }
