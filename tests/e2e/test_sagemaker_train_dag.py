"""The train DAG of a ``compute: sagemaker`` / ``registry: sagemaker`` pipeline, end to end on moto.

``dag.test()`` runs split -> train -> evaluate -> gate -> register -> approve -> publish with the
lake on moto's S3, the training job and the Model Registry on moto's SageMaker, and the deferred
wait in the provider's ``SageMakerTrigger`` (run inline by ``dag.test``, polling moto). moto runs no
training container: ``training_emulator`` (``tests/sagemaker_emulator.py``) runs the real
``include/training/autogluon_tabular/train.py`` for each job as a SageMaker container would
(channels and ``sourcedir.tar.gz`` from S3, ``SM_*`` environment, ``model.tar.gz`` back to the
job's output path, CloudWatch log lines). Experiment runs still go to MLflow tracking (SQLite).
"""

from __future__ import annotations

import json
import uuid

import pytest

from conveyor import settings
from helpers import churn_csv, ingest_and_validate, write_drop
from sagemaker_emulator import sagemaker_aws, sagemaker_pipeline, training_emulator  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def pipeline(tmp_path, monkeypatch, airflow_db, s3_lake, training_emulator):
    """The churn pipeline on SageMaker (its own model package group), a validated dataset on S3."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    # A few seconds of one GBM: the gate asks only for better than chance (this tests the plumbing).
    gate = {"metric": "roc_auc", "thresholds": {"roc_auc": 0.6}, "min_improvement": 0.0, "on_reject": "fail"}
    spec = sagemaker_pipeline(tmp_path, monkeypatch, check_interval_seconds=1, name_prefix=f"e{uuid.uuid4().hex[:8]}-",
                              trainer={"hyperparameters": {"GBM": {}}}, changes={"gate": gate})
    write_drop(s3_lake, "d1", {"customers.csv": churn_csv(1200)})
    ingested, _ = ingest_and_validate("d1", run_id="ingest-run")
    return {"spec": spec, "lake": s3_lake, "dataset": ingested["version"], "emulator": training_emulator}


def train_dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(settings.PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["churn__train"]


def test_train_register_approve_on_sagemaker(pipeline):
    from conveyor.backends.sagemaker import plain_s3_uri, training_job_name
    from conveyor.hooks.mlflow_registry import MlflowRegistryHook
    from conveyor.lake import read_json
    from conveyor.registry import registry_hook

    dag = train_dag()
    assert type(dag.get_task("train")).__name__ == "SageMakerTrainModelOperator"
    run = dag.test(run_conf={"time_limit": 8})
    states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    assert set(states.values()) == {"success"}, states

    lake, spec = pipeline["lake"], pipeline["spec"]
    job = training_job_name("churn", "churn__train", run.run_id)
    assert pipeline["emulator"].created == [job]  # one job, named after the run

    registry = registry_hook(spec)
    champion = registry.champion("churn")
    assert champion is not None and champion.version == "1" and champion.tags["approval_status"] == "Approved"
    assert champion.source == plain_s3_uri(lake.models("churn", run.run_id) / "model.tar.gz")
    assert champion.tags["conveyor_run_id"] == run.run_id and champion.tags["backend"] == "sagemaker"
    assert champion.tags["dataset_version"] == pipeline["dataset"]
    assert 0.6 < float(champion.tags["test_roc_auc"]) <= 1.0
    assert champion.group == f"{spec.sagemaker.name_prefix}churn"

    metadata_of_model = read_json(lake.reports("churn", run.run_id) / "evaluation" / "metrics.json")
    assert abs(metadata_of_model["roc_auc"] - float(champion.tags["test_roc_auc"])) < 1e-5
    gate = read_json(lake.reports("churn", run.run_id) / "gate" / "gate.json")
    assert gate["passed"] and gate["champion"] is None
    mlflow_run = MlflowRegistryHook().client.get_run(champion.run_id)
    assert mlflow_run.data.tags["backend"] == "sagemaker" and mlflow_run.data.tags["gate_decision"] == "passed"
    published = json.loads(json.dumps(run.get_task_instance("publish").xcom_pull(task_ids="publish")))
    assert published["version"] == "1"
