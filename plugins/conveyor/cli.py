"""Conveyor's command line: ``python -m conveyor.cli demo`` runs the demo pipeline end to end.

The demo drops generated churn data into the landing zone, then runs the pipeline's DAGs (ingest,
train, deploy, batch predict, then the closed loop: drifted data and poor feedback, monitor,
retrain, deploy the new version) with
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


def show(text: str, file: Any = None) -> None:
    """Print a line of the demo's output with any URL's credentials masked (``settings.mask_url``).

    :param text: the line.
    :param file: where to (standard output when None).
    """
    print(settings.mask_url(text), file=file, flush=True)


def say(message: str) -> None:
    show(f"==> {message}")


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
    with (
        log_path.open("w") as log,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if match := TASK_END.search(line):
                show(f"    task {match.group(1)} done ({time.monotonic() - started:.0f}s)")
            elif match := RUN_DONE.search(line):
                state = match.group(2)
    if proc.returncode != 0 or state != "success":
        tail = log_path.read_text().splitlines()[-40:]
        show("\n".join(tail), file=sys.stderr)
        ended = f"{dag_id} ended in state {state!r} (exit {proc.returncode}); full log: {log_path}"
        raise SystemExit(settings.mask_url(ended))
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
    from conveyor.data.datasets import latest_version, load_manifest
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
    show(f"    dataset version : {version} ({manifest['rows']} rows, {manifest['bytes']} bytes)")
    show(f"    data docs       : {validated['report']}")
    return version


def train_demo(pipeline: str, version: str, time_limit: int, shown: tuple[str, ...]) -> None:
    """Run a pipeline's train DAG and print the registered model, its metrics and its reports."""
    import json

    from conveyor.lake import Lake, read_json
    from conveyor.registry import registry_hook
    from conveyor.spec import get_spec

    say(f"Training {pipeline} on {version} ({time_limit}s budget), then evaluate, gate, register, approve")
    run_dag(f"{pipeline}__train", settings.state_dir() / "logs", conf=json.dumps({"time_limit": time_limit}))
    champion = registry_hook(get_spec(pipeline)).champion(pipeline)
    if champion is None:
        raise SystemExit(f"The {pipeline} train run succeeded but no model is champion: see the gate report")
    reports = Lake.from_env().reports(pipeline, champion.tags.get("conveyor_run_id", ""))
    metrics = read_json(reports / "evaluation" / "metrics.json")
    show(
        f"    registered model: {pipeline} version {champion.version} ({champion.tags.get('approval_status')}, "
        "alias champion)"
    )
    show(f"    test metrics    : { ({k: round(metrics[k], 4) for k in shown if k in metrics}) }")
    show(f"    evaluation      : {reports / 'evaluation' / 'index.html'}")
    show(f"    gate            : {reports / 'gate' / 'index.html'}")
    show(f"    model artifact  : {champion.source}")


def deploy_demo(pipeline: str) -> None:
    """Roll the champion out to the pipeline's endpoint and answer a sample request through boto3."""
    import boto3

    from conveyor.data.splits import read_part
    from conveyor.serving.process import endpoint_status
    from conveyor.spec import get_spec

    run_dag(f"{pipeline}__deploy", settings.state_dir() / "logs")
    spec = get_spec(pipeline)
    name = spec.deploy.endpoint.name or pipeline
    status = endpoint_status(name)
    url = status["url"]
    from conveyor.lake import Lake
    from conveyor.registry import registry_hook

    registry = registry_hook(spec)
    champion = registry.champion(pipeline)
    sample = read_part(Lake.from_env(), pipeline, champion.tags["conveyor_run_id"], "test").head(2)
    body = sample.drop(columns=[spec.data.label]).to_csv(index=False)
    from conveyor.serving.auth import credentials_path, endpoint_credentials

    keys = endpoint_credentials()  # the endpoint's access key: a SigV4-signing client, unchanged
    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=keys.access_key_id,
        aws_secret_access_key=keys.secret_access_key,
    )
    answer = client.invoke_endpoint(EndpointName=name, ContentType="text/csv", Accept="application/json", Body=body)
    show(f"    endpoint        : {name} at {url} (version {registry.live_version(pipeline, name)} live)")
    show(f"    sample answer   : {answer['Body'].read().decode()[:300]}")
    first = body.splitlines()
    read_token = f"""python3 -c 'import json; print(json.load(open("{credentials_path()}"))["token"])'"""
    token = "$CONVEYOR_ENDPOINT_TOKEN" if keys.source == "the environment" else f"$({read_token})"  # never the value
    show(
        "    call it yourself: curl -s "
        + f"{url}/invocations -H 'Content-Type: text/csv' "
        + f'-H "Authorization: Bearer {token}" '
        + "--data-binary $'"
        + "\\n".join(first[:2])
        + "'"
    )


def batch_demo(pipeline: str, rows: int) -> None:
    """Drop unlabelled rows into the inference landing zone and score them in batch."""
    import sqlalchemy as sa

    from conveyor.batch.warehouse import warehouse_url
    from conveyor.demo import churn_frame
    from conveyor.lake import Lake

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
        counts = conn.execute(
            sa.text(
                f"SELECT run_id, model_version, COUNT(*) FROM {pipeline}_predictions GROUP BY run_id, model_version "
                "ORDER BY run_id DESC LIMIT 1"
            )
        ).fetchall()
    show(f"    warehouse       : {url}, table {pipeline}_predictions: {counts}")
    show(f"    parquet         : {lake.uri('predictions', pipeline)}/<run>/part-*.parquet")


def loop_demo(pipeline: str, rows: int, time_limit: int) -> None:
    """The closed loop: the market shifts; drifted data and poor feedback retrain the model, which
    passes the gate and replaces the old one on the endpoint."""
    import httpx

    from conveyor.demo import churn_frame
    from conveyor.lake import Lake
    from conveyor.serving.process import endpoint_status
    from conveyor.spec import get_spec

    spec = get_spec(pipeline)
    lake = Lake.from_env()
    name = spec.deploy.endpoint.name or pipeline
    drop = next_drop_name(f"{pipeline}/inference")
    shifted = churn_frame(rows, seed=5000 + int(drop.rsplit("-", 1)[-1]), shifted=True)
    say(
        f"The market shifts: {rows} new customers (more fibre, higher charges, a competitor's offer) "
        f"scored in batch and {min(200, rows)} live on the endpoint"
    )
    target = lake.landing(pipeline, "inference", drop)
    target.mkdir(parents=True, exist_ok=True)
    (target / "customers.parquet").write_bytes(shifted.drop(columns=[spec.data.label]).to_parquet(index=False))
    (target / "_SUCCESS").write_bytes(b"")
    run_dag(f"{pipeline}__batch_predict", settings.state_dir() / "logs")
    url = endpoint_status(name)["url"]
    live = shifted.head(200)
    from conveyor.serving.auth import endpoint_credentials

    bearer = {"Authorization": f"Bearer {endpoint_credentials().token}"}
    with httpx.Client(timeout=30, headers=bearer) as client:
        for _, row in live.iterrows():
            body = row.drop(labels=[spec.data.label]).to_frame().T.to_csv(index=False)
            client.post(
                f"{url}/invocations",
                content=body,
                headers={
                    "Content-Type": "text/csv",
                    "X-Amzn-SageMaker-Inference-Id": f"live-{drop}-{row[spec.data.id_column]}",
                },
            )
        say("The truth arrives: a feedback drop for the batch rows, POST /feedback for the live requests")
        truth = shifted[[spec.data.id_column, spec.data.label]].rename(
            columns={spec.data.id_column: "id", spec.data.label: "label"}
        )
        folder = lake.landing(pipeline, "feedback", drop)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labels.csv").write_text(truth.to_csv(index=False))
        (folder / "_SUCCESS").write_bytes(b"")
        answer = client.post(
            f"{url}/feedback",
            json={
                "feedback": [
                    {"id": f"live-{drop}-{r[spec.data.id_column]}", "label": r[spec.data.label]}
                    for _, r in live.iterrows()
                ]
            },
        )
        show(f"    POST /feedback  : {answer.status_code} {answer.text}")
    retrain_demo(spec, lake, name, time_limit)


def retrain_demo(spec: Any, lake: Any, name: str, time_limit: int) -> None:
    """The loop's second half: the monitor decides, the model retrains and, if it passes, goes live.

    :param spec: the pipeline.
    :param lake: the lake.
    :param name: the endpoint.
    :param time_limit: the retraining's time budget.
    """
    import json

    from conveyor.monitoring.decisions import load_triggers
    from conveyor.registry import registry_hook

    pipeline = spec.name
    run_dag(f"{pipeline}__monitor", settings.state_dir() / "logs")
    decision = load_triggers(lake, pipeline)[-1]
    report = lake.reports(pipeline, decision["run_id"]) / "monitor" / "index.html"
    show(
        f"    live {decision['live']['metric']:<11}: {decision['live']['value']} over {decision['live']['labels']} new labels"  # noqa: E501
    )
    show(f"    monitor report  : {report}")
    for reason in decision["reasons"]:
        show(f"    reason          : {reason}")
    if not decision["retrain"]:
        show("    no retraining was triggered (see the report)")
        return
    before = registry_hook(spec).champion(pipeline).version
    say(
        f"Retraining {pipeline} on the latest dataset plus {decision.get('labelled_rows', 0)} newly labelled rows "
        "(the scheduler would start it on the retrain Asset event; `dags test` is started here)"
    )
    run_dag(
        f"{pipeline}__train",
        settings.state_dir() / "logs",
        conf=json.dumps({"time_limit": time_limit, "labelled_rows": decision.get("labelled_uri") or ""}),
    )
    after = registry_hook(spec).champion(pipeline)
    if str(after.version) == str(before):
        show(f"    the retrained model did not pass the gate; version {before} stays live (see the gate report)")
        return
    show(f"    new champion    : version {after.version} (was {before})")
    say(f"Rolling version {after.version} out to the {name} endpoint")
    run_dag(f"{pipeline}__deploy", settings.state_dir() / "logs")
    show(f"    endpoint        : {name} now serves version {registry_hook(spec).live_version(pipeline, name)}")


def demo(rows: int, time_limit: int, images: bool) -> None:
    from conveyor.demo import write_drop, write_image_drop
    from conveyor.registry.mlflow import MlflowRegistryHook

    version = ingest_demo("churn", lambda drop: write_drop(rows, drop))
    train_demo("churn", version, time_limit, ("roc_auc", "accuracy", "balanced_accuracy", "f1"))
    say("Deploying the champion to the churn endpoint (smoke test, then switch)")
    deploy_demo("churn")
    batch_demo("churn", 20000)
    loop_demo("churn", 2000, time_limit)
    if images:
        version = ingest_demo("shapes", lambda drop: write_image_drop(80, drop, size=48))
        train_demo("shapes", version, 240, ("accuracy", "balanced_accuracy", "f1_macro"))
    uri = MlflowRegistryHook().tracking_uri
    say("Done.")
    show(f"    MLflow store    : {uri}  (browse: .venv/bin/mlflow ui --backend-store-uri {uri})")
    show("    Airflow UI      : make ui  (trigger runs by hand, approve models)")
    show("    the endpoint keeps running: make stop")


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
