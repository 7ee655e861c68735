"""A pipeline in sagemaker mode end to end on moto: train -> register -> approve -> deploy -> batch, with dag.test().

Everything AWS goes to moto's server: the lake (S3), training and transform jobs, the Model
Registry (model package group, packages, approval), models, endpoint configurations and the
endpoint. moto runs no container, so ``sagemaker_emulator`` runs them as SageMaker would: the
training job runs ``include/training/.../train.py`` in script mode, the transform job runs the
model's own ``code/inference.py`` over the job's S3 input. The endpoint is created (moto reports it
``InService`` at once); moto has no ``UpdateEndpoint``, so the blue/green update is covered by the
unit tests (``tests/unit/operators/test_deploy_sagemaker.py``), mocked at the hook.
"""

from __future__ import annotations

import json

import boto3
import pytest
import sqlalchemy as sa

from helpers import churn_csv, dags, ingest_and_validate, states, write_drop
from sagemaker_pipeline import sagemaker_include

pytestmark = pytest.mark.slow


def test_train_register_approve_deploy_and_batch_on_sagemaker(
    airflow_db, s3_lake, sagemaker_aws, training_emulator, transform_emulator, tmp_path, monkeypatch
):
    from conveyor.demo import churn_frame
    from conveyor.registry import registry_hook
    from conveyor.spec import get_spec

    sagemaker_include(
        tmp_path / "include",
        monkeypatch,
        {
            "trainer": {"time_limit": 10, "hyperparameters": {"GBM": {}}},
            # A 10-second model of 1,200 rows: the gate only has to let it through (quality is not tested here).
            "gate": {"thresholds": {"roc_auc": 0.6, "balanced_accuracy": 0.5}, "on_reject": "fail"},
            "sagemaker": {"check_interval_seconds": 1, "inference_image_uri": None},
            "deploy": {
                "endpoint": {"enabled": True, "name": "churn", "capture_share": 0.1},
                "batch": {"enabled": True, "chunk_rows": 700, "table": "churn_predictions"},
            },
        },
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # experiment tracking
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CONVEYOR_WAREHOUSE_URL", f"sqlite:///{tmp_path}/warehouse.db")
    sagemaker = boto3.client("sagemaker", endpoint_url=sagemaker_aws, region_name="us-east-1")
    spec = get_spec("churn")
    registry = registry_hook(spec)

    # Ingest (S3 lake), then train as a SageMaker training job, register in the Model Registry, approve.
    write_drop(s3_lake, "d1", {"customers.csv": churn_csv(1200)})
    ingest_and_validate("d1", run_id="ingest-run")
    bag = dags()
    train = bag["churn__train"].test(run_conf={"time_limit": 10})
    assert str(train.state) == "success", states(train)
    from conveyor.aws.training import plain_s3_uri, training_job_name

    assert training_emulator.created == [
        training_job_name("churn", "churn__train", train.run_id)
    ]  # one, named after the run
    champion = registry.champion("churn")
    assert champion is not None and str(champion.version) == "1" and champion.tags["approval_status"] == "Approved"
    assert champion.source == plain_s3_uri(s3_lake.models("churn", train.run_id) / "model.tar.gz")
    assert champion.tags["conveyor_run_id"] == train.run_id and champion.tags["backend"] == "sagemaker"
    assert 0.6 < float(champion.tags["test_roc_auc"]) <= 1.0
    packages = sagemaker.list_model_packages(ModelPackageGroupName="churn")["ModelPackageSummaryList"]
    assert [p["ModelApprovalStatus"] for p in packages] == ["Approved"]

    # Deploy: a SageMaker model, an endpoint config with data capture, a new endpoint; the live version recorded.
    deploy = bag["churn__deploy"].test()
    assert str(deploy.state) == "success", states(deploy)
    endpoint = sagemaker.describe_endpoint(EndpointName="churn")
    assert endpoint["EndpointStatus"] == "InService"
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert config["DataCaptureConfig"]["InitialSamplingPercentage"] == 10
    assert config["DataCaptureConfig"]["DestinationS3Uri"] == f"{s3_lake.root}/capture/churn"
    model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == champion.source.replace("lake_s3@", "")
    assert model["PrimaryContainer"]["Image"].endswith("/autogluon:1.6.3-cpu-amzn2023")
    assert registry.live_version("churn", "churn") == "1"
    # Deploying the same version again changes nothing on the endpoint.
    again = bag["churn__deploy"].test()
    assert str(again.state) == "success", states(again)
    assert sagemaker.describe_endpoint(EndpointName="churn")["EndpointConfigName"] == endpoint["EndpointConfigName"]
    assert len(sagemaker.list_endpoint_configs()["EndpointConfigs"]) == 1

    # Batch: a pending inference drop scored by a transform job into the analysts' table.
    frame = churn_frame(2000, seed=5).drop(columns=["churned"])
    drop = s3_lake.landing("churn", "inference", "b1")
    drop.mkdir(parents=True, exist_ok=True)
    (drop / "customers.parquet").write_bytes(frame.to_parquet(index=False))
    (drop / "_SUCCESS").write_bytes(b"")
    batch = bag["churn__batch_predict"].test()
    assert str(batch.state) == "success", states(batch)
    assert len(transform_emulator.created) == 1
    engine = sa.create_engine(f"sqlite:///{tmp_path}/warehouse.db")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT run_id, model_version, COUNT(*), COUNT(DISTINCT customer_id), "
                "MIN(proba_yes + proba_no), MAX(proba_yes + proba_no) "
                "FROM churn_predictions GROUP BY 1, 2"
            )
        ).fetchall()
    assert len(rows) == 1
    run_id, version, count, ids, low, high = rows[0]
    assert (run_id, version, count, ids) == (batch.run_id, "1", 2000, 2000)
    assert abs(low - 1) < 1e-6 and abs(high - 1) < 1e-6
    assert (s3_lake.landing("churn", "inference", "b1") / "_SCORED.json").exists()
    success = json.loads((s3_lake.predictions("churn", batch.run_id) / "_SUCCESS.json").read_text())
    assert success["rows"] == 2000 and success["parts"] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert success["transform_job"] == transform_emulator.created[0]
    job = sagemaker.describe_transform_job(TransformJobName=transform_emulator.created[0])
    assert job["TransformJobStatus"] == "Completed" and job["ModelName"] == model["ModelName"]
