"""docker-compose.yaml really started (make test-compose): every service healthy, the churn pipeline end to end on
Celery through the REST API and the S3 lake only, and the stack's faults.

The tests run in order on one stack (conftest.py) and build on each other:

1. the example secrets are refused by the secrets-check service, naming the variables (nothing else starts);
2. ``up`` until all healthy; every published port bound to 127.0.0.1;
3. the chain: a drop written to the S3 lake -> ``churn__ingest`` (its sensor) -> ``churn__train`` (dataset Asset, on
   the Celery worker) -> the MLflow server's registry -> ``churn__deploy`` -> the ``model-endpoint`` container answers
   ``boto3`` ``invoke_endpoint`` on its published port -> ``churn__batch_predict`` -> rows in the Postgres warehouse
   -> ``churn__monitor``;
4. the Celery worker container killed mid-train: the task retries, one registry version;
5. the endpoint container restarted: it serves the live version again (the state volume);
6. ``up`` run again: the one-shots (secrets, buckets, migration, admin user) pass again, nothing is recreated twice.
"""

from __future__ import annotations

import json
import time

import pytest
from compose_stack import ONE_SHOTS, PROJECT, wait_for

pytestmark = pytest.mark.slow

RUN_S = 600  # the most one DAG run may take (2 shared cores, containers)
START_S = 240  # the most a run may take to be created by an Asset event
HEADER = (
    "customer_id,tenure_months,monthly_charges,total_charges,contract,payment_method,internet_service,"
    "support_calls,age,region"
)
SAMPLE_ROW = "C-1,3,99.5,298.5,month-to-month,card,fiber,5,23,north"


def churn(rows: int, seed: int, label: bool = True):
    from conveyor.demo import churn_frame

    frame = churn_frame(rows, seed)
    return frame if label else frame.drop(columns=["churned"])


def registry(stack):
    from conveyor.registry.mlflow import MlflowRegistryHook

    return MlflowRegistryHook(stack.tracking_uri)


def versions_of(stack, model: str = "churn") -> list:
    return registry(stack).client.search_model_versions(f"name='{model}'")


def invoke(stack) -> tuple[str, list]:
    """``invoke_endpoint`` through boto3's ``sagemaker-runtime`` on the published port: (version, predictions)."""
    response = stack.runtime().invoke_endpoint(
        EndpointName="churn", ContentType="text/csv", Body=f"{HEADER}\n{SAMPLE_ROW}\n".encode()
    )
    return response["InvokedProductionVariant"], json.loads(response["Body"].read())["predictions"]


def ti(stack, dag_id: str, run_id: str, task_id: str) -> dict:
    return next(t for t in stack.api.task_instances(dag_id, run_id) if t["task_id"] == task_id)


def test_example_secrets_are_refused_naming_the_variables(compose_root):
    from compose_stack import ComposeStack

    stack = ComposeStack(compose_root, project="conveyor-stack-refusal")
    done = stack.compose("run", "--rm", "secrets-check", check=False, env_file=PROJECT / ".env.example")
    said = done.stdout + done.stderr
    assert done.returncode != 0, said
    for name in ("AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        assert name in said, said
    stack.compose("down", "-v", check=False, env_file=PROJECT / ".env.example")


def test_every_service_healthy_and_published_on_loopback_only(stack):
    assert stack.not_ready() == []
    published = []
    for name, container in stack.containers().items():
        for bindings in (container["HostConfig"].get("PortBindings") or {}).values():
            published += [(name, b["HostIp"]) for b in bindings or []]
    assert {"airflow-apiserver", "mlflow", "minio", "model-endpoint", "postgres"} <= {n for n, _ in published}
    assert {ip for _, ip in published} == {"127.0.0.1"}, published


def test_churn_from_an_s3_drop_to_the_endpoint_the_warehouse_and_the_monitor(stack):
    api = stack.api
    dags = ["churn__ingest", "churn__train", "churn__deploy", "churn__batch_predict", "churn__monitor"]
    wait_for("the churn DAGs to be parsed", lambda: set(dags) <= set(api.dag_ids(tag="churn")), START_S)
    for dag_id in dags:
        api.unpause(dag_id)

    stack.write_drop("drop-0001", churn(800, seed=7))
    ingest = api.trigger("churn__ingest")
    api.wait_run("churn__ingest", ingest["dag_run_id"], RUN_S)
    assert set(api.task_states("churn__ingest", ingest["dag_run_id"]).values()) == {"success"}
    listed = stack.s3().list_objects_v2(Bucket="conveyor-lake", Prefix="raw/churn/")
    assert any(o["Key"].endswith("manifest.json") for o in listed.get("Contents", [])), listed.get("Contents")

    train = api.wait_new_run("churn__train", set(), START_S)
    assert train["run_type"] == "asset_triggered"
    api.wait_run("churn__train", train["dag_run_id"], RUN_S)
    hostname = ti(stack, "churn__train", train["dag_run_id"], "train")["hostname"]
    assert hostname == stack.containers()["airflow-worker"]["Config"]["Hostname"]  # ran in the Celery worker

    deploy = api.wait_new_run("churn__deploy", set(), START_S)
    api.wait_run("churn__deploy", deploy["dag_run_id"], RUN_S)
    hook = registry(stack)
    assert str(hook.champion("churn").version) == "1"
    assert hook.champion("churn").tags["conveyor_run_id"] == train["dag_run_id"]
    version, predictions = invoke(stack)
    assert version == "1" and predictions[0]["prediction"] in ("yes", "no")

    inputs = churn(300, seed=99, label=False)
    stack.write_drop("batch-0001", inputs, "inference", fmt="parquet")
    batch = api.trigger("churn__batch_predict", {"input": "", "model": "champion"})
    api.wait_run("churn__batch_predict", batch["dag_run_id"], RUN_S)
    import sqlalchemy as sa

    engine = sa.create_engine(stack.warehouse_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT customer_id, model_version FROM churn_predictions WHERE run_id = :run"),
            {"run": batch["dag_run_id"]},
        ).fetchall()
    engine.dispose()
    assert sorted(r.customer_id for r in rows) == sorted(inputs["customer_id"])
    assert {r.model_version for r in rows} == {"1"}

    monitor = api.trigger("churn__monitor")
    api.wait_run("churn__monitor", monitor["dag_run_id"], RUN_S)
    reports = stack.s3().list_objects_v2(Bucket="conveyor-lake", Prefix="reports/churn/")
    assert reports.get("KeyCount", 0) > 0


def test_worker_container_killed_mid_train_retries_with_one_registry_version(stack):
    api = stack.api
    before = len(versions_of(stack))
    run_id = api.trigger("churn__train", {"time_limit": 20, "deploy": False})["dag_run_id"]

    def training() -> bool:
        if ti(stack, "churn__train", run_id, "train")["state"] != "running":
            return False
        return "train.py" in stack.exec("airflow-worker", "ps", "-eo", "args")

    wait_for("train.py to run in the worker container", training, RUN_S, interval=1)
    time.sleep(3)  # well into training
    worker = stack.container_id("airflow-worker")
    import subprocess

    subprocess.run(["docker", "kill", worker], check=True, capture_output=True)
    # restart: always brings it back; if this engine counts a kill as a manual stop, start it as an operator would.
    time.sleep(5)
    if not stack.containers()["airflow-worker"]["State"]["Running"]:
        subprocess.run(["docker", "start", worker], check=True, capture_output=True)
    api.wait_run("churn__train", run_id, RUN_S + 180)
    train = ti(stack, "churn__train", run_id, "train")
    assert train["state"] == "success" and train["try_number"] >= 2
    mine = [v for v in versions_of(stack) if v.tags.get("conveyor_run_id") == run_id]
    assert len(mine) == 1, [(v.version, v.tags) for v in mine]
    assert len(versions_of(stack)) == before + 1


def test_endpoint_container_restarted_serves_the_live_version(stack):
    import subprocess

    live = registry(stack).live_version("churn", "churn")
    subprocess.run(["docker", "restart", stack.container_id("model-endpoint")], check=True, capture_output=True)
    version, _ = wait_for("the endpoint to answer after its restart", lambda: invoke(stack), 180)
    assert version == live


def test_up_again_is_idempotent(stack):
    before = {name: c["Id"] for name, c in stack.containers().items() if name not in ONE_SHOTS}
    stack.compose("up", "-d")
    stack.wait_healthy(600)
    after = stack.containers()
    assert {name: c["Id"] for name, c in after.items() if name not in ONE_SHOTS} == before  # nothing recreated
    for name in ONE_SHOTS:
        assert after[name]["State"]["ExitCode"] == 0, stack.logs(name)
    # airflow-init ran again on the state volume: the endpoint's credentials stay private (it refuses them otherwise).
    credentials = "/opt/airflow/state/endpoint-credentials.json"
    assert stack.exec("model-endpoint", "stat", "-c", "%a", credentials).strip() == "600"
    version, _ = invoke(stack)
    assert version == registry(stack).live_version("churn", "churn")
