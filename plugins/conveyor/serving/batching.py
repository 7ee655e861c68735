"""Adaptive micro-batching of the model server: requests waiting for one model version share a predict.

Each loaded model version (:class:`conveyor.serving.app.ServedModel`) of a worker has one
:class:`Batcher`. A request is parsed on its own first (a malformed one is answered 4xx before it
joins anything), then queued on the batcher of the version it took. When nothing runs for that
version the batch starts at once (no fixed wait when idle); while a predict runs, newcomers queue;
the next predict takes everything queued, oldest first, up to ``max_batch_size`` rows (a request
larger than that is predicted alone, never split). With ``max_batch_wait_ms > 0`` a batch waits up
to that long after its oldest request for more rows before it starts (latency traded for larger
batches; 0, the default, is purely adaptive).

Merging needs the handler module's optional ``predict_batch(inputs, model) -> list``: one predict on
the concatenated rows, one prediction per input. A module without it (archives packed before it
existed) gets one ``predict_fn`` per request, in the same queue. If a merged predict raises, each
member is predicted again on its own, so only the request that breaks the model fails. Every
member's answer is serialised with its own ``Accept``. A batch never mixes versions: the batcher
belongs to one version, so the rollout and rollback guarantee (each request answered wholly by the
version it took when it started) is unchanged.

A request alone on its worker (no other request started and unanswered there, as uvicorn counts them:
:func:`conveyor.serving.protocol.requests_in_flight`), of at most ``INLINE_MAX_ROWS`` rows, for a version
whose recent one-request predicts took at most ``INLINE_MAX_MS``, is predicted on the event loop
itself: nothing could share its batch, and the two thread hand-offs (about 0.4 ms of a one-row
request on 2 cores, ``bench/endpoint.py``) are saved. Anything else, and every slow model, goes to a
thread as above, so the loop is never held longer than that bound.

Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

logger = logging.getLogger("conveyor.serving")

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_BATCH_WAIT_MS = 0.0
INLINE_MAX_ROWS = 16  # a request alone on an idle worker may be predicted on the loop up to this many rows
INLINE_MAX_MS = 10.0  # ... when the version's recent one-request predicts took at most this long
SMOOTHING = 0.2  # weight of the newest one-request predict time in the running average


def row_count(data: Any) -> int:
    """The rows of a parsed request (``len`` of a frame or list; 1 for anything without a length).

    :param data: what the parser returned.
    """
    try:
        return max(1, len(data))
    except TypeError:
        return 1


@dataclass
class Pending:
    """One parsed request waiting for its predict.

    :param data: the parsed request.
    :param accept: its ``Accept`` header (each answer is serialised as its request asked).
    :param rows: its row count.
    :param future: resolved with ``(body, media)`` or the exception of this request alone (None: predicted inline).
    """

    data: Any
    accept: str | None
    rows: int
    future: asyncio.Future | None = field(repr=False)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What a batcher did: predict calls, requests and rows answered, the largest batch, requests predicted inline."""

    predicts: int = 0
    requests: int = 0
    rows: int = 0
    largest: int = 0
    inline: int = 0


class Batcher:
    """The queue of one model version in one worker: one predict at a time, merged when it can be.

    :param handlers: the model's handler module (``predict_fn``, ``output_fn``, maybe ``predict_batch``).
    :param model: what its ``model_fn`` returned.
    :param serialise: ``(prediction, accept) -> (body, media)``, the model's ``output_fn`` and media choice.
    :param max_batch_size: the most rows one merged predict takes.
    :param max_batch_wait_ms: how long a batch may wait after its oldest request for more rows.
    :param limiter: bounds the predicts this worker runs at once (all versions together).
    :param alone: whether the request asking is the only one its worker has in flight (None: never inline).
    """

    def __init__(
        self,
        handlers: Any,
        model: Any,
        serialise: Callable[[Any, str | None], tuple[bytes | str, str]],
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS,
        limiter: anyio.CapacityLimiter | None = None,
        alone: Callable[[], bool] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_batch_wait_ms < 0:
            raise ValueError(f"max_batch_wait_ms must be at least 0, got {max_batch_wait_ms}")
        self.handlers, self.model, self.serialise = handlers, model, serialise
        self.max_rows = max_batch_size
        self.max_wait_s = max_batch_wait_ms / 1000.0
        self.limiter = limiter
        self.alone = alone
        self.single_ms: float | None = None  # running average of one-request predicts of at most INLINE_MAX_ROWS
        batch = getattr(handlers, "predict_batch", None)
        self.predict_batch: Callable[[list[Any], Any], list[Any]] | None = batch if callable(batch) else None
        self.stats = BatchStats()
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._running = False
        self._full = asyncio.Event()

    async def submit(self, data: Any, accept: str | None) -> tuple[bytes | str, str]:
        """Queue one parsed request; its serialised answer (body, media) once its batch ran.

        :param data: the parsed request.
        :param accept: its ``Accept`` header.
        :raises Exception: what predicting or serialising this request raised.
        """
        rows = row_count(data)
        if self._may_inline(rows):
            self.stats.inline += 1
            [result] = self._run([Pending(data, accept, rows, None)])
            if isinstance(result, BaseException):
                raise result
            return result
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        pending = Pending(data, accept, rows, future)
        self._queue.append(pending)
        self._queued_rows += pending.rows
        if self._queued_rows >= self.max_rows:
            self._full.set()
        if not self._running:
            self._running = True
            loop.create_task(self._drain())
        return await future

    def _may_inline(self, rows: int) -> bool:
        """Whether a request is predicted on the loop: small, its version idle and quick, its worker otherwise idle.

        :param rows: the request's rows.
        """
        return (
            rows <= INLINE_MAX_ROWS
            and not self._running
            and not self._queue
            and self.single_ms is not None
            and self.single_ms <= INLINE_MAX_MS
            and self.alone is not None
            and self.alone()
        )

    async def _drain(self) -> None:
        """Run batches until the queue is empty (one task per version while it has work)."""
        try:
            while self._queue:
                await self._gather()
                batch = self._take()
                try:
                    results = await anyio.to_thread.run_sync(self._run, batch, limiter=self.limiter)
                except Exception as error:  # noqa: BLE001 - every member is answered, the queue goes on
                    results = [error] * len(batch)
                except BaseException:  # cancelled (the worker stops): the members are told, then it stops
                    _resolve(batch, [RuntimeError("the worker is stopping")] * len(batch))
                    raise
                _resolve(batch, results)
        finally:
            self._running = False

    async def _gather(self) -> None:
        """With ``max_batch_wait_ms``: wait until the oldest request has waited that long or the rows fill a batch."""
        if self.max_wait_s <= 0 or self._queued_rows >= self.max_rows:
            return
        remaining = self._queue[0].queued_at + self.max_wait_s - time.monotonic()
        if remaining > 0:
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), remaining)
            except TimeoutError:
                pass

    def _take(self) -> list[Pending]:
        """The next batch: queued requests, oldest first, up to ``max_rows`` rows (at least one request)."""
        batch = [self._queue.popleft()]
        rows = batch[0].rows
        while self._queue and rows + self._queue[0].rows <= self.max_rows:
            rows += self._queue[0].rows
            batch.append(self._queue.popleft())
        self._queued_rows -= rows
        if self._queued_rows < self.max_rows:
            self._full.clear()
        return batch

    def _run(self, batch: list[Pending]) -> list[Any]:
        """Predict and serialise a batch (blocking; in a worker thread): per member a (body, media) or an error.

        :param batch: the requests.
        """
        started = time.perf_counter()
        predictions = self._predict([member.data for member in batch])
        if len(batch) == 1 and batch[0].rows <= INLINE_MAX_ROWS:
            took = (time.perf_counter() - started) * 1000
            self.single_ms = took if self.single_ms is None else self.single_ms + SMOOTHING * (took - self.single_ms)
        out: list[Any] = []
        for member, prediction in zip(batch, predictions, strict=True):
            if isinstance(prediction, BaseException):
                out.append(prediction)
                continue
            try:
                out.append(self.serialise(prediction, member.accept))
            except Exception as error:  # noqa: BLE001 - one member's accept fails only that member
                out.append(error)
        return out

    def _predict(self, inputs: list[Any]) -> list[Any]:
        """One merged predict when the handlers can merge, else (or when it fails) one predict per input.

        :param inputs: the parsed requests.
        """
        self.stats.requests += len(inputs)
        self.stats.rows += sum(row_count(data) for data in inputs)
        self.stats.largest = max(self.stats.largest, len(inputs))
        if self.predict_batch is not None and len(inputs) > 1:
            self.stats.predicts += 1
            try:
                predictions = self.predict_batch(inputs, self.model)
                if len(predictions) != len(inputs):
                    raise ValueError(f"predict_batch returned {len(predictions)} predictions for {len(inputs)} inputs")
                return list(predictions)
            except Exception:  # noqa: BLE001 - retried member by member so only the bad one fails
                logger.info("a merged predict of %d requests failed; predicting them one by one", len(inputs))
        out: list[Any] = []
        for data in inputs:
            self.stats.predicts += 1
            try:
                out.append(self.handlers.predict_fn(data, self.model))
            except Exception as error:  # noqa: BLE001 - the member's own failure, answered to it alone
                out.append(error)
        return out


def _resolve(batch: list[Pending], results: list[Any]) -> None:
    """Hand each member its result or its error (members whose client went away are skipped).

    :param batch: the requests.
    :param results: one (body, media) or exception per request.
    """
    for member, result in zip(batch, results, strict=True):
        if member.future is None or member.future.done():
            continue
        if isinstance(result, BaseException):
            member.future.set_exception(result)
        else:
            member.future.set_result(result)
