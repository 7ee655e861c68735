"""DagBag integrity: the DAG files import cleanly, cheaply, and every DAG follows the house rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[3]
HEAVY = ("pandas", "torch", "torchvision", "autogluon", "great_expectations", "mlflow", "sklearn")


def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT / "dags"))


def test_no_import_errors_and_every_pipeline_has_its_dags():
    bag = dagbag()
    assert bag.import_errors == {}
    assert "churn__ingest" in bag.dags


def test_every_dag_is_tagged_owned_and_retried():
    for dag_id, dag in dagbag().dags.items():
        assert "conveyor" in dag.tags, dag_id
        assert dag_id.split("__")[0] in dag.tags, dag_id
        assert dag.doc_md, dag_id
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", (dag_id, task.task_id)
            if task.task_id != "wait_for_drop":  # the sensor's wait is its own retry
                assert task.retries >= 1, (dag_id, task.task_id)


def test_ingest_dag_shape():
    dag = dagbag().dags["churn__ingest"]
    assert [t.task_id for t in dag.topological_sort()] == ["wait_for_drop", "ingest", "validate"]
    sensor = dag.get_task("wait_for_drop")
    assert sensor.deferrable and sensor.soft_fail
    assert dag.max_active_runs == 1 and not dag.catchup
    (outlet,) = dag.get_task("validate").outlets
    assert outlet.name == "churn.dataset"


def test_dag_file_parses_without_heavy_imports():
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(PROJECT / "dags" / "conveyor_pipelines.py")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_invalid_pipeline_is_one_import_error_and_others_still_load(tmp_path, monkeypatch):
    include = tmp_path / "include"
    shutil.copytree(PROJECT / "include" / "pipelines", include / "pipelines")
    text = (include / "pipelines" / "churn.yaml").read_text()
    (include / "pipelines" / "typo.yaml").write_text(
        text.replace("name: churn", "name: typo").replace("time_limit:", "time_limt:")
    )
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    bag = dagbag()
    assert "churn__ingest" in bag.dags
    assert not any(dag_id.startswith("typo") for dag_id in bag.dags)
    assert len(bag.import_errors) == 1
    (message,) = bag.import_errors.values()
    assert "typo.yaml" in message and "trainer.time_limt" in message


def test_train_dag_shape_params_and_schedule():
    dag = dagbag().dags["churn__train"]
    assert [t.task_id for t in dag.topological_sort()] == [
        "split",
        "train",
        "evaluate",
        "gate",
        "register",
        "approve",
        "publish",
    ]
    (outlet,) = dag.get_task("publish").outlets
    assert outlet.name == "churn.model"
    assert set(dag.params) == {"dataset_version", "labelled_rows", "time_limit", "presets", "deploy"}
    assert dag.params.get_param("time_limit").schema["minimum"] == 1
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    # new validated data OR the monitor's retraining event (either one starts a run)
    condition = dag.timetable.asset_condition
    assert type(condition).__name__ == "AssetAny"
    assert {a.name for a in condition.objects} == {"churn.dataset", "churn.retrain"}
    assert type(dag.get_task("approve")).__name__ == "AutoApproveOperator"
    assert dag.get_task("train").execution_timeout is not None


def test_manual_approval_waits_for_a_person(tmp_path, monkeypatch):
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    include = tmp_path / "include"
    shutil.copytree(PROJECT / "include" / "pipelines", include / "pipelines")
    path = include / "pipelines" / "churn.yaml"
    path.write_text(path.read_text().replace("approval: auto", "approval: manual"))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    approve = dagbag().dags["churn__train"].get_task("approve")
    assert isinstance(approve, ApprovalOperator)
    assert "register" in approve.subject and "summary_md" in approve.body


def test_deploy_and_batch_dags_follow_the_spec():
    dags = dagbag().dags
    deploy, batch = dags["churn__deploy"], dags["churn__batch_predict"]
    assert [t.task_id for t in deploy.topological_sort()] == ["resolve", "deploy"]
    assert deploy.params["version"] == "champion"
    assert "churn.model" in repr(deploy.timetable.asset_condition)
    assert [t.task_id for t in batch.topological_sort()] == ["resolve", "score"]
    assert set(batch.params) == {"input", "model"}
    (outlet,) = batch.get_task("score").outlets
    assert outlet.name == "churn.predictions"
    assert "shapes__deploy" not in dags and "shapes__batch_predict" not in dags  # turned off in its spec


def test_monitor_dag_watches_batch_runs_and_emits_the_retrain_event():
    dag = dagbag().dags["churn__monitor"]
    assert [t.task_id for t in dag.topological_sort()] == ["drift", "feedback", "decide", "trigger_retrain"]
    (outlet,) = dag.get_task("trigger_retrain").outlets
    assert outlet.name == "churn.retrain"
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert "churn.predictions" in repr(dag.timetable.asset_condition)
    assert set(dag.params) == {"input"}
    assert "shapes__monitor" not in dagbag().dags  # image pipelines without endpoint or batch: nothing to watch
