"""Preprocessing of the ResNet trainer: training augmentation and the evaluation transform, whose
description is written to ``metadata.json`` for inference to reproduce.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

from typing import Any

from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


SMALL_INPUT = 64  # px: images this small or smaller train at their own size, with the small-input stem


def eval_preprocessing(image_size: int, small: bool = False) -> dict[str, Any]:
    """The evaluation preprocessing, as written to ``metadata.json`` for inference to reproduce.

    :param image_size: the crop size.
    :param small: small inputs: resize to the crop size itself (no 256/224 margin cropped away).
    """
    return {
        "resize": image_size if small else int(image_size * 256 / 224),
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


def train_transform(
    image_size: int, flip: bool = True, small: bool = False, strong: bool = False
) -> transforms.Compose:
    """Training augmentation.

    Large inputs: random resized crop (scale 0.6-1, or 0.35-1 when ``strong``), horizontal flip,
    light colour jitter, normalise. Small inputs (the images' own size): resize and centre-crop as
    evaluation does, then a random crop of the image padded by 1/8 of its side (reflected), with
    ``strong`` a small random rotation and scale, the flip, normalise.

    :param image_size: the crop size.
    :param flip: whether to flip horizontally at random (off where a mirror image is another class, e.g. digits).
    :param small: small inputs (see above).
    :param strong: stronger augmentation (small data trained for many epochs).
    """
    steps: list[Any]
    if small:
        steps = [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"),
        ]
        if strong:
            steps.append(transforms.RandomAffine(degrees=10, scale=(0.9, 1.1)))
    else:
        steps = [transforms.RandomResizedCrop(image_size, scale=(0.35 if strong else 0.6, 1.0), antialias=True)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    if not small:
        steps.append(transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
