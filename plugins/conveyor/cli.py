"""Conveyor's command line: ``python -m conveyor.cli demo`` runs the demo pipeline as production does.

The demo starts Airflow's scheduler, triggerer, DAG processor and api-server in the background
(``airflow standalone`` on the embedded SQLite default, as ``make ui`` does), unpauses the
pipeline's DAGs, and then only does what a producer, a client and the business do: it drops
generated churn data into the landing zone, calls the live endpoint, announces new data to score,
and sends the truth (feedback labels). The chain follows by itself: the scheduled sensor, the
dataset Asset, training, the model Asset, deployment, batch scoring, monitoring and the retrain
event. The terminal shows each run and task as it goes; a run that fails or stalls stops the demo
with the DAG, the task and its log. Airflow keeps running afterwards (``make ui``, ``make stop``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from conveyor import settings
from conveyor.demo_airflow import AirflowApi, DemoError, Limits, RunResult, RunWatcher

DEFAULT_STALL_S = 300.0


def show(text: str, file: Any = None) -> None:
    """Print a line of the demo's output with any URL's credentials masked (``settings.mask_url``).

    :param text: the line.
    :param file: where to (standard output when None).
    """
    print(settings.mask_url(text), file=file, flush=True)


def say(message: str) -> None:
    show(f"==> {message}")


@dataclass
class Session:
    """The running demo's Airflow: its API, the watcher, the runs already seen, and what each step took."""

    url: str
    api: AirflowApi
    watcher: RunWatcher
    stall_s: float = DEFAULT_STALL_S
    seen: dict[str, set[str]] = field(default_factory=dict)
    results: list[RunResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


_session: Session | None = None


def session() -> Session:
    if _session is None:
        raise DemoError("Airflow is not started: run the demo with `python -m conveyor.cli demo`")
    return _session


def run_dag(
    dag_id: str, unpause: bool = False, announce: str | None = None, nudge: bool = False, budget_s: float = 0
) -> RunResult:
    """Wait for the scheduler's next run of a DAG and follow it to its end (``DemoError`` when it fails or stalls).

    :param dag_id: the DAG.
    :param unpause: unpause it first (a DAG whose schedule is due then runs at once; catchup is off).
    :param announce: an Asset to update as a producer does (not when this call unpaused the DAG: its
        due run does the work).
    :param nudge: when no run starts within 20 s (a schedule not due), announce the Asset, else start a
        run through the REST API, and say so.
    :param budget_s: a task's expected length (training), added to its stall bound.
    """
    s = session()
    was_paused = s.api.unpause(dag_id) if unpause else False
    if was_paused:
        show(f"    unpaused {dag_id}")
    if announce and not was_paused:
        s.api.asset_event(announce, {"producer": "conveyor demo"})
        show(f"    Asset {announce} updated (as the producer announces new data)")

    def kick() -> None:
        if announce:
            s.api.asset_event(announce, {"producer": "conveyor demo"})
        else:
            s.api.trigger(dag_id)
        show(f"    {dag_id}: no scheduled run was due, one started through the REST API")

    limits = Limits(start_s=120, task_s=s.stall_s, per_task={"train": s.stall_s + 3 * budget_s}, nudge_s=20)
    result = s.watcher.wait(dag_id, s.seen.setdefault(dag_id, set()), limits, kick if nudge else None)
    s.seen[dag_id].add(result.run_id)
    s.results.append(result)
    return result


def next_drop_name(pipeline: str) -> str:
    """The first ``demo-NNNN`` drop name not used yet in the pipeline's landing zone."""
    from conveyor.lake import Lake

    landing = Lake.from_env().landing(pipeline)
    n = 1
    while (landing / f"demo-{n:04d}").exists():
        n += 1
    return f"demo-{n:04d}"


def ingest_demo(pipeline: str, write: Any) -> str:
    """Drop generated data into a pipeline's landing zone; its sensor run ingests it. Returns the version."""
    from conveyor.data.datasets import latest_version, load_manifest
    from conveyor.lake import Lake, read_json

    lake = Lake.from_env()
    drop = next_drop_name(pipeline)
    say(f"Writing generated {pipeline} data as drop {drop} into {lake.uri('landing', pipeline)}")
    write(drop)
    say(f"The {pipeline}__ingest sensor finds the drop (scheduled run), versions and validates it")
    run_dag(f"{pipeline}__ingest", unpause=True, nudge=True)
    version = latest_version(lake, pipeline)
    if version is None:
        raise DemoError(f"The {pipeline} ingest run succeeded but published no dataset version")
    manifest = load_manifest(lake, pipeline, version)
    validated = read_json(lake.raw(pipeline, version) / "validation.json")
    show(f"    dataset version : {version} ({manifest['rows']} rows, {manifest['bytes']} bytes)")
    show(f"    data docs       : {validated['report']}")
    return version


def train_demo(pipeline: str, shown: tuple[str, ...]) -> None:
    """Follow the pipeline's train run (split, train, evaluate, gate, register, approve) and print the model."""
    from conveyor.lake import Lake, read_json
    from conveyor.registry import registry_hook
    from conveyor.spec import get_spec

    spec = get_spec(pipeline)
    say(
        f"Training {pipeline} ({spec.trainer.time_limit}s budget), then evaluate, gate, register, approve "
        f"({spec.approval})"
    )
    run_dag(f"{pipeline}__train", unpause=True, nudge=True, budget_s=spec.trainer.time_limit)
    champion = registry_hook(spec).champion(pipeline)
    if champion is None:
        raise DemoError(f"The {pipeline} train run succeeded but no model is champion: see the gate report")
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
    """Follow the deploy run the model Asset started, then answer a sample request through boto3 (SigV4)."""
    from conveyor.data.splits import read_part
    from conveyor.lake import Lake
    from conveyor.registry import registry_hook
    from conveyor.serving.auth import credentials_path, endpoint_credentials, runtime_client
    from conveyor.serving.process import endpoint_status
    from conveyor.spec import get_spec

    say(f"The {pipeline}.model Asset starts {pipeline}__deploy: smoke test, then switch")
    run_dag(f"{pipeline}__deploy")
    spec = get_spec(pipeline)
    name = spec.deploy.endpoint.name or pipeline
    url = endpoint_status(name)["url"]
    registry = registry_hook(spec)
    champion = registry.champion(pipeline)
    sample = read_part(Lake.from_env(), pipeline, champion.tags["conveyor_run_id"], "test").head(2)
    body = sample.drop(columns=[spec.data.label]).to_csv(index=False)
    client = runtime_client(url)  # the endpoint's access key: SigV4 as against SageMaker
    answer = client.invoke_endpoint(EndpointName=name, ContentType="text/csv", Accept="application/json", Body=body)
    show(f"    endpoint        : {name} at {url} (version {registry.live_version(pipeline, name)} live)")
    show(f"    sample answer   : {answer['Body'].read().decode()[:300]}")
    first = body.splitlines()
    read_token = f"""python3 -c 'import json; print(json.load(open("{credentials_path()}"))["token"])'"""
    source = endpoint_credentials().source
    token = "$CONVEYOR_ENDPOINT_TOKEN" if source == "the environment" else f"$({read_token})"  # never the value
    show(
        "    call it yourself: curl -s "
        + f"{url}/invocations -H 'Content-Type: text/csv' "
        + f'-H "Authorization: Bearer {token}" '
        + "--data-binary $'"
        + "\\n".join(first[:2])
        + "'"
    )


def write_inference_drop(pipeline: str, frame: Any) -> str:
    """Write unlabelled rows as a complete drop in ``landing/<pipeline>/inference/``; the drop's name.

    :param pipeline: the pipeline.
    :param frame: the rows (pandas DataFrame).
    """
    from conveyor.lake import Lake

    drop = next_drop_name(f"{pipeline}/inference")
    target = Lake.from_env().landing(pipeline, "inference", drop)
    target.mkdir(parents=True, exist_ok=True)
    (target / "customers.parquet").write_bytes(frame.to_parquet(index=False))
    (target / "_SUCCESS").write_bytes(b"")
    return drop


def batch_demo(pipeline: str, rows: int) -> None:
    """Drop unlabelled rows into the inference landing zone; the batch run scores them into the warehouse."""
    import sqlalchemy as sa

    from conveyor.batch.warehouse import warehouse_url
    from conveyor.demo import churn_frame
    from conveyor.lake import Lake

    lake = Lake.from_env()
    n = int(next_drop_name(f"{pipeline}/inference").rsplit("-", 1)[-1])
    drop = write_inference_drop(pipeline, churn_frame(rows, seed=1000 + n).drop(columns=["churned"]))
    say(f"Scoring {rows} new customers in batch (drop {drop} in {lake.uri('landing', pipeline, 'inference')})")
    run_dag(f"{pipeline}__batch_predict", unpause=True, announce=f"{pipeline}.inference", nudge=True)
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


def live_traffic_and_truth(spec: Any, shifted: Any, drop: str, url: str) -> None:
    """Shifted customers call the endpoint; the truth arrives as a feedback drop and ``POST /feedback``.

    :param spec: the pipeline.
    :param shifted: the shifted customers, labelled (pandas DataFrame).
    :param drop: the name their batch drop will have (the live ids derive from it).
    :param url: the endpoint.
    """
    import httpx

    from conveyor.lake import Lake
    from conveyor.serving.auth import endpoint_credentials

    live, key, label = shifted.head(200), spec.data.id_column, spec.data.label
    bearer = {"Authorization": f"Bearer {endpoint_credentials().token}"}
    with httpx.Client(timeout=30, headers=bearer) as client:
        for _, row in live.iterrows():
            body = row.drop(labels=[label]).to_frame().T.to_csv(index=False)
            client.post(
                f"{url}/invocations",
                content=body,
                headers={"Content-Type": "text/csv", "X-Amzn-SageMaker-Inference-Id": f"live-{drop}-{row[key]}"},
            )
        say("The truth arrives: a feedback drop for the batch rows, POST /feedback for the live requests")
        truth = shifted[[key, label]].rename(columns={key: "id", label: "label"})
        folder = Lake.from_env().landing(spec.name, "feedback", drop)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labels.csv").write_text(truth.to_csv(index=False))
        (folder / "_SUCCESS").write_bytes(b"")
        feedback = [{"id": f"live-{drop}-{r[key]}", "label": r[label]} for _, r in live.iterrows()]
        answer = client.post(f"{url}/feedback", json={"feedback": feedback})
        show(f"    POST /feedback  : {answer.status_code} {answer.text}")


def loop_demo(pipeline: str, rows: int) -> None:
    """The closed loop: the market shifts; drifted data and poor feedback retrain the model, which
    passes the gate and replaces the old one on the endpoint, every step started by the one before."""
    from conveyor.demo import churn_frame
    from conveyor.serving.process import endpoint_status
    from conveyor.spec import get_spec

    spec = get_spec(pipeline)
    say(f"Monitoring starts ({pipeline}__monitor on its schedule): drift and live accuracy of the batch run")
    run_dag(f"{pipeline}__monitor", unpause=True, nudge=True)
    name = spec.deploy.endpoint.name or pipeline
    drop = next_drop_name(f"{pipeline}/inference")
    shifted = churn_frame(rows, seed=5000 + int(drop.rsplit("-", 1)[-1]), shifted=True)
    say(
        f"The market shifts: {min(200, rows)} new customers (more fibre, higher charges, a competitor's offer) "
        f"call the endpoint live and {rows} arrive for batch scoring"
    )
    live_traffic_and_truth(spec, shifted, drop, endpoint_status(name)["url"])
    write_inference_drop(pipeline, shifted.drop(columns=[spec.data.label]))
    run_dag(f"{pipeline}__batch_predict", announce=f"{pipeline}.inference")
    retrain_demo(spec, name)


def retrain_demo(spec: Any, name: str) -> None:
    """The loop's second half: the monitor run the batch run started decides; the retrain Asset event
    starts training and, if the new model passes, the model Asset starts its deployment.

    :param spec: the pipeline.
    :param name: the endpoint.
    """
    from conveyor.lake import Lake
    from conveyor.monitoring.decisions import load_triggers
    from conveyor.registry import registry_hook

    pipeline, lake = spec.name, Lake.from_env()
    say(f"The {pipeline}.predictions Asset starts {pipeline}__monitor: drift, feedback, live metric, decision")
    run_dag(f"{pipeline}__monitor")
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
        f"The {pipeline}.retrain Asset starts {pipeline}__train on the latest dataset plus "
        f"{decision.get('labelled_rows', 0)} newly labelled rows"
    )
    run_dag(f"{pipeline}__train", budget_s=spec.trainer.time_limit)
    after = registry_hook(spec).champion(pipeline)
    if str(after.version) == str(before):
        show(f"    the retrained model did not pass the gate; version {before} stays live (see the gate report)")
        return
    show(f"    new champion    : version {after.version} (was {before})")
    say(f"The {pipeline}.model Asset starts {pipeline}__deploy: version {after.version} to the {name} endpoint")
    run_dag(f"{pipeline}__deploy")
    show(f"    endpoint        : {name} now serves version {registry_hook(spec).live_version(pipeline, name)}")


def images_demo() -> None:
    """The image pipeline: a shapes drop; its sensor, training (ResNet) and registration follow."""
    from conveyor.demo import write_image_drop

    ingest_demo("shapes", lambda drop: write_image_drop(80, drop, size=48))
    train_demo("shapes", ("accuracy", "balanced_accuracy", "f1_macro"))


def start_session(pipelines: list[str], stall_s: float) -> Session:
    """Start Airflow (or find it running), wait until the pipelines' DAGs are parsed, note their finished runs.

    :param pipelines: the pipelines the demo runs.
    :param stall_s: how long a task may show no progress.
    """
    global _session
    from conveyor.demo_airflow import log_file, running_pid, start_airflow
    from conveyor.factory import build_for
    from conveyor.spec import get_spec

    say("Starting Airflow in the background: scheduler, triggerer, DAG processor, api-server (SQLite, as make ui)")
    started = time.monotonic()
    url, _ = start_airflow(show)
    api = AirflowApi(url)

    def alive() -> str | None:
        return None if running_pid() else f"Airflow's services stopped: see {log_file()}"

    s = Session(url, api, RunWatcher(api, show, alive=alive), stall_s)
    dag_ids = [dag.dag_id for p in pipelines for dag in build_for(get_spec(p))]  # the family its spec builds
    deadline = time.monotonic() + 240
    for dag_id in dag_ids:
        while (dag := s.watcher.poll(functools.partial(api.dag, dag_id))) is None:
            if time.monotonic() > deadline:
                raise DemoError(f"the DAG processor has not stored {dag_id} after 240s: see {log_file()}")
            time.sleep(1)
        s.seen[dag_id] = s.watcher.finished_runs(dag_id)
        if dag.get("has_import_errors"):
            raise DemoError(f"{dag_id} has import errors: see the UI at {url}")
    s.timings["startup_s"] = round(time.monotonic() - started, 1)
    show(f"    Airflow ready at {url} in {s.timings['startup_s']:.0f}s; {len(dag_ids)} DAGs parsed")
    _session = s
    return s


def summary(s: Session, started: float) -> None:
    """Print where everything is, the UI and its login, and write the timings to the state folder."""
    from conveyor.demo_airflow import password_file
    from conveyor.registry.mlflow import MlflowRegistryHook

    s.timings["demo_s"] = round(time.monotonic() - started, 1)
    path = settings.state_dir() / "demo-timings.json"
    path.write_text(json.dumps({**s.timings, "runs": [asdict(r) for r in s.results]}, indent=2))
    uri = MlflowRegistryHook().tracking_uri
    say(f"Done in {s.timings['demo_s'] / 60:.1f} min ({len(s.results)} DAG runs; timings: {path})")
    for r in s.results:
        show(f"    {r.dag_id:<22} {r.run_type:<16} {r.seconds:6.0f}s  {r.run_id}")
    show(f"    MLflow store    : {uri}  (browse: .venv/bin/mlflow ui --backend-store-uri {uri})")
    show(f"    Airflow UI      : {s.url}  (user admin, password in {password_file()})")
    show("    look at         : Assets (the dataset, model, predictions and retrain events), each DAG's Runs and")
    show("                      task logs, the train run's gate report link; Browse > Required Actions (approvals)")
    show("    Airflow and the endpoint keep running: make ui shows the address again, make stop stops them")


def demo(rows: int, images: bool, stall_s: float = DEFAULT_STALL_S) -> None:
    """The whole demo (see the module's docstring).

    :param rows: churn rows in the first drop.
    :param images: also run the image pipeline.
    :param stall_s: how long a task may show no progress before the demo stops.
    """
    from conveyor.demo import write_drop

    started = time.monotonic()
    s = start_session(["churn", "shapes"] if images else ["churn"], stall_s)
    s.api.unpause("churn__deploy")  # scheduled on the model Asset only: nothing runs until a model is approved
    ingest_demo("churn", lambda drop: write_drop(rows, drop))
    train_demo("churn", ("roc_auc", "accuracy", "balanced_accuracy", "f1"))
    deploy_demo("churn")
    batch_demo("churn", 20000)
    loop_demo("churn", 2000)
    if images:
        images_demo()
    summary(s, started)
    if not images:
        show("    the image pipeline (shapes, ResNet, ~5 min more): make demo DEMO_ARGS=--images")


def ui() -> None:
    """Start Airflow in the background as the demo does (or find it running); print the address and login."""
    from conveyor.demo_airflow import log_file, password_file, start_airflow

    say("Starting Airflow: scheduler, triggerer, DAG processor, api-server (SQLite; the demo's runs are all there)")
    url, started = start_airflow(show)
    show(f"    {'started' if started else 'already running'}: {url}  (user admin, password in {password_file()})")
    show(f"    services log: {log_file()}; stop with: make stop")


def stop() -> None:
    """Stop every endpoint this project's state folder knows of, and Airflow's services."""
    from conveyor.demo_airflow import stop_airflow
    from conveyor.serving.process import stop_endpoint

    root = settings.state_dir() / "endpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    for name in names:
        if stop_endpoint(name):
            say(f"Stopped endpoint {name}")
    if not names:
        say("No endpoint to stop")
    say("Stopped Airflow's services" if stop_airflow() else "Airflow was not running")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo_cmd = sub.add_parser("demo", help="run the demo pipeline on the embedded default, as production does")
    demo_cmd.add_argument("--rows", type=int, default=5000, help="rows of demo data to generate")
    demo_cmd.add_argument("--images", action="store_true", help="also run the image pipeline (about 5 min more)")
    demo_cmd.add_argument(
        "--stall-timeout", type=float, default=DEFAULT_STALL_S, help="seconds a task may show no progress"
    )
    sub.add_parser("ui", help="start Airflow in the background (as the demo does) and print the login")
    sub.add_parser("stop", help="stop Airflow and the endpoints the demo left running")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            demo(args.rows, args.images, args.stall_timeout)
        elif args.command == "ui":
            ui()
        elif args.command == "stop":
            stop()
    except DemoError as exc:
        raise SystemExit(settings.mask_url(f"Demo stopped: {exc}")) from None
    except KeyboardInterrupt:
        raise SystemExit("Interrupted: Airflow keeps running (make ui shows it, make stop stops it)") from None


if __name__ == "__main__":
    main()
