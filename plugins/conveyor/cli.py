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
from typing import Any

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


def ingest_demo(pipeline: str, write: Any) -> str:
    """Drop generated data into a pipeline's landing zone and run its ingest DAG; returns the version."""
    from conveyor.datasets import latest_version, load_manifest
    from conveyor.lake import Lake, read_json

    lake = Lake.from_env()
    drop = next_drop_name(pipeline)
    say(f"Writing generated {pipeline} data as drop {drop} into {lake.uri('landing', pipeline)}")
    write(drop)
    run_dag(f"{pipeline}__ingest", settings.state_dir() / "logs")
    version = latest_version(lake, pipeline)
    if version is None:
        raise SystemExit(f"The {pipeline} ingest run succeeded but published no dataset version")
    manifest = load_manifest(lake, pipeline, version)
    validated = read_json(lake.raw(pipeline, version) / "validation.json")
    print(f"    dataset version : {version} ({manifest['rows']} rows, {manifest['bytes']} bytes)")
    print(f"    data docs       : {validated['report']}")
    return version


def train_demo(pipeline: str, version: str, time_limit: int, shown: tuple[str, ...]) -> None:
    """Run a pipeline's train DAG and print the registered model, its metrics and its reports."""
    import json

    from conveyor.hooks.mlflow_registry import MlflowRegistryHook
    from conveyor.lake import Lake, read_json

    say(f"Training {pipeline} on {version} ({time_limit}s budget), then evaluate, gate, register, approve")
    run_dag(f"{pipeline}__train", settings.state_dir() / "logs", conf=json.dumps({"time_limit": time_limit}))
    hook = MlflowRegistryHook()
    champion = hook.champion(pipeline)
    if champion is None:
        raise SystemExit(f"The {pipeline} train run succeeded but no model is champion: see the gate report")
    reports = Lake.from_env().reports(pipeline, champion.tags.get("conveyor_run_id", ""))
    metrics = read_json(reports / "evaluation" / "metrics.json")
    print(f"    registered model: {pipeline} version {champion.version} ({champion.tags.get('approval_status')}, "
          "alias champion)")
    print(f"    test metrics    : {({k: round(metrics[k], 4) for k in shown if k in metrics})}")
    print(f"    evaluation      : {reports / 'evaluation' / 'index.html'}")
    print(f"    gate            : {reports / 'gate' / 'index.html'}")
    print(f"    model artifact  : {champion.source}")


def deploy_demo(pipeline: str) -> None:
    """Roll the champion out to the pipeline's endpoint and answer a sample request through boto3."""
    import boto3

    from conveyor.serving.process import endpoint_status
    from conveyor.spec import get_spec
    from conveyor.splits import read_part

    run_dag(f"{pipeline}__deploy", settings.state_dir() / "logs")
    spec = get_spec(pipeline)
    name = spec.deploy.endpoint.name or pipeline
    status = endpoint_status(name)
    url = status["url"]
    from conveyor.hooks.mlflow_registry import MlflowRegistryHook
    from conveyor.lake import Lake

    champion = MlflowRegistryHook().champion(pipeline)
    sample = read_part(Lake.from_env(), pipeline, champion.tags["conveyor_run_id"], "test").head(2)
    body = sample.drop(columns=[spec.data.label]).to_csv(index=False)
    client = boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local")
    answer = client.invoke_endpoint(EndpointName=name, ContentType="text/csv", Accept="application/json", Body=body)
    print(f"    endpoint        : {name} at {url} (version {MlflowRegistryHook().live_version(pipeline, name)} live)")
    print(f"    sample answer   : {answer['Body'].read().decode()[:300]}")
    first = body.splitlines()
    print("    call it yourself: curl -s " + f"{url}/invocations -H 'Content-Type: text/csv' "
          + "--data-binary $'" + "\\n".join(first[:2]) + "'")


def batch_demo(pipeline: str, rows: int) -> None:
    """Drop unlabelled rows into the inference landing zone and score them in batch."""
    import sqlalchemy as sa

    from conveyor.demo import churn_frame
    from conveyor.lake import Lake
    from conveyor.operators.batch import warehouse_url

    lake = Lake.from_env()
    drop = next_drop_name(f"{pipeline}/inference")
    target = lake.landing(pipeline, "inference", drop)
    target.mkdir(parents=True, exist_ok=True)
    frame = churn_frame(rows, seed=1000 + int(drop.rsplit("-", 1)[-1])).drop(columns=["churned"])
    (target / "customers.parquet").write_bytes(frame.to_parquet(index=False))
    (target / "_SUCCESS").write_bytes(b"")
    say(f"Scoring {rows} new customers in batch (drop {drop} in {lake.uri('landing', pipeline, 'inference')})")
    run_dag(f"{pipeline}__batch_predict", settings.state_dir() / "logs")
    url = warehouse_url()
    with sa.create_engine(url).connect() as conn:
        counts = conn.execute(sa.text(
            f"SELECT run_id, model_version, COUNT(*) FROM {pipeline}_predictions GROUP BY run_id, model_version "
            "ORDER BY run_id DESC LIMIT 1")).fetchall()
    print(f"    warehouse       : {url}, table {pipeline}_predictions: {counts}")
    print(f"    parquet         : {lake.uri('predictions', pipeline)}/<run>/part-*.parquet")


def demo(rows: int, time_limit: int, images: bool) -> None:
    from conveyor.demo import write_drop, write_image_drop
    from conveyor.hooks.mlflow_registry import MlflowRegistryHook

    version = ingest_demo("churn", lambda drop: write_drop(rows, drop))
    train_demo("churn", version, time_limit, ("roc_auc", "accuracy", "balanced_accuracy", "f1"))
    say("Deploying the champion to the churn endpoint (smoke test, then switch)")
    deploy_demo("churn")
    batch_demo("churn", 20000)
    if images:
        version = ingest_demo("shapes", lambda drop: write_image_drop(80, drop, size=48))
        train_demo("shapes", version, 240, ("accuracy", "balanced_accuracy", "f1_macro"))
    uri = MlflowRegistryHook().tracking_uri
    say("Done.")
    print(f"    MLflow store    : {uri}  (browse: .venv/bin/mlflow ui --backend-store-uri {uri})")
    print("    Airflow UI      : make ui  (trigger runs by hand, approve models)")
    print("    the endpoint keeps running: make stop")


def stop() -> None:
    """Stop every endpoint this project's state folder knows of."""
    from conveyor.serving.process import stop_endpoint

    root = settings.state_dir() / "endpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    for name in names:
        if stop_endpoint(name):
            say(f"Stopped endpoint {name}")
    if not names:
        say("No endpoint to stop")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo", help="run the demo pipeline on the embedded default")
    demo_cmd.add_argument("--rows", type=int, default=5000, help="rows of demo data to generate")
    demo_cmd.add_argument("--time-limit", type=int, default=45, help="tabular training budget in seconds")
    demo_cmd.add_argument("--no-images", action="store_true", help="skip the image pipeline")
    sub.add_parser("stop", help="stop the endpoints the demo left running")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.rows, args.time_limit, not args.no_images)
    elif args.command == "stop":
        stop()


if __name__ == "__main__":
    main()
