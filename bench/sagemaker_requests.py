"""Benchmark: AWS API calls and Conveyor's own time per pipeline run in sagemaker mode, on moto.

One run of the churn pipeline with ``compute: sagemaker`` and ``registry: sagemaker`` against moto's
server in this process (S3 lake, training job, Model Registry, model, endpoint config, endpoint,
transform job), each DAG with ``dag.test()``: ``churn__train`` (split, train, evaluate, gate,
register, approve, publish), ``churn__deploy`` (resolve, deploy) and ``churn__batch_predict``
(resolve, score). The drop is ingested and validated before the clock starts (not SageMaker's
part). moto runs no container, so ``tests/sagemaker_emulator.py`` plays SageMaker: the training job
runs ``train.py`` in script mode, the transform job runs the model's ``code/inference.py``.

**Calls**: every AWS API call the process makes (``botocore``'s ``BaseClient._make_api_call`` and
``aiobotocore``'s, so s3fs and the triggers count), by service and operation, split into

* ``calls``: what Conveyor's tasks send (S3 lake reads and writes, SageMaker requests);
* ``polls``: the describe calls of the deferred waits (``SageMakerTrigger`` in the triggerer;
  ``check_interval_seconds`` is 1 here, so their number is the job's duration in seconds and says
  nothing about Conveyor);
* calls the emulated containers make (a training job uploading its model, a transform job
  reading its input) are SageMaker's, left out.

A deferred task resumes with the kwargs it deferred with, as under Airflow's triggerer
(``dag.test()`` alone would drop them: :func:`keep_deferral_kwargs`).

**Time** per DAG run (wall clock of ``dag.test()``):

* ``wait_s``: inside the deferred waits (the training job runs then) and inside the emulated
  transform job (which moto's CreateTransformJob runs before it answers);
* ``conveyor_s`` = wall - wait: Conveyor's code, the AWS calls it makes (to moto, on this machine)
  and Airflow's in-process task machinery of ``dag.test()`` (task state, XCom, rendering);
* ``aws_s``: inside those calls; ``own_s`` = conveyor_s - aws_s;
* ``task_s``: each task's duration as Airflow records it (deferred waits included).

**Baseline**: the shortest call sequence a hand-written boto3 script needs for the same
train -> register -> approve -> deploy -> transform (``BASELINE``: the data channels and the source
uploaded, the job, the model repacked with its inference code, a package group, a package, its
approval, a model, an endpoint config, an endpoint, the transform input uploaded, the job, its
output read; its waits would poll too and are left out likewise). ``ratio`` = Conveyor's calls /
baseline calls. ``conveyor_share`` = conveyor_s / wall.

``--quick``: 1,200 training rows, a 10 s gradient-boosting budget, 2,000 rows to score. Default:
5,000 rows, 30 s, 20,000 rows. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "plugins", ROOT / "tests", Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

BASELINE: dict[str, list[tuple[str, str]]] = {
    "train": [("s3", "PutObject")] * 3
    + [
        ("sagemaker", "CreateTrainingJob"),
        ("s3", "GetObject"),
        ("s3", "PutObject"),
        ("sagemaker", "CreateModelPackageGroup"),
        ("sagemaker", "CreateModelPackage"),
        ("sagemaker", "UpdateModelPackage"),
    ],
    "deploy": [("sagemaker", "CreateModel"), ("sagemaker", "CreateEndpointConfig"), ("sagemaker", "CreateEndpoint")],
    "batch": [("s3", "GetObject"), ("s3", "PutObject"), ("sagemaker", "CreateTransformJob"), ("s3", "GetObject")],
}


class Recorder:
    """Counts AWS calls and times waits, per phase (the DAG being run)."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.local = threading.local()  # .waiting / .emulating in the thread that makes the call
        self.calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.polls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.seconds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.origins: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.trace = False
        self.lock = threading.Lock()
        self.sync_origin = "?"  # --trace: where the blocked fsspec call came from (s3fs calls in its loop thread)

    def flag(self, name: str) -> bool:
        return getattr(self.local, name, False)

    def record(self, service: str, operation: str, seconds: float) -> None:
        if self.phase is None or self.flag("emulating"):
            return
        with self.lock:
            if self.flag("waiting"):
                self.polls[self.phase][f"{service}:{operation}"] += 1
            else:
                self.calls[self.phase][f"{service}:{operation}"] += 1
                self.seconds[self.phase]["aws_s"] += seconds
                if self.trace:
                    where = origin()
                    where = self.sync_origin if where == "?" else where
                    self.origins[self.phase][f"{service}:{operation} <- {where}"] += 1

    def timed(self, name: str, seconds: float) -> None:
        if self.phase is not None:
            with self.lock:
                self.seconds[self.phase][name] += seconds


def origin() -> str:
    """The innermost Conveyor frames of the current call stack (``--trace``: where a call comes from)."""
    import traceback

    frames = [f for f in traceback.extract_stack() if "/plugins/conveyor/" in f.filename]
    return " < ".join(f"{Path(f.filename).stem}.{f.name}:{f.lineno}" for f in reversed(frames[-3:])) or "?"


def instrument(recorder: Recorder) -> None:
    """Wrap the AWS clients, the in-process trigger runner and the emulated containers."""
    import aiobotocore.client
    import botocore.client
    from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor

    import sagemaker_emulator

    sync_call = botocore.client.BaseClient._make_api_call

    def make_api_call(client: Any, operation: str, params: Any) -> Any:
        if getattr(client, sagemaker_emulator.CONTAINER_CLIENT, False):  # a container's (s3transfer's threads too)
            return sync_call(client, operation, params)
        started = time.perf_counter()
        try:
            return sync_call(client, operation, params)
        finally:
            recorder.record(client.meta.service_model.service_name, operation, time.perf_counter() - started)

    async_call = aiobotocore.client.AioBaseClient._make_api_call

    async def make_async_api_call(client: Any, operation: str, params: Any) -> Any:
        started = time.perf_counter()
        try:
            return await async_call(client, operation, params)
        finally:
            recorder.record(client.meta.service_model.service_name, operation, time.perf_counter() - started)

    botocore.client.BaseClient._make_api_call = make_api_call
    import fsspec.asyn

    blocking_sync = fsspec.asyn.sync

    def sync(loop: Any, func: Any, *args: Any, **kwargs: Any) -> Any:  # s3fs: the caller blocks, its loop calls
        if recorder.trace:
            recorder.sync_origin = f"s3fs.{getattr(func, '__name__', '?')} < {origin()}"
        return blocking_sync(loop, func, *args, **kwargs)

    fsspec.asyn.sync = sync
    import s3fs.core

    s3fs.core.sync = sync  # its files' reads and writes
    aiobotocore.client.AioBaseClient._make_api_call = make_async_api_call

    run_trigger = InProcessTestSupervisor.run_trigger_in_process.__func__

    def run_trigger_in_process(cls: Any, *, trigger: Any, ti: Any) -> Any:
        recorder.local.waiting = True
        started = time.perf_counter()
        try:
            return run_trigger(cls, trigger=trigger, ti=ti)
        finally:
            recorder.local.waiting = False
            recorder.timed("wait_s", time.perf_counter() - started)

    InProcessTestSupervisor.run_trigger_in_process = classmethod(run_trigger_in_process)

    transform = sagemaker_emulator.run_transform_job

    def run_transform_job(*args: Any, **kwargs: Any) -> Any:  # runs inside moto's CreateTransformJob
        recorder.local.emulating = True
        started = time.perf_counter()
        try:
            return transform(*args, **kwargs)
        finally:
            recorder.local.emulating = False
            recorder.timed("container_s", time.perf_counter() - started)

    sagemaker_emulator.run_transform_job = run_transform_job
    train = sagemaker_emulator.TrainingEmulator._run

    def run_training(self: Any, job: Any) -> Any:  # its own thread, during the deferred wait
        recorder.local.emulating = True
        return train(self, job)

    sagemaker_emulator.TrainingEmulator._run = run_training
    keep_deferral_kwargs()


def keep_deferral_kwargs() -> None:
    """Resume deferred tasks with the kwargs they deferred with, as Airflow's triggerer does.

    ``dag.test()`` resumes a deferred task with the trigger's event alone (``next_kwargs = {"event": ...}``),
    dropping what the task passed to ``defer(kwargs=...)``; the triggerer stores the event beside them
    (``airflow.models.trigger``: the stored next_kwargs plus ``event``). Without this, the SageMaker batch
    would read back under ``dag.test()`` the input manifest it hands over in production (one GET counted
    that a deployment never makes).
    """
    import sqlalchemy
    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk.execution_time import supervisor
    from airflow.sdk.execution_time.comms import DeferTask

    deferred: dict[str, dict[str, Any]] = {}
    run_task = supervisor.run_task_in_process

    def run_task_in_process(*args: Any, **kwargs: Any) -> Any:
        result = run_task(*args, **kwargs)
        ti = kwargs.get("ti", args[0] if args else None)
        if isinstance(result.msg, DeferTask) and isinstance(result.msg.next_kwargs, dict) and ti is not None:
            deferred[str(ti.id)] = result.msg.next_kwargs  # serde-encoded key by key, like the event beside it
        return result

    supervisor.run_task_in_process = run_task_in_process

    def with_kwargs(target: Any, value: Any, _old: Any, _initiator: Any) -> Any:
        kept = deferred.get(str(target.id))  # (the deferral's own record sets them first: not popped there)
        if kept and isinstance(value, dict) and set(value) == {"event"}:
            return {**kept, **value}
        return value

    sqlalchemy.event.listen(TaskInstance.next_kwargs, "set", with_kwargs, retval=True)


def set_up(tmp: Path) -> tuple[Any, str]:
    """A private Airflow home, moto's server, an S3 lake on it and the two AWS connections."""
    from _common import isolate

    isolate(tmp)
    os.environ.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",  # experiment tracking (the registry is SageMaker's)
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "CONVEYOR_WAREHOUSE_URL": f"sqlite:///{tmp}/warehouse.db",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    Path(os.environ["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
    connection = json.dumps(
        {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": url, "region_name": "us-east-1"},
        }
    )
    os.environ.update(
        {
            "AIRFLOW_CONN_LAKE_S3": connection,
            "AIRFLOW_CONN_AWS_DEFAULT": connection,
            "CONVEYOR_LAKE_URI": f"s3://{bucket}/conveyor",
            "CONVEYOR_LAKE_CONN_ID": "lake_s3",
        }
    )
    return server, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,200 rows, 10 s budget, 2,000 rows to score")
    parser.add_argument("--trace", action="store_true", help="print where in Conveyor each call is made")
    args = parser.parse_args()
    rows, budget, scored = (1200, 10, 2000) if args.quick else (5000, 30, 20000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sagemaker-"))
    server, url = set_up(tmp)
    import pytest
    from airflow.dag_processing.dagbag import DagBag

    import sagemaker_emulator
    from conveyor.demo import churn_frame
    from helpers import churn_csv, ingest_and_validate, write_drop
    from sagemaker_pipeline import sagemaker_include

    recorder = Recorder()
    recorder.trace = args.trace
    instrument(recorder)
    patch = pytest.MonkeyPatch()
    sagemaker_include(
        tmp / "include",
        patch,
        {
            "retries": 0,  # a failure ends the benchmark instead of waiting for retries
            "trainer": {"time_limit": budget, "hyperparameters": {"GBM": {}}},
            "gate": {"thresholds": {"roc_auc": 0.6, "balanced_accuracy": 0.5}, "on_reject": "fail"},
            "sagemaker": {"check_interval_seconds": 1, "inference_image_uri": None},
            "deploy": {
                "endpoint": {"enabled": True, "name": "churn"},
                "batch": {"enabled": True, "chunk_rows": 10_000, "table": "churn_predictions"},
            },
        },
    )
    sagemaker_emulator.as_sagemaker(patch)  # creates of what exists refused, updates keep what they omit, as on AWS
    training = sagemaker_emulator.TrainingEmulator(url).install(patch)
    sagemaker_emulator.TransformEmulator(url).install(patch)
    from conveyor.lake import Lake

    lake = Lake.from_env()
    print(f"ingesting {rows} rows into {lake.root} (not measured)", file=sys.stderr, flush=True)
    write_drop(lake, "d1", {"customers.csv": churn_csv(rows)})
    ingest_and_validate("d1", run_id="ingest-run")
    drop = lake.landing("churn", "inference", "b1")
    drop.mkdir(parents=True, exist_ok=True)
    (drop / "customers.parquet").write_bytes(
        churn_frame(scored, seed=5).drop(columns=["churned"]).to_parquet(index=False)
    )
    (drop / "_SUCCESS").write_bytes(b"")
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors

    runs = {
        "train": ("churn__train", {"time_limit": budget}),
        "deploy": ("churn__deploy", None),
        "batch": ("churn__batch_predict", None),
    }
    wall: dict[str, float] = {}
    tasks: dict[str, dict[str, float]] = {}
    try:
        for phase, (dag_id, conf) in runs.items():
            print(f"running {dag_id}", file=sys.stderr, flush=True)
            recorder.phase = phase
            started = time.perf_counter()
            run = bag.dags[dag_id].test(run_conf=conf)
            wall[phase] = time.perf_counter() - started
            recorder.phase = None
            states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
            if str(run.state) != "success":
                raise SystemExit(f"{dag_id} did not succeed: {states}")
            tasks[phase] = {
                ti.task_id: round(ti.duration or 0.0, 2)
                for ti in sorted(run.get_task_instances(), key=lambda ti: ti.start_date)
            }
        training.wait()
    finally:
        server.stop()
        patch.undo()
        shutil.rmtree(tmp, ignore_errors=True)

    figures: dict[str, Any] = {}
    for phase in runs:
        seconds = recorder.seconds[phase]
        wait = seconds["wait_s"] + seconds["container_s"]
        conveyor = wall[phase] - wait
        aws = seconds["aws_s"] - seconds["container_s"]  # the transform container runs inside CreateTransformJob
        figures[phase] = {
            "calls": sum(recorder.calls[phase].values()),
            "baseline_calls": len(BASELINE[phase]),
            "polls": sum(recorder.polls[phase].values()),
            "wall_s": round(wall[phase], 2),
            "wait_s": round(wait, 2),
            "conveyor_s": round(conveyor, 2),
            "aws_s": round(aws, 2),
            "own_s": round(conveyor - aws, 2),
            "by_operation": dict(sorted(recorder.calls[phase].items())),
            "task_s": tasks[phase],
        }
    calls = sum(f["calls"] for f in figures.values())
    baseline = sum(len(v) for v in BASELINE.values())
    total_wall = sum(wall.values())
    total_conveyor = sum(f["conveyor_s"] for f in figures.values())
    for phase, f in figures.items():
        print(
            f"{phase:7s} calls {f['calls']:4d} (baseline {f['baseline_calls']}), polls {f['polls']:3d}, "
            f"wall {f['wall_s']:6.1f}s, waits {f['wait_s']:6.1f}s, Conveyor {f['conveyor_s']:5.1f}s "
            f"(AWS calls {f['aws_s']:.1f}s, own {f['own_s']:.1f}s)",
            file=sys.stderr,
        )
        for operation, count in f["by_operation"].items():
            print(f"          {count:4d}  {operation}", file=sys.stderr)
        for where, count in sorted(recorder.origins[phase].items()):
            print(f"          {count:4d}  {where}", file=sys.stderr)
        print(
            "          task seconds (Airflow's duration, deferred waits included): "
            + ", ".join(f"{task} {seconds}" for task, seconds in f["task_s"].items()),
            file=sys.stderr,
        )
    print(
        json.dumps(
            {
                "bench": "sagemaker_requests",
                "baseline": "hand-written boto3 script: the minimal S3+SageMaker calls for train->register->approve->deploy->transform",  # noqa: E501
                "ratio": round(calls / baseline, 2),
                "calls": calls,
                "baseline_calls": baseline,
                "polls": sum(f["polls"] for f in figures.values()),
                "wall_s": round(total_wall, 2),
                "conveyor_s": round(total_conveyor, 2),
                "conveyor_share": round(total_conveyor / total_wall, 3),
                "aws_s": round(sum(f["aws_s"] for f in figures.values()), 2),
                "own_s": round(sum(f["own_s"] for f in figures.values()), 2),
                "per_dag": figures,
                "rows": rows,
                "time_limit": budget,
                "scored_rows": scored,
                "quick": args.quick,
            }
        )
    )


if __name__ == "__main__":
    main()
