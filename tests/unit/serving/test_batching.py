"""Adaptive micro-batching of the model server (serving/batching.py), driven with small handler modules
(no AutoGluon): merging under concurrency, the row bound, the adaptive start, error isolation, the
fallback for handlers without ``predict_batch``, one batcher per version, and the spec fields that set
it. The real server and the real churn model are in tests/integration/test_model_server.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

from conveyor.errors import SpecError
from conveyor.serving.batching import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCH_WAIT_MS,
    INLINE_MAX_MS,
    INLINE_MAX_ROWS,
    Batcher,
)
from conveyor.spec import load_spec

PIPELINES = Path(__file__).resolve().parents[3] / "include" / "pipelines"


class Handlers:
    """A handler module: rows are lists of numbers, the prediction of a row is its value times 2.

    ``predict_fn`` takes a little time (so requests queue behind a running predict) and refuses the
    value 13; ``predict_batch`` concatenates, predicts once and splits, recording each call.
    """

    def __init__(self, batch: bool = True, seconds: float = 0.02):
        self.seconds = seconds
        self.predict_calls: list[int] = []  # rows per predict_fn call
        self.batch_calls: list[int] = []  # requests per predict_batch call
        self.lock = threading.Lock()
        if batch:
            self.predict_batch = self._predict_batch

    def predict_fn(self, data: list[float], model: dict) -> list[float]:
        with self.lock:
            self.predict_calls.append(len(data))
        time.sleep(self.seconds)
        if 13.0 in data:
            raise ValueError("thirteen is not a value this model takes")
        return [value * model["factor"] for value in data]

    def _predict_batch(self, inputs: list[list[float]], model: dict) -> list[list[float]]:
        with self.lock:
            self.batch_calls.append(len(inputs))
        merged = self.predict_fn([value for data in inputs for value in data], model)
        out, start = [], 0
        for data in inputs:
            out.append(merged[start : start + len(data)])
            start += len(data)
        return out


def serialise(prediction: list[float], accept: str | None) -> tuple[str, str]:
    if accept not in (None, "application/json"):
        raise ValueError(f"accept {accept!r} is not supported")
    return json.dumps({"predictions": prediction}), "application/json"


async def submit_all(batcher: Batcher, requests: list[list[float]], accepts: list[str | None] | None = None) -> list:
    """Every request submitted at once; each one's answer or exception, in order."""
    accepts = accepts or [None] * len(requests)
    return await asyncio.gather(
        *(batcher.submit(data, accept) for data, accept in zip(requests, accepts, strict=True)), return_exceptions=True
    )


def test_concurrent_requests_share_predicts_and_each_gets_its_own_rows():
    handlers = Handlers()
    batcher = Batcher(handlers, {"factor": 2}, serialise, max_batch_size=64)
    requests = [[float(i) + 100, float(i) + 100.5] for i in range(24)]
    answers = asyncio.run(submit_all(batcher, requests))
    assert [json.loads(body)["predictions"] for body, _ in answers] == [[2.0 * a, 2.0 * b] for a, b in requests]
    calls = len(handlers.predict_calls)
    assert calls < len(requests)  # merged: fewer predicts than requests
    assert handlers.batch_calls and max(handlers.batch_calls) > 1
    assert batcher.stats.requests == 24 and batcher.stats.rows == 48 and batcher.stats.predicts == calls


def test_an_idle_batcher_starts_at_once_and_a_batch_takes_what_queued_up_to_the_row_limit():
    handlers = Handlers()
    batcher = Batcher(handlers, {"factor": 2}, serialise, max_batch_size=5)

    async def scenario() -> list:
        first = asyncio.ensure_future(batcher.submit([1.0], None))
        await asyncio.sleep(0.005)  # the first request's predict is running now
        rest = [batcher.submit([float(i)], None) for i in range(2, 14 + 2) if i != 13]
        big = batcher.submit([1.0] * 9, None)  # larger than the limit: predicted alone, never split
        return await asyncio.gather(first, *rest, big)

    answers = asyncio.run(scenario())
    assert len(answers) == 15 and all(isinstance(answer, tuple) for answer in answers)
    assert handlers.predict_calls[0] == 1  # the first request did not wait for the others
    assert all(rows <= 5 for rows in handlers.predict_calls[:-1])
    assert handlers.predict_calls[-1] == 9  # the big one, alone
    assert max(handlers.predict_calls[:-1]) == 5  # a full batch of queued requests


def test_max_batch_wait_ms_holds_an_idle_batch_for_more_rows_until_it_is_full():
    handlers = Handlers()
    # the second request fills the batch, which then starts without waiting out the rest of the second
    batcher = Batcher(handlers, {"factor": 2}, serialise, max_batch_size=2, max_batch_wait_ms=1000)

    async def scenario() -> list:
        first = asyncio.ensure_future(batcher.submit([1.0], None))
        await asyncio.sleep(0.01)
        return await asyncio.gather(first, batcher.submit([2.0], None))

    asyncio.run(scenario())
    assert handlers.batch_calls == [2] and handlers.predict_calls == [2]


def test_a_bad_member_fails_alone_and_the_others_get_their_answers():
    handlers = Handlers()
    batcher = Batcher(handlers, {"factor": 2}, serialise)
    requests = [[1.0], [2.0], [13.0], [4.0], [5.0]]
    accepts: list[str | None] = [None, None, None, "text/plain", None]

    async def scenario() -> list:
        blocker = asyncio.ensure_future(batcher.submit([0.0], None))  # the others queue behind it, then merge
        await asyncio.sleep(0.005)
        return [await blocker, *(await submit_all(batcher, requests, accepts))]

    answers = asyncio.run(scenario())[1:]
    assert isinstance(answers[2], ValueError) and "thirteen" in str(answers[2])
    assert isinstance(answers[3], ValueError) and "text/plain" in str(answers[3])  # its own accept
    assert [json.loads(answers[i][0])["predictions"] for i in (0, 1, 4)] == [[2.0], [4.0], [10.0]]
    assert 4 in handlers.batch_calls or 5 in handlers.batch_calls  # merged first, then retried one by one


def test_handlers_without_predict_batch_predict_each_request_on_its_own():
    handlers = Handlers(batch=False)
    batcher = Batcher(handlers, {"factor": 3}, serialise)
    answers = asyncio.run(submit_all(batcher, [[1.0], [2.0], [3.0]]))
    assert [json.loads(body)["predictions"] for body, _ in answers] == [[3.0], [6.0], [9.0]]
    assert handlers.predict_calls == [1, 1, 1]


class ThreadRecorder(Handlers):
    """Handlers that record the thread each predict_fn runs on."""

    def __init__(self, seconds: float = 0.0):
        super().__init__(batch=True, seconds=seconds)
        self.threads: list[int] = []

    def predict_fn(self, data: list[float], model: dict) -> list[float]:
        self.threads.append(threading.get_ident())
        return super().predict_fn(data, model)


def test_a_request_alone_on_an_idle_worker_is_predicted_on_the_loop_once_the_model_is_known_quick():
    handlers = ThreadRecorder()
    alone = [True]
    batcher = Batcher(handlers, {"factor": 2}, serialise, alone=lambda: alone[0])

    async def scenario() -> tuple[int, list]:
        loop_thread = threading.get_ident()
        answers = [await batcher.submit([float(i)], None) for i in range(3)]  # the first one times the model
        alone[0] = False
        answers.append(await batcher.submit([5.0], None))  # another request in flight: a thread
        alone[0] = True
        answers.append(await batcher.submit([1.0] * (INLINE_MAX_ROWS + 1), None))  # too many rows: a thread
        try:
            await batcher.submit([13.0], None)
        except ValueError as error:  # its own error, raised to it alone
            answers.append(error)
        return loop_thread, answers

    loop_thread, answers = asyncio.run(scenario())
    assert [json.loads(body)["predictions"] for body, _ in answers[:4]] == [[0.0], [2.0], [4.0], [10.0]]
    assert isinstance(answers[5], ValueError) and "thirteen" in str(answers[5])
    on_loop = [thread == loop_thread for thread in handlers.threads]
    assert on_loop == [False, True, True, False, False, True]
    assert batcher.stats.inline == 3 and batcher.stats.requests == 6
    assert batcher.single_ms is not None and batcher.single_ms < INLINE_MAX_MS


def test_a_slow_model_or_an_unknown_worker_never_holds_the_loop():
    slow = ThreadRecorder(seconds=(INLINE_MAX_MS + 10) / 1000)
    unknown = ThreadRecorder()

    async def scenario() -> int:
        for handlers, alone in ((slow, lambda: True), (unknown, None)):
            batcher = Batcher(handlers, {"factor": 2}, serialise, alone=alone)
            for value in (1.0, 2.0, 3.0):
                await batcher.submit([value], None)
            assert batcher.stats.inline == 0
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert loop_thread not in slow.threads + unknown.threads


def test_requests_in_flight_are_uvicorns_request_tasks(monkeypatch):
    from conveyor.serving import protocol

    monkeypatch.setattr(protocol, "_server_state", None)
    assert protocol.requests_in_flight() is None  # no connection through the protocol (e.g. a TestClient)
    state = types.SimpleNamespace(tasks={object(), object()})
    monkeypatch.setattr(protocol, "_server_state", state)
    assert protocol.requests_in_flight() == 2


def test_a_batcher_refuses_bad_bounds():
    with pytest.raises(ValueError, match="max_batch_size must be at least 1"):
        Batcher(Handlers(), {}, serialise, max_batch_size=0)
    with pytest.raises(ValueError, match="max_batch_wait_ms must be at least 0"):
        Batcher(Handlers(), {}, serialise, max_batch_wait_ms=-1)


def test_each_version_has_its_own_batcher():
    from conveyor.serving.app import ModelWorker
    from conveyor.serving.models import ServedModel

    def served(version: str) -> ServedModel:
        loaded = types.SimpleNamespace(handlers=Handlers(), model={"factor": 2})
        return ServedModel(version=version, model_dir=f"/models/{version}", loaded=loaded, loaded_at="now")

    worker = ModelWorker("ep", max_batch_size=8, max_batch_wait_ms=3)
    live, candidate = served("v1"), served("v2")
    assert worker.batcher(live) is worker.batcher(live)
    assert worker.batcher(live) is not worker.batcher(candidate)
    assert (worker.batcher(live).max_rows, worker.batcher(live).max_wait_s) == (8, 0.003)


# ------------------------------------------------------------------------------------ the spec


def write_spec(tmp_path: Path, endpoint: dict) -> Path:
    document = yaml.safe_load((PIPELINES / "churn.yaml").read_text())
    document.setdefault("deploy", {}).setdefault("endpoint", {}).update(endpoint)
    path = tmp_path / "churn.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_spec_batching_fields_default_and_load(tmp_path):
    spec = load_spec(write_spec(tmp_path, {}))
    assert (spec.deploy.endpoint.max_batch_size, spec.deploy.endpoint.max_batch_wait_ms) == (
        DEFAULT_MAX_BATCH_SIZE,
        DEFAULT_MAX_BATCH_WAIT_MS,
    )
    spec = load_spec(write_spec(tmp_path, {"max_batch_size": 16, "max_batch_wait_ms": 2.5}))
    assert (spec.deploy.endpoint.max_batch_size, spec.deploy.endpoint.max_batch_wait_ms) == (16, 2.5)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 100_000),
        ("max_batch_size", "many"),
        ("max_batch_wait_ms", -1),
        ("max_batch_wait_ms", 5000),
    ],
)
def test_bad_batching_values_are_spec_errors_naming_the_field(tmp_path, field, value):
    with pytest.raises(SpecError, match=field):
        load_spec(write_spec(tmp_path, {field: value}))


def test_server_settings_read_the_batching_variables(monkeypatch):
    from conveyor import settings

    monkeypatch.setenv("CONVEYOR_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("CONVEYOR_MAX_BATCH_WAIT_MS", "1.5")
    config = settings.server_settings()
    assert (config.max_batch_size, config.max_batch_wait_ms) == (12, 1.5)
    monkeypatch.setenv("CONVEYOR_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="CONVEYOR_MAX_BATCH_SIZE"):
        settings.server_settings()
