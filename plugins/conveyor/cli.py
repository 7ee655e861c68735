"""Conveyor's command line: ``python -m conveyor.cli demo`` runs the demo pipeline end to end.

The demo drops generated churn data into the landing zone, then runs the pipeline's DAGs (ingest,
then train: evaluate, gate, register, approve) with
``airflow dags test`` (real Airflow, SQLite metadata DB, deferrable sensors run inline), and
prints where everything it made is.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conveyor import settings

TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(\S+)")
RUN_DONE = re.compile(r"DagRun Finished: dag_id=(\S+?),.*state=(\w+)")


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run_dag(dag_id: str, log_dir: Path, conf: str | None = None) -> str:
    """Run one DAG with ``airflow dags test``; its log goes to a file, progress to the screen.

    :param dag_id: the DAG to run.
    :param log_dir: where the full log is written.
    :param conf: a JSON run configuration, when given.
    :return: the run's final state.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{dag_id}-{int(time.time())}.log"
    command = [str(Path(sys.executable).parent / "airflow"), "dags", "test", dag_id]
    if conf:
        command += ["--conf", conf]
    say(f"Running {dag_id} (airflow dags test; full log: {log_path})")
    state = "unknown"
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if match := TASK_END.search(line):
                print(f"    task {match.group(1)} done ({time.monotonic() - started:.0f}s)", flush=True)
            elif match := RUN_DONE.search(line):
                state = match.group(2)
    if proc.returncode != 0 or state != "success":
        tail = log_path.read_text().splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{dag_id} ended in state {state!r} (exit {proc.returncode}); full log: {log_path}")
    return state


def next_drop_name(pipeline: str) -> str:
    """The first ``demo-NNNN`` drop name not used yet in the pipeline's landing zone."""
    from conveyor.lake import Lake

    landing = Lake.from_env().landing(pipeline)
    n = 1
    while (landing / f"demo-{n:04d}").exists():
        n += 1
    return f"demo-{n:04d}"


def demo(rows: int, time_limit: int) -> None:
    import json

    from conveyor.datasets import latest_version, load_manifest
    from conveyor.demo import write_drop
    from conveyor.hooks.mlflow_registry import MlflowRegistryHook
    from conveyor.lake import Lake, read_json

    lake = Lake.from_env()
    drop = next_drop_name("churn")
    say(f"Writing {rows} rows of generated churn data as drop {drop} into {lake.uri('landing', 'churn')}")
    write_drop(rows, drop)
    run_dag("churn__ingest", settings.state_dir() / "logs")
    version = latest_version(lake, "churn")
    if version is None:
        raise SystemExit("The ingest run succeeded but published no dataset version")
    manifest = load_manifest(lake, "churn", version)
    validated = read_json(lake.raw("churn", version) / "validation.json")
    print(f"    dataset version : {version} ({manifest['rows']} rows, {manifest['bytes']} bytes)")
    print(f"    data docs       : {validated['report']}")

    say(f"Training on {version} with AutoGluon ({time_limit}s budget), then evaluate, gate, register, approve")
    run_dag("churn__train", settings.state_dir() / "logs", conf=json.dumps({"time_limit": time_limit}))
    hook = MlflowRegistryHook()
    champion = hook.champion("churn")
    if champion is None:
        raise SystemExit("The train run succeeded but no model is champion: see the gate report")
    run_id = champion.tags.get("conveyor_run_id", "")
    reports = lake.reports("churn", run_id)
    metrics = read_json(reports / "evaluation" / "metrics.json")
    shown = {k: round(metrics[k], 4) for k in ("roc_auc", "accuracy", "balanced_accuracy", "f1") if k in metrics}
    say("Done.")
    print(f"    registered model: churn version {champion.version} ({champion.tags.get('approval_status')}, alias champion)")
    print(f"    test metrics    : {shown}")
    print(f"    evaluation      : {reports / 'evaluation' / 'index.html'}")
    print(f"    gate            : {reports / 'gate' / 'index.html'}")
    print(f"    model artifact  : {champion.source}")
    print(f"    MLflow store    : {hook.tracking_uri}  (browse: .venv/bin/mlflow ui --backend-store-uri {hook.tracking_uri})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo", help="run the demo pipeline on the embedded default")
    demo_cmd.add_argument("--rows", type=int, default=5000, help="rows of demo data to generate")
    demo_cmd.add_argument("--time-limit", type=int, default=60, help="training budget in seconds")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.rows, args.time_limit)


if __name__ == "__main__":
    main()
