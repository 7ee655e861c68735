"""Benchmark: where ``make demo``'s wall time goes, from a fresh clone to "Done".

It clones this repository into a scratch folder and runs ``make demo`` there, with its own state
folder, its own virtual environment and an empty uv cache (what a new user has), then reads:

* **install**: ``<venv>/.conveyor-install.json`` (the tool, uv or pip, and its seconds);
* **start-up**: ``.state/demo-timings.json`` (Airflow's services healthy and the DAGs parsed);
* **each DAG run**: the same file (the demo's clock, from waiting for the run to its end) and the
  metadata DB (``.state/airflow/airflow.db``: every task instance's ``end_date - start_date``);
* ``outside_tasks_share``: the part of the demo's wall time (install excluded) not spent inside a task;
* **baseline**: the sum of every task instance's run time of the demo's runs, same run;
  ``ratio`` = demo wall (install included) / that sum; ``demo_ratio`` the same without the install.

``--quick`` reuses this checkout's ``.venv`` (no install) and copies the pipeline files with a
20 s training budget (``CONVEYOR_INCLUDE_DIR``): a few minutes instead of about ten. Airflow's
api-server, its log servers and the endpoint get free ports, so a running ``make ui`` is no
obstacle; everything the demo started is stopped at the end (``make stop``). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below Linux's ephemeral range (an ephemeral one may be handed to a client meanwhile)."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free port between 20000 and 29999")


def quick_include(clone: Path, port: int) -> Path:
    """A copy of ``include/`` whose pipelines train for 20 s and serve on a free port.

    :param clone: the scratch clone.
    :param port: the churn endpoint's port.
    """
    import yaml

    include = clone / "include-quick"
    shutil.copytree(clone / "include", include)
    for path in (include / "pipelines").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())
        spec["trainer"]["time_limit"] = 20
        if spec.get("deploy", {}).get("endpoint", {}).get("port") == 8090:
            spec["deploy"]["endpoint"]["port"] = port
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return include


def task_seconds(db: Path, run_ids: set[tuple[str, str]]) -> tuple[float, dict[str, float]]:
    """The sum of the task instances' run times of the given runs, and each run's sum.

    :param db: Airflow's SQLite metadata DB.
    :param run_ids: ``(dag_id, run_id)`` pairs.
    """
    total, per_run = 0.0, {}
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT dag_id, run_id, start_date, end_date FROM task_instance").fetchall()
    for dag_id, run_id, start, end in rows:
        if (dag_id, run_id) not in run_ids or not start or not end:
            continue
        seconds = (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()
        total += seconds
        per_run[f"{dag_id}/{run_id}"] = per_run.get(f"{dag_id}/{run_id}", 0.0) + seconds
    return total, per_run


def run_demo(clone: Path, quick: bool, demo_args: str) -> tuple[float, dict[str, str]]:
    """``make demo`` in the clone; its wall seconds and the environment it ran with.

    :param clone: the scratch clone.
    :param quick: reuse this checkout's venv and the 20 s pipelines.
    :param demo_args: extra ``conveyor.cli demo`` arguments.
    """
    api = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CONVEYOR_", "VIRTUAL_ENV"))},
        "AIRFLOW__API__PORT": str(api),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "UV_CACHE_DIR": str(clone / ".uv-cache"),  # a new user's empty cache
        "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if ".venv" not in p),
    }
    make = ["make", "demo", f"DEMO_ARGS={demo_args}"]
    if quick:
        env["CONVEYOR_INCLUDE_DIR"] = str(quick_include(clone, free_port()))
        # The clone's requirement files are newer than the venv's stamp: -o keeps make from reinstalling into it.
        make += [f"VENV={ROOT / '.venv'}", "-o", str(ROOT / ".venv" / ".conveyor-installed")]
    started = time.monotonic()
    done = subprocess.run(make, cwd=clone, env=env, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"make demo failed (exit {done.returncode}) in {clone}")
    return wall, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reuse .venv and train for 20 s")
    parser.add_argument("--demo-args", default="", help="extra arguments of conveyor.cli demo")
    parser.add_argument("--keep", action="store_true", help="keep the scratch clone")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="conveyor-bench-demo-"))
    clone = scratch / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    load_before = os.getloadavg()
    env: dict[str, str] = {}
    try:
        wall, env = run_demo(clone, args.quick, args.demo_args)
    finally:
        venv = f"VENV={ROOT / '.venv'}" if args.quick else "VENV=.venv"
        subprocess.run(["make", "stop", venv], cwd=clone, env=env or None, check=False, capture_output=True)
    installed_file = (ROOT / ".venv" if args.quick else clone / ".venv") / ".conveyor-install.json"
    install = json.loads(installed_file.read_text()) if not args.quick else {"tool": "reused", "seconds": 0.0}
    timings = json.loads((clone / ".state" / "demo-timings.json").read_text())
    runs = {(r["dag_id"], r["run_id"]) for r in timings["runs"]}
    task_total, per_run = task_seconds(clone / ".state" / "airflow" / "airflow.db", runs)
    demo_wall = wall - install["seconds"]
    result = {
        "bench": "demo",
        "baseline": "sum of the demo's task run times (metadata DB), same run",
        "ratio": round(wall / task_total, 2),
        "demo_ratio": round(demo_wall / task_total, 2),
        "wall_s": round(wall, 1),
        "install_s": install["seconds"],
        "install_tool": install["tool"],
        "startup_s": timings["startup_s"],
        "runs": [{"dag": r["dag_id"], "how": r["run_type"], "s": round(r["seconds"], 1)} for r in timings["runs"]],
        "task_sum_s": round(task_total, 1),
        "outside_tasks_share": round(1 - task_total / demo_wall, 3),
        "task_s_per_run": {k: round(v, 1) for k, v in per_run.items()},
        "quick": args.quick,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
