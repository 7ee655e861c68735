"""The model versions a server worker holds: loading an archive, parsing a request, answering errors.

:func:`load_model` loads an extracted ``model.tar.gz`` through its ``code/inference.py``;
:func:`parse` turns one request body into the handlers' input (``parse_request`` when the module
has it, else ``input_fn``), on the event loop for small bodies and in a thread for large ones;
:func:`handler_error` maps what a handler raised to the answer (415/413 for the module's
``UnsupportedContentType``/``RequestTooLarge``, 400 any other ``ValueError`` or too-deep JSON,
500 ``ModelError`` for the rest, logged). Predicting is :mod:`conveyor.serving.batching`'s.

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi.responses import Response

from conveyor.serving.http import error_response

logger = logging.getLogger("conveyor.serving")

JSON_MEDIA = "application/json"
REQUIRED_HANDLERS = ("model_fn", "predict_fn", "output_fn")
INLINE_PARSE_BYTES = 16 * 1024  # bodies up to this size are parsed on the event loop (no thread hop)


def utc_now() -> str:
    """The current UTC time, ISO 8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, eq=False)  # identity: each load is its own version object (and batcher)
class ServedModel:
    """One loaded model version of a worker.

    :param version: the version requests are answered as.
    :param model_dir: the extracted archive it was loaded from.
    :param loaded: the model and its handler module.
    :param loaded_at: when loading finished (UTC, ISO 8601).
    """

    version: str
    model_dir: str
    loaded: Any
    loaded_at: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.version, self.model_dir)

    def ref(self) -> dict[str, str]:
        return {"version": self.version, "model_dir": self.model_dir, "loaded_at": self.loaded_at}


def control_key(ref: dict[str, str] | None) -> tuple[str, str] | None:
    """The identity of a control entry: (version, model_dir).

    :param ref: ``{"version", "model_dir"}`` or None.
    """
    return None if ref is None else (ref["version"], ref["model_dir"])


def load_model(version: str, model_dir: str) -> ServedModel:
    """Load an extracted ``model.tar.gz`` through its ``code/inference.py`` (blocking; call in a thread).

    :param version: the model version.
    :param model_dir: the extracted archive.
    """
    from conveyor.model.artifacts import LoadedModel

    loaded = LoadedModel(Path(model_dir))
    missing = [name for name in REQUIRED_HANDLERS if not callable(getattr(loaded.handlers, name, None))]
    parses = any(callable(getattr(loaded.handlers, name, None)) for name in ("parse_request", "input_fn"))
    if not parses:
        missing.append("input_fn")
    if missing:
        raise ValueError(f"{model_dir}/code/inference.py lacks the handlers {', '.join(missing)}")
    return ServedModel(version=version, model_dir=model_dir, loaded=loaded, loaded_at=utc_now())


def _media_of(handlers: Any, accept: str | None) -> str:
    """The content type of a response body: the handlers' choice, else the Accept asked for.

    :param handlers: the model's handler module.
    :param accept: the request's ``Accept`` header.
    """
    choose = getattr(handlers, "choose_accept", None)
    if callable(choose):
        return choose(accept)
    if accept and "," not in accept and "*" not in accept:
        return accept.split(";")[0].strip()
    return JSON_MEDIA


def run_handlers(
    served: ServedModel, body: bytes, content_type: str | None, accept: str | None
) -> tuple[bytes | str, str]:
    """Answer one request with the model's handlers (blocking; call in a thread): body and content type.

    :param served: the model that answers.
    :param body: the request body.
    :param content_type: the request's ``Content-Type``.
    :param accept: the request's ``Accept``.
    """
    handlers, model = served.loaded.handlers, served.loaded.model
    parse = getattr(handlers, "parse_request", None)
    data = parse(body, content_type, model) if callable(parse) else handlers.input_fn(body, content_type)
    result = handlers.output_fn(handlers.predict_fn(data, model), accept)
    if isinstance(result, tuple):  # SageMaker handlers may return (body, content_type)
        return result[0], result[1]
    return result, _media_of(handlers, accept)


HANDLER_STATUS = {"UnsupportedContentType": 415, "RequestTooLarge": 413}  # a handler module's ValueErrors


def _handler_status(error: BaseException, handlers: Any) -> int | None:
    """The status of a handler error the module names: 415 ``UnsupportedContentType``, 413 ``RequestTooLarge``.

    :param error: the exception raised by a handler.
    :param handlers: the model's handler module.
    """
    for name, status in HANDLER_STATUS.items():
        cls = getattr(handlers, name, None)
        if isinstance(cls, type) and isinstance(error, cls):
            return status
        if any(base.__name__ == name for base in type(error).__mro__):
            return status
    return None


def parse_now(served: ServedModel, body: bytes, content_type: str | None) -> Any:
    """Parse one request body with the model's handlers (blocking).

    :param served: the model.
    :param body: the request body.
    :param content_type: its ``Content-Type``.
    """
    handlers, model = served.loaded.handlers, served.loaded.model
    parse_request = getattr(handlers, "parse_request", None)
    if callable(parse_request):
        return parse_request(body, content_type, model)
    return handlers.input_fn(body, content_type)


async def parse(served: ServedModel, body: bytes, content_type: str | None, limiter: Any = None) -> Any:
    """Parse one request on its own (before it joins a batch): on the loop when small, else in a thread.

    :param served: the model.
    :param body: the request body.
    :param content_type: its ``Content-Type``.
    :param limiter: the thread limiter for a large body.
    """
    if len(body) <= INLINE_PARSE_BYTES:
        return parse_now(served, body, content_type)
    return await anyio.to_thread.run_sync(parse_now, served, body, content_type, limiter=limiter)


def serialiser(served: ServedModel) -> Any:
    """``(prediction, accept) -> (body, media)`` with the model's ``output_fn`` (blocking).

    :param served: the model.
    """
    handlers = served.loaded.handlers

    def serialise(prediction: Any, accept: str | None) -> tuple[bytes | str, str]:
        result = handlers.output_fn(prediction, accept)
        if isinstance(result, tuple):  # SageMaker handlers may return (body, content_type)
            return result[0], result[1]
        return result, _media_of(handlers, accept)

    return serialise


def handler_error(error: Exception, served: ServedModel, endpoint: str) -> Response:
    """The answer to what a handler raised on one request (the worker keeps serving).

    :param error: the exception.
    :param served: the model that was asked.
    :param endpoint: the endpoint's name, for the log.
    """
    status = _handler_status(error, served.loaded.handlers)
    if status is not None:
        return error_response(status, str(error), served.version)
    if isinstance(error, ValueError):
        return error_response(400, str(error), served.version)
    if isinstance(error, RecursionError):  # json.loads of a deeply nested body, in a model's own parser
        return error_response(400, "the request nests arrays or objects too deeply to parse", served.version)
    logger.error("endpoint %s: version %s failed on a request", endpoint, served.version, exc_info=error)
    message = f"the model failed on this request ({type(error).__name__}); see the server log"
    return error_response(500, message, served.version, "ModelError")
