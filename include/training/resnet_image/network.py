"""The network of the ResNet trainer: a torchvision ResNet, pretrained weights from a local file
(never downloaded), a frozen backbone, the optimizer and the learning-rate schedule.

A sibling of ``train.py``, imported as a plain module; it imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

import argparse
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from utils import TrainingInputError, log

ARCHS = ("resnet18", "resnet34", "resnet50")
WEIGHT_NAME = re.compile(r"(resnet\d+(_weights)?\.)?(imagenet1k_v\d+|default)|resnet\d+", re.IGNORECASE)
# resnet variants by (bottleneck blocks?, blocks per stage), to name what a weights file holds.
KNOWN_ARCHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


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
            raise TrainingInputError(
                f"pretrained weights folder {path} must hold exactly one .pt/.pth file, found {len(files)}"
            )
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
        shown = ", ".join(
            f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} in the model" for k in shapes[:3]
        )
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
    head_differs = any(key not in state or state[key].shape != own[key].shape for key in ("fc.weight", "fc.bias"))
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
        log(
            f"pretrained weights {path}: loaded everything but fc (the file's head does not have {classes} "
            f"classes); fc starts new for {classes} classes"
        )
    else:
        log(f"pretrained weights {path}: loaded (fc included)")


def freeze_backbone(model: nn.Module) -> None:
    """Leave only the fc layer trainable.

    :param model: the model.
    """
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("fc.")


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters.

    :param model: the model (frozen parameters are left out).
    :param args: the parsed command line.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)


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
