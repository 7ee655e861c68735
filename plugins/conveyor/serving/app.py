"""Conveyor's model server: the SageMaker hosting contract, with zero-downtime model switching.

``create_app`` builds the ASGI app of one worker process (``uvicorn --factory --workers N`` runs
several). Each worker:

- at startup loads the live model named by the endpoint's ``control.json`` (see
  :mod:`conveyor.serving.endpoint_state`), before it accepts a connection;
- polls ``control.json`` (every 0.2 s); a staged candidate is loaded *beside* the live model and
  the outcome written to the worker's heartbeat; when the candidate is promoted the worker swaps
  one reference, so each request, which takes the reference once when it starts, is answered
  entirely by the old or entirely by the new model; the old model is dropped after the swap. A
  failed load is retried only when ``control.json`` changes again.

Routes: ``GET /ping`` (200 with a live model, else 503); ``POST /invocations`` and
``POST /endpoints/{name}/invocations`` (what ``sagemaker-runtime`` ``invoke_endpoint`` calls).
A request is parsed, predicted and serialised by the model's own handlers
(``parse_request`` when the handler module has it, else ``input_fn``; ``predict_fn``;
``output_fn``) in a worker thread, and answered in the ``Accept`` media type (JSON by default)
with ``X-Conveyor-Model-Version`` naming the version that answered. ``X-Conveyor-Target:
candidate`` asks the staged candidate (deploy smoke tests). Bad requests get a 4xx and
``{"error": message}``: 404 another endpoint's name, 409 no candidate loaded, 413 body too large,
415 unsupported content type or accept, 400 any other ``ValueError`` of the handlers; 503 no
model; 500 an unexpected error (logged; the worker keeps serving).

Environment:

| variable | meaning |
|---|---|
| ``CONVEYOR_ENDPOINT`` | the endpoint name when ``create_app`` gets none |
| ``CONVEYOR_MAX_BODY_BYTES`` | largest request body, 6 MiB by default (as SageMaker) |
| ``CONVEYOR_INFERENCE_CONCURRENCY`` | requests one worker predicts at once, 1 by default |
| ``CONVEYOR_CAPTURE_DIR`` | where sampled live requests and responses are appended (off when unset) |
| ``CONVEYOR_CAPTURE_SHARE`` | the share of live requests captured, 0..1, 1 by default |
| ``CONVEYOR_FEEDBACK_DIR`` | where ``POST /feedback`` writes label drops (``landing/<p>/feedback``; off when unset) |

``POST /feedback`` takes ground truth for earlier predictions: ``{"id": ..., "label": ...}``, a list
of them, or ``{"feedback": [...]}``. An id is the request's id column value, or the inference id a
client sent in ``X-Amzn-SageMaker-Inference-Id`` (as ``invoke_endpoint(InferenceId=...)`` does),
which is captured with the request. Labels outside the live model's classes get a 400; accepted
records become one feedback drop (``feedback.jsonl`` + ``_SUCCESS``) that ``<name>__monitor`` reads.

Nothing here imports Airflow: workers start fast and stay small.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from conveyor import settings
from conveyor.serving import endpoint_state

logger = logging.getLogger("conveyor.serving")

DEFAULT_MAX_BODY_BYTES = settings.MAX_BODY_BYTES_DEFAULT
POLL_INTERVAL_S = 0.2
HEARTBEAT_EVERY_S = 2.0
TARGET_HEADER = "x-conveyor-target"
VERSION_HEADER = "X-Conveyor-Model-Version"
VARIANT_HEADER = "X-Amzn-Invoked-Production-Variant"  # boto3 returns it as InvokedProductionVariant
INFERENCE_ID_HEADER = "x-amzn-sagemaker-inference-id"  # invoke_endpoint(InferenceId=...)
MAX_FEEDBACK_BYTES = 1 << 20
JSON_MEDIA = "application/json"
REQUIRED_HANDLERS = ("model_fn", "predict_fn", "output_fn")


class RequestRejected(Exception):
    """A request refused before the model sees it.

    :param status: the HTTP status.
    :param message: what was wrong, for the client.
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    """The current UTC time, ISO 8601."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


# ------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
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


def _key(ref: dict[str, str] | None) -> tuple[str, str] | None:
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
    if not callable(getattr(loaded.handlers, "parse_request", None)) and not callable(getattr(loaded.handlers, "input_fn", None)):
        missing.append("input_fn")
    if missing:
        raise ValueError(f"{model_dir}/code/inference.py lacks the handlers {', '.join(missing)}")
    return ServedModel(version=version, model_dir=model_dir, loaded=loaded, loaded_at=_now())


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


def run_handlers(served: ServedModel, body: bytes, content_type: str | None, accept: str | None) -> tuple[bytes | str, str]:
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


def _is_unsupported(error: BaseException, handlers: Any) -> bool:
    """Whether a handler error is the module's ``UnsupportedContentType``.

    :param error: the exception raised by a handler.
    :param handlers: the model's handler module.
    """
    unsupported = getattr(handlers, "UnsupportedContentType", None)
    if isinstance(unsupported, type) and isinstance(error, unsupported):
        return True
    return any(cls.__name__ == "UnsupportedContentType" for cls in type(error).__mro__)


# ------------------------------------------------------------------------------------- capture


class Capture:
    """Appends a sampled share of live requests and responses as JSON lines.

    Lines go to ``<folder>/<yyyy-mm-dd>/<pid>.jsonl`` (UTC date; one file per worker, so no two
    processes append to the same file).

    :param folder: the capture folder.
    :param share: the share of requests kept, 0..1.
    :param endpoint: the endpoint name, written in every line.
    """

    def __init__(self, folder: Path, share: float, endpoint: str):
        self.folder = folder
        self.share = share
        self.endpoint = endpoint
        self._lock = threading.Lock()

    def sampled(self) -> bool:
        return self.share > 0 and (self.share >= 1 or random.random() < self.share)

    @staticmethod
    def _payload(data: bytes | str) -> dict[str, str]:
        """A body as JSON: text when it is UTF-8, else base64.

        :param data: the body.
        """
        if isinstance(data, str):
            return {"encoding": "text", "data": data}
        try:
            return {"encoding": "text", "data": data.decode("utf-8")}
        except UnicodeDecodeError:
            return {"encoding": "base64", "data": base64.b64encode(data).decode("ascii")}

    def write(self, version: str, content_type: str | None, accept: str | None, body: bytes,
              response: bytes | str, response_type: str, inference_id: str | None = None) -> None:
        """Append one request and its response (blocking; never raises).

        :param version: the model version that answered.
        :param content_type: the request's content type.
        :param accept: the request's accept.
        :param body: the request body.
        :param response: the response body.
        :param response_type: the response's content type.
        :param inference_id: the client's inference id, if it sent one.
        """
        now = dt.datetime.now(dt.timezone.utc)
        record = {
            "timestamp": now.isoformat(timespec="milliseconds"), "endpoint": self.endpoint, "version": version,
            "inference_id": inference_id,
            "request": {"content_type": content_type, "accept": accept, "body": self._payload(body)},
            "response": {"content_type": response_type, "body": self._payload(response)},
        }
        path = self.folder / now.strftime("%Y-%m-%d") / f"{os.getpid()}.jsonl"
        try:
            with self._lock:
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
        except OSError:
            logger.warning("data capture: could not append to %s", path, exc_info=True)


# ------------------------------------------------------------------------------------- worker


class ModelWorker:
    """What one worker process serves, kept in step with ``control.json``.

    ``live`` and ``candidate`` are only ever replaced whole (one reference assignment each), from
    the event loop; a request reads the reference it needs once, when it starts.

    :param name: the endpoint name.
    :param poll_interval: seconds between looks at ``control.json``.
    """

    def __init__(self, name: str, poll_interval: float = POLL_INTERVAL_S):
        self.name = name
        self.poll_interval = poll_interval
        self.live: ServedModel | None = None
        self.candidate: ServedModel | None = None
        self.error: dict[str, str] | None = None
        self.loaded_at: str | None = None
        self.control: dict[str, Any] | None = None
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task | None = None
        self._last_beat = 0.0

    # -- state files

    def heartbeat(self) -> None:
        """Write this worker's heartbeat (what it has loaded, the last load error)."""
        state = {
            "pid": os.getpid(), "host": endpoint_state.HOST, "live": self.live.ref() if self.live else None,
            "candidate": self.candidate.ref() if self.candidate else None, "loaded_at": self.loaded_at,
            "error": self.error, "serial": (self.control or {}).get("serial"), "updated_at": _now(),
        }
        try:
            endpoint_state.write_json_atomic(endpoint_state.heartbeat_path(self.name, os.getpid()), state, durable=False)
            self._last_beat = time.monotonic()
        except OSError:
            logger.warning("could not write the heartbeat of worker %s", os.getpid(), exc_info=True)

    def _signature(self) -> tuple[int, int, int] | None:
        """The identity of ``control.json`` on disk (a replace gives a new inode), None when absent."""
        try:
            info = endpoint_state.control_path(self.name).stat()
        except FileNotFoundError:
            return None
        return (info.st_mtime_ns, info.st_ino, info.st_size)

    # -- lifecycle

    async def start(self) -> None:
        """Load what ``control.json`` asks for, then poll it in the background."""
        self.heartbeat()
        await self.sync()
        self._task = asyncio.create_task(self._poll_forever(), name=f"conveyor-control-{self.name}")

    async def stop(self) -> None:
        """Stop polling and remove the heartbeat."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            endpoint_state.heartbeat_path(self.name, os.getpid()).unlink()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.sync()
                if time.monotonic() - self._last_beat >= HEARTBEAT_EVERY_S:
                    self.heartbeat()
            except Exception:  # noqa: BLE001 - the poller must outlive any one bad look
                logger.exception("endpoint %s: following control.json failed; trying again", self.name)

    async def sync(self) -> bool:
        """Apply ``control.json`` if it changed since the last look; whether anything was applied."""
        signature = self._signature()
        if signature == self._seen and self.control is not None:
            return False
        self._seen = signature
        try:
            control = endpoint_state.read_control(self.name)
        except endpoint_state.EndpointError as error:
            logger.error("%s", error)
            return False
        if control == self.control:
            return False
        self.control = control
        await self._reconcile(control)
        self.heartbeat()
        return True

    # -- reconciling

    async def _load(self, ref: dict[str, str], role: str) -> ServedModel | None:
        """Load a model in a thread; None (and the error kept for the heartbeat) when it fails.

        :param ref: ``{"version", "model_dir"}`` from control.json.
        :param role: ``live`` or ``candidate``, for messages.
        """
        logger.info("endpoint %s: loading %s version %s from %s", self.name, role, ref["version"], ref["model_dir"])
        started = time.monotonic()
        try:
            served = await anyio.to_thread.run_sync(load_model, ref["version"], ref["model_dir"])
        except Exception as error:  # noqa: BLE001 - any failure of foreign model code is reported
            message = f"{type(error).__name__}: {error}"
            logger.exception("endpoint %s: loading %s version %s failed", self.name, role, ref["version"])
            self.error = {"version": ref["version"], "model_dir": ref["model_dir"], "role": role, "message": message, "at": _now()}
            return None
        logger.info("endpoint %s: loaded version %s in %.2fs", self.name, ref["version"], time.monotonic() - started)
        self.loaded_at = served.loaded_at
        if self.error is not None and self.error["version"] == ref["version"]:
            self.error = None
        return served

    async def _reconcile(self, control: dict[str, Any]) -> None:
        """Bring ``live`` and ``candidate`` to what ``control`` asks; never unload live before its successor is ready.

        :param control: the control document.
        """
        want_live, want_candidate = _key(control["live"]), _key(control["candidate"])
        dropped: list[ServedModel] = []
        if want_live != (self.live.key if self.live else None):
            if want_live is None:
                dropped.append(self.live)
                self.live = None
            elif self.candidate is not None and self.candidate.key == want_live:
                dropped.append(self.live)
                self.live = self.candidate  # the swap: one reference assignment
                logger.info("endpoint %s: version %s is live", self.name, self.live.version)
            else:
                served = await self._load(control["live"], "live")
                if served is not None:
                    dropped.append(self.live)
                    self.live = served
                    logger.info("endpoint %s: version %s is live", self.name, served.version)
        if want_candidate != (self.candidate.key if self.candidate else None):
            dropped.append(self.candidate)
            self.candidate = None
            if want_candidate is not None and self.live is not None and self.live.key == want_candidate:
                self.candidate = self.live
            elif want_candidate is not None:
                self.candidate = await self._load(control["candidate"], "candidate")
        if self.error is not None and (self.error["version"], self.error["model_dir"]) not in (want_live, want_candidate):
            self.error = None  # the failed version is no longer asked for
        unused = [old for old in dropped if old is not None and old is not self.live and old is not self.candidate]
        dropped.clear()
        if unused:
            logger.info("endpoint %s: dropped version(s) %s", self.name, ", ".join(old.version for old in unused))
            unused.clear()
            await anyio.to_thread.run_sync(gc.collect)  # free the old model once no request holds it


# ------------------------------------------------------------------------------------- the app


def _error(status: int, message: str, version: str | None = None) -> JSONResponse:
    """A JSON error response.

    :param status: the HTTP status.
    :param message: what went wrong.
    :param version: the model version that handled the request, if one did.
    """
    headers = {VERSION_HEADER: version} if version else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) above ``limit`` bytes by its Content-Length or its actual size.

    :param request: the request.
    :param limit: the largest body allowed.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestRejected(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise RequestRejected(413, f"request body of {size} bytes is larger than the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestRejected(413, f"request body is larger than the limit of {limit} bytes")
    return bytes(body)


def create_app(name: str | None = None, *, poll_interval: float = POLL_INTERVAL_S) -> FastAPI:
    """The ASGI app of one worker of an endpoint (``uvicorn --factory`` calls it with no argument).

    :param name: the endpoint name; ``CONVEYOR_ENDPOINT`` when None.
    :param poll_interval: seconds between looks at ``control.json``.
    """
    config = settings.server_settings()
    name = name or config.endpoint
    if not name:
        raise ValueError("create_app: no endpoint name: pass one or set CONVEYOR_ENDPOINT")
    endpoint_state.endpoint_dir(name)  # checks the name
    max_body = config.max_body_bytes
    concurrency = config.concurrency
    capture = Capture(config.capture_dir, config.capture_share, name) if config.capture_dir else None
    feedback_dir = str(config.feedback_dir) if config.feedback_dir else None
    _configure_logging()
    worker = ModelWorker(name, poll_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = anyio.CapacityLimiter(concurrency)
        await worker.start()
        logger.info("endpoint %s: worker %s serving (live: %s)", name, os.getpid(),
                    worker.live.version if worker.live else None)
        try:
            yield
        finally:
            await worker.stop()

    app = FastAPI(title=f"Conveyor endpoint {name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.endpoint = name

    @app.get("/ping")
    async def ping() -> Response:
        live = worker.live
        if live is None:
            return _error(503, f"endpoint {name}: no live model is loaded")
        return Response(status_code=200, headers={VERSION_HEADER: live.version})

    async def invoke(request: Request, endpoint_name: str | None) -> Response:
        if endpoint_name is not None and endpoint_name != name:
            return _error(404, f"endpoint {endpoint_name!r} is not served here (this is endpoint {name!r})")
        target = request.headers.get(TARGET_HEADER, "live").strip().lower()
        if target not in ("live", "candidate"):
            return _error(400, f"X-Conveyor-Target {target!r} is not valid: use live or candidate")
        served = worker.live if target == "live" else worker.candidate  # the one reference this request uses
        if served is None:
            if target == "candidate":
                return _error(409, f"endpoint {name}: no candidate model is loaded")
            return _error(503, f"endpoint {name}: no live model is loaded")
        try:
            body = await _read_body(request, max_body)
        except RequestRejected as rejected:
            return _error(rejected.status, rejected.message, served.version)
        content_type, accept = request.headers.get("content-type"), request.headers.get("accept")
        try:
            answer, media = await anyio.to_thread.run_sync(
                run_handlers, served, body, content_type, accept, limiter=request.app.state.limiter
            )
        except Exception as error:  # noqa: BLE001 - every failure becomes a response; the worker keeps serving
            if _is_unsupported(error, served.loaded.handlers):
                return _error(415, str(error), served.version)
            if isinstance(error, ValueError):
                return _error(400, str(error), served.version)
            logger.exception("endpoint %s: version %s failed on a request", name, served.version)
            return _error(500, f"the model failed on this request ({type(error).__name__}); see the server log", served.version)
        if capture is not None and target == "live" and capture.sampled():
            await anyio.to_thread.run_sync(capture.write, served.version, content_type, accept, body, answer, media,
                                           request.headers.get(INFERENCE_ID_HEADER))
        return Response(content=answer, media_type=media,
                        headers={VERSION_HEADER: served.version, VARIANT_HEADER: served.version})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await invoke(request, None)

    @app.post("/endpoints/{endpoint_name}/invocations")
    async def endpoint_invocations(endpoint_name: str, request: Request) -> Response:
        return await invoke(request, endpoint_name)

    @app.post("/feedback")
    async def post_feedback(request: Request) -> Response:
        if not feedback_dir:
            return _error(404, f"endpoint {name}: feedback is not enabled (no CONVEYOR_FEEDBACK_DIR)")
        live = worker.live
        try:
            body = await _read_body(request, MAX_FEEDBACK_BYTES)
            drop = await anyio.to_thread.run_sync(write_feedback, Path(feedback_dir), body, live)
        except RequestRejected as rejected:
            return _error(rejected.status, rejected.message)
        except ValueError as error:
            return _error(400, f"feedback: {error}")
        return JSONResponse(status_code=202, content={"accepted": drop["records"], "drop": drop["name"]})

    return app


def write_feedback(folder: Path, body: bytes, live: Any) -> dict[str, Any]:
    """Check a ``POST /feedback`` body and write it as one complete feedback drop.

    :param folder: ``landing/<pipeline>/feedback``.
    :param body: the request body (JSON).
    :param live: the live model (its class labels check the labels), or None.
    :raises ValueError: a body or label that breaks a rule (answered with 400).
    """
    import uuid

    from conveyor.monitoring.feedback import canonical_label, feedback_records

    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the body is not JSON ({error})") from None
    records = feedback_records(payload)
    classes = [str(c) for c in ((live.loaded.metadata.get("class_labels") or []) if live is not None else [])]
    if classes:
        for number, record in enumerate(records, start=1):
            label = canonical_label(record["label"], classes)
            if label is None:
                raise ValueError(f"record {number}: label {record['label']!r} is outside the class set {classes}")
            record["label"] = label
    now = dt.datetime.now(dt.timezone.utc)
    drop = folder / f"api-{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    drop.mkdir(parents=True, exist_ok=False)
    (drop / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (drop / "_SUCCESS").write_text("")  # the marker last: the drop is complete
    return {"name": drop.name, "records": len(records)}


def _configure_logging() -> None:
    """Send the server's own messages (model loads, swaps, failures) to stderr, i.e. ``server.log``.

    Only where nothing else configured logging (a uvicorn worker); inside a test or an Airflow
    task the host's handlers get the records.
    """
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
