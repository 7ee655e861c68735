"""Deploy and batch-predict DAGs end to end: train, roll out (and back), score in batch."""

from __future__ import annotations

import json
import tarfile
import threading
import time

import httpx
import pytest

from helpers import churn_csv, dags, ingest_and_validate, private_churn, states, write_drop

pytestmark = pytest.mark.slow


@pytest.fixture
def served(airflow_db, lake, tmp_path, monkeypatch):
    """A trained, approved churn model and a private registry, endpoint port and warehouse."""
    from conveyor.registry.mlflow import MlflowRegistryHook
    from conveyor.serving.process import stop_endpoint

    # A serving test: the gate floors are lowered so that a 15 s model on a loaded machine always reaches the endpoint.
    floors = {"thresholds: {roc_auc: 0.70, balanced_accuracy: 0.60}": "thresholds: {roc_auc: 0.60}"}
    port = private_churn(tmp_path, monkeypatch, floors)
    write_drop(lake, "d1", {"customers.csv": churn_csv(1200)})
    ingest_and_validate("d1", run_id="ingest-run")
    run = dags()["churn__train"].test(run_conf={"time_limit": 15})
    assert str(run.state) == "success", states(run)
    yield {"port": port, "url": f"http://127.0.0.1:{port}", "hook": MlflowRegistryHook(), "lake": lake}
    stop_endpoint("churn")


def broken_copy(source_uri: str, target, predict_body: str) -> str:
    """A copy of a model.tar.gz whose predict_fn is replaced (the model still loads)."""
    from conveyor.model.artifacts import fetch

    folder = fetch(source_uri, target.parent / "unpacked")
    code = folder / "code" / "inference.py"
    code.write_text(code.read_text() + "\n\n" + predict_body)
    with tarfile.open(target, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return target.as_uri()


def test_deploy_rolls_out_rolls_back_and_batch_scores(served, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException  # noqa: F401  (the deploy task fails with one)

    from conveyor.serving.auth import endpoint_credentials

    hook, url = served["hook"], served["url"]
    deploy = dags()["churn__deploy"]
    run = deploy.test()  # its smoke test signs its requests (SigV4) with the endpoint's generated key
    assert str(run.state) == "success", states(run)
    assert httpx.get(f"{url}/ping").status_code == 200
    csv = {"Content-Type": "text/csv", "Authorization": f"Bearer {endpoint_credentials().token}"}
    anonymous = httpx.post(f"{url}/invocations", content="1", headers={"X-Conveyor-Target": "candidate"})
    assert anonymous.status_code == 401  # the endpoint a deploy starts needs credentials
    assert hook.live_version("churn", "churn") == "1"

    # A second version whose answers differ from its evaluation: the smoke test must roll it back
    # while a client keeps calling the endpoint.
    v1 = hook.version("churn", "1")
    source = broken_copy(
        v1.source,
        tmp_path / "broken" / "model.tar.gz",
        "_original_predict = predict_fn\n"
        "def predict_fn(data, model):\n"
        "    out = _original_predict(data, model)\n"
        "    out['prediction'] = 'no'\n"
        "    return out\n",
    )
    mlflow_run = hook.ensure_run("churn", "broken-run", "broken-run", {})
    v2 = hook.register("churn", source, mlflow_run, {"conveyor_run_id": v1.tags["conveyor_run_id"]})
    hook.promote("churn", str(v2.version))
    row = "3,99.5,298.5,month-to-month,card,fiber,5,23,north"  # the 9 features, in metadata order
    failures, answers, stop = [], [], threading.Event()

    def client():
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                response = httpx.post(f"{url}/invocations", content=row, headers=csv, timeout=30)
                if response.status_code == 200:
                    answers.append(response.headers.get("X-Conveyor-Model-Version"))
                else:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            time.sleep(0.05)

    caller = threading.Thread(target=client, daemon=True)
    caller.start()
    run = deploy.test(run_conf={"version": str(v2.version)})
    stop.set()
    caller.join(timeout=60)
    assert str(run.state) == "failed" and states(run)["deploy"] == "failed"
    assert failures == [] and answers and set(answers) == {"1"}
    assert hook.live_version("churn", "churn") == "1"
    assert httpx.post(f"{url}/invocations", content=row, headers=csv).headers["X-Conveyor-Model-Version"] == "1"

    # Batch: score an inference drop with version 1, twice for the same run id, no duplicates.
    import sqlalchemy as sa

    from conveyor.demo import churn_frame

    lake = served["lake"]
    target = lake.landing("churn", "inference", "batch-1")
    target.mkdir(parents=True, exist_ok=True)
    unlabelled = churn_frame(3000, seed=5).drop(columns=["churned"])
    (target / "customers.parquet").write_bytes(unlabelled.to_parquet(index=False))
    (target / "_SUCCESS").write_bytes(b"")
    batch = dags()["churn__batch_predict"]
    run = batch.test(run_conf={"model": "1"})
    assert str(run.state) == "success", states(run)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/warehouse.db")
    with engine.connect() as conn:
        query = "SELECT run_id, model_version, COUNT(*) FROM churn_predictions GROUP BY 1, 2"
        rows = conn.execute(sa.text(query)).fetchall()
    assert [(r[1], r[2]) for r in rows] == [("1", 3000)]
    assert (lake.predictions("churn", run.run_id) / "_SUCCESS.json").exists()
    assert (lake.landing("churn", "inference", "batch-1") / "_SCORED.json").exists()
    summary = json.loads((lake.reports("churn", run.run_id) / "batch" / "summary.json").read_text())
    assert summary["rows"] == 3000 and summary["model"] == "churn v1"
