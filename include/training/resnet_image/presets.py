"""Preprocessing of the ResNet trainer: training augmentation and the evaluation transform, whose
description is written to ``metadata.json`` for inference to reproduce.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

from typing import Any

from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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
    return transforms.Compose(
        [
            transforms.Resize(
                preprocessing["resize"], interpolation=transforms.InterpolationMode.BILINEAR, antialias=True
            ),
            transforms.CenterCrop(preprocessing["crop"]),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


def train_transform(image_size: int) -> transforms.Compose:
    """Training augmentation: random resized crop, horizontal flip, light colour jitter, normalise.

    :param image_size: the crop size.
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.6, 1.0), antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
