"""The images of a ResNet model's requests: content types, limits, base64 and JSON bodies, decoding.

A sibling of ``inference.py`` in ``code/`` (on ``sys.path`` there, as in the SageMaker containers):
the request rules of :mod:`inference`'s handlers. An image's size is read from its header before it
is decoded (:func:`open_image`), so a request over :class:`RequestLimits` is refused
(:class:`RequestTooLarge`, answered 413) before any pixel is decoded. Nothing here imports Airflow,
Conveyor or torch.
"""

import base64
import binascii
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

CSV = "text/csv"
JSON = "application/json"
JPEG = "image/jpeg"
PNG = "image/png"
ANY_IMAGE = "application/x-image"
IMAGE_TYPES = (JPEG, PNG, ANY_IMAGE)
DATA_URI = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_IMAGES = 64
MAX_IMAGE_PIXELS = 40_000_000
MAX_REQUEST_PIXELS = 100_000_000


class UnsupportedContentType(ValueError):
    """The request's content type, or the accept asked for, is not one this model speaks."""


class RequestTooLarge(ValueError):
    """The request has more images, or more pixels, than :class:`RequestLimits` allows (answered 413)."""


def _env_limit(name: str, default: int) -> int:
    """A positive whole number from the environment.

    :param name: the variable.
    :param default: the value when it is unset or empty.
    """
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}={raw!r} must be a whole number of at least 1")
    return int(raw)


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the model: images, pixels per image, pixels in all.

    :param max_images: images per request.
    :param max_image_pixels: width x height of one image (checked from its header, before decoding).
    :param max_pixels: width x height of every image of the request together.
    """

    max_images: int = MAX_IMAGES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_pixels: int = MAX_REQUEST_PIXELS

    @classmethod
    def from_env(cls) -> "RequestLimits":
        """The limits from ``CONVEYOR_REQUEST_MAX_IMAGES``, ``..._MAX_IMAGE_PIXELS``, ``..._MAX_PIXELS``."""
        return cls(
            max_images=_env_limit("CONVEYOR_REQUEST_MAX_IMAGES", MAX_IMAGES),
            max_image_pixels=_env_limit("CONVEYOR_REQUEST_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS),
            max_pixels=_env_limit("CONVEYOR_REQUEST_MAX_PIXELS", MAX_REQUEST_PIXELS),
        )


def decode(payload: Any, where: str) -> Image.Image:
    """Decode encoded image bytes fully (a truncated file fails here), or pass a PIL image through.

    :param payload: the bytes, or a PIL image.
    :param where: what the payload is, for messages (e.g. ``application/json: instance 2``).
    """
    if isinstance(payload, Image.Image):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    if not isinstance(payload, bytes):
        raise ValueError(f"{where}: expected encoded image bytes, got {type(payload).__name__}")
    return load_image(open_image(payload, where), payload, where)


def open_image(payload: bytes, where: str, max_pixels: int | None = None) -> Image.Image:
    """Open encoded image bytes without decoding them (PIL reads the header); refuse one over ``max_pixels``.

    :param payload: the encoded bytes.
    :param where: what the payload is, for messages.
    :param max_pixels: the largest width x height allowed, or None (PIL's own decompression-bomb limit).
    :raises RequestTooLarge: an image over ``max_pixels``.
    """
    if not payload:
        raise ValueError(f"{where}: empty image (zero bytes)")
    try:
        image = Image.open(io.BytesIO(payload))
    except UnidentifiedImageError:
        raise ValueError(f"{where}: not an image PIL can decode ({len(payload)} bytes)") from None
    except Image.DecompressionBombError as error:
        if max_pixels is not None:
            raise RequestTooLarge(f"{where}: {error}; the limit is {max_pixels} pixels per image") from None
        raise ValueError(f"{where}: the image does not decode ({error})") from None
    except DECODE_ERRORS as error:
        raise ValueError(f"{where}: the image does not decode ({error})") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise RequestTooLarge(
            f"{where}: the image is {image.width}x{image.height} = {image.width * image.height} pixels, more than "
            f"the limit of {max_pixels} per image (CONVEYOR_REQUEST_MAX_IMAGE_PIXELS)"
        )
    return image


def load_image(image: Image.Image, payload: bytes, where: str) -> Image.Image:
    """Decode an opened image fully (a truncated file fails here).

    :param image: the image :func:`open_image` opened.
    :param payload: its encoded bytes (for messages).
    :param where: what the payload is, for messages.
    """
    try:
        image.load()
    except DECODE_ERRORS as error:
        raise ValueError(f"{where}: the image does not decode ({error})") from None
    return image


def media_type(content_type: str | None) -> str | None:
    """The media type of a content type, lower case, without parameters.

    :param content_type: e.g. ``application/json; charset=utf-8``.
    """
    if content_type is None:
        return None
    return content_type.split(";")[0].strip().lower()


def json_images(body: str | bytes, max_images: int) -> list[tuple[str, bytes]]:
    """The base64-decoded images of a JSON body, each with its place for messages.

    :param body: the request body.
    :param max_images: the most instances allowed (more: :class:`RequestTooLarge`, before any is decoded).
    """
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            body = bytes(body).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(f"{JSON}: the body is not UTF-8 text ({error})") from None
    if not isinstance(body, str):
        raise ValueError(f"{JSON}: the body must be bytes or text, got {type(body).__name__}")
    if not body.strip():
        raise ValueError(f"{JSON}: empty input: the body holds no image")
    try:
        document = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"{JSON}: malformed JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{JSON}: the body nests arrays or objects too deeply to parse") from None
    if isinstance(document, dict) and "instances" in document:
        instances = document["instances"]
    elif isinstance(document, dict) and "b64" in document:
        instances = [document]
    elif isinstance(document, list):
        instances = document
    else:
        raise ValueError(
            f'{JSON}: expected {{"instances": [{{"b64": "<base64>"}}, ...]}} or a list of base64 '
            f"strings, got a JSON {type(document).__name__}"
        )
    if not isinstance(instances, list):
        raise ValueError(f'{JSON}: "instances" must be a list, got a JSON {type(instances).__name__}')
    if not instances:
        raise ValueError(f"{JSON}: empty input: no instances")
    if len(instances) > max_images:
        raise RequestTooLarge(
            f"{JSON}: {len(instances)} instances, more than the limit of {max_images} images per request "
            "(CONVEYOR_REQUEST_MAX_IMAGES): split the batch"
        )
    images = []
    for number, instance in enumerate(instances, 1):
        where = f"{JSON}: instance {number}"
        text = instance.get("b64") if isinstance(instance, dict) else instance
        if not isinstance(text, str):
            shown = json.dumps(instance)[:80]
            raise ValueError(f'{where}: expected {{"b64": "<base64>"}} or a base64 string, got {shown}')
        images.append((where, _b64(text, where)))
    return images


def _b64(text: str, where: str) -> bytes:
    """Decode standard or URL-safe base64 (whitespace and a ``data:`` URI prefix ignored).

    :param text: the base64 text.
    :param where: the instance, for messages.
    """
    compact = "".join(DATA_URI.sub("", text.strip()).split())
    if not compact:
        raise ValueError(f"{where}: empty image (no base64 text)")
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"{where}: not valid base64 ({error})") from None
