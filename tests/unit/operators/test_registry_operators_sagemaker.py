"""Register, approve and resolve with ``registry: sagemaker``: the same operators, the Model Registry on moto."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.aws.common import NotOnS3
from conveyor.operators.deploy import ResolveModelOperator
from conveyor.operators.registry import AutoApproveOperator, ModelApprovalOperator, RegisterModelOperator
from conveyor.registry import registry_hook
from conveyor.registry.base import APPROVED, PENDING, REJECTED, SHA256_TAG, STATUS_TAG
from conveyor.registry.mlflow import MlflowRegistryHook
from helpers import context
from sagemaker_emulator import sagemaker_pipeline


@pytest.fixture
def setup(mlflow_template, tmp_path, monkeypatch, s3_lake, sagemaker_aws):
    """A churn pipeline with ``registry: sagemaker`` (its own group on moto), an MLflow store for runs."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path))
    spec = sagemaker_pipeline(tmp_path, monkeypatch, name_prefix=f"o{uuid.uuid4().hex[:8]}-")
    return {
        "spec": spec,
        "uri": uri,
        "lake": s3_lake,
        "registry": registry_hook(spec),
        "mlflow": MlflowRegistryHook(uri),
    }


def spec_json(setup: dict) -> dict[str, Any]:
    """The spec as the factory passes it to operators."""
    return setup["spec"].model_dump(mode="json")


def register(setup: dict, run_id: str, **kwargs: Any) -> dict[str, Any]:
    archive = setup["lake"].models("churn", run_id) / "model.tar.gz"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_bytes(f"model of {run_id}".encode())
    model = {"model_uri": str(archive), "dataset_version": "v-1", "code_version": "c-1"}
    mlflow_run = setup["mlflow"].ensure_run("churn", run_id, run_name=run_id, tags={})
    evaluation = {"metrics": {"roc_auc": 0.81, "accuracy": 0.77}, "report": "s3://x/evaluation/index.html"}
    op = RegisterModelOperator(
        task_id="register",
        spec=spec_json(setup),
        model=model,
        tracking_uri=setup["uri"],
        gate={"mlflow_run_id": mlflow_run},
        evaluation=evaluation,
        **kwargs,
    )
    return op.execute(context(run_id))


def test_register_then_auto_approve_in_the_model_registry(setup):
    registration = register(setup, "manual__1", deploy=False)
    assert registration["version"] == "1" and registration["model_name"] == "churn"
    assert register(setup, "manual__1") == registration  # a retry: the same package
    version = setup["registry"].version("churn", "1")
    assert version.tags[STATUS_TAG] == PENDING and version.tags["deploy"] == "false"
    assert version.tags["test_roc_auc"] == "0.81" and version.tags["backend"] == "sagemaker"
    assert version.tags[SHA256_TAG] == registration["sha256"] == hashlib.sha256(b"model of manual__1").hexdigest()
    described = setup["registry"].hook.conn.describe_model_package(ModelPackageName=version.arn)
    metrics_uri = described["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    assert metrics_uri.endswith("/conveyor/reports/churn/manual__1/evaluation/metrics.json") and "@" not in metrics_uri
    assert setup["mlflow"].client.get_run(registration["mlflow_run_id"]).info.status == "FINISHED"

    approve = AutoApproveOperator(task_id="approve", spec=spec_json(setup), registration=registration)
    result = approve.execute(context("manual__1"))
    assert result["status"] == APPROVED
    assert setup["registry"].champion("churn").version == "1"


def test_a_person_rejects_a_version_in_the_model_registry(setup):
    first = register(setup, "manual__1")
    AutoApproveOperator(task_id="approve", spec=spec_json(setup), registration=first).execute(context("manual__1"))
    second = register(setup, "manual__2")
    op = ModelApprovalOperator(
        task_id="approve", spec=spec_json(setup), subject="Approve?", body="gate PASSED", tracking_uri=setup["uri"]
    )
    monkeypatch_skip: list = []
    op.skip = lambda **kwargs: monkeypatch_skip.append(kwargs)  # no downstream tasks here

    class TI:
        def xcom_pull(self, task_ids: Any = None, **kwargs: Any) -> Any:
            return second

    event = {
        "chosen_options": ["Reject"],
        "params_input": {},
        "responded_by_user": {"id": "1", "name": "ana"},
        "responded_at": datetime(2026, 1, 1, tzinfo=UTC),
    }
    op.execute_complete({**context("manual__2"), "ti": TI(), "task": op}, event)
    rejected = setup["registry"].version("churn", "2")
    assert rejected.tags[STATUS_TAG] == REJECTED and rejected.tags["decided_by"] == "ana"
    assert setup["registry"].champion("churn").version == "1"


def test_resolve_reads_the_pipelines_registry(setup):
    def resolve(**kwargs):
        spec = setup["spec"].model_dump(mode="json")
        return ResolveModelOperator(task_id="resolve", spec=spec, **kwargs).execute(context("deploy-1"))

    register(setup, "manual__1")
    with pytest.raises(AirflowFailException, match="no version or alias 'champion'.*no champion version yet"):
        resolve()
    with pytest.raises(AirflowFailException, match="version 1 is PendingManualApproval, not Approved"):
        resolve(version="1")
    setup["registry"].promote("churn", "1")
    resolved = resolve()
    assert resolved == {
        "model_name": "churn",
        "version": "1",
        "status": APPROVED,
        "train_run": "manual__1",
        "model_uri": setup["registry"].version("churn", "1").source,
        "sha256": hashlib.sha256(b"model of manual__1").hexdigest(),
        "arn": setup["registry"].version("churn", "1").arn,  # the deploy's registry hook takes it (no listing)
    }
    assert resolved["model_uri"].startswith("s3://") and "@" not in resolved["model_uri"]


def test_registering_a_model_off_s3_is_refused_before_anything_is_written(setup, tmp_path):
    mlflow_run = setup["mlflow"].ensure_run("churn", "manual__9", run_name="manual__9", tags={})
    (tmp_path / "model.tar.gz").write_bytes(b"a model off S3")
    model = {"model_uri": (tmp_path / "model.tar.gz").as_uri(), "dataset_version": "v-1", "code_version": "c-1"}
    op = RegisterModelOperator(
        task_id="register",
        spec=spec_json(setup),
        model=model,
        gate={"mlflow_run_id": mlflow_run},
        tracking_uri=setup["uri"],
    )
    with pytest.raises(AirflowFailException, match="needs an s3:// location") as caught:
        op.execute(context("manual__9"))
    assert isinstance(caught.value.__cause__, NotOnS3)
    assert setup["registry"].group_arn("churn") is None
