"""The endpoint's state folder (control.json, heartbeats, waiting for workers) and the model
server's request handling, driven in-process through FastAPI's TestClient with a tiny handler
module (no AutoGluon): the real-process tests are in tests/integration/test_model_server.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conveyor.serving import endpoint_state as es
from conveyor.serving.app import DEFAULT_MAX_BODY_BYTES, create_app, invocation_path
from conveyor.serving.auth import endpoint_credentials
from helpers import wait_until

AUTH_ENV = ("CONVEYOR_ENDPOINT_ACCESS_KEY_ID", "CONVEYOR_ENDPOINT_SECRET_ACCESS_KEY", "CONVEYOR_ENDPOINT_TOKEN")


def client_for(app, **kwargs) -> TestClient:
    """A TestClient that sends the endpoint's bearer token (``create_app`` generated the credentials)."""
    return TestClient(app, headers={"Authorization": f"Bearer {endpoint_credentials().token}"}, **kwargs)


HANDLERS = '''
import json

class UnsupportedContentType(ValueError):
    """Not a content type this model reads."""

class RequestTooLarge(ValueError):
    """More values than this model takes at once."""

def model_fn(model_dir):
    meta = json.load(open(model_dir + "/metadata.json"))
    if meta.get("fail"):
        raise RuntimeError(meta["fail"])
    return meta

def input_fn(body, content_type):
    if content_type == "application/octet-stream":
        return [float(len(body))]
    if content_type == "application/json":
        values = json.loads(body)  # a bare json.loads: RecursionError on deep nesting
        if len(values) > 5:
            raise RequestTooLarge(f"application/json: {len(values)} values, more than the limit of 5")
        return [float(v) for v in values]
    if content_type != "text/csv":
        raise UnsupportedContentType(f"content type {content_type!r} is not supported: send text/csv")
    text = body.decode() if isinstance(body, bytes) else body
    try:
        return [float(value) for value in text.strip().split(",")]
    except ValueError:
        raise ValueError(f"text/csv: not a list of numbers: {text!r}") from None

def predict_fn(data, model):
    if data == [13.0]:
        raise KeyError("thirteen")
    return [value * model["factor"] for value in data]

def output_fn(prediction, accept):
    if accept not in (None, "", "*/*", "application/json"):
        raise UnsupportedContentType(f"accept {accept!r} is not supported")
    return json.dumps({"predictions": prediction})
'''


CANDIDATE = {"Content-Type": "text/csv", "X-Conveyor-Target": "candidate"}


def make_model(root: Path, factor: float = 2, fail: str | None = None) -> Path:
    """An extracted model folder with the tiny handlers: predictions are the values times ``factor``."""
    (root / "code").mkdir(parents=True)
    (root / "code" / "inference.py").write_text(HANDLERS)
    metadata = {
        "trainer": "tiny",
        "problem_type": "regression",
        "label": "y",
        "features": [{"name": "x", "dtype": "float64"}],
        "factor": factor,
    }
    if fail:
        metadata["fail"] = fail
    (root / "metadata.json").write_text(json.dumps(metadata))
    return root


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A private state folder; the capture and limit variables unset."""
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    for name in (
        "CONVEYOR_CAPTURE_DIR",
        "CONVEYOR_CAPTURE_SHARE",
        "CONVEYOR_MAX_BODY_BYTES",
        "CONVEYOR_ENDPOINT",
        *AUTH_ENV,
    ):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "state"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


# ----------------------------------------------------------------------------------- control


def test_control_transitions_are_atomic_and_serialised(state, tmp_path):
    v1, v2 = make_model(tmp_path / "v1"), make_model(tmp_path / "v2")
    assert es.read_control("ep") == {"live": None, "candidate": None, "serial": 0}

    staged = es.stage_candidate("ep", "v1", v1)
    assert staged == {"live": None, "candidate": {"version": "v1", "model_dir": str(v1)}, "serial": 1}
    assert es.read_control("ep") == staged
    promoted = es.promote_candidate("ep")
    assert promoted == {"live": {"version": "v1", "model_dir": str(v1)}, "candidate": None, "serial": 2}
    with pytest.raises(es.EndpointError, match="no candidate to promote"):
        es.promote_candidate("ep")

    assert es.drop_candidate("ep")["serial"] == 2  # nothing staged: unchanged
    es.stage_candidate("ep", "v2", v2)
    dropped = es.drop_candidate("ep")
    assert dropped == {"live": {"version": "v1", "model_dir": str(v1)}, "candidate": None, "serial": 4}
    assert sorted(p.name for p in es.endpoint_dir("ep").iterdir()) == [".control.lock", "control.json"]  # no temp files

    with pytest.raises(es.EndpointError, match="no code/inference.py"):
        es.stage_candidate("ep", "v3", tmp_path)


def test_bad_control_documents_and_names_are_refused(state):
    with pytest.raises(ValueError, match='"live" must be null'):
        es.write_control("ep", {"live": {"version": "v1"}, "candidate": None, "serial": 1})
    with pytest.raises(ValueError, match='"serial"'):
        es.write_control("ep", {"live": None, "candidate": None, "serial": -1})
    es.control_path("ep").parent.mkdir(parents=True)
    es.control_path("ep").write_text("[1, 2]")
    with pytest.raises(es.EndpointError, match="not a valid control document"):
        es.read_control("ep")
    for name in ("../escape", "", "a b", "x" * 64):
        with pytest.raises(ValueError, match="endpoint name"):
            es.endpoint_dir(name)


# ----------------------------------------------------------------------------------- workers


def heartbeat(pid: int, live: str | None = "v1", candidate: str | None = None, error: dict | None = None) -> None:
    ref = lambda version: {"version": version, "model_dir": f"/m/{version}"} if version else None  # noqa: E731
    es.write_json_atomic(
        es.heartbeat_path("ep", pid),
        {
            "pid": pid,
            "live": ref(live),
            "candidate": ref(candidate),
            "loaded_at": None,
            "error": error,
        },
    )


def test_worker_states_lists_running_workers_only(state):
    gone = dead_pid()
    heartbeat(os.getpid())
    heartbeat(gone)
    assert [s["pid"] for s in es.worker_states("ep")] == [os.getpid()]
    assert not es.heartbeat_path("ep", gone).exists()  # a dead worker's file is removed


def test_wait_for_workers_returns_when_loaded_and_raises_on_failure_or_timeout(state):
    heartbeat(os.getpid(), live="v1", candidate="v2")
    assert [s["pid"] for s in es.wait_for_workers("ep", "v2", timeout=2)] == [os.getpid()]

    heartbeat(
        os.getpid(),
        live="v1",
        candidate=None,
        error={"version": "v3", "model_dir": "/m/v3", "message": "RuntimeError: no predictor"},
    )
    match = "v3 failed to load on 1 of 1 worker.*RuntimeError: no predictor"
    with pytest.raises(es.RolloutFailed, match=match) as failed:
        es.wait_for_workers("ep", "v3", timeout=5)
    assert failed.value.errors == {os.getpid(): "RuntimeError: no predictor"}

    started = time.monotonic()
    match = r"v4 not loaded by 1 worker\(s\) within 0.3s: worker \d+: live=v1 candidate=None"
    with pytest.raises(es.RolloutFailed, match=match):
        es.wait_for_workers("ep", "v4", timeout=0.3)
    assert time.monotonic() - started < 5


# ----------------------------------------------------------------------------------- the app


def test_app_loads_promotes_and_routes_to_the_candidate(state, tmp_path):
    v1, v2 = make_model(tmp_path / "v1", factor=2), make_model(tmp_path / "v2", factor=3)
    with client_for(create_app("ep", poll_interval=0.02)) as client:
        assert client.get("/ping").status_code == 503
        answer = client.post("/invocations", content=b"1", headers={"Content-Type": "text/csv"})
        assert answer.status_code == 503 and "no live model" in answer.json()["error"]

        es.stage_candidate("ep", "v1", v1)
        es.promote_candidate("ep")
        wait_until(lambda: client.get("/ping").status_code == 200, what="v1 live")
        answer = client.post("/invocations", content=b"1,2", headers={"Content-Type": "text/csv"})
        assert answer.json() == {"predictions": [2.0, 4.0]}
        assert answer.headers["X-Conveyor-Model-Version"] == "v1"
        assert answer.headers["content-type"] == "application/json"
        same = client.post("/endpoints/ep/invocations", content=b"1,2", headers={"Content-Type": "text/csv"})
        assert same.json() == answer.json()
        other = client.post("/endpoints/other/invocations", content=b"1", headers={"Content-Type": "text/csv"})
        assert other.status_code == 404 and "'other' is not served here" in other.json()["error"]
        smoke = client.post("/invocations", content=b"1", headers=CANDIDATE)
        assert smoke.status_code == 409 and "no candidate" in smoke.json()["error"]

        es.stage_candidate("ep", "v2", v2)
        es.wait_for_workers("ep", "v2", timeout=10)
        smoke = client.post("/invocations", content=b"1", headers=CANDIDATE)
        assert (smoke.json(), smoke.headers["X-Conveyor-Model-Version"]) == ({"predictions": [3.0]}, "v2")
        live = client.post("/invocations", content=b"1", headers={"Content-Type": "text/csv"})
        assert (live.json(), live.headers["X-Conveyor-Model-Version"]) == ({"predictions": [2.0]}, "v1")

        es.promote_candidate("ep")
        wait_until(lambda: client.get("/ping").headers.get("X-Conveyor-Model-Version") == "v2", what="v2 live")
        live = client.post("/invocations", content=b"1", headers={"Content-Type": "text/csv"})
        assert (live.json(), live.headers["X-Conveyor-Model-Version"]) == ({"predictions": [3.0]}, "v2")
        [worker] = es.worker_states("ep")
        assert (worker["live"]["version"], worker["candidate"], worker["error"]) == ("v2", None, None)
    assert es.worker_states("ep") == []  # the heartbeat goes with the worker


def test_loaded_models_are_frozen_out_of_the_collector_and_a_dropped_one_is_still_freed(state, tmp_path):
    import gc
    import weakref

    v1, v2 = make_model(tmp_path / "v1", factor=2), make_model(tmp_path / "v2", factor=3)
    es.stage_candidate("ep", "v1", v1)
    es.promote_candidate("ep")
    app = create_app("ep", poll_interval=0.02)
    try:
        with client_for(app) as client:
            assert gc.get_freeze_count() > 0  # the load froze what was alive
            old = weakref.ref(app.state.worker.live.loaded.handlers.predict_fn)  # in a cycle with its module's globals
            client.post("/invocations", content=b"1", headers={"Content-Type": "text/csv"})  # v1's batcher too
            es.stage_candidate("ep", "v2", v2)
            es.promote_candidate("ep")
            wait_until(lambda: client.get("/ping").headers.get("X-Conveyor-Model-Version") == "v2", what="v2 live")
            wait_until(lambda: old() is None, what="v1 collected though it was frozen")
            wait_until(lambda: gc.get_freeze_count() > 0, what="v2 frozen again after the collection")
    finally:
        gc.unfreeze()


def test_a_broken_candidate_is_reported_and_dropped(state, tmp_path):
    v1 = make_model(tmp_path / "v1")
    broken = make_model(tmp_path / "broken", fail="predictor files are missing")
    es.stage_candidate("ep", "v1", v1)
    es.promote_candidate("ep")
    with client_for(create_app("ep", poll_interval=0.02)) as client:
        assert client.get("/ping").status_code == 200  # loaded at startup, before serving
        es.stage_candidate("ep", "v-broken", broken)
        with pytest.raises(es.RolloutFailed, match="RuntimeError: predictor files are missing"):
            es.wait_for_workers("ep", "v-broken", timeout=10)
        assert (
            client.post(
                "/invocations", content=b"1", headers={"Content-Type": "text/csv", "X-Conveyor-Target": "candidate"}
            ).status_code
            == 409
        )
        es.drop_candidate("ep")
        wait_until(lambda: es.worker_states("ep")[0]["error"] is None, what="error cleared")
        answer = client.post("/invocations", content=b"5", headers={"Content-Type": "text/csv"})
        assert (answer.status_code, answer.headers["X-Conveyor-Model-Version"]) == (200, "v1")


def test_bad_requests_get_4xx_and_the_worker_keeps_serving(state, tmp_path, monkeypatch):
    es.stage_candidate("ep", "v1", make_model(tmp_path / "v1"))
    es.promote_candidate("ep")
    monkeypatch.setenv("CONVEYOR_MAX_BODY_BYTES", "100")
    csv = {"Content-Type": "text/csv"}
    with client_for(create_app("ep"), raise_server_exceptions=False) as client:
        big = client.post("/invocations", content=b"1," * 60, headers=csv)
        assert big.status_code == 413 and "120 bytes is larger than the limit of 100" in big.json()["error"]
        chunked = client.post("/invocations", content=iter([b"1," * 30] * 3), headers=csv)  # no Content-Length
        assert chunked.status_code == 413 and "larger than the limit of 100 bytes" in chunked.json()["error"]
        unsupported = client.post("/invocations", content=b"1", headers={"Content-Type": "text/plain"})
        assert unsupported.status_code == 415 and "'text/plain' is not supported" in unsupported.json()["error"]
        accept = client.post("/invocations", content=b"1", headers={**csv, "Accept": "image/png"})
        assert accept.status_code == 415
        malformed = client.post("/invocations", content=b"1,x", headers=csv)
        message = "text/csv: not a list of numbers: '1,x'"
        assert malformed.status_code == 400 and malformed.json() == {"error": message, "message": message}
        assert malformed.headers["x-amzn-ErrorType"] == "ValidationError"
        crash = client.post("/invocations", content=b"13", headers=csv)
        assert crash.status_code == 500 and "KeyError" in crash.json()["error"]
        assert crash.headers["x-amzn-ErrorType"] == "ModelError" and crash.json()["OriginalStatusCode"] == 500
        target = client.post("/invocations", content=b"1", headers={**csv, "X-Conveyor-Target": "blue"})
        assert target.status_code == 400
        good = client.post("/invocations", content=b"21", headers=csv)
        assert (good.status_code, good.json()) == (200, {"predictions": [42.0]})


def test_limits_auth_and_the_error_shape_in_process(state, tmp_path, monkeypatch):
    es.stage_candidate("ep", "v1", make_model(tmp_path / "v1"))
    es.promote_candidate("ep")
    monkeypatch.setenv("CONVEYOR_MAX_HEADER_BYTES", "4096")
    json_type = {"Content-Type": "application/json"}
    with client_for(create_app("ep")) as client:
        deep = client.post("/invocations", content=b"[" * 100_000 + b"]" * 100_000, headers=json_type)
        assert (
            deep.status_code == 400
            and deep.json()["message"] == "the request nests arrays or objects too deeply to parse"
        )
        many = client.post("/invocations", content=b"[1, 2, 3, 4, 5, 6]", headers=json_type)
        assert many.status_code == 413 and "more than the limit of 5" in many.json()["message"]
        assert client.post("/invocations", content=b"[1, 2]", headers=json_type).json() == {"predictions": [2.0, 4.0]}
        head = client.post("/invocations", content=b"1", headers={"Content-Type": "text/csv", "X-Pad": "a" * 5000})
        assert head.status_code == 431 and "larger than the limit of 4096 bytes" in head.json()["message"]
        missing = client.get("/nothing-here")
        assert (missing.status_code, missing.headers["x-amzn-ErrorType"]) == (404, "ValidationError")
        assert missing.json()["message"] == "Not Found"
        for path in ("/invocations", "/endpoints/ep/invocations"):
            wrong = client.get(path)
            assert (wrong.status_code, wrong.headers["Allow"], wrong.headers["x-amzn-ErrorType"]) == (
                405,
                "POST",
                "ValidationError",
            )
            assert wrong.json()["message"] == f"GET is not allowed on {path}: invocations are POST"
        assert client.post("/endpoints/ep/invocations", content=b"[1]", headers=json_type).status_code == 200
        other = client.post("/endpoints/other/invocations", content=b"[1]", headers=json_type)
        assert other.status_code == 404 and "'other' is not served here" in other.json()["message"]
        assert client.post("/invocations/", content=b"[1]", headers=json_type).status_code == 404
        anonymous = client.post("/invocations", content=b"1", headers={"Authorization": ""})
        assert anonymous.status_code == 401 and "WWW-Authenticate" in anonymous.headers
        assert client.get("/ping", headers={"Authorization": ""}).status_code == 200
        assert client.get("/openapi.json").status_code == 404  # no route list for anonymous callers


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/invocations", (True, None)),
        ("/endpoints/churn/invocations", (True, "churn")),
        ("/endpoints//invocations", (False, None)),
        ("/endpoints/a/b/invocations", (False, None)),
        ("/invocations/", (False, None)),
        ("/ping", (False, None)),
    ],
)
def test_invocation_paths_are_recognised_exactly(path, expected):
    assert invocation_path(path) == expected


def test_the_default_body_limit_is_six_mib(state, tmp_path):
    es.stage_candidate("ep", "v1", make_model(tmp_path / "v1"))
    es.promote_candidate("ep")
    with client_for(create_app("ep")) as client:
        over = client.post(
            "/invocations", content=b"1" * (DEFAULT_MAX_BODY_BYTES + 1), headers={"Content-Type": "text/csv"}
        )
        assert over.status_code == 413 and str(6 * 1024 * 1024) in over.json()["error"]
        at = client.post(
            "/invocations", content=b"1" * DEFAULT_MAX_BODY_BYTES, headers={"Content-Type": "application/octet-stream"}
        )
        assert at.json() == {"predictions": [2.0 * DEFAULT_MAX_BODY_BYTES]}


def test_data_capture_appends_a_sampled_share(state, tmp_path, monkeypatch):
    es.stage_candidate("ep", "v1", make_model(tmp_path / "v1"))
    es.promote_candidate("ep")
    capture = tmp_path / "capture"
    monkeypatch.setenv("CONVEYOR_CAPTURE_DIR", str(capture))
    monkeypatch.setenv("CONVEYOR_CAPTURE_SHARE", "1")
    with client_for(create_app("ep")) as client:
        client.post("/invocations", content=b"1,2", headers={"Content-Type": "text/csv"})
        client.post("/invocations", content=b"\xff\x00", headers={"Content-Type": "application/octet-stream"})
        client.post("/invocations", content=b"1,x", headers={"Content-Type": "text/csv"})  # a 400 is not captured
    [day] = capture.iterdir()
    assert day.name == dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")  # (a run at midnight UTC may flake)
    lines = [json.loads(line) for line in (day / f"{os.getpid()}.jsonl").read_text().splitlines()]
    assert [(r["version"], r["request"]["content_type"], r["request"]["body"]) for r in lines] == [
        ("v1", "text/csv", {"encoding": "text", "data": "1,2"}),
        ("v1", "application/octet-stream", {"encoding": "base64", "data": "/wA="}),
    ]
    assert lines[0]["response"] == {
        "content_type": "application/json",
        "body": {"encoding": "text", "data": '{"predictions": [2.0, 4.0]}'},
    }
    assert lines[0]["endpoint"] == "ep" and lines[0]["timestamp"]

    monkeypatch.setenv("CONVEYOR_CAPTURE_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("CONVEYOR_CAPTURE_SHARE", "0")
    with client_for(create_app("ep")) as client:
        assert client.post("/invocations", content=b"1", headers={"Content-Type": "text/csv"}).status_code == 200
    assert not (tmp_path / "none").exists()


def test_create_app_refuses_bad_settings(state, monkeypatch):
    with pytest.raises(ValueError, match="no endpoint name"):
        create_app()
    monkeypatch.setenv("CONVEYOR_ENDPOINT", "ep")
    monkeypatch.setenv("CONVEYOR_CAPTURE_SHARE", "1.5")
    with pytest.raises(ValueError, match="CONVEYOR_CAPTURE_SHARE='1.5' must be between 0 and 1"):
        create_app()
    monkeypatch.delenv("CONVEYOR_CAPTURE_SHARE")
    monkeypatch.setenv("CONVEYOR_MAX_BODY_BYTES", "lots")
    with pytest.raises(ValueError, match="CONVEYOR_MAX_BODY_BYTES='lots' is not a number"):
        create_app()


def test_endpoint_errors_are_conveyor_errors_that_a_retry_may_clear():
    from conveyor.errors import ConveyorError, TransientError
    from conveyor.serving.smoke import SmokeTestFailed

    assert issubclass(es.EndpointError, TransientError) and es.EndpointError.retryable
    assert issubclass(es.RolloutFailed, es.EndpointError)
    assert issubclass(SmokeTestFailed, ConveyorError) and not SmokeTestFailed.retryable  # the rollout is rolled back
