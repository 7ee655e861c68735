"""The train DAG with ``tuning:`` end to end (``dag.test()``): two real AutoGluon trials on churn, the best
registered, each trial a child MLflow run of the run the gate and the registry log to, the trials on the report."""

from __future__ import annotations

import shutil

import pytest
import yaml

from conveyor import settings
from helpers import churn_csv, dags, ingest_and_validate, states, write_drop

pytestmark = pytest.mark.slow


def test_two_trials_the_best_is_registered_and_every_trial_is_a_child_run(airflow_db, lake, tmp_path, monkeypatch):
    from conveyor.registry.mlflow import MlflowRegistryHook

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    include = tmp_path / "include"
    shutil.copytree(settings.include_dir(), include)
    path = include / "pipelines" / "churn.yaml"
    document = yaml.safe_load(path.read_text())
    document["gate"]["thresholds"] = {}
    document["tuning"] = {
        "metric": "roc_auc",
        "trials": 2,
        "budget": 20,  # 10 s a trial
        "strategy": "random",
        "search_space": {"GBM.num_leaves": {"type": "int", "low": 4, "high": 32}},
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    write_drop(lake, "d1", {"customers.csv": churn_csv(800)})
    ingest_and_validate("d1", run_id="ingest-run")

    run = dags()["churn__train"].test()
    assert str(run.state) == "success", states(run)

    registry = MlflowRegistryHook()
    (version,) = registry.client.search_model_versions("name='churn'")
    parent = registry.client.get_run(version.run_id)
    children = registry.client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    best = parent.data.tags["tuning_best_run_id"]
    assert best in {c.info.run_id for c in children}
    values = {c.info.run_id: c.data.metrics["validation_roc_auc"] for c in children}
    assert values[best] == max(values.values())
    assert "test_roc_auc" in parent.data.metrics  # the gate logged the best trial's model to the same run

    report = lake.reports("churn", run.run_id) / "evaluation"
    page = (report / "index.html").read_text()
    assert "<h2>Tuning trials</h2>" in page and page.count("GBM.num_leaves=") == 2
    assert '<img src="data:image/png;base64,' in page.split("<h2>Tuning trials</h2>")[1]  # its plot inlined
    assert not (report / "tuning_trials.png").exists()
