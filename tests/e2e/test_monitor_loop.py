"""The closed loop end to end: drifted traffic and poor feedback retrain the model, which replaces the old one.

train v1 -> deploy (capture on) -> batch on drifted data + endpoint traffic with inference ids ->
feedback (a drop with bad rows, and POST /feedback) -> monitor (drift, live metric, retrain fires)
-> train on the dataset plus the labelled rows -> gate beats v1 -> deploy v2. (The cool-down and
repeated decisions are covered by tests/unit/monitoring/test_decisions.py and the operator tests.)
"""

from __future__ import annotations

import httpx
import pytest

from helpers import churn_csv, dags, ingest_and_validate, private_churn, states, write_drop

pytestmark = pytest.mark.slow


@pytest.fixture
def loop(airflow_db, lake, tmp_path, monkeypatch):
    from conveyor.serving.process import stop_endpoint

    # Tiny data and 10 s budgets: the gate's absolute floor is lowered; the comparison with v1 stays.
    port = private_churn(
        tmp_path,
        monkeypatch,
        {
            "capture_share: 0.1": "capture_share: 1.0",
            "min_new_labels: 200": "min_new_labels: 100",
            "thresholds: {roc_auc: 0.70, balanced_accuracy: 0.60}": "thresholds: {roc_auc: 0.60}",
        },
    )
    yield {"url": f"http://127.0.0.1:{port}", "lake": lake}
    stop_endpoint("churn")


def test_drift_and_feedback_retrain_and_replace_the_model(loop):
    from conveyor.demo import churn_frame
    from conveyor.monitoring.records import load_labels
    from conveyor.registry.mlflow import MlflowRegistryHook

    lake, url = loop["lake"], loop["url"]
    family = dags()
    assert "churn__monitor" in family

    write_drop(lake, "d1", {"customers.csv": churn_csv(1500)})
    ingest_and_validate("d1", run_id="ingest-run")
    run = family["churn__train"].test(run_conf={"time_limit": 10})
    assert str(run.state) == "success", states(run)
    run = family["churn__deploy"].test()
    assert str(run.state) == "success", states(run)
    hook = MlflowRegistryHook()
    assert str(hook.champion("churn").version) == "1"

    # The market shifts: scored in batch, and live on the endpoint with inference ids.
    shifted = churn_frame(1200, seed=21, shifted=True)
    inference = shifted.drop(columns=["churned"])
    write_drop(lake, "inference/b1", {"part.csv": inference.iloc[:900].to_csv(index=False).encode()})
    run = family["churn__batch_predict"].test()
    assert str(run.state) == "success", states(run)
    live_rows = inference.iloc[900:1000].drop(columns=["customer_id"])
    from conveyor.serving.auth import endpoint_credentials

    bearer = {"Authorization": f"Bearer {endpoint_credentials().token}"}  # the endpoint's generated token
    for number, (_, row) in enumerate(live_rows.iterrows()):
        answer = httpx.post(
            f"{url}/invocations",
            content=row.to_frame().T.to_csv(index=False, header=False),
            headers={"Content-Type": "text/csv", "X-Amzn-SageMaker-Inference-Id": f"req-{number}", **bearer},
        )
        assert answer.status_code == 200, answer.text

    # Ground truth: a drop for the batch rows (with bad rows), and POST /feedback for live requests.
    truth = shifted[["customer_id", "churned"]].rename(columns={"customer_id": "id", "churned": "label"})
    rows = truth.iloc[:900].copy()
    bad = [
        {"id": "NOPE-1", "label": "yes"},
        {"id": rows.iloc[0]["id"], "label": "no"},
        {"id": rows.iloc[1]["id"] + "x", "label": "maybe"},
    ]
    import pandas as pd

    drop = pd.concat([rows, pd.DataFrame(bad)], ignore_index=True)
    write_drop(lake, "feedback/f1", {"labels.csv": drop.to_csv(index=False).encode()})
    api = [{"id": f"req-{n}", "label": shifted.iloc[900 + n]["churned"]} for n in range(100)]
    answer = httpx.post(f"{url}/feedback", json={"feedback": api}, headers=bearer)
    assert answer.status_code == 202, answer.text
    refused = httpx.post(f"{url}/feedback", json={"id": "req-1", "label": "perhaps"}, headers=bearer)
    assert refused.status_code == 400 and "class set" in refused.json()["error"]

    run = family["churn__monitor"].test()
    assert str(run.state) == "success", states(run)
    decide = run.get_task_instance("decide").xcom_pull(task_ids="decide")
    assert decide["retrain"] is True, decide
    assert any("drift" in r for r in decide["reasons"]) and any("live roc_auc" in r for r in decide["reasons"])
    assert decide["live"]["labels"] == 1000 and decide["live"]["value"] < 0.65
    assert decide["labelled_rows"] == 1000
    assert states(run)["trigger_retrain"] == "success"
    labels = load_labels(lake, "churn")
    # monitor.feedback_duplicates: last (the default): the later label of an id is kept and wins
    assert len(labels) == 1001 and labels["id"].nunique() == 1000
    rejected = (lake.quarantine("churn", "feedback/f1") / "rejected.csv").read_text()
    assert "NOPE-1" in rejected and "unknown id" in rejected and "first label wins" not in rejected
    report = (lake.reports("churn", run.run_id) / "monitor" / "index.html").read_text()
    assert "retrain" in report.lower()

    # Retraining on the dataset plus the labelled rows; the gate compares with v1 on the same test set.
    run = family["churn__train"].test(run_conf={"time_limit": 10, "labelled_rows": decide["labelled_uri"]})
    assert str(run.state) == "success", states(run)
    split = run.get_task_instance("split").xcom_pull(task_ids="split")
    assert split["labelled"]["rows"] == 1000 and split["labelled"]["rejected"] == 0  # they pass the suite
    gate = run.get_task_instance("gate").xcom_pull(task_ids="gate")
    assert gate["passed"] is True, gate
    assert str(hook.champion("churn").version) == "2"
    run = family["churn__deploy"].test()
    assert str(run.state) == "success", states(run)
    assert httpx.get(f"{url}/ping").headers["X-Conveyor-Model-Version"] == "2"
