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
``POST /endpoints/{name}/invocations`` (what ``sagemaker-runtime`` ``invoke_endpoint`` calls; answered by
:class:`FrontDoor` ahead of FastAPI's routing, the hot path).
A request is parsed on its own by the model's handlers (``parse_request`` when the handler
module has it, else ``input_fn``; a malformed one is answered 4xx there), then queued on the
batcher of the version it took (:mod:`conveyor.serving.batching`): requests waiting for one
version are merged into one predict (``predict_batch`` when the module has it, else one
``predict_fn`` each) of at most ``CONVEYOR_MAX_BATCH_SIZE`` rows, run in a thread so the loop keeps
accepting; each answer is serialised by ``output_fn`` with its own ``Accept`` (JSON by default),
with ``X-Conveyor-Model-Version`` naming the version that answered and the request's
``X-Amzn-SageMaker-Inference-Id`` echoed. ``X-Conveyor-Target:
candidate`` asks the staged candidate (deploy smoke tests).

Every route but ``/ping`` needs credentials (:mod:`conveyor.serving.auth`: an AWS SigV4 signature,
as ``sagemaker-runtime`` clients send, or ``Authorization: Bearer <token>``): 401 without, 403
with wrong ones. Bad requests get a 4xx in the shape boto3 parses (``x-amzn-ErrorType`` and
``{"message", "error"}``, see :mod:`conveyor.serving.http`): 404 another endpoint's name, 409 no
candidate loaded, 413 body too large, 415 unsupported content type or accept, 431 request line
and headers over ``CONVEYOR_MAX_HEADER_BYTES``, 400 any other ``ValueError`` of the handlers (and
JSON nested too deeply to parse); 503 no model; 500 an unexpected error (``ModelError``; logged;
the worker keeps serving).

Settings come from ``conveyor.settings.server_settings()`` (``CONVEYOR_ENDPOINT``,
``CONVEYOR_MAX_BODY_BYTES``, ``CONVEYOR_INFERENCE_CONCURRENCY``, ``CONVEYOR_MAX_BATCH_SIZE``,
``CONVEYOR_MAX_BATCH_WAIT_MS``, ``CONVEYOR_CAPTURE_DIR``,
``CONVEYOR_CAPTURE_SHARE``, ``CONVEYOR_FEEDBACK_DIR``, ``CONVEYOR_MAX_HEADER_BYTES``, the
``CONVEYOR_ENDPOINT_*`` credentials: see its table). Beside this module:
:mod:`conveyor.serving.http` (request bodies, error answers), :mod:`conveyor.serving.capture`
(sampled live traffic as JSON lines) and :mod:`conveyor.serving.feedback` (``POST /feedback``:
ground truth for earlier predictions, written as label drops the monitor reads).

Nothing here imports Airflow: workers start fast and stay small.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor import settings
from conveyor.serving import endpoint_state
from conveyor.serving.auth import AuthFailed, Verifier, endpoint_credentials
from conveyor.serving.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BATCH_WAIT_MS, Batcher
from conveyor.serving.capture import Capture
from conveyor.serving.feedback import MAX_FEEDBACK_BYTES, feedback_route
from conveyor.serving.http import (
    VERSION_HEADER,
    RequestRejected,
    error_response,
    head_size,
    read_body,
    too_large_message,
)
from conveyor.serving.models import (  # noqa: F401 - load_model and run_handlers kept importable from here
    JSON_MEDIA,
    ServedModel,
    control_key,
    handler_error,
    load_model,
    parse,
    run_handlers,
    serialiser,
    utc_now,
)
from conveyor.serving.protocol import requests_in_flight

logger = logging.getLogger("conveyor.serving")

DEFAULT_MAX_BODY_BYTES = settings.MAX_BODY_BYTES_DEFAULT
POLL_INTERVAL_S = 0.2
HEARTBEAT_EVERY_S = 2.0
TARGET_HEADER = "x-conveyor-target"
VARIANT_HEADER = "X-Amzn-Invoked-Production-Variant"  # boto3 returns it as InvokedProductionVariant
INFERENCE_ID_HEADER = "x-amzn-sagemaker-inference-id"  # invoke_endpoint(InferenceId=...)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="conveyor", AWS4-HMAC-SHA256'}


# ------------------------------------------------------------------------------------- worker


class ModelWorker:
    """What one worker process serves, kept in step with ``control.json``.

    ``live`` and ``candidate`` are only ever replaced whole (one reference assignment each), from
    the event loop; a request reads the reference it needs once, when it starts.

    Each version held has its own :class:`~conveyor.serving.batching.Batcher` (requests for one
    version are merged; a batch never mixes versions).

    :param name: the endpoint name.
    :param poll_interval: seconds between looks at ``control.json``.
    :param max_batch_size: the most rows one merged predict takes.
    :param max_batch_wait_ms: how long a batch may wait for more rows (0: start at once when idle).
    """

    def __init__(
        self,
        name: str,
        poll_interval: float = POLL_INTERVAL_S,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS,
    ):
        self.name = name
        self.poll_interval = poll_interval
        self.max_batch_size = max_batch_size
        self.max_batch_wait_ms = max_batch_wait_ms
        self.limiter: anyio.CapacityLimiter | None = None
        self.requests = 0
        self._batchers: weakref.WeakKeyDictionary[ServedModel, Batcher] = weakref.WeakKeyDictionary()
        self.live: ServedModel | None = None
        self.candidate: ServedModel | None = None
        self.error: dict[str, str] | None = None
        self.loaded_at: str | None = None
        self.control: dict[str, Any] | None = None
        self._seen: tuple[int, int, int] | None = None
        self._task: asyncio.Task | None = None
        self._last_beat = 0.0

    def batcher(self, model: ServedModel) -> Batcher:
        """The batcher of one loaded version (made on its first request, dropped with the version).

        :param model: the version a request took.
        """
        batcher = self._batchers.get(model)
        if batcher is None:
            handlers, loaded = model.loaded.handlers, model.loaded.model
            batcher = Batcher(
                handlers,
                loaded,
                serialiser(model),
                self.max_batch_size,
                self.max_batch_wait_ms,
                self.limiter,
                alone=_alone,
            )
            self._batchers[model] = batcher
        return batcher

    def batch_stats(self) -> dict[str, dict[str, int]]:
        """Per version held: predict calls, requests, rows and the largest batch so far."""
        return {model.version: vars(batcher.stats).copy() for model, batcher in list(self._batchers.items())}

    # -- state files

    def heartbeat(self) -> None:
        """Write this worker's heartbeat (what it has loaded, the last load error)."""
        state = {
            "pid": os.getpid(),
            "host": endpoint_state.HOST,
            "live": self.live.ref() if self.live else None,
            "candidate": self.candidate.ref() if self.candidate else None,
            "loaded_at": self.loaded_at,
            "error": self.error,
            "requests": self.requests,
            "batches": self.batch_stats(),
            "serial": (self.control or {}).get("serial"),
            "updated_at": utc_now(),
        }
        try:
            path = endpoint_state.heartbeat_path(self.name, os.getpid())
            endpoint_state.write_json_atomic(path, state, durable=False)
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
            served = await anyio.to_thread.run_sync(_load_frozen, ref["version"], ref["model_dir"])
        except Exception as error:  # noqa: BLE001 - any failure of foreign model code is reported
            message = f"{type(error).__name__}: {error}"
            logger.exception("endpoint %s: loading %s version %s failed", self.name, role, ref["version"])
            self.error = {
                "version": ref["version"],
                "model_dir": ref["model_dir"],
                "role": role,
                "message": message,
                "at": utc_now(),
            }
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
        want_live, want_candidate = control_key(control["live"]), control_key(control["candidate"])
        dropped: list[ServedModel | None] = []
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
        failed = None if self.error is None else (self.error["version"], self.error["model_dir"])
        if failed is not None and failed not in (want_live, want_candidate):
            self.error = None  # the failed version is no longer asked for
        unused = [old for old in dropped if old is not None and old is not self.live and old is not self.candidate]
        dropped.clear()
        if unused:
            self.heartbeat()  # what is served now is on disk before the (slow) collection below
            logger.info("endpoint %s: dropped version(s) %s", self.name, ", ".join(old.version for old in unused))
            unused.clear()
            await anyio.to_thread.run_sync(_collect_frozen)  # free the old model once no request holds it


def _alone() -> bool:
    """Whether the request asking is the only one this worker process has started and not answered."""
    return requests_in_flight() == 1


def _load_frozen(version: str, model_dir: str) -> ServedModel:
    """Load a model (blocking), then keep every object alive now out of the garbage collector's full passes.

    A loaded model is millions of long-lived objects; each full collection walked them all, a pause of
    150-200 ms that every request in flight waited out (p99 at 32 clients, ``bench/endpoint.py``).
    Frozen objects are still freed by reference counting; :func:`_collect_frozen` thaws them when a
    version is dropped, so a replaced model is collected.

    :param version: the model version.
    :param model_dir: the extracted archive.
    """
    served = load_model(version, model_dir)
    _collect_frozen()
    return served


def _collect_frozen() -> None:
    """Collect everything, the frozen objects included, then freeze what is left (the models still held)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


# ------------------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class Endpoint:
    """What the routes of one worker need: the endpoint, its model worker and its settings.

    :param name: the endpoint's name.
    :param worker: the models this worker serves.
    :param max_body: the largest request body, in bytes.
    :param capture: the data capture, or None when off.
    :param feedback_dir: where ``POST /feedback`` writes drops, or None when off.
    :param verifier: checks every request's credentials.
    """

    name: str
    worker: ModelWorker
    max_body: int
    capture: Capture | None
    feedback_dir: Path | None
    verifier: Verifier


def invocation_path(path: str) -> tuple[bool, str | None]:
    """Whether a path is an invocations path, and the endpoint it names (None for ``/invocations``).

    :param path: the request path (decoded).
    """
    if path == "/invocations":
        return True, None
    if path.startswith("/endpoints/") and path.endswith("/invocations"):
        name = path[len("/endpoints/") : -len("/invocations")]
        if name and "/" not in name:
            return True, name
    return False, None


class FrontDoor:
    """ASGI middleware (inside Starlette's error handler): the head limit, then invocations answered here.

    A request line and headers over the limit get 431. ``POST /invocations`` and ``POST
    /endpoints/{name}/invocations``, nearly all of an endpoint's traffic, go straight to
    :func:`invoke` (which answers every failure itself), past FastAPI's router, exception middleware
    and dependency machinery (0.15-0.3 ms of a one-row request in-process, 2 cores). Another method
    there gets 405; other paths go on to the routes.

    :param app: the app.
    :param served: the endpoint.
    :param limit: the largest head, in bytes.
    """

    def __init__(self, app: ASGIApp, served: Endpoint, limit: int):
        self.app = app
        self.served = served
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = scope.get("raw_path", b"") + b"?" + scope.get("query_string", b"")
            if head_size(target, scope["headers"]) > self.limit:
                await error_response(431, too_large_message(self.limit))(scope, receive, send)
                return
            hit, name = invocation_path(scope["path"])
            if hit:
                if scope["method"] == "POST":
                    response = await invoke(self.served, Request(scope, receive), name)
                else:
                    message = f"{scope['method']} is not allowed on {scope['path']}: invocations are POST"
                    response = error_response(405, message, headers={"Allow": "POST"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    capture = Capture(config.capture_dir, config.capture_share, name) if config.capture_dir else None
    _configure_logging()
    verifier = Verifier(endpoint_credentials())
    worker = ModelWorker(name, poll_interval, config.max_batch_size, config.max_batch_wait_ms)
    served = Endpoint(name, worker, config.max_body_bytes, capture, config.feedback_dir, verifier)
    app = FastAPI(
        title=f"Conveyor endpoint {name}",
        lifespan=_lifespan(served, config.concurrency),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(FrontDoor, served=served, limit=config.max_header_bytes)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, str(error.detail), headers=error.headers)

    app.state.worker = served.worker
    app.state.endpoint = name
    _add_routes(app, served)
    return app


def _lifespan(served: Endpoint, concurrency: int) -> Any:
    """The worker's lifespan: load the live model before the first connection, stop polling at the end.

    :param served: the endpoint.
    :param concurrency: requests this worker predicts at once.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = served.worker.limiter = anyio.CapacityLimiter(concurrency)
        await served.worker.start()
        logger.info(
            "endpoint %s: worker %s serving (live: %s)",
            served.name,
            os.getpid(),
            served.worker.live.version if served.worker.live else None,
        )
        try:
            yield
        finally:
            await served.worker.stop()

    return lifespan


def _add_routes(app: FastAPI, served: Endpoint) -> None:
    """``GET /ping`` and ``POST /feedback`` (the invocations are :class:`FrontDoor`'s).

    :param app: the app.
    :param served: the endpoint.
    """

    @app.get("/ping")
    async def ping() -> Response:
        live = served.worker.live
        if live is None:
            return error_response(503, f"endpoint {served.name}: no live model is loaded")
        return Response(status_code=200, headers={VERSION_HEADER: live.version})

    @app.post("/feedback")
    async def post_feedback(request: Request) -> Response:
        try:
            body = await authorised_body(served, request, MAX_FEEDBACK_BYTES)
        except RequestRejected as rejected:
            return rejected_response(rejected)
        return await feedback_route(body, served.name, served.feedback_dir, served.worker.live)


def rejected_response(rejected: RequestRejected, version: str | None = None) -> Response:
    """The answer to a refused request (401s carry the ``WWW-Authenticate`` challenge).

    :param rejected: why it was refused.
    :param version: the model version that would have answered, if any.
    """
    challenge = CHALLENGE if rejected.status == 401 else None
    return error_response(rejected.status, rejected.message, version, rejected.code, challenge)


async def authorised_body(served: Endpoint, request: Request, limit: int) -> bytes:
    """Check the request's credentials and read its body (a bearer token or a signature's key and date first).

    :param served: the endpoint (its verifier).
    :param request: the request.
    :param limit: the largest body allowed.
    :raises RequestRejected: 401/403 for credentials, 400/413 for the body.
    """
    verifier = served.verifier
    try:
        signed = verifier.check_headers(request.headers)
        body = await read_body(request, limit)
        if signed is not None:
            path = request.scope.get("raw_path") or request.url.path.encode()
            query = request.scope.get("query_string", b"").decode("latin-1")
            verifier.check_signature(
                signed, request.method, path.decode("latin-1"), query, request.headers.items(), body
            )
    except AuthFailed as failed:
        logger.warning("endpoint %s: refused %s %s: %s", served.name, request.method, request.url.path, failed.message)
        raise RequestRejected(failed.status, failed.message, failed.code) from None
    return body


async def invoke(served: Endpoint, request: Request, endpoint_name: str | None) -> Response:
    """Answer an invocation with the live model, or the candidate (``X-Conveyor-Target: candidate``).

    :param served: the endpoint.
    :param request: the request.
    :param endpoint_name: the name in the path (``/endpoints/{name}/invocations``), or None.
    """
    name, worker = served.name, served.worker
    try:
        body = await authorised_body(served, request, served.max_body)
    except RequestRejected as rejected:
        return rejected_response(rejected)
    if endpoint_name is not None and endpoint_name != name:
        return error_response(404, f"endpoint {endpoint_name!r} is not served here (this is endpoint {name!r})")
    target = request.headers.get(TARGET_HEADER, "live").strip().lower()
    if target not in ("live", "candidate"):
        return error_response(400, f"X-Conveyor-Target {target!r} is not valid: use live or candidate")
    model = worker.live if target == "live" else worker.candidate  # the one reference this request uses
    if model is None:
        if target == "candidate":
            return error_response(409, f"endpoint {name}: no candidate model is loaded")
        return error_response(503, f"endpoint {name}: no live model is loaded")
    content_type, accept = request.headers.get("content-type"), request.headers.get("accept")
    worker.requests += 1
    try:  # parsed on its own first: a malformed request is answered alone, before it joins a batch
        data = await parse(model, body, content_type, request.app.state.limiter)
        answer, media = await worker.batcher(model).submit(data, accept)
    except Exception as error:  # noqa: BLE001 - every failure becomes a response; the worker keeps serving
        return handler_error(error, model, name)
    inference_id = request.headers.get(INFERENCE_ID_HEADER)
    capture = served.capture
    if capture is not None and target == "live" and capture.sampled():
        await anyio.to_thread.run_sync(
            capture.write,
            model.version,
            content_type,
            accept,
            body,
            answer,
            media,
            inference_id,
        )
    headers = {VERSION_HEADER: model.version, VARIANT_HEADER: model.version}
    if inference_id is not None:
        headers[INFERENCE_ID_HEADER] = inference_id  # each answer carries its own request's id
    return Response(content=answer, media_type=media, headers=headers)


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
