"""Conveyor on Airflow's distributed set-up: CeleryExecutor, PostgreSQL, Redis, every component a process.

Everything is driven through the REST API v2 the way a person uses the UI (log in, unpause,
trigger with the form's Params, answer the approval request), against one stack started for the
module (see ``conftest.py``). The tests run in order and build on each other:

1. the whole chain: a drop → ``churn__ingest`` (triggered) → ``churn__train`` (dataset Asset) →
   ``churn__deploy`` (model Asset) → ``churn__batch_predict`` (triggered with Params) → rows in
   the PostgreSQL warehouse;
2. manual approval: approve once (the version goes live), reject once (it does not);
3. the scheduler killed and restarted mid-run;
4. the warehouse unreachable in the middle of the batch write;
5. the Celery worker killed during training.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from celery_stack import process_tree

pytestmark = pytest.mark.slow

RUN_S = 420  # the most any one DAG run may take here (2 shared cores)
START_S = 180  # the most a run may take to be created by an Asset event
SAMPLE_ROW = "C-1,3,99.5,298.5,month-to-month,card,fiber,5,23,north"
HEADER = (
    "customer_id,tenure_months,monthly_charges,total_charges,contract,payment_method,internet_service,"
    "support_calls,age,region"
)


def churn(rows: int, seed: int, label: bool = True):
    from conveyor.demo import churn_frame

    frame = churn_frame(rows, seed)
    return frame if label else frame.drop(columns=["churned"])


def registry(stack):
    from conveyor.registry.mlflow import MlflowRegistryHook

    return MlflowRegistryHook(stack.tracking_uri)


def versions_of(stack, model: str) -> list:
    return registry(stack).client.search_model_versions(f"name='{model}'")


def served_version(stack, pipeline: str) -> str:
    """The model version that answers a request on the pipeline's endpoint (with the stack's generated token)."""
    token = json.loads((stack.root / "state" / "endpoint-credentials.json").read_text())["token"]
    answer = httpx.post(
        f"{stack.endpoint_url(pipeline)}/invocations",
        content=f"{HEADER}\n{SAMPLE_ROW}\n",
        headers={"Content-Type": "text/csv", "Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return answer.headers["X-Conveyor-Model-Version"]


def prediction_counts(stack, table: str) -> dict[str, tuple[int, int, set[str]]]:
    """Per run: rows, distinct customers, model versions, read from the PostgreSQL warehouse."""
    import sqlalchemy as sa

    engine = sa.create_engine(stack.warehouse_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                sa.text(
                    f"SELECT run_id, COUNT(*), COUNT(DISTINCT customer_id), STRING_AGG(DISTINCT model_version, ',') "
                    f"FROM {table} GROUP BY run_id"
                )
            ).fetchall()
    finally:
        engine.dispose()
    return {run: (rows, customers, set(models.split(","))) for run, rows, customers, models in found}


def running(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ti(stack, dag_id: str, run_id: str, task_id: str) -> dict:
    return next(t for t in stack.api.task_instances(dag_id, run_id) if t["task_id"] == task_id)


def batch_run(stack, drop: str, rows: int, seed: int) -> str:
    """Drop unlabelled rows in ``landing/churn/inference/`` and trigger batch_predict on them by hand."""
    stack.write_drop("churn", drop, churn(rows, seed, label=False), "inference", fmt="parquet")
    return stack.api.trigger("churn__batch_predict", {"input": "", "model": "champion"})["dag_run_id"]


def test_chain_from_drop_to_warehouse_through_the_rest_api(stack):
    api = stack.api
    dags = ["churn__ingest", "churn__train", "churn__deploy", "churn__batch_predict"]
    assert set(dags) <= set(api.dag_ids(tag="churn"))
    for dag_id in dags:
        api.unpause(dag_id)

    stack.write_drop("churn", "drop-0001", churn(800, seed=7))
    ingest = api.trigger("churn__ingest")
    assert ingest["conf"] == {} and ingest["run_type"] == "manual"
    api.wait_run("churn__ingest", ingest["dag_run_id"], RUN_S)
    assert api.task_states("churn__ingest", ingest["dag_run_id"]) == {
        "wait_for_drop": "success",
        "ingest": "success",
        "validate": "success",
    }

    # New validated data starts training (the dataset Asset); approval is automatic.
    train = api.wait_new_run("churn__train", set(), START_S)
    assert train["run_type"] == "asset_triggered"
    api.wait_run("churn__train", train["dag_run_id"], RUN_S)
    assert set(api.task_states("churn__train", train["dag_run_id"]).values()) == {"success"}

    # The approved version starts the deploy DAG (the model Asset).
    deploy = api.wait_new_run("churn__deploy", set(), START_S)
    assert deploy["run_type"] == "asset_triggered"
    api.wait_run("churn__deploy", deploy["dag_run_id"], RUN_S)
    hook = registry(stack)
    champion = hook.champion("churn")
    assert str(champion.version) == "1" and champion.tags["approval_status"] == "Approved"
    assert champion.tags["conveyor_run_id"] == train["dag_run_id"]
    assert hook.live_version("churn", "churn") == "1"
    assert served_version(stack, "churn") == "1"

    # Batch: triggered by hand with the form's Params; the rows land in the PostgreSQL table.
    inputs = churn(300, seed=99, label=False)
    stack.write_drop("churn", "batch-0001", inputs, "inference", fmt="parquet")
    batch = api.trigger("churn__batch_predict", {"input": "", "model": "champion"})
    assert batch["conf"] == {"input": "", "model": "champion"}
    api.wait_run("churn__batch_predict", batch["dag_run_id"], RUN_S)
    import sqlalchemy as sa

    engine = sa.create_engine(stack.warehouse_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT customer_id, prediction, model_name, model_version, proba_yes "
                "FROM churn_predictions WHERE run_id = :run"
            ),
            {"run": batch["dag_run_id"]},
        ).fetchall()
    engine.dispose()
    assert len(rows) == len(inputs)
    assert sorted(r.customer_id for r in rows) == sorted(inputs["customer_id"])
    assert {(r.model_name, r.model_version) for r in rows} == {("churn", "1")}
    assert {r.prediction for r in rows} <= {"yes", "no"}
    assert all(0.0 <= r.proba_yes <= 1.0 for r in rows)
    assert (stack.lake_root / "landing" / "churn" / "inference" / "batch-0001" / "_SCORED.json").exists()


def test_manual_approval_approve_then_reject_through_the_rest_api(stack):
    api = stack.api
    for dag_id in ("churn_manual__ingest", "churn_manual__train", "churn_manual__deploy"):
        api.unpause(dag_id)
    stack.write_drop("churn_manual", "drop-0001", churn(800, seed=11))
    ingest = api.trigger("churn_manual__ingest")
    api.wait_run("churn_manual__ingest", ingest["dag_run_id"], RUN_S)
    first = api.wait_new_run("churn_manual__train", set(), START_S)["dag_run_id"]

    def pending(run_id: str):
        return next((d for d in api.hitl_details("churn_manual__train", run_id) if not d["response_received"]), None)

    def awaiting(run_id: str):
        # The request is written just before the task instance turns awaiting_input: wait for both.
        found = pending(run_id)
        return found if found and found["task_instance"]["state"] == "awaiting_input" else None

    request = api.wait("the approval request of the first run, awaiting input", lambda: awaiting(first), RUN_S)
    assert request["task_instance"]["task_id"] == "approve"
    assert request["task_instance"]["state"] == "awaiting_input"
    assert request["options"] == ["Approve", "Reject"]
    assert "version 1" in request["subject"]
    assert "roc_auc" in request["body"]  # the gate's comparison is shown to the person
    assert registry(stack).version("churn_manual", "1").tags["approval_status"] == "PendingManualApproval"

    # Bad answers: an option that is not offered is refused, and nothing is decided.
    api.answer("churn_manual__train", first, "approve", ["Maybe"], expect=(400,))
    assert pending(first) is not None
    answer = api.answer("churn_manual__train", first, "approve", ["Approve"])
    assert answer["chosen_options"] == ["Approve"] and answer["responded_by"]["name"] == "admin"
    # A second answer (a second person, a double click) is refused: the first one stands.
    api.answer("churn_manual__train", first, "approve", ["Reject"], expect=(409,))

    api.wait_run("churn_manual__train", first, RUN_S)
    assert api.task_states("churn_manual__train", first)["publish"] == "success"
    deploy = api.wait_new_run("churn_manual__deploy", set(), START_S)
    api.wait_run("churn_manual__deploy", deploy["dag_run_id"], RUN_S)
    hook = registry(stack)
    v1 = hook.version("churn_manual", "1")
    assert v1.tags["approval_status"] == "Approved" and v1.tags["decided_by"] == "admin"
    assert str(hook.champion("churn_manual").version) == "1"
    assert hook.live_version("churn_manual", "churn_manual") == "1"
    assert served_version(stack, "churn_manual") == "1"

    # A retrain triggered by hand with the form's Params, rejected by the person.
    second = api.trigger("churn_manual__train", {"time_limit": 8, "deploy": True})["dag_run_id"]
    request = api.wait("the approval request of the second run", lambda: pending(second), RUN_S)
    assert "version 2" in request["subject"]
    api.answer("churn_manual__train", second, "approve", ["Reject"])
    api.wait_run("churn_manual__train", second, RUN_S)
    states = api.task_states("churn_manual__train", second)
    assert states["approve"] == "success" and states["publish"] == "skipped"
    v2 = hook.version("churn_manual", "2")
    assert v2.tags["approval_status"] == "Rejected" and v2.tags["decided_by"] == "admin"
    assert str(hook.champion("churn_manual").version) == "1"
    assert hook.live_version("churn_manual", "churn_manual") == "1"
    assert served_version(stack, "churn_manual") == "1"
    assert [r["dag_run_id"] for r in api.runs("churn_manual__deploy")] == [deploy["dag_run_id"]]


def test_scheduler_killed_and_restarted_mid_run(stack):
    api = stack.api
    run_id = batch_run(stack, "batch-0002", rows=200, seed=101)
    at_kill = api.wait(
        "the run's first task to be handed to the worker",
        lambda: (
            (s := api.task_states("churn__batch_predict", run_id)).get("resolve") in ("queued", "running", "success")
            and s
        ),
        RUN_S,
        interval=0.3,
    )
    stack.kill_component("scheduler")
    assert at_kill.get("score") not in ("running", "success"), f"the run was not mid-way when killed: {at_kill}"
    time.sleep(3)  # the run sits without a scheduler; its running task goes on in the worker
    stack.start_component("scheduler")
    api.wait_run("churn__batch_predict", run_id, RUN_S)
    assert api.task_states("churn__batch_predict", run_id) == {"resolve": "success", "score": "success"}
    rows, customers, models = prediction_counts(stack, "churn_predictions")[run_id]
    assert rows == customers == 200
    assert models == {str(registry(stack).champion("churn").version)}


def test_warehouse_unreachable_during_the_batch_write(stack):
    api = stack.api
    # The moment the first INSERT of the batch reaches PostgreSQL, every warehouse connection is
    # cut and new ones are refused for 5 seconds; the transaction (DELETE + INSERTs) never commits.
    stack.proxy.arm(b"INSERT INTO churn_predictions", outage_s=5)
    run_id = batch_run(stack, "batch-0003", rows=250, seed=103)
    api.wait_run("churn__batch_predict", run_id, RUN_S)
    assert stack.proxy.trips == 1
    score = ti(stack, "churn__batch_predict", run_id, "score")
    assert score["state"] == "success" and score["try_number"] >= 2
    first_try = stack.airflow_home / "logs" / "dag_id=churn__batch_predict" / f"run_id={run_id}" / "task_id=score"
    log = (first_try / "attempt=1.log").read_text(errors="replace")
    assert "OperationalError" in log, log[-3000:]
    counts = prediction_counts(stack, "churn_predictions")
    assert counts[run_id][:2] == (250, 250)  # every row once
    assert all(rows == customers for rows, customers, _ in counts.values())


def test_celery_worker_killed_during_training(stack):
    import psutil

    api = stack.api
    before = len(versions_of(stack, "churn"))
    run_id = api.trigger("churn__train", {"time_limit": 20, "deploy": False})["dag_run_id"]

    def trainer():
        if ti(stack, "churn__train", run_id, "train")["state"] != "running":
            return None
        for pid in process_tree(stack.procs["worker"].pid):
            try:
                if any(part.endswith("train.py") for part in psutil.Process(pid).cmdline()):
                    return pid
            except psutil.NoSuchProcess:
                continue
        return None

    training = api.wait("the training child process to run under the worker", trainer, RUN_S, interval=1)
    time.sleep(3)  # well into training
    killed = stack.kill_component("worker")
    assert training in killed, (training, killed)
    api.wait("the training process to be gone", lambda: not running(training), 30, interval=0.5)
    stack.start_component("worker")

    api.wait_run("churn__train", run_id, RUN_S + 120)
    train = ti(stack, "churn__train", run_id, "train")
    assert train["state"] == "success" and train["try_number"] >= 2
    assert set(api.task_states("churn__train", run_id).values()) == {"success"}
    mine = [v for v in versions_of(stack, "churn") if v.tags.get("conveyor_run_id") == run_id]
    assert len(mine) == 1, [(v.version, v.tags) for v in mine]
    assert len(versions_of(stack, "churn")) == before + 1
