"""The network of the ResNet trainer: a torchvision ResNet (or, for small inputs, the same ResNet with a
small-input stem and a narrower width), pretrained weights from a local file (never downloaded), a
frozen backbone, the optimizer and the learning-rate schedule.

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
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from utils import TrainingInputError, log

ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")
STEMS = ("imagenet", "small")
IMAGENET_WIDTH = 64  # torchvision's first-stage width (what pretrained weights have)
# block and blocks per stage of each architecture (resnet10: one BasicBlock per stage, not in torchvision)
LAYOUTS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet10": (BasicBlock, [1, 1, 1, 1]),
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
WEIGHT_NAME = re.compile(r"(resnet\d+(_weights)?\.)?(imagenet1k_v\d+|default)|resnet\d+", re.IGNORECASE)
# resnet variants by (bottleneck blocks?, blocks per stage), to name what a weights file holds.
KNOWN_ARCHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


def build_model(arch: str, num_classes: int, stem: str = "imagenet", width: int = IMAGENET_WIDTH) -> nn.Module:
    """A randomly initialised ResNet with ``num_classes`` outputs (never downloads weights).

    With the ImageNet stem and width 64 it is torchvision's model itself. The small-input stem (for
    images of 64 px or less) is a 3x3 convolution with stride 1 and no max-pool, so a 32-px image
    reaches the last stage at 4x4 instead of 1x1; ``width`` is the first stage's channels (the
    stages have 1x, 2x, 4x and 8x). The state_dict keys are torchvision's either way.
    The layers replaced keep PyTorch's default initialisation: on 1,257 digits it trained far faster
    than torchvision's (Kaiming fan-out, zero-initialised residual branches): 0.96 against 0.35
    validation accuracy after 2 epochs.

    :param arch: resnet10, resnet18, resnet34 or resnet50.
    :param num_classes: the number of classes.
    :param stem: ``imagenet`` (7x7 stride-2 convolution, max-pool) or ``small``.
    :param width: channels of the first stage.
    """
    if stem == "imagenet" and width == IMAGENET_WIDTH and arch != "resnet10":
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    block, layers = LAYOUTS[arch]
    small = stem == "small"
    model = ResNet(block, layers, num_classes=num_classes)
    if small or width != IMAGENET_WIDTH:
        model.inplanes = width
        model.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False) if small else nn.Conv2d(3, width, 7, 2, 3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        if small:
            model.maxpool = nn.Identity()
        for index, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            stage = model._make_layer(block, width * 2**index, layers[index], stride=1 if index == 0 else 2)
            setattr(model, name, stage)
        model.fc = nn.Linear(width * 8 * getattr(block, "expansion", 1), num_classes)
    return model


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
    """SGD (momentum, Nesterov with ``--nesterov``) or AdamW over the trainable parameters.

    ``--norm-weight-decay`` (when set) is the weight decay of BatchNorm weights and of biases, as in
    torchvision's reference recipe; otherwise every parameter gets ``--weight-decay``.

    :param model: the model (frozen parameters are left out).
    :param args: the parsed command line.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    norm_decay = getattr(args, "norm_weight_decay", None)
    groups: list[dict[str, Any]] = [{"params": [p for _, p in trainable]}]
    if norm_decay is not None and norm_decay != args.weight_decay:
        groups = [
            {"params": [p for _, p in trainable if p.ndim > 1]},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": norm_decay},
        ]
        groups = [group for group in groups if group["params"]]
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            nesterov=bool(getattr(args, "nesterov", False)) and args.momentum > 0,
        )
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def lr_factor(epoch: float, args: argparse.Namespace) -> float:
    """The LR multiplier at a 0-based epoch (a fraction within an epoch): linear warm-up, then cosine to 0 or steps.

    :param epoch: the epoch, with the share of it done (2.5: half-way through the third).
    :param args: the parsed command line.
    """
    warm, epochs = args.lr_warmup_epochs or 0, args.epochs or 1  # unset until the plan has the epochs
    if epoch < warm:
        return args.lr_warmup_decay + (1.0 - args.lr_warmup_decay) * epoch / warm
    if args.lr_scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / max(1, epochs - warm)))
    return args.lr_gamma ** ((epoch - warm) // args.lr_step_size)
