"""Register and approve operators against a real MLflow SQLite store (one per test, copied from a template)."""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.errors import IntegrityError
from conveyor.operators.registry import (
    AutoApproveOperator,
    ModelApprovalOperator,
    PublishModelOperator,
    RegisterModelOperator,
)
from conveyor.registry.base import APPROVED, PENDING, REJECTED, SHA256_TAG, STATUS_TAG
from conveyor.registry.mlflow import MlflowRegistryHook
from helpers import context, pipeline_spec_dict

MODEL = {
    "model_uri": "file:///lake/models/churn/manual__1/model.tar.gz",
    "dataset_version": "v-0123456789abcdef0123",
    "code_version": "c0ffee",
}
ANA = {"id": "1", "name": "ana"}
SPEC = pipeline_spec_dict("churn")


@pytest.fixture
def store(mlflow_template, tmp_path, monkeypatch):
    """This test's own MLflow store: (tracking URI, hook)."""
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return SimpleNamespace(uri=uri, hook=MlflowRegistryHook(uri))


@pytest.fixture(autouse=True)
def archive(tmp_path, monkeypatch) -> Path:
    """The trained model's archive in this test's lake (``MODEL["model_uri"]`` names it)."""
    path = tmp_path / "lake" / "models" / "churn" / "manual__1" / "model.tar.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"the trained model")
    monkeypatch.setitem(MODEL, "model_uri", path.as_uri())
    return path


def gate_result(store, run_id: str) -> dict[str, Any]:
    """What the gate task returns: at least the MLflow run it opened for this Airflow run."""
    mlflow_run = store.hook.ensure_run("churn", run_id, run_name=run_id, tags={"pipeline": "churn"})
    return {"passed": True, "mlflow_run_id": mlflow_run}


def register(store, run_id: str = "manual__1", **kwargs: Any) -> dict[str, Any]:
    op = RegisterModelOperator(
        task_id="register", spec=SPEC, model=MODEL, gate=gate_result(store, run_id), tracking_uri=store.uri, **kwargs
    )
    return op.execute(context(run_id))


def versions(store) -> list:
    return store.hook.client.search_model_versions("name='churn'")


def champion_version(store) -> str | None:
    champion = store.hook.champion("churn")
    return None if champion is None else str(champion.version)


# --- RegisterModelOperator -------------------------------------------------------------------------


def test_register_creates_a_pending_version_tagged_with_its_provenance(store):
    gate = gate_result(store, "manual__1")
    op = RegisterModelOperator(
        task_id="register", spec=SPEC, model=MODEL, gate=gate, deploy=False, tracking_uri=store.uri
    )
    result = op.execute(context("manual__1"))
    assert result == {
        "model_name": "churn",
        "version": "1",
        "mlflow_run_id": gate["mlflow_run_id"],
        "model_uri": MODEL["model_uri"],
        "sha256": hashlib.sha256(b"the trained model").hexdigest(),
        "arn": None,  # MLflow: no package ARN
    }
    version = store.hook.version("churn", "1")
    assert version.source == MODEL["model_uri"] and version.run_id == gate["mlflow_run_id"]
    assert version.tags == {
        STATUS_TAG: PENDING,
        "dataset_version": MODEL["dataset_version"],
        "code_version": "c0ffee",
        "backend": "local",
        "gate_decision": "passed",
        "conveyor_run_id": "manual__1",
        "deploy": "false",
        SHA256_TAG: hashlib.sha256(b"the trained model").hexdigest(),
    }
    assert store.hook.client.get_run(gate["mlflow_run_id"]).info.status == "FINISHED"
    assert champion_version(store) is None


def test_register_records_the_sha256_the_train_task_wrote_without_reading_the_archive(store, archive, monkeypatch):
    trained = hashlib.sha256(b"the trained model").hexdigest()
    monkeypatch.setitem(MODEL, "sha256", trained)
    archive.write_bytes(b"swapped after training")  # never read: the train task's hash is recorded
    result = register(store, "manual__1")
    assert result["sha256"] == trained
    assert store.hook.version("churn", result["version"]).tags[SHA256_TAG] == trained  # loaders refuse the swap


def test_a_malformed_train_sha256_is_refused(store, monkeypatch):
    monkeypatch.setitem(MODEL, "sha256", "not-a-hash")
    with pytest.raises(AirflowFailException, match="the train task's sha256 of .*'not-a-hash' is not a sha256"):
        register(store, "manual__1")
    assert versions(store) == []


def test_register_of_a_missing_archive_fails_without_a_version(store, archive):
    archive.unlink()
    with pytest.raises(AirflowFailException, match=f"no model archive at {MODEL['model_uri']}"):
        register(store, "manual__1")
    assert versions(store) == []


def test_a_retry_after_the_archive_changed_fails_without_retry(store, archive):
    first = register(store, "manual__1")
    archive.write_bytes(b"a swapped model")
    with pytest.raises(AirflowFailException, match="churn version 1: archive .* refused") as caught:
        register(store, "manual__1")
    assert isinstance(caught.value.__cause__, IntegrityError)
    assert caught.value.__cause__.expected == first["sha256"] != caught.value.__cause__.actual
    assert len(versions(store)) == 1


def test_register_twice_in_one_run_is_one_version(store):
    first = register(store, "manual__1")
    second = register(store, "manual__1")
    assert first == second and first["version"] == "1"
    assert len(versions(store)) == 1


def test_a_later_run_registers_the_next_version(store):
    assert register(store, "manual__1")["version"] == "1"
    assert register(store, "manual__2")["version"] == "2"
    assert len(versions(store)) == 2


# --- AutoApproveOperator ---------------------------------------------------------------------------


def test_auto_approve_promotes_the_version(store):
    registration = register(store)
    op = AutoApproveOperator(task_id="approve", spec=SPEC, registration=registration, tracking_uri=store.uri)
    result = op.execute(context("manual__1"))
    assert result == {"model_name": "churn", "version": "1", "status": APPROVED, "approved_by": "auto"}
    assert champion_version(store) == "1"
    assert store.hook.version("churn", "1").tags[STATUS_TAG] == APPROVED


def test_auto_approve_of_a_later_version_moves_the_champion(store):
    for run_id in ("manual__1", "manual__2"):
        registration = register(store, run_id)
        AutoApproveOperator(task_id="approve", spec=SPEC, registration=registration, tracking_uri=store.uri).execute(
            context(run_id)
        )
    assert champion_version(store) == "2"


# --- ModelApprovalOperator -------------------------------------------------------------------------


class FakeTI:
    def __init__(self, registration: dict[str, Any]):
        self.registration = registration
        self.pulled: list[Any] = []

    def xcom_pull(self, task_ids: Any = None, **kwargs: Any) -> Any:
        self.pulled.append(task_ids)
        return self.registration if task_ids == "register" else None


def approval_op(store, **kwargs: Any) -> ModelApprovalOperator:
    return ModelApprovalOperator(
        task_id="approve",
        spec=SPEC,
        subject="Approve churn model version 1?",
        body="gate PASSED",
        tracking_uri=store.uri,
        **kwargs,
    )


def answer(option: str, user: dict[str, str] | None = ANA) -> dict[str, Any]:
    return {
        "chosen_options": [option],
        "params_input": {},
        "responded_by_user": user,
        "responded_at": datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
    }


def approval_context(op: ModelApprovalOperator, registration: dict[str, Any]) -> dict[str, Any]:
    return {**context("manual__1"), "ti": FakeTI(registration), "task": op}


def test_a_person_approving_promotes_the_version(store):
    registration = register(store)
    op = approval_op(store)
    ctx = approval_context(op, registration)
    result = op.execute_complete(ctx, answer("Approve"))
    assert result["chosen_options"] == ["Approve"]
    assert ctx["ti"].pulled == ["register"]
    tags = store.hook.version("churn", "1").tags
    assert tags[STATUS_TAG] == APPROVED
    assert tags["decided_by"] == "ana"
    assert champion_version(store) == "1"


def test_decided_by_is_the_persons_name(store):
    registration = register(store)
    op = approval_op(store)
    op.execute_complete(approval_context(op, registration), answer("Approve"))
    assert store.hook.version("churn", "1").tags["decided_by"] == "ana"


def test_a_person_rejecting_leaves_the_champion_alone_and_skips_downstream(store, monkeypatch):
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    first = register(store, "manual__1")
    approve = AutoApproveOperator(task_id="approve", spec=SPEC, registration=first, tracking_uri=store.uri)
    approve.execute(context("manual__1"))
    second = register(store, "manual__2")
    with DAG("churn__train_test", schedule=None):
        op = approval_op(store)
        deploy = EmptyOperator(task_id="deploy")
        op >> deploy
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    skipped: list[dict[str, Any]] = []

    def skip(**kwargs):  # as Airflow's SkipMixin.skip does: record, then raise to end the task
        skipped.append({**kwargs, "tasks": list(kwargs["tasks"])})
        raise DownstreamTasksSkipped(tasks=[task.task_id for task in skipped[-1]["tasks"]])

    monkeypatch.setattr(op, "skip", skip)
    ctx = approval_context(op, second)
    with pytest.raises(DownstreamTasksSkipped):
        op.execute_complete(ctx, answer("Reject"))
    assert store.hook.version("churn", "2").tags[STATUS_TAG] == REJECTED
    assert "ana" in store.hook.version("churn", "2").tags["decided_by"]
    assert champion_version(store) == "1"
    assert store.hook.version("churn", "1").tags[STATUS_TAG] == APPROVED
    assert len(skipped) == 1 and skipped[0]["ti"] is ctx["ti"]
    assert [task.task_id for task in skipped[0]["tasks"]] == ["deploy"]


def test_a_timed_out_request_changes_nothing_in_the_registry(store):
    from airflow.providers.standard.exceptions import HITLTimeoutError

    registration = register(store)
    op = approval_op(store)
    event = {"error": "no answer within 1 day", "error_type": "timeout"}
    with pytest.raises(HITLTimeoutError):
        op.execute_complete(approval_context(op, registration), event)
    tags = store.hook.version("churn", "1").tags
    assert tags[STATUS_TAG] == PENDING and "decided_by" not in tags
    assert champion_version(store) is None


def test_an_answer_that_is_not_an_option_changes_nothing(store):
    registration = register(store)
    op = approval_op(store)
    with pytest.raises(ValueError, match="Maybe"):
        op.execute_complete(approval_context(op, registration), answer("Maybe"))
    assert store.hook.version("churn", "1").tags[STATUS_TAG] == PENDING
    assert champion_version(store) is None


# --- spec passing, errors, PublishModelOperator ----------------------------------------------------


def test_the_operators_show_the_spec_they_were_built_with_and_read_no_pipeline_file(store, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(tmp_path / "nowhere"))  # no pipelines folder at run time
    registration = register(store)
    assert registration["version"] == "1"
    op = AutoApproveOperator(task_id="approve", spec=SPEC, registration=registration, tracking_uri=store.uri)
    assert "spec" in op.template_fields and op.template_fields_renderers["spec"] == "json"
    assert op.execute(context("manual__1"))["status"] == APPROVED
    approval = approval_op(store)
    assert {"subject", "body", "spec"} <= set(approval.template_fields)


def test_a_registry_error_fails_the_task_with_it_as_the_cause(store, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException
    from mlflow.exceptions import MlflowException

    import conveyor.registry.mlflow as mlflow_registry
    from conveyor.registry.base import UnknownApprovalStatus

    registration = register(store)
    op = AutoApproveOperator(
        task_id="approve", spec=SPEC, registration={**registration, "version": "9"}, tracking_uri=store.uri
    )
    with pytest.raises(MlflowException):  # not Conveyor's: as before, MLflow's own error
        op.execute(context("manual__1"))

    class Broken(MlflowRegistryHook):
        def promote(self, model_name: str, version: str, newest: bool = False) -> None:
            self.set_status(model_name, version, "Approve")

    monkeypatch.setattr(mlflow_registry, "MlflowRegistryHook", Broken)
    op = AutoApproveOperator(task_id="approve", spec=SPEC, registration=registration, tracking_uri=store.uri)
    with pytest.raises(AirflowFailException, match="unknown approval status 'Approve'") as caught:
        op.execute(context("manual__1"))
    assert isinstance(caught.value.__cause__, UnknownApprovalStatus)


def test_an_unreachable_registry_is_retried(monkeypatch):
    from conveyor.registry.base import RegistryUnavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    op = AutoApproveOperator(
        task_id="approve",
        spec=SPEC,
        registration={"model_name": "churn", "version": "1"},
        tracking_uri="http://127.0.0.1:9",
    )
    with pytest.raises(RegistryUnavailable):  # transient: propagates as itself, so the task's retries apply
        op.execute(context("manual__1"))


def test_publish_announces_the_version_on_the_model_asset():
    from conveyor.assets import model_asset

    ctx = context("manual__1")
    registration = {"model_name": "churn", "version": "3", "model_uri": MODEL["model_uri"]}
    result = PublishModelOperator(task_id="publish", spec=SPEC, registration=registration, deploy="False").execute(ctx)
    assert result == {"version": "3", "deploy": False, "model_uri": MODEL["model_uri"]}
    assert ctx["outlet_events"][model_asset("churn")].extra == result
