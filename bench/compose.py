"""Benchmark: the docker compose stack, as `make test-compose` builds and starts it (scripts/compose-test.sh).

In one run, on this machine (the stand-in images of docker-compose.test.yaml, no registry):

* ``base_images_s`` / ``conveyor_image_s``: the image builds of this run (``scripts/build-base-images.sh``, then
  ``docker-compose build``); cached when the daemon's data folder (``~/.cache/conveyor/compose/docker``) holds the
  layers, cold after ``scripts/stack-docker.sh`` starts on an empty one (``--cold`` empties it first);
* ``up_to_healthy_s``: ``up -d`` on fresh volumes until every service is healthy and every one-shot exited 0;
* ``idle_memory_mib``: the containers' memory (``docker stats``) summed, 30 s after all-healthy, nothing running;
* ``chain_celery_s``: the churn chain on Celery driven through the REST API: a drop in the S3 lake, ``churn__ingest``
  triggered, ``churn__train`` and ``churn__deploy`` started by their Assets, ``churn__batch_predict`` triggered as the
  deploy ends; from the first trigger to the end of the batch run;
* baseline ``chain_dags_test_s``: the same four DAGs, paused, run one after the other by ``airflow dags test`` in the
  worker container (same images, lake, registry and warehouse; no scheduler, no Celery);
* ``ratio`` = chain_celery_s / chain_dags_test_s.

``--quick``: 800 training rows, a 10 s budget, 300 rows to score (the default: 5,000 rows, 30 s, 2,000 rows).
Needs root (its own dockerd). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "stack"))
sys.path.insert(0, str(ROOT / "plugins"))

RUN_S = 900


def outside(args: argparse.Namespace) -> int:
    """Build and start the engine (scripts/compose-test.sh), then run this script inside its network namespace."""
    if args.cold:
        cache = Path(os.environ.get("CONVEYOR_STACK_CACHE", Path.home() / ".cache" / "conveyor" / "compose"))
        shutil.rmtree(cache / "docker", ignore_errors=True)
    inner = f"{sys.executable} {Path(__file__).resolve()} --inside" + (" --quick" if args.quick else "")
    env = dict(os.environ, CONVEYOR_STACK_COMMAND=inner)
    return subprocess.run([str(ROOT / "scripts" / "compose-test.sh")], env=env).returncode


def idle_memory_mib() -> float:
    """The containers' memory use summed (``docker stats --no-stream``), in MiB."""
    units = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "kB": 1 / 1024, "MB": 1, "GB": 1024}
    said = subprocess.run(
        ["docker", "stats", "--no-stream", "--format", "{{.MemUsage}}"], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    total = 0.0
    for line in filter(None, said):
        used = line.split("/")[0].strip()
        number = used.rstrip("BKMGiak")
        total += float(number) * units[used[len(number) :]]
    return round(total, 1)


def celery_chain(stack, rows: int, score_rows: int) -> float:
    """The chain through the REST API (Assets start train and deploy); seconds from the first trigger."""
    from test_stack import churn

    api = stack.api
    for dag_id in ("churn__ingest", "churn__train", "churn__deploy", "churn__batch_predict"):
        api.unpause(dag_id)
    stack.write_drop("bench-celery", churn(rows, seed=7))
    stack.write_drop("bench-celery-batch", churn(score_rows, seed=9, label=False), "inference", fmt="parquet")
    started = time.monotonic()
    ingest = api.trigger("churn__ingest")
    api.wait_run("churn__ingest", ingest["dag_run_id"], RUN_S)
    train = api.wait_new_run("churn__train", set(), RUN_S)
    api.wait_run("churn__train", train["dag_run_id"], RUN_S)
    deploy = api.wait_new_run("churn__deploy", set(), RUN_S)
    api.wait_run("churn__deploy", deploy["dag_run_id"], RUN_S)
    batch = api.trigger("churn__batch_predict", {"input": "", "model": "champion"})
    api.wait_run("churn__batch_predict", batch["dag_run_id"], RUN_S)
    return time.monotonic() - started


def dags_test_chain(stack, rows: int, score_rows: int) -> float:
    """The same DAGs, paused, by ``airflow dags test`` in the worker container; seconds in all."""
    from test_stack import churn

    api = stack.api
    for dag_id in ("churn__ingest", "churn__train", "churn__deploy", "churn__batch_predict"):
        api.call("PATCH", f"/dags/{dag_id}", json={"is_paused": True})
    stack.write_drop("bench-dags-test", churn(rows, seed=8))
    stack.write_drop("bench-dags-test-batch", churn(score_rows, seed=10, label=False), "inference", fmt="parquet")
    started = time.monotonic()
    for dag_id, conf in (
        ("churn__ingest", {}),
        ("churn__train", {}),
        ("churn__deploy", {}),
        ("churn__batch_predict", {"input": "", "model": "champion"}),
    ):
        stack.exec("airflow-worker", "airflow", "dags", "test", dag_id, "--conf", json.dumps(conf))
    return time.monotonic() - started


def inside(args: argparse.Namespace) -> dict:
    from compose_stack import ComposeStack

    rows, score_rows, budget = (800, 300, 10) if args.quick else (5000, 2000, 30)
    root = Path(os.environ.get("CONVEYOR_STACK_ROOT", ROOT / ".state" / "compose-test"))
    times = json.loads((root / "times.json").read_text()) if (root / "times.json").exists() else {}
    stack = ComposeStack(root, project="conveyor-stack-bench", time_limit=budget).prepare()
    stack.compose("down", "-v", "--remove-orphans", check=False)
    try:
        started = time.monotonic()
        stack.compose("up", "-d")
        stack.wait_healthy(RUN_S)
        up_s = time.monotonic() - started
        time.sleep(30)
        memory = idle_memory_mib()
        celery_s = celery_chain(stack, rows, score_rows)
        dags_test_s = dags_test_chain(stack, rows, score_rows)
    finally:
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
    return {
        "bench": "compose",
        **times,
        "up_to_healthy_s": round(up_s, 1),
        "idle_memory_mib": memory,
        "chain_celery_s": round(celery_s, 1),
        "baseline": "airflow dags test, same chain, same containers",
        "chain_dags_test_s": round(dags_test_s, 1),
        "ratio": round(celery_s / dags_test_s, 2),
        "load": os.getloadavg()[0],
        "quick": args.quick,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and budget")
    parser.add_argument("--cold", action="store_true", help="empty the image cache first (a cold build)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:
        return outside(args)
    result = inside(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
