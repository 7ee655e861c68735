"""The ingest DAG end to end with ``dag.test()``: real Airflow, SQLite metadata DB, local lake."""

from __future__ import annotations

import pytest

from conveyor.data.datasets import latest_version
from helpers import churn_csv, dags, states, write_drop


def ingest_dag():
    return dags()["churn__ingest"]


@pytest.mark.slow
def test_ingest_dag_publishes_a_validated_dataset(airflow_db, lake):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    write_drop(lake, "2026-11-01", {"customers.csv": churn_csv(1000)})
    run = ingest_dag().test()
    assert str(run.state) == "success", states(run)
    assert states(run) == {"wait_for_drop": "success", "ingest": "success", "validate": "success"}
    version = latest_version(lake, "churn")
    assert version is not None
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == run.run_id).all()
    assert [event.extra["version"] for event in events] == [version]


@pytest.mark.slow
def test_ingest_dag_fails_and_quarantines_a_bad_drop(airflow_db, lake):
    write_drop(lake, "bad", {"customers.csv": churn_csv(300, churned=["maybe"] * 300)})
    run = ingest_dag().test()
    assert str(run.state) == "failed"
    assert states(run)["validate"] == "failed"
    assert lake.quarantine("churn", "bad").exists()
    assert latest_version(lake, "churn") is None
