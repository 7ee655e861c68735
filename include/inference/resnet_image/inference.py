"""SageMaker inference handlers for the ResNet image trainer.

Packed as ``code/inference.py`` in ``model.tar.gz`` next to ``model.pt`` and ``metadata.json``
(written by ``include/training/resnet_image/train.py``). The SageMaker PyTorch containers,
Conveyor's model server and the local batch transform all call the same four handlers:

- :func:`model_fn` rebuilds the architecture for the artifact's classes (its depth, stem and width:
  ``metadata.json``'s ``arch`` and ``hyperparameters``), loads ``model.pt`` on
  the GPU when there is one (else the CPU), in eval mode, and remembers the model so
  :func:`input_fn` (whose SageMaker signature has no model argument) can preprocess with its
  settings; a server holding several models calls :func:`parse_request` instead.
- :func:`input_fn` decodes ``image/jpeg``, ``image/png`` or ``application/x-image`` (one image's
  bytes) or ``application/json`` (``{"instances": [{"b64": ...}, ...]}`` or a list of base64
  strings: a batch) and preprocesses exactly as the trainer's evaluation did (``metadata.json``'s
  ``preprocessing``): a float tensor ``(N, 3, crop, crop)``.
- :func:`predict_fn` returns ``prediction`` (the label) and one ``proba_<label>`` column per class
  (softmax). It also takes a pandas DataFrame with an ``image`` column of encoded bytes or a
  ``path`` column of local files (relative paths resolve against ``frame.attrs["image_root"]``),
  so an evaluation scores a test set the same way as with the tabular trainer.
- :func:`output_fn` serialises to ``application/json`` (the default) or ``text/csv``.

Bad requests raise ``ValueError`` with a message that names the content type, the instance and
the rule broken; an unsupported content type or accept raises :class:`UnsupportedContentType` (a
``ValueError``). A request over the limits (:class:`RequestLimits`: images per request, pixels per
image, pixels per request; ``CONVEYOR_REQUEST_MAX_IMAGES``, ``CONVEYOR_REQUEST_MAX_IMAGE_PIXELS``,
``CONVEYOR_REQUEST_MAX_PIXELS``) raises :class:`RequestTooLarge` (a ``ValueError``; the server
answers 413): an image's size is read from its header before it is decoded, and images are decoded
and preprocessed one at a time, so a request never holds more than one decoded image.

Nothing here imports Airflow or Conveyor: ``metadata.json`` is read through the shipped contract
module ``conveyor_metadata`` (packed beside this file in ``code/``, on ``sys.path`` there); the
request rules (content types, limits, base64 and JSON bodies, decoding) are the sibling module
``image_requests``, packed beside it too.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import conveyor_metadata
import numpy as np
import pandas as pd
import torch
import torchvision
from conveyor_metadata import ModelMetadata
from image_requests import (  # the request rules, re-exported: handlers' callers catch these
    ANY_IMAGE,
    CSV,
    IMAGE_TYPES,
    JPEG,
    JSON,
    MAX_REQUEST_PIXELS,  # noqa: F401 - the default of RequestLimits, for callers
    PNG,
    RequestLimits,
    RequestTooLarge,
    UnsupportedContentType,
    decode,
    json_images,
    load_image,
    media_type,
    open_image,
)
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

logger = logging.getLogger(__name__)

PROBA_PREFIX = "proba_"
BATCH_SIZE = 32
ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50")
LAYOUTS = {"resnet10": (BasicBlock, [1, 1, 1, 1]), "resnet18": (BasicBlock, [2, 2, 2, 2])}
LAYOUTS |= {"resnet34": (BasicBlock, [3, 4, 6, 3]), "resnet50": (Bottleneck, [3, 4, 6, 3])}
INTERPOLATION = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


def build_transform(preprocessing: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The trainer's evaluation transform: resize the shorter side, centre-crop, scale to [0, 1], normalise.

    :param preprocessing: ``metadata.json``'s ``preprocessing`` (resize, crop, mean, std, interpolation).
    """
    mode = preprocessing.get("resize_mode", "shorter_side")
    if mode != "shorter_side":
        raise ValueError(f"metadata.json: preprocessing resize_mode {mode!r} is not supported")
    interpolation = preprocessing.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATION:
        raise ValueError(f"metadata.json: preprocessing interpolation {interpolation!r} is not supported")
    return transforms.Compose(
        [
            transforms.Resize(int(preprocessing["resize"]), interpolation=INTERPOLATION[interpolation], antialias=True),
            transforms.CenterCrop(int(preprocessing["crop"])),
            transforms.ToTensor(),
            transforms.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


@dataclass(frozen=True)
class ImageModel:
    """A loaded network and how requests are preprocessed for it.

    :param network: the ResNet, in eval mode, on ``device``.
    :param metadata: the artifact's ``metadata.json``.
    :param device: where the network runs.
    :param limits: what one request may ask (read from the environment when the model loads).
    """

    network: torch.nn.Module
    metadata: ModelMetadata
    device: torch.device
    limits: RequestLimits = field(default_factory=RequestLimits.from_env)
    class_labels: list[str] = field(init=False)
    transform: Callable[[Image.Image], torch.Tensor] = field(init=False)
    exif_transpose: bool = field(init=False)

    def __post_init__(self) -> None:
        preprocessing = self.metadata.preprocessing or {}
        object.__setattr__(self, "class_labels", [str(label) for label in self.metadata.class_labels or []])
        object.__setattr__(self, "transform", build_transform(preprocessing))
        object.__setattr__(self, "exif_transpose", bool(preprocessing.get("exif_transpose", True)))


_loaded: ImageModel | None = None


# -------------------------------------------------------------------------------------- handlers


def model_fn(model_dir: str) -> ImageModel:
    """Rebuild the architecture, load ``<model_dir>/model.pt`` and ``<model_dir>/metadata.json``.

    :param model_dir: the folder ``model.tar.gz`` was extracted into.
    """
    global _loaded
    root = Path(model_dir)
    metadata = conveyor_metadata.read(root)
    arch = metadata.arch
    if arch not in ARCHS:
        raise ValueError(f"metadata.json: arch {arch!r} is not one of {', '.join(ARCHS)}")
    if not metadata.class_labels or not metadata.preprocessing:
        raise ValueError("metadata.json: an image model needs class_labels and preprocessing")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hyperparameters = metadata.hyperparameters or {}
    stem, width = hyperparameters.get("stem") or "imagenet", int(hyperparameters.get("width") or 64)
    if stem not in ("imagenet", "small"):
        raise ValueError(f"metadata.json: hyperparameters stem {stem!r} is not one of imagenet, small")
    network = build_network(arch, len(metadata.class_labels), stem, width)
    network.load_state_dict(torch.load(root / "model.pt", map_location="cpu", weights_only=True))
    network.to(device).eval()
    model = ImageModel(network=network, metadata=metadata, device=device)
    _warm_up(model)
    _loaded = model
    return model


def build_network(arch: str, num_classes: int, stem: str = "imagenet", width: int = 64) -> nn.Module:
    """The trainer's network, untrained: torchvision's ResNet, or with the small-input stem (3x3
    convolution, stride 1, no max-pool) and another first-stage width (as the trainer's ``network.py``).

    :param arch: resnet10, resnet18, resnet34 or resnet50.
    :param num_classes: the number of classes.
    :param stem: ``imagenet`` or ``small``.
    :param width: channels of the first stage.
    """
    if stem == "imagenet" and width == 64 and arch != "resnet10":
        return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    block, layers = LAYOUTS[arch]
    network = ResNet(block, layers, num_classes=num_classes)
    network.inplanes = width
    small = stem == "small"
    network.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False) if small else nn.Conv2d(3, width, 7, 2, 3, bias=False)
    network.bn1 = nn.BatchNorm2d(width)
    if small:
        network.maxpool = nn.Identity()
    for index, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
        setattr(
            network, name, network._make_layer(block, width * 2**index, layers[index], stride=1 if index == 0 else 2)
        )
    network.fc = nn.Linear(width * 8 * block.expansion, num_classes)
    return network


def input_fn(request_body: str | bytes, request_content_type: str | None) -> torch.Tensor:
    """Parse a request for the model :func:`model_fn` loaded last (see :func:`parse_request`).

    :param request_body: the request body.
    :param request_content_type: its content type.
    """
    if _loaded is None:
        raise RuntimeError("input_fn: no model is loaded; model_fn must run first")
    return parse_request(request_body, request_content_type, _loaded)


def predict_fn(data: Any, model: ImageModel) -> pd.DataFrame:
    """Predict: a ``prediction`` column (the label) and one ``proba_<label>`` column per class.

    :param data: a preprocessed batch from :func:`input_fn`; or a DataFrame with an ``image``
        column (encoded image bytes) or a ``path`` column (local files; relative ones resolve
        against ``data.attrs["image_root"]``); or a list of encoded images.
    :param model: the model from :func:`model_fn`.
    """
    if isinstance(data, torch.Tensor):
        if data.ndim != 4 or data.shape[1] != 3:
            raise ValueError(f"predict_fn: expected a batch of shape (N, 3, H, W), got {tuple(data.shape)}")
        chunks = (data[i : i + BATCH_SIZE] for i in range(0, len(data), BATCH_SIZE))
        proba = _stack([_forward(model, chunk) for chunk in chunks], len(model.class_labels))
    else:
        loaders = _frame_loaders(data) if isinstance(data, pd.DataFrame) else _list_loaders(data)
        batches = []
        for start in range(0, len(loaders), BATCH_SIZE):
            tensors = [preprocess(decode(load(), where), model) for where, load in loaders[start : start + BATCH_SIZE]]
            batches.append(_forward(model, torch.stack(tensors)))
        proba = _stack(batches, len(model.class_labels))
    out = pd.DataFrame(
        {
            "prediction": np.asarray(model.class_labels, dtype=object)[proba.argmax(axis=1)]
            if len(proba)
            else np.array([], dtype=object)
        }
    )
    for i, label in enumerate(model.class_labels):
        out[f"{PROBA_PREFIX}{label}"] = proba[:, i]
    return out


def predict_batch(inputs: list[Any], model: ImageModel) -> list[pd.DataFrame]:
    """Predict several parsed requests in one call (the model server's micro-batches): one frame each.

    The requests' image tensors are joined and run through the network in chunks of ``BATCH_SIZE``,
    then split back in order: each request gets what :func:`predict_fn` alone gives it (inputs that
    are not parsed tensors are predicted one by one).

    :param inputs: batches from :func:`parse_request`, one per request.
    :param model: the model from :func:`model_fn`.
    """
    if not all(isinstance(data, torch.Tensor) for data in inputs):
        return [predict_fn(data, model) for data in inputs]
    out = predict_fn(torch.cat(inputs), model)
    parts, start = [], 0
    for data in inputs:
        parts.append(out.iloc[start : start + len(data)].reset_index(drop=True))
        start += len(data)
    return parts


def output_fn(prediction: pd.DataFrame, accept: str | None) -> str:
    """Serialise predictions; the body is returned and its content type is the accept chosen.

    - ``application/json`` (for ``None``, empty or ``*/*`` too): ``{"predictions": [{"prediction":
      label, "probabilities": {label: p, ...}}, ...]}``;
    - ``text/csv``: one line per image without header: the prediction, then one probability per
      class in the order of ``class_labels``.

    :param prediction: the frame from :func:`predict_fn`.
    :param accept: the request's ``Accept`` header.
    """
    media = choose_accept(accept)
    proba_columns = [c for c in prediction.columns if str(c).startswith(PROBA_PREFIX)]
    if media == CSV:
        return prediction[["prediction", *proba_columns]].to_csv(header=False, index=False, lineterminator="\n")
    classes = [str(c)[len(PROBA_PREFIX) :] for c in proba_columns]
    probabilities = prediction[proba_columns].to_numpy(dtype="float64")
    records = [
        {"prediction": str(label), "probabilities": dict(zip(classes, map(float, probabilities[i])))}
        for i, label in enumerate(prediction["prediction"].tolist())
    ]
    return json.dumps({"predictions": records})


# ------------------------------------------------------------------------------------- requests


def parse_request(body: str | bytes, content_type: str | None, model: ImageModel) -> torch.Tensor:
    """Decode and preprocess a request body into a batch ``(N, 3, crop, crop)``.

    ``image/jpeg``, ``image/png``, ``application/x-image``: the body is one image's bytes (any
    format PIL decodes). ``application/json``: ``{"instances": [{"b64": "<base64>"}, ...]}``, a
    bare list of such objects or of base64 strings, or one ``{"b64": ...}`` object (a ``data:``
    URI prefix is accepted).

    :param body: the request body.
    :param content_type: its content type (parameters such as ``charset`` are ignored).
    :param model: the model whose preprocessing applies.
    """
    media = media_type(content_type)
    if media in IMAGE_TYPES:
        if isinstance(body, str):
            raise ValueError(f"{media}: the body must be the image's bytes, got text")
        if not isinstance(body, (bytes, bytearray, memoryview)):
            raise ValueError(f"{media}: the body must be bytes, got {type(body).__name__}")
        if not len(body):
            raise ValueError(f"{media}: empty input: the body holds no image")
        images = [(f"{media}: the body", bytes(body))]
    elif media == JSON:
        images = json_images(body, model.limits.max_images)
    else:
        raise UnsupportedContentType(
            f"content type {content_type!r} is not supported: send {JPEG}, {PNG}, {ANY_IMAGE} or {JSON}"
        )
    limits, total, tensors = model.limits, 0, []
    for where, payload in images:  # one decoded image at a time: open (size from the header), check, decode
        image = open_image(payload, where, limits.max_image_pixels)
        total += image.width * image.height
        if total > limits.max_pixels:
            raise RequestTooLarge(
                f"{where}: the images up to this one have {total} pixels, more than the limit of "
                f"{limits.max_pixels} per request (CONVEYOR_REQUEST_MAX_PIXELS): send fewer or smaller images"
            )
        tensors.append(preprocess(load_image(image, payload, where), model))
        del image
    return torch.stack(tensors)


def choose_accept(accept: str | None) -> str:
    """The response media type for an ``Accept`` header: ``application/json`` or ``text/csv``.

    :param accept: the header (may list several types, with parameters).
    """
    if accept is None or not accept.strip():
        return JSON
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("*/*", "application/*", JSON):
            return JSON
        if media in ("text/*", CSV):
            return CSV
    raise UnsupportedContentType(f"accept {accept!r} is not supported: ask for {JSON} or {CSV}")


def preprocess(image: Image.Image, model: ImageModel) -> torch.Tensor:
    """The trainer's evaluation preprocessing of one image: EXIF orientation, RGB, resize, crop, normalise.

    :param image: the decoded image.
    :param model: the model whose preprocessing applies.
    """
    if model.exif_transpose:
        image = ImageOps.exif_transpose(image) or image
    return model.transform(image.convert("RGB"))


def _frame_loaders(frame: pd.DataFrame) -> list[tuple[str, Callable[[], Any]]]:
    """For each row of a DataFrame, its place for messages and a function giving its encoded image.

    :param frame: rows with an ``image`` column (bytes) or a ``path`` column (local files).
    """
    if "image" in frame.columns:
        values = frame["image"].tolist()
        for position, value in enumerate(values):
            if isinstance(value, str):
                raise ValueError(
                    f"predict_fn: row {position}: column 'image' holds text; it takes encoded image "
                    "bytes (put file paths in a 'path' column)"
                )
        return [(f"predict_fn: row {i} (column 'image')", (lambda v=value: v)) for i, value in enumerate(values)]
    if "path" in frame.columns:
        root = frame.attrs.get("image_root")
        loaders = []
        for position, value in enumerate(frame["path"].tolist()):
            if not isinstance(value, (str, Path)) or not str(value).strip():
                raise ValueError(f"predict_fn: row {position}: column 'path' must hold a file path, got {value!r}")
            path = Path(value)
            if root is not None and not path.is_absolute():
                path = Path(root) / path
            loaders.append((f"predict_fn: row {position} ({path})", (lambda p=path: _read(p))))
        return loaders
    raise ValueError(
        f"predict_fn: the data needs an 'image' column (encoded bytes) or a 'path' column; "
        f"it has {', '.join(map(str, frame.columns)) or 'no columns'}"
    )


def _list_loaders(data: Any) -> list[tuple[str, Callable[[], Any]]]:
    """For each item of a list of encoded images (or PIL images), its place and a function giving it.

    :param data: the list.
    """
    if isinstance(data, (bytes, bytearray, memoryview, Image.Image)):
        data = [data]
    if not isinstance(data, (list, tuple)):
        raise ValueError(
            f"predict_fn: expected a batch tensor, a DataFrame or a list of images, got {type(data).__name__}"
        )
    return [(f"predict_fn: item {i}", (lambda v=value: v)) for i, value in enumerate(data)]


def _read(path: Path) -> bytes:
    """A local image file's bytes.

    :param path: the file.
    """
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"predict_fn: cannot read {path} ({error.strerror or error})") from None


def _forward(model: ImageModel, batch: torch.Tensor) -> np.ndarray:
    """Class probabilities (softmax, float64) of one preprocessed batch.

    :param model: the model.
    :param batch: the batch ``(N, 3, H, W)``.
    """
    with torch.inference_mode():
        logits = model.network(batch.to(model.device, dtype=torch.float32))
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


def _stack(batches: list[np.ndarray], classes: int) -> np.ndarray:
    """The probabilities of every batch as one array.

    :param batches: per-batch probabilities.
    :param classes: the number of classes (for an empty result).
    """
    return np.concatenate(batches) if batches else np.zeros((0, classes))


def _warm_up(model: ImageModel) -> None:
    """Run one blank image through the network so the first request is fast.

    :param model: the loaded model.
    """
    crop = int((model.metadata.preprocessing or {})["crop"])
    try:
        _forward(model, torch.zeros(1, 3, crop, crop))
    except Exception:  # noqa: BLE001 - a warm-up failure must not stop serving; requests will report it
        logger.warning("warm-up prediction failed; the first request may be slow", exc_info=True)
