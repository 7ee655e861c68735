"""Conveyor's model server as it runs: real uvicorn processes (2 workers) on free 127.0.0.1 ports,
the real churn model, the SageMaker runtime client, a rollout and a rollback under continuous
traffic, and a worker killed with SIGKILL; authentication (SigV4 from boto3, bearer tokens), the
error shape boto3 parses, and the request limits (head size, body size, JSON depth). Every loop is
bounded; the server is always stopped."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from conveyor.model import artifacts
from conveyor.serving import endpoint_state as es
from conveyor.serving.auth import auth_headers, endpoint_credentials
from conveyor.serving.process import endpoint_status, ensure_endpoint, stop_endpoint
from helpers import free_port, wait_until

pytestmark = pytest.mark.slow  # trains the churn model once and runs real server processes

NAME = "churn-it"
MAX_BODY = 64 * 1024
TRAFFIC_LIMIT_S = 45.0  # hard bound of any traffic thread


def features(model_dir: Path) -> list[str]:
    return [f["name"] for f in json.loads((model_dir / "metadata.json").read_text())["features"]]


def csv_body(frame: pd.DataFrame, columns: list[str]) -> bytes:
    return frame[columns].to_csv(header=False, index=False).encode()


def live_version() -> str:
    return es.read_control(NAME)["live"]["version"]


def bearer() -> dict[str, str]:
    """The endpoint's bearer token (generated in the test state folder when the server started)."""
    return {"Authorization": f"Bearer {endpoint_credentials().token}"}


def runtime(url: str, secret: str | None = None, key_id: str | None = None):
    """A plain boto3 ``sagemaker-runtime`` client for the local endpoint (the keys as configured, or others)."""
    import boto3
    from botocore.config import Config

    credentials = endpoint_credentials()
    return boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=key_id or credentials.access_key_id,
        aws_secret_access_key=secret or credentials.secret_access_key,
        config=Config(retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def endpoint(churn_model, tmp_path_factory):
    """The churn endpoint with 2 workers: started empty (its /ping recorded), then v1 staged and promoted.

    Every live request is captured (``capture``), so tests can find the record of each inference id.
    """
    port = free_port()
    capture = tmp_path_factory.mktemp("capture")
    env = {"CONVEYOR_MAX_BODY_BYTES": str(MAX_BODY), "CONVEYOR_CAPTURE_DIR": str(capture)}
    try:
        status = ensure_endpoint(NAME, port, workers=2, timeout=120, env=env)
        ping_before = status["ping"]
        es.stage_candidate(NAME, "v1", churn_model["dir"])
        es.wait_for_workers(NAME, "v1", timeout=120)
        es.promote_candidate(NAME)
        url = status["url"]
        wait_until(lambda: all((w["live"] or {}).get("version") == "v1" for w in es.worker_states(NAME)), 30, "v1 live")
        yield {"url": url, "ping_before": ping_before, "port": port, "capture": capture}
    finally:
        stop_endpoint(NAME)


@pytest.fixture(scope="module")
def in_process(churn_model):
    return artifacts.LoadedModel(churn_model["dir"])


@pytest.fixture
def client(endpoint):
    with httpx.Client(base_url=endpoint["url"], timeout=30, headers=bearer()) as client:
        yield client


class Traffic:
    """A client thread sending single-row CSV requests back to back (no retries) until stopped.

    With ``keep_alive`` every request goes over one connection (one worker, as a pooled client);
    without, each request opens a connection, which either worker may accept. Records every
    outcome: ``(seconds since start, status or None, version or None, error or None)``.
    """

    def __init__(self, url: str, body: bytes, keep_alive: bool = False):
        self.url, self.body = url, body
        self.limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
        self.outcomes: list[tuple[float, int | None, str | None, str | None]] = []
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, limits=self.limits, headers=bearer()) as client:
            while not self.stop.is_set() and time.monotonic() - self.started < TRAFFIC_LIMIT_S:
                at = time.monotonic() - self.started
                try:
                    answer = client.post("/invocations", content=self.body, headers={"Content-Type": "text/csv"})
                    ok = answer.status_code == 200 and len(answer.json()["predictions"]) == 1
                    self.outcomes.append(
                        (
                            at,
                            answer.status_code,
                            answer.headers.get("X-Conveyor-Model-Version"),
                            None if ok else answer.text[:200],
                        )
                    )
                except httpx.HTTPError as error:
                    self.outcomes.append((at, None, None, f"{type(error).__name__}: {error}"))
                time.sleep(0.005)

    def __enter__(self) -> Traffic:
        self.thread.start()
        wait_until(lambda: len(self.outcomes) >= 5, 30, "the first answers")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    @property
    def failures(self) -> list[tuple]:
        return [o for o in self.outcomes if o[3] is not None]

    @property
    def versions(self) -> set[str]:
        return {o[2] for o in self.outcomes if o[2]}


def test_ping_then_predictions_equal_in_process(endpoint, client, churn_model, in_process):
    assert endpoint["ping_before"] == 503  # no model yet
    assert client.get("/ping").status_code == 200
    test = churn_model["test"].head(25)
    expected = in_process.predict_frame(test)

    answer = client.post(
        "/invocations",
        content=csv_body(test, in_process.feature_names),
        headers={"Content-Type": "text/csv", "Accept": "application/json"},
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    predictions = answer.json()["predictions"]
    assert [p["prediction"] for p in predictions] == expected["prediction"].tolist()
    classes = [c[len("proba_") :] for c in expected.columns if c.startswith("proba_")]
    assert classes and all(list(p["probabilities"]) == classes for p in predictions)
    for label in classes:
        got = [p["probabilities"][label] for p in predictions]
        assert got == pytest.approx(expected[f"proba_{label}"].tolist(), abs=1e-12)

    records = json.loads(test.drop(columns=["churned"]).to_json(orient="records"))
    answer = client.post("/invocations", json={"instances": records}, headers={"Accept": "text/csv"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
    frame = pd.read_csv(io.StringIO(answer.text), header=None, names=["customer_id", "prediction", "p0", "p1"])
    assert frame["customer_id"].tolist() == test["customer_id"].tolist()
    assert frame["prediction"].tolist() == expected["prediction"].tolist()


def test_sagemaker_runtime_client_invokes_the_endpoint(endpoint, churn_model, in_process):
    from botocore.exceptions import ClientError

    client = runtime(endpoint["url"])  # SigV4 with the endpoint's access key
    test = churn_model["test"].head(10)
    response = client.invoke_endpoint(
        EndpointName=NAME, ContentType="text/csv", Body=csv_body(test, in_process.feature_names)
    )
    assert response["ContentType"] == "application/json"
    assert response["InvokedProductionVariant"] == live_version()
    predictions = json.loads(response["Body"].read())["predictions"]
    assert [p["prediction"] for p in predictions] == in_process.predict_frame(test)["prediction"].tolist()
    with pytest.raises(ClientError) as refused:
        client.invoke_endpoint(EndpointName="another", ContentType="text/csv", Body=b"1")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert refused.value.response["Error"] == {
        "Code": "ValidationError",
        "Message": f"endpoint 'another' is not served here (this is endpoint '{NAME}')",
    }


def test_boto3_errors_carry_the_code_and_the_readable_message(endpoint, churn_model, in_process):
    from botocore.exceptions import ClientError

    client = runtime(endpoint["url"])
    with pytest.raises(ClientError) as malformed:
        client.invoke_endpoint(EndpointName=NAME, ContentType="text/csv", Body=b'1,"unterminated\n')
    error = malformed.value
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert error.response["Error"]["Code"] == "ValidationError"
    assert "malformed CSV" in error.response["Error"]["Message"]
    assert "(ValidationError) when calling the InvokeEndpoint operation: text/csv: malformed CSV" in str(error)
    with pytest.raises(ClientError) as unsupported:
        client.invoke_endpoint(EndpointName=NAME, ContentType="text/plain", Body=b"1")
    assert unsupported.value.response["Error"]["Code"] == "ValidationError"
    assert "'text/plain' is not supported" in str(unsupported.value)
    with pytest.raises(ClientError) as large:
        client.invoke_endpoint(EndpointName=NAME, ContentType="text/csv", Body=b"1," * MAX_BODY)
    assert large.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert f"larger than the limit of {MAX_BODY} bytes" in large.value.response["Error"]["Message"]


def test_requests_need_credentials_and_ping_stays_open(endpoint, churn_model, in_process):
    from botocore.exceptions import ClientError

    url, row = endpoint["url"], csv_body(churn_model["test"].head(1), in_process.feature_names)
    assert httpx.get(f"{url}/ping").status_code == 200  # open: load balancers and health checks
    csv = {"Content-Type": "text/csv"}
    for path, headers in (
        ("/invocations", csv),
        ("/invocations", {**csv, "X-Conveyor-Target": "candidate"}),  # the unreleased model above all
        (f"/endpoints/{NAME}/invocations", csv),
        ("/feedback", {"Content-Type": "application/json"}),
    ):
        anonymous = httpx.post(f"{url}{path}", content=row, headers=headers)
        assert anonymous.status_code == 401, path
        assert anonymous.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
        assert (
            "needs authentication" in anonymous.json()["message"] and "Bearer" in anonymous.headers["WWW-Authenticate"]
        )
    wrong = httpx.post(f"{url}/invocations", content=row, headers={**csv, "Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403 and "bearer token is not valid" in wrong.json()["message"]

    with pytest.raises(ClientError) as bad_secret:
        runtime(url, secret="a-wrong-secret-of-forty-characters-00000").invoke_endpoint(
            EndpointName=NAME, ContentType="text/csv", Body=row
        )
    assert bad_secret.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert bad_secret.value.response["Error"]["Code"] == "InvalidSignatureException"
    assert "signature does not match" in bad_secret.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as unknown:
        runtime(url, key_id="AKIDSOMEBODYELSE0001").invoke_endpoint(EndpointName=NAME, ContentType="text/csv", Body=row)
    assert unknown.value.response["Error"]["Code"] == "UnrecognizedClientException"

    signed = auth_headers("POST", f"{url}/invocations", row, csv, bearer=False)
    assert httpx.post(f"{url}/invocations", content=row, headers=signed).status_code == 200
    tampered = httpx.post(f"{url}/invocations", content=row.replace(b",", b";", 1), headers=signed)
    assert tampered.status_code == 403 and tampered.headers["x-amzn-ErrorType"] == "InvalidSignatureException"


def raw_head(port: int, header_bytes: int, chunk: int = 16 * 1024) -> tuple[bytes, int]:
    """Send a request whose one header has ``header_bytes`` bytes, in chunks; the answer and the bytes sent.

    Stops sending as soon as the server answers (or closes), so an 8 MB head shows how early it is refused.
    """
    head = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * header_bytes + b"\r\n\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.settimeout(0.05)
        try:
            while sent < len(head):
                conn.sendall(head[sent : sent + chunk])
                sent += chunk
                with contextlib.suppress(TimeoutError):
                    first = conn.recv(65536)
                    if first:
                        return first, sent
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.settimeout(10)
        try:
            return conn.recv(65536), sent
        except (ConnectionResetError, TimeoutError):
            return b"", sent


def test_request_limits_heads_bodies_and_json_depth(endpoint, client, churn_model, in_process):
    port = endpoint["port"]
    answer, _ = raw_head(port, 8 * 1024)
    assert answer.startswith(b"HTTP/1.1 200")  # an ordinary head is fine
    for size in (64 * 1024, 8 * 1024 * 1024):
        answer, sent = raw_head(port, size)
        assert answer.startswith(b"HTTP/1.1 431"), (size, answer[:200])
        assert b"larger than the limit of 16384 bytes" in answer and b"x-amzn-ErrorType: ValidationError" in answer
        assert sent < 1024 * 1024  # refused early: the server never buffered the 8 MB
    padded = client.post("/invocations", content=b"1", headers={"X-Padding": "a" * 20_000})
    assert padded.status_code == 431

    deep = b"[" * 30_000 + b"]" * 30_000  # under this endpoint's 64 KiB body limit
    nested = client.post("/invocations", content=deep, headers={"Content-Type": "application/json"})
    assert nested.status_code == 400 and "too deeply" in nested.json()["message"]
    over = client.post("/invocations", content=b"1," * MAX_BODY, headers={"Content-Type": "text/csv"})
    assert over.status_code == 413
    row = csv_body(churn_model["test"].head(1), in_process.feature_names)
    good = client.post("/invocations", content=row, headers={"Content-Type": "text/csv"})
    assert good.status_code == 200 and len(good.json()["predictions"]) == 1  # still serving


def test_bad_requests_get_4xx_and_the_server_keeps_serving(endpoint, client, churn_model, in_process):
    csv = {"Content-Type": "text/csv"}
    row = csv_body(churn_model["test"].head(1), in_process.feature_names)

    big = client.post("/invocations", content=row * (MAX_BODY // len(row) + 1), headers=csv)
    assert big.status_code == 413 and f"larger than the limit of {MAX_BODY} bytes" in big.json()["error"]
    chunked = client.post("/invocations", content=iter([row] * (MAX_BODY // len(row) + 1)), headers=csv)
    assert chunked.status_code == 413 and "larger than the limit" in chunked.json()["error"]
    unsupported = client.post("/invocations", content=row, headers={"Content-Type": "text/plain"})
    assert unsupported.status_code == 415 and "'text/plain' is not supported" in unsupported.json()["error"]
    malformed_csv = client.post("/invocations", content=b'1,"unterminated\n', headers=csv)
    assert malformed_csv.status_code == 400 and "malformed CSV" in malformed_csv.json()["error"]
    malformed_json = client.post(
        "/invocations", content=b'{"instances": [', headers={"Content-Type": "application/json"}
    )
    assert malformed_json.status_code == 400 and "application/json" in malformed_json.json()["error"]
    short = client.post("/invocations", content=b"1,2,3\n", headers=csv)
    message = short.json()["error"]
    assert short.status_code == 400 and "has 3 values" in message
    assert f"expects {len(in_process.feature_names)} features" in message
    candidate = {**csv, "X-Conveyor-Target": "candidate"}
    assert client.post("/invocations", content=row, headers=candidate).status_code == 409

    good = client.post("/invocations", content=row, headers=csv)
    assert good.status_code == 200 and len(good.json()["predictions"]) == 1


def concurrently(url: str, jobs: list[tuple[bytes, dict[str, str]]], threads: int = 16) -> list[httpx.Response]:
    """Send every (body, headers) job from ``threads`` client threads at once, each on its own connection."""
    answers: list[httpx.Response | None] = [None] * len(jobs)
    barrier = threading.Barrier(threads)

    def run(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers=bearer()) as client:
            client.get("/ping")
            barrier.wait(timeout=60)
            for index in range(offset, len(jobs), threads):
                body, headers = jobs[index]
                answers[index] = client.post("/invocations", content=body, headers=headers)

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=TRAFFIC_LIMIT_S)
    assert all(answer is not None for answer in answers), "a client thread did not finish"
    return [answer for answer in answers if answer is not None]


def batch_totals(version: str, requests: int = 0) -> dict[str, int]:
    """Every worker's batch stats of ``version`` added up, from heartbeats written after this call
    and counting at least ``requests`` of them."""
    since = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")

    def totals() -> dict[str, int] | None:
        states = es.worker_states(NAME)
        if len(states) < 2 or any(w["updated_at"] <= since for w in states):
            return None
        stats = [w.get("batches", {}).get(version) for w in states]
        summed = {k: sum(s.get(k, 0) for s in stats if s) for k in ("predicts", "requests", "rows", "inline")}
        return summed if summed["requests"] >= requests else None

    return wait_until(totals, 30, f"fresh heartbeats counting {requests} requests of {version}")


def capture_records(folder: Path) -> dict[str, dict]:
    """Captured records by inference id."""
    records = {}
    for path in folder.rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("inference_id"):
                records[record["inference_id"]] = record
    return records


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer_id_and_record(endpoint, churn_model, in_process):
    version = live_version()
    before = batch_totals(version, 0)
    test = churn_model["test"].head(48).reset_index(drop=True)
    expected = in_process.predict_frame(test)
    jobs = [
        (
            csv_body(test.iloc[[i]], in_process.feature_names),
            {"Content-Type": "text/csv", "X-Amzn-SageMaker-Inference-Id": f"merge-{i}"},
        )
        for i in range(len(test))
    ]
    answers = concurrently(endpoint["url"], jobs)
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Conveyor-Model-Version"] == version
        assert answer.headers["x-amzn-sagemaker-inference-id"] == f"merge-{i}"
        [record] = answer.json()["predictions"]
        assert record["prediction"] == expected["prediction"][i]  # the single-request answer for its row
        for label, p in record["probabilities"].items():
            assert p == pytest.approx(expected[f"proba_{label}"][i], abs=1e-9)
    after = batch_totals(version, before["requests"] + len(jobs))
    predicts, requests = after["predicts"] - before["predicts"], after["requests"] - before["requests"]
    print(f"\nmerged: {requests} requests in {predicts} predicts")
    assert requests == len(jobs) and predicts < requests
    assert all(w["requests"] > 0 for w in es.worker_states(NAME))  # the connections spread over both workers
    records = wait_until(
        lambda: (r := capture_records(endpoint["capture"])) and all(f"merge-{i}" in r for i in range(len(jobs))) and r,
        30,
        "a capture record per inference id",
    )
    for i, answer in enumerate(answers):
        record = records[f"merge-{i}"]
        assert record["version"] == version
        assert record["request"]["body"]["data"] == jobs[i][0].decode()
        assert json.loads(record["response"]["body"]["data"]) == answer.json()


def test_one_request_at_a_time_is_predicted_inline_with_the_same_answers(endpoint, churn_model, in_process):
    version = live_version()
    before = batch_totals(version, 0)
    test = churn_model["test"].head(8).reset_index(drop=True)
    expected = in_process.predict_frame(test)
    with httpx.Client(base_url=endpoint["url"], timeout=30, headers=bearer()) as client:  # one connection: one worker
        for i in range(len(test)):
            answer = client.post(
                "/invocations",
                content=csv_body(test.iloc[[i]], in_process.feature_names),
                headers={"Content-Type": "text/csv"},
            )
            assert answer.status_code == 200 and answer.headers["X-Conveyor-Model-Version"] == version
            [record] = answer.json()["predictions"]
            assert record["prediction"] == expected["prediction"][i]
            for label, p in record["probabilities"].items():
                assert p == pytest.approx(expected[f"proba_{label}"][i], abs=1e-9)
    after = batch_totals(version, before["requests"] + len(test))
    # the worker's first request of this version times the model in a thread; the rest skip the hand-off
    assert after["inline"] - before["inline"] >= len(test) - 1


def test_a_malformed_request_among_concurrent_ones_gets_400_and_the_others_200(endpoint, churn_model, in_process):
    test = churn_model["test"].head(24).reset_index(drop=True)
    expected = in_process.predict_frame(test)
    csv = {"Content-Type": "text/csv"}
    jobs = [(csv_body(test.iloc[[i]], in_process.feature_names), csv) for i in range(len(test))]
    bad = [3, 11, 17]
    for i in bad:
        values = jobs[i][0].decode().split(",")
        values[in_process.feature_names.index("tenure_months")] = "not-a-number"
        jobs[i] = (",".join(values).encode(), csv)
    answers = concurrently(endpoint["url"], jobs, threads=12)
    for i, answer in enumerate(answers):
        if i in bad:
            assert answer.status_code == 400 and "tenure_months" in answer.json()["error"]
        else:
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"][0]["prediction"] == expected["prediction"][i]


def test_live_and_candidate_requests_never_share_a_batch(endpoint, churn_model, in_process, tmp_path_factory):
    live = live_version()
    candidate = f"{live}-candidate"
    candidate_dir = artifacts.unpack(churn_model["archive"], tmp_path_factory.mktemp("isolation") / candidate)
    es.stage_candidate(NAME, candidate, candidate_dir)
    try:
        es.wait_for_workers(NAME, candidate, timeout=90)
        before = {v: batch_totals(v, 0) for v in (live, candidate)}
        test = churn_model["test"].head(32).reset_index(drop=True)
        targets = ["candidate" if i % 2 else "live" for i in range(len(test))]
        jobs = [
            (
                csv_body(test.iloc[[i]], in_process.feature_names),
                {"Content-Type": "text/csv", "X-Conveyor-Target": targets[i]},
            )
            for i in range(len(test))
        ]
        answers = concurrently(endpoint["url"], jobs)
        for target, answer in zip(targets, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Conveyor-Model-Version"] == (candidate if target == "candidate" else live)
        half = len(jobs) // 2
        for version in (live, candidate):  # each version's batches counted exactly its own requests
            after = batch_totals(version, before[version]["requests"] + half)
            assert after["requests"] - before[version]["requests"] == half
            assert after["rows"] - before[version]["rows"] == half
    finally:
        es.drop_candidate(NAME)
        wait_until(lambda: all(w["candidate"] is None for w in es.worker_states(NAME)), 30, "the candidate dropped")


def test_rollout_under_traffic_drops_no_request(endpoint, client, churn_model, in_process, tmp_path_factory):
    before = live_version()
    new = f"{before}-next"
    new_dir = artifacts.unpack(churn_model["archive"], tmp_path_factory.mktemp("rollout") / new)
    row = csv_body(churn_model["test"].head(1), in_process.feature_names)
    with Traffic(endpoint["url"], row) as traffic:  # a connection per request: both workers answer
        es.stage_candidate(NAME, new, new_dir)
        es.wait_for_workers(NAME, new, timeout=90)
        smoke = client.post(
            "/invocations", content=row, headers={"Content-Type": "text/csv", "X-Conveyor-Target": "candidate"}
        )
        assert (smoke.status_code, smoke.headers["X-Conveyor-Model-Version"]) == (200, new)
        es.promote_candidate(NAME)
        wait_until(
            lambda: all(w["live"]["version"] == new and w["candidate"] is None for w in es.worker_states(NAME)),
            30,
            "every worker swapped",
        )
        seen = len(traffic.outcomes)
        wait_until(lambda: len(traffic.outcomes) >= seen + 5, 30, "answers after the swap")
    print(f"\nrollout: {len(traffic.outcomes)} requests in {traffic.outcomes[-1][0]:.1f}s, failures {traffic.failures}")
    assert traffic.failures == []
    assert traffic.versions == {before, new}
    assert traffic.outcomes[-1][2] == new


def test_a_broken_candidate_is_rolled_back_under_traffic(endpoint, churn_model, in_process, tmp_path):
    live = live_version()
    broken = tmp_path / "broken"
    (broken / "code").mkdir(parents=True)
    shutil.copy(churn_model["dir"] / "metadata.json", broken / "metadata.json")
    (broken / "code" / "inference.py").write_text(
        "def model_fn(model_dir):\n    raise RuntimeError('model_fn failed on purpose: no predictor in ' + model_dir)\n"
    )
    row = csv_body(churn_model["test"].head(1), in_process.feature_names)
    with Traffic(endpoint["url"], row) as traffic:
        es.stage_candidate(NAME, "v-broken", broken)
        failed = "v-broken failed to load .*RuntimeError: model_fn failed on purpose"
        with pytest.raises(es.RolloutFailed, match=failed):
            es.wait_for_workers(NAME, "v-broken", timeout=60)
        es.drop_candidate(NAME)
        wait_until(
            lambda: all(w["error"] is None and w["candidate"] is None for w in es.worker_states(NAME)),
            30,
            "the candidate dropped everywhere",
        )
        seen = len(traffic.outcomes)
        wait_until(lambda: len(traffic.outcomes) >= seen + 5, 30, "answers after the rollback")
    assert traffic.failures == []
    assert traffic.versions == {live}
    assert es.read_control(NAME)["candidate"] is None


def connection_holder(pids: set[int], port: int) -> int | None:
    """The worker that holds an established connection on the server port (the keep-alive client's)."""
    import psutil

    for pid in sorted(pids):
        with contextlib.suppress(psutil.Error):
            if any(
                c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                for c in psutil.Process(pid).net_connections("tcp")
            ):
                return pid
    return None


def test_a_killed_worker_is_restarted_and_the_endpoint_keeps_answering(endpoint, churn_model, in_process):
    live = live_version()
    before = {w["pid"] for w in es.worker_states(NAME)}
    assert len(before) == 2
    row = csv_body(churn_model["test"].head(1), in_process.feature_names)
    with Traffic(endpoint["url"], row, keep_alive=True) as traffic:
        victim = connection_holder(before, endpoint["port"]) or min(before)  # the worst case: the client's worker
        killed_at = time.monotonic() - traffic.started
        os.kill(victim, signal.SIGKILL)
        states = wait_until(
            lambda: (
                (s := es.worker_states(NAME))
                and len(s) == 2
                and victim not in {w["pid"] for w in s}
                and all((w["live"] or {}).get("version") == live for w in s)
                and s
            ),
            60,
            "a replacement worker with the live model",
        )
        restarted_at = time.monotonic() - traffic.started
        seen = len(traffic.outcomes)
        wait_until(lambda: len(traffic.outcomes) >= seen + 5, 30, "answers after the restart")
    during = [o for o in traffic.outcomes if killed_at <= o[0] <= restarted_at]
    replacement = sorted({w["pid"] for w in states} - before)
    print(
        f"\nkill: worker {victim} killed at {killed_at:.2f}s, replacement {replacement} "
        f"serving at {restarted_at:.2f}s; {len(during)} requests answered meanwhile; "
        f"{len(traffic.outcomes)} requests, failures {traffic.failures}"
    )
    # The request in flight on the killed worker dies with it (SIGKILL leaves no time to answer); the client is
    # sequential, so at most one can; it shows as a dropped connection, never as an HTTP error. Its next request
    # opens a new connection, which the surviving worker accepts.
    assert len(traffic.failures) <= 1 and all(f[1] is None for f in traffic.failures)
    assert all(f[0] >= killed_at - 0.5 for f in traffic.failures)
    assert len(during) >= 1 and all(o[2] == live for o in traffic.outcomes if o[1] == 200)
    status = endpoint_status(NAME)
    assert status["running"] and status["ping"] == 200
    assert {w["pid"] for w in status["worker_states"]} == {w["pid"] for w in states}


def test_a_server_that_cannot_start_is_reported(churn_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            with pytest.raises(es.EndpointError, match=r"exited while starting(.|\n)*already in use"):
                ensure_endpoint("churn-it-taken", port, workers=2, timeout=60)
        finally:
            stop_endpoint("churn-it-taken")
    assert endpoint_status("churn-it-taken")["running"] is False
