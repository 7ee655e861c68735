"""Benchmark: the Conveyor endpoint against the model in-process and against ``mlflow models serve``.

What is compared, in one run, with the same small churn model (AutoGluon, LightGBM + weighted
ensemble, trained here as ``tests/conftest.py``'s ``churn_model`` fixture trains it) and the same
single-row requests (rows of ``churn_frame(seed=11)``, features only):

* ours: the Conveyor endpoint (``process.ensure_endpoint`` with 2 uvicorn workers, the model staged
  with ``stage_candidate``, loaded by every worker, then ``promote_candidate``), sent one-row
  ``text/csv`` bodies (feature values in training order, no header) on ``POST /invocations``
  with the endpoint's bearer token (every request is authenticated), answered in JSON;
* MLflow: the same extracted model wrapped in an MLflow pyfunc (a ``PythonModel`` whose
  ``load_context`` loads it with ``LoadedModel`` and whose ``predict`` returns
  ``predict_frame``; signature inferred from the features, so MLflow checks the schema as ours
  checks it), served by ``mlflow models serve --env-manager local --workers 2`` (uvicorn), sent
  the same rows as ``{"dataframe_split": {"columns": [...], "data": [[...]]}}``;
* in-process: ``LoadedModel.predict_frame`` on the same one-row frames (the model's own predict:
  the issue's reference), and ``LoadedModel.invoke`` on the same CSV bodies (``input_fn``,
  ``predict_fn``, ``output_fn``: the handler path a server runs, without HTTP).

Load, bounded in count and time (every block also stops after ``--level-timeout`` seconds):

* concurrency 1: ``--requests`` rounds (600; 150 with ``--quick``), each timing, one after the other,
  ``predict_frame`` on row i, ``invoke`` on its CSV body, and one request with row i to each server
  on a kept-alive connection (servers in alternating order), so the machine's load drift falls on
  every path alike; the overhead target compares p50s taken this way;
* concurrency 8 and 32: ``--requests`` requests per server in ``--blocks`` blocks (4; 2 with
  ``--quick``) run in ABBA order; a block splits its requests over that many client threads, each on
  its own new keep-alive connection (``httpx.Client``), so each block draws a new spread of
  connections over the two workers. Requests/s = requests / summed block time; latencies pooled.

The bench's own objects are frozen out of its garbage collector before timing (``gc.freeze``: a full
collection of this process, which holds a model too, paused every client thread for about 200 ms, in
either server's block). Before timing, the in-process paths and both servers must agree on 20 rows (same prediction,
probabilities within 1e-9). Also reported: the servers' CPU time per request (all their processes)
and the busiest process's share of it per block (0.5: both workers equally busy), the client's CPU
time, ``GET /ping`` at concurrency 1 (the HTTP round trip without model work), server start-up time
and memory, and ``predict_frame`` on 1, 8 and 32 rows in one call.

Figures: ``overhead_ms`` = ours p50 minus in-process ``predict_frame`` p50 at concurrency 1 (target
<= 2 ms); ``throughput_ratio`` = ours requests/s / MLflow's at each concurrency (targets >= 1.5 at 8,
>= 3 at 32); ``p99_ms_c32`` (ours no worse than MLflow's); ``ours_of_ceiling`` = ours requests/s /
the in-process ceiling (c rows predicted in one ``predict_frame`` call: c / its time); ``ratio``
(the headline) is the throughput ratio at concurrency 8. Every server started here is
stopped before the bench returns, whatever happens.

Usage: ``python bench/endpoint.py [--quick] [--requests N] [--blocks N] [--model-dir DIR]
[--ours-env NAME=VALUE ...]`` (``--model-dir``: an extracted ``model.tar.gz`` of the churn model, to
skip training; ``--ours-env``: extra environment for our server only, to try a setting).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
sys.path.insert(0, str(PLUGINS))
from _common import isolate, train_model  # noqa: E402

CONCURRENCY = (1, 8, 32)
FULL_REQUESTS, QUICK_REQUESTS = 600, 150
FULL_BLOCKS, QUICK_BLOCKS = 4, 2
LEVEL_TIMEOUT_S = 90.0
WARMUP_REQUESTS = 40
PING_REQUESTS = 200
AGREEMENT_ROWS = 20
REQUEST_ROWS = 200
ENDPOINT = "bench-endpoint"
VERSION = "v-bench"
WORKERS = 2
TARGET_OVERHEAD_MS = 2.0
TARGET_THROUGHPUT = {"8": 1.5, "32": 3.0}  # ours/MLflow requests/s by concurrency (issue 14)
HEADLINE_CONCURRENCY = 8
START_TIMEOUT_S = 240.0

WRAPPER_MODULE = "conveyor_bench_pyfunc"
WRAPPER_SOURCE = '''"""MLflow pyfunc wrapper of a Conveyor model (written by bench/endpoint.py)."""
from pathlib import Path

import mlflow.pyfunc


class ConveyorPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the extracted model.tar.gz with Conveyor's LoadedModel; predict is its predict_frame."""

    def load_context(self, context):
        from conveyor.model.artifacts import LoadedModel

        self.model = LoadedModel(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params=None):
        return self.model.predict_frame(model_input)
'''


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[endpoint bench] {message}", flush=True)


# --- the model ----------------------------------------------------------------------------------


def save_mlflow_model(model_dir: Path, features: Any, target: Path, scratch: Path) -> Path:
    """Wrap the extracted model in an MLflow pyfunc saved at ``target``.

    :param model_dir: the extracted ``model.tar.gz``.
    :param features: a frame of the feature columns (for the signature).
    :param target: the MLflow model folder to write.
    :param scratch: where the wrapper module is written.
    """
    import mlflow.pyfunc
    from mlflow.models import infer_signature

    module = scratch / f"{WRAPPER_MODULE}.py"
    module.write_text(WRAPPER_SOURCE)
    sys.path.insert(0, str(scratch))
    importlib.invalidate_caches()
    wrapper = importlib.import_module(WRAPPER_MODULE).ConveyorPyfunc()  # pickled by reference to this module
    mlflow.pyfunc.save_model(
        str(target),
        python_model=wrapper,
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(module), str(PLUGINS / "conveyor")],
        signature=infer_signature(features),
        pip_requirements=["mlflow"],  # explicit: no requirement inference (it would load the model)
    )
    return target


# --- requests ------------------------------------------------------------------------------------


def csv_body(values: list[Any]) -> bytes:
    """One CSV line of feature values (no header)."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerow(values)
    return text.getvalue().encode()


def mlflow_body(columns: list[str], values: list[Any]) -> bytes:
    """MLflow's scoring format for one row."""
    return json.dumps({"dataframe_split": {"columns": columns, "data": [values]}}).encode()


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def latency_stats(latencies: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max of latencies in seconds, as ms."""
    ms = [x * 1e3 for x in latencies]
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        "max_ms": max(ms) if ms else float("nan"),
    }


class Sender:
    """One keep-alive HTTP connection to a server (an ``httpx.Client`` limited to one connection)."""

    def __init__(self, server: Any, bodies: list[bytes]):
        import httpx

        self.server, self.bodies = server, bodies
        self.client = httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self.failures: list[str] = []

    def open(self) -> None:
        """Open the connection (a GET /ping) so connecting is not timed."""
        self.client.get(f"{self.server.url}/ping")

    def send(self, index: int) -> float | None:
        """POST one body; its latency in seconds, or None when it failed."""
        import httpx

        started = time.perf_counter()
        try:
            response = self.client.post(
                self.server.invocations, content=self.bodies[index % len(self.bodies)], headers=self.server.headers
            )
        except httpx.HTTPError as error:
            self.failures.append(repr(error))
            return None
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            self.failures.append(f"{response.status_code}: {response.text[:200]}")
            return None
        return elapsed

    def close(self) -> None:
        self.client.close()


def run_block(server: Any, bodies: list[bytes], concurrency: int, total: int, timeout_s: float) -> dict[str, Any]:
    """``total`` requests from ``concurrency`` threads, each on its own new keep-alive connection.

    Returns the raw figures: latencies (s), seconds, errors, the client's and the server's CPU time,
    and the server's CPU time by process (how the load fell on its workers).

    :param server: the server.
    :param bodies: request bodies, used in turn.
    :param concurrency: client threads.
    :param total: requests in all, split evenly (also bounded by ``timeout_s``).
    :param timeout_s: stop issuing requests after this many seconds.
    """
    per_thread = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
    senders = [Sender(server, bodies) for _ in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)
    deadline: list[float] = [float("inf")]  # set once every thread is connected

    def worker(index: int) -> None:
        sender = senders[index]
        sender.open()
        barrier.wait()
        for n in range(per_thread[index]):
            if time.perf_counter() > deadline[0]:
                break
            elapsed = sender.send(index * 7919 + n)
            if elapsed is None:
                errors[index] += 1
            else:
                latencies[index].append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    try:
        for thread in threads:
            thread.start()
        barrier.wait(timeout=120)
        cpu_before = tree_cpu_seconds(server.pid)
        client_before, started = time.process_time(), time.perf_counter()
        deadline[0] = started + timeout_s
        for thread in threads:
            thread.join(timeout_s + 120)
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - client_before
        cpu_after = tree_cpu_seconds(server.pid)
    finally:
        for sender in senders:
            sender.close()
    by_process = sorted((cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after), reverse=True)
    return {
        "latencies": [x for chunk in latencies for x in chunk],
        "seconds": seconds,
        "errors": sum(errors),
        "client_cpu": client_cpu,
        "server_cpu": sum(by_process),
        "server_cpu_by_process": by_process,
        "failures": [f for sender in senders for f in sender.failures][:3],
    }


def combine(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """One level's figures from its blocks: latencies pooled, requests/s = requests / summed block time."""
    latencies = [x for block in blocks for x in block["latencies"]]
    seconds = sum(block["seconds"] for block in blocks)
    requests = len(latencies)
    shares = [
        block["server_cpu_by_process"][0] / block["server_cpu"]
        for block in blocks
        if block["server_cpu_by_process"] and block["server_cpu"] > 0
    ]
    return {
        "requests": requests,
        "errors": sum(block["errors"] for block in blocks),
        "seconds": seconds,
        "rps": requests / seconds if seconds > 0 else float("nan"),
        **latency_stats(latencies),
        "server_cpu_ms_per_request": sum(b["server_cpu"] for b in blocks) * 1e3 / max(requests, 1),
        "server_cpu_cores": sum(b["server_cpu"] for b in blocks) / seconds if seconds > 0 else float("nan"),
        "client_cpu_ms_per_request": sum(b["client_cpu"] for b in blocks) * 1e3 / max(requests, 1),
        # the busiest process's share of the server's CPU time in each block: ~0.5 = both workers busy
        "busiest_process_cpu_share": shares,
        "block_rps": [len(b["latencies"]) / b["seconds"] if b["seconds"] > 0 else float("nan") for b in blocks],
        "failures": [f for b in blocks for f in b["failures"]][:3],
    }


def sequential(
    loaded: Any, frames: list[Any], csv_bodies: list[bytes], senders: list[Sender], count: int
) -> dict[str, Any]:
    """Concurrency 1, interleaved request by request: predict_frame, the handlers, then each server.

    Each of ``count`` rounds times ``predict_frame`` on row i, ``invoke`` on its CSV body, and one
    request with row i to every server (servers in alternating order), so machine-load drift falls on
    all paths alike. A server's CPU time is read before and after (each is idle while the others work).
    """
    names = ["predict_frame", "handlers", *(sender.server.label for sender in senders)]
    latencies: dict[str, list[float]] = {name: [] for name in names}
    errors = {sender.server.label: 0 for sender in senders}
    for i in range(10):  # warm the in-process paths and the connections
        loaded.predict_frame(frames[i % len(frames)])
        loaded.invoke(csv_bodies[i % len(csv_bodies)], "text/csv")
        for sender in senders:
            sender.send(i)
    cpu_before = {sender.server.label: sum(tree_cpu_seconds(sender.server.pid).values()) for sender in senders}
    for i in range(count):
        started = time.perf_counter()
        loaded.predict_frame(frames[i % len(frames)])
        middle = time.perf_counter()
        loaded.invoke(csv_bodies[i % len(csv_bodies)], "text/csv")
        latencies["predict_frame"].append(middle - started)
        latencies["handlers"].append(time.perf_counter() - middle)
        for sender in senders if i % 2 == 0 else senders[::-1]:
            elapsed = sender.send(i)
            if elapsed is None:
                errors[sender.server.label] += 1
            else:
                latencies[sender.server.label].append(elapsed)
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {"requests": len(latencies[name]), **latency_stats(latencies[name])}
        # a closed-loop client at concurrency 1 gets 1 / mean latency requests per second
        out[name]["rps"] = len(latencies[name]) / sum(latencies[name]) if latencies[name] else float("nan")
    for sender in senders:
        label = sender.server.label
        spent = sum(tree_cpu_seconds(sender.server.pid).values()) - cpu_before[label]
        out[label].update(
            errors=errors[label],
            server_cpu_ms_per_request=spent * 1e3 / max(len(latencies[label]), 1),
            failures=sender.failures[:3],
        )
    return out


def ping_latency(server: Any, count: int) -> dict[str, float]:
    """``GET /ping`` at concurrency 1 on a keep-alive connection: the HTTP round trip with no model work."""
    import httpx

    with httpx.Client(timeout=30.0) as client:
        client.get(f"{server.url}/ping")
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            client.get(f"{server.url}/ping")
            latencies.append(time.perf_counter() - started)
    return latency_stats(latencies)


# --- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its descendants alive now, by pid."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    seconds = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            seconds[proc.pid] = times.user + times.system
    return seconds


def tree_rss_bytes(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


class OursServer:
    """The Conveyor endpoint with the model staged, loaded by every worker and promoted."""

    label = "ours"

    def __init__(self, model_dir: Path, port: int, env: dict[str, str] | None = None):
        self.model_dir, self.port, self.env = model_dir, port, env or {}
        self.pid: int | None = None
        self.url = f"http://127.0.0.1:{port}"
        self.invocations = f"{self.url}/invocations"
        self.headers = {"Content-Type": "text/csv", "Accept": "application/json"}
        self.start_seconds = 0.0

    def start(self) -> None:
        from conveyor.serving import endpoint_state, process
        from conveyor.serving.auth import ENV_TOKEN, endpoint_credentials

        started = time.perf_counter()
        status = process.ensure_endpoint(
            ENDPOINT, self.port, WORKERS, host="127.0.0.1", timeout=START_TIMEOUT_S, env=self.env
        )
        self.pid = int(status["pid"])
        self.headers["Authorization"] = f"Bearer {self.env.get(ENV_TOKEN) or endpoint_credentials().token}"
        endpoint_state.stage_candidate(ENDPOINT, VERSION, self.model_dir)
        endpoint_state.wait_for_workers(ENDPOINT, VERSION, timeout=START_TIMEOUT_S)
        endpoint_state.promote_candidate(ENDPOINT)
        deadline = time.monotonic() + 30
        while True:
            states = endpoint_state.worker_states(ENDPOINT)
            live = [s for s in states if (s.get("live") or {}).get("version") == VERSION]
            if len(live) >= WORKERS:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"ours: workers did not make {VERSION} live: {states}")
            time.sleep(0.1)
        self.start_seconds = time.perf_counter() - started

    def batch_stats(self) -> dict[str, Any]:
        """Requests and predict calls of every worker (their heartbeats): how much the batcher merged."""
        from conveyor.serving import endpoint_state

        states = endpoint_state.worker_states(ENDPOINT)
        stats = [(s.get("batches") or {}).get(VERSION) or {} for s in states]
        requests, predicts = sum(x.get("requests", 0) for x in stats), sum(x.get("predicts", 0) for x in stats)
        return {
            "requests_by_worker": [s.get("requests", 0) for s in states],
            "requests": requests,
            "predicts": predicts,
            "requests_per_predict": requests / predicts if predicts else float("nan"),
            "largest_batch": max((x.get("largest", 0) for x in stats), default=0),
        }

    def stop(self) -> None:
        from conveyor.serving import process

        process.stop_endpoint(ENDPOINT)

    def log_tail(self) -> str:
        from conveyor.serving import process

        return process._log_tail(ENDPOINT)


class MlflowServer:
    """``mlflow models serve`` of the wrapped model (uvicorn, local environment), in its own process group."""

    label = "mlflow"

    def __init__(self, model_path: Path, port: int, log: Path):
        self.model_path, self.port, self.log = model_path, port, log
        self.pid: int | None = None
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"
        self.invocations = f"{self.url}/invocations"
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.start_seconds = 0.0

    def start(self) -> None:
        import httpx

        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
        command = [
            str(Path(bin_dir) / "mlflow"),
            "models",
            "serve",
            "-m",
            str(self.model_path),
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--workers",
            str(WORKERS),
        ]
        started = time.perf_counter()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.process.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited ({self.process.returncode}):\n{self.log_tail()}")
            ready = self.log.read_text(errors="replace").count("Application startup complete")
            if ready >= WORKERS:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.url}/ping", timeout=2).status_code == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve not ready after {START_TIMEOUT_S:g} s:\n{self.log_tail()}")
            time.sleep(0.2)
        self.start_seconds = time.perf_counter() - started

    def stop(self) -> None:
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.process):
                time.sleep(0.1)
            if not _group_alive(self.process):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"


def _group_alive(process: subprocess.Popen) -> bool:
    """Whether any process of the group led by ``process`` still runs (the leader reaped when it exits)."""
    process.poll()
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(stat[2]) == process.pid and stat[0] not in ("Z", "X"):
            return True
    return False


# --- agreement and in-process timing ---------------------------------------------------------------


def check_agreement(
    loaded: Any, frames: list[Any], csv_bodies: list[bytes], servers: list[Any], mlflow_bodies: list[bytes]
) -> int:
    """Same prediction and probabilities (1e-9) from in-process, ours and MLflow on the first rows."""
    import httpx

    checked = 0
    for i in range(min(AGREEMENT_ROWS, len(frames))):
        reference = loaded.predict_frame(frames[i]).iloc[0]
        expected = {
            "prediction": reference["prediction"],
            **{k: float(v) for k, v in reference.items() if str(k).startswith("proba_")},
        }
        answers = {}
        for server in servers:
            body = csv_bodies[i] if server.label == "ours" else mlflow_bodies[i]
            response = httpx.post(server.invocations, content=body, headers=server.headers, timeout=60)
            if response.status_code != 200:
                raise SystemExit(f"{server.label} answered {response.status_code} on row {i}: {response.text[:500]}")
            record = response.json()["predictions"][0]
            if server.label == "ours":
                answers["ours"] = {
                    "prediction": record["prediction"],
                    **{f"proba_{k}": v for k, v in record["probabilities"].items()},
                }
            else:
                answers["mlflow"] = {k: record[k] for k in expected}
        via_handlers = json.loads(loaded.invoke(csv_bodies[i], "text/csv"))["predictions"][0]
        answers["in-process handlers"] = {
            "prediction": via_handlers["prediction"],
            **{f"proba_{k}": v for k, v in via_handlers["probabilities"].items()},
        }
        for side, answer in answers.items():
            same = answer["prediction"] == expected["prediction"] and all(
                abs(float(answer[k]) - expected[k]) <= 1e-9 for k in expected if k != "prediction"
            )
            if not same:
                raise SystemExit(f"row {i}: {side} answered {answer}, in-process predict_frame {expected}")
        checked += 1
    return checked


def time_batched_predict(
    loaded: Any, features: Any, sizes: tuple[int, ...] = (1, 8, 32), repeats: int = 30
) -> dict[str, float]:
    """Median ms of one ``predict_frame`` call on n rows: what serving n waiting requests in one call would cost."""
    import statistics

    out = {}
    for n in sizes:
        frame = features.iloc[:n].reset_index(drop=True)
        loaded.predict_frame(frame)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loaded.predict_frame(frame)
            times.append(time.perf_counter() - t0)
        out[str(n)] = statistics.median(times) * 1e3
    return out


# --- the run -------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REQUESTS} requests per server and level in {QUICK_BLOCKS} blocks"
    )
    parser.add_argument("--requests", type=int, default=None, help="requests per server and level")
    parser.add_argument("--blocks", type=int, default=None, help="interleaved blocks per level (concurrency > 1)")
    parser.add_argument("--level-timeout", type=float, default=LEVEL_TIMEOUT_S, help="seconds per block at most")
    parser.add_argument("--model-dir", type=Path, default=None, help="an extracted churn model.tar.gz (skip training)")
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for our server only (e.g. CONVEYOR_INFERENCE_CONCURRENCY=2, "
        "OMP_NUM_THREADS=1); repeatable",
    )
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison and return the figures (the JSON line)."""
    total = args.requests or (QUICK_REQUESTS if args.quick else FULL_REQUESTS)
    blocks = args.blocks or (QUICK_BLOCKS if args.quick else FULL_BLOCKS)
    ours_env = dict(item.split("=", 1) for item in args.ours_env)
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-endpoint-") as tmp_name:
        tmp = Path(tmp_name)
        isolate(tmp, mlflow=True)
        if args.model_dir is not None:
            model_dir = args.model_dir.resolve()
            progress(f"using the model at {model_dir}")
        else:
            progress("training the churn model (AutoGluon GBM, 20 s budget, as the churn_model fixture)")
            started = time.perf_counter()
            model_dir = train_model(tmp / "train")
            progress(f"trained and packed in {time.perf_counter() - started:.1f} s")
        from conveyor.demo import churn_frame
        from conveyor.model.artifacts import LoadedModel

        started = time.perf_counter()
        loaded = LoadedModel(model_dir)
        load_seconds = time.perf_counter() - started
        features = loaded.feature_names
        table = churn_frame(REQUEST_ROWS, seed=11)[features]
        frames = [table.iloc[[i]].reset_index(drop=True) for i in range(len(table))]
        values = [
            [row[name].item() if hasattr(row[name], "item") else row[name] for name in features]
            for _, row in table.iterrows()
        ]
        csv_bodies = [csv_body(v) for v in values]
        mlflow_bodies = [mlflow_body(features, v) for v in values]
        progress(f"model loaded in-process in {load_seconds:.2f} s; {len(features)} features; e.g. {csv_bodies[0]!r}")

        progress("saving the MLflow pyfunc wrapper")
        mlflow_path = save_mlflow_model(model_dir, table, tmp / "mlflow-model", tmp)
        ours = OursServer(model_dir, free_port(), ours_env)
        theirs = MlflowServer(mlflow_path, free_port(), tmp / "mlflow-serve.log")
        servers = [ours, theirs]
        bodies = {"ours": csv_bodies, "mlflow": mlflow_bodies}
        levels: dict[str, dict[str, Any]] = {"ours": {}, "mlflow": {}}
        try:
            for server in servers:
                progress(
                    f"starting {server.label} on {server.url} with {WORKERS} workers"
                    + (f" (env {ours_env})" if server is ours and ours_env else "")
                )
                try:
                    server.start()
                except Exception:
                    progress(f"{server.label} failed to start; log tail:\n{server.log_tail()}")
                    raise
                progress(
                    f"{server.label} serving after {server.start_seconds:.1f} s; "
                    f"RSS of its processes {tree_rss_bytes(server.pid) / 2**20:.0f} MiB"
                )
            checked = check_agreement(loaded, frames, csv_bodies, servers, mlflow_bodies)
            progress(f"in-process predict_frame, in-process handlers, ours and MLflow agree on {checked} rows")
            for server in servers:  # warm every worker
                run_block(server, bodies[server.label], 4, WARMUP_REQUESTS, 60)
            ping = {server.label: ping_latency(server, PING_REQUESTS) for server in servers}
            progress("GET /ping c=1 p50: " + ", ".join(f"{k} {v['p50_ms']:.2f} ms" for k, v in ping.items()))
            # This process holds a model too: its full collections paused all 32 client threads for ~200 ms at once,
            # a stall in whichever server's block it hit. Frozen, the clients measure the servers, not their own GC.
            gc.collect()
            gc.freeze()

            progress(f"concurrency 1: {total} rounds of predict_frame, handlers, ours, MLflow, request by request")
            senders = [Sender(server, bodies[server.label]) for server in servers]
            try:
                for sender in senders:
                    sender.open()
                seq = sequential(loaded, frames, csv_bodies, senders, total)
            finally:
                for sender in senders:
                    sender.close()
            for name, result in seq.items():
                progress(
                    f"c= 1 {name:13s}: p50 {result['p50_ms']:7.2f} ms, p99 {result['p99_ms']:7.2f} ms, "
                    f"{result['rps']:6.1f} req/s"
                    + (
                        f", server CPU {result['server_cpu_ms_per_request']:.1f} ms/req"
                        if "server_cpu_ms_per_request" in result
                        else ""
                    )
                )
            for server in servers:
                levels[server.label]["1"] = seq[server.label]
            for concurrency in CONCURRENCY:
                if concurrency == 1:
                    continue
                raw: dict[str, list[dict[str, Any]]] = {server.label: [] for server in servers}
                for block in range(blocks):
                    order = servers if block % 4 in (0, 3) else servers[::-1]  # ABBA: drift falls on both alike
                    for server in order:
                        raw[server.label].append(
                            run_block(
                                server,
                                bodies[server.label],
                                concurrency,
                                max(concurrency, total // blocks),
                                args.level_timeout,
                            )
                        )
                for server in servers:
                    result = levels[server.label][str(concurrency)] = combine(raw[server.label])
                    progress(
                        f"c={concurrency:2d} {server.label:13s}: {result['rps']:6.1f} req/s, p50 {result['p50_ms']:7.2f} ms, "  # noqa: E501
                        f"p99 {result['p99_ms']:7.2f} ms, {result['requests']} ok, {result['errors']} errors; "
                        f"server CPU {result['server_cpu_ms_per_request']:.1f} ms/req, "
                        f"{result['server_cpu_cores']:.2f} cores; busiest process's CPU share by block "
                        f"{[round(x, 2) for x in result['busiest_process_cpu_share']]}; "
                        f"block req/s {[round(x, 1) for x in result['block_rps']]}"
                    )
            batched = time_batched_predict(loaded, table)
            progress(
                "in-process predict_frame of n rows in one call, median ms: "
                + ", ".join(f"{n}: {ms:.1f}" for n, ms in batched.items())
            )
            rss = {server.label: tree_rss_bytes(server.pid) for server in servers}
            time.sleep(2.5)  # one more heartbeat of every worker
            batching = ours.batch_stats()
            progress(f"ours batching (heartbeats): {batching}")
        finally:
            for server in servers:
                with contextlib.suppress(Exception):
                    server.stop()
            progress("servers stopped")
        starts = {server.label: server.start_seconds for server in servers}

    throughput = {c: levels["ours"][c]["rps"] / levels["mlflow"][c]["rps"] for c in levels["ours"]}
    overhead = seq["ours"]["p50_ms"] - seq["predict_frame"]["p50_ms"]
    errors = sum(level.get("errors", 0) for server in levels.values() for level in server.values())
    # the ceiling: the in-process predict of the same c rows in one call, c requests answered per call
    ceiling_rps = {c: int(c) * 1e3 / batched[c] for c in batched if c in levels["ours"]}
    of_ceiling = {c: levels["ours"][c]["rps"] / ceiling_rps[c] for c in ceiling_rps}
    p99_32 = {label: levels[label]["32"]["p99_ms"] for label in levels if "32" in levels[label]}
    p99_ok = bool(p99_32) and p99_32["ours"] <= p99_32["mlflow"]
    figures = {
        "ratio": throughput[str(HEADLINE_CONCURRENCY)],
        "ratio_is": f"ours req/s / mlflow req/s at concurrency {HEADLINE_CONCURRENCY}",
        "throughput_ratio": throughput,
        "overhead_ms": overhead,
        "overhead_over_handlers_ms": seq["ours"]["p50_ms"] - seq["handlers"]["p50_ms"],
        "p99_ms_c32": p99_32,
        "ours_batching": batching,
        # load-independent: MLflow's server CPU per request / ours (the machine is shared)
        "server_cpu_per_request_ratio": {
            c: levels["mlflow"][c]["server_cpu_ms_per_request"] / levels["ours"][c]["server_cpu_ms_per_request"]
            for c in levels["ours"]
            if levels["ours"][c].get("server_cpu_ms_per_request")
        },
        "in_process_batched_ceiling_rps": ceiling_rps,
        "ours_of_ceiling": of_ceiling,
        "mlflow_overhead_ms": seq["mlflow"]["p50_ms"] - seq["predict_frame"]["p50_ms"],
        "ours": levels["ours"],
        "mlflow": levels["mlflow"],
        "in_process_predict_frame": seq["predict_frame"],
        "in_process_handlers": seq["handlers"],
        "in_process_predict_n_rows_ms": batched,
        "ping_ms": ping,
        "errors": errors,
        "requests_per_level": total,
        "blocks": blocks,
        "workers": WORKERS,
        "ours_env": ours_env,
        "agreement_rows": checked,
        "server_start_seconds": starts,
        "server_rss_bytes": rss,
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    return {
        "bench": "endpoint",
        "baseline": "mlflow models serve (uvicorn, 2 workers) of the same model; in-process predict_frame",
        **figures,
        "targets": {
            "overhead_ms": f"<= {TARGET_OVERHEAD_MS:g}",
            **{f"throughput_ratio_c{c}": f">= {t:g}" for c, t in TARGET_THROUGHPUT.items()},
            "p99_ms_c32": "ours <= mlflow",
            "errors": "== 0",
        },
        "met": {
            "overhead_ms": overhead <= TARGET_OVERHEAD_MS,
            **{f"throughput_ratio_c{c}": throughput.get(c, 0.0) >= t for c, t in TARGET_THROUGHPUT.items()},
            "p99_ms_c32": p99_ok,
            "errors": errors == 0,
        },
    }


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args())), flush=True)
