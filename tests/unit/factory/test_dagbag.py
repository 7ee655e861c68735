"""DagBag integrity: the DAG files import cleanly, cheaply, and every DAG follows the house rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[3]
HEAVY = ("pandas", "torch", "torchvision", "autogluon", "great_expectations", "mlflow", "sklearn")


def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT / "dags"))


def copy_include(tmp_path: Path) -> Path:
    """A copy of the pipelines and their expectation suites (training code is not needed to parse).

    :param tmp_path: the test's folder.
    """
    include = tmp_path / "include"
    for folder in ("pipelines", "expectations"):
        shutil.copytree(PROJECT / "include" / folder, include / folder)
    return include


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


@pytest.mark.parametrize("dag_file", ["conveyor_pipelines.py", "conveyor_pipeline_errors.py"])
def test_dag_file_parses_without_heavy_imports(dag_file):
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(PROJECT / "dags" / dag_file)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_invalid_pipeline_is_one_import_error_and_others_still_load(tmp_path, monkeypatch):
    include = copy_include(tmp_path)
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

    include = copy_include(tmp_path)
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


# --- issue 17 item 19: one pipeline file never takes the others down


def add_variant(include: Path, name: str, *replacements: tuple[str, str]) -> Path:
    """A copy of churn.yaml named ``name`` (churn's suite, no endpoint of its own) with text replaced.

    :param include: the include folder the DAG file reads.
    :param name: the new pipeline's name.
    :param replacements: (old, new) text pairs, each of which must occur.
    """
    text = (
        (include / "pipelines" / "churn.yaml")
        .read_text()
        .replace("name: churn\n", f"name: {name}\nexpectations: churn\n")
    )
    text = text.replace("endpoint: {enabled: true", "endpoint: {enabled: false")
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = include / "pipelines" / f"{name}.yaml"
    path.write_text(text)
    return path


def only_import_error(bag) -> tuple[str, str]:
    """The one import error of the bag: (file, message)."""
    assert len(bag.import_errors) == 1, bag.import_errors
    ((path, message),) = bag.import_errors.items()
    return path, message


def assert_shipped_pipelines_load(bag) -> None:
    for dag_id in (
        "churn__ingest",
        "churn__train",
        "churn__deploy",
        "churn__monitor",
        "shapes__ingest",
        "shapes__train",
    ):
        assert dag_id in bag.dags, dag_id


def test_time_limit_zero_is_one_import_error_and_every_other_pipeline_loads(tmp_path, monkeypatch):
    """Observed: time_limit 0 passed the spec, Airflow refused the train Param, every pipeline vanished."""
    include = copy_include(tmp_path)
    add_variant(include, "quick", ("time_limit: 120", "time_limit: 0"))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    bag = dagbag()
    assert_shipped_pipelines_load(bag)
    assert not any(dag_id.startswith("quick__") for dag_id in bag.dags)
    path, message = only_import_error(bag)
    assert path.endswith("conveyor_pipeline_errors.py")
    assert str(include / "pipelines" / "quick.yaml") in message and "field 'trainer.time_limit'" in message


def test_invalid_cron_names_file_and_field_and_the_others_load(tmp_path, monkeypatch):
    """Observed: an invalid ingest.schedule gave an import error naming neither file nor field."""
    include = copy_include(tmp_path)
    add_variant(include, "hourly", ('schedule: "@hourly"', 'schedule: "every hour"'))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    bag = dagbag()
    assert_shipped_pipelines_load(bag)
    assert not any(dag_id.startswith("hourly__") for dag_id in bag.dags)
    _, message = only_import_error(bag)
    assert "hourly.yaml" in message and "field 'ingest.schedule'" in message and "every hour" in message


def test_any_error_while_building_a_pipeline_stays_in_its_own_import_error(tmp_path, monkeypatch):
    """An exception the spec cannot foresee (here: from building the train DAG's Params) drops that family only."""
    from conveyor.factory import train

    include = copy_include(tmp_path)
    add_variant(include, "fragile")
    real = train.train_params

    def params(spec):
        if spec.name == "fragile":
            raise ValueError("Param 'time_limit' is invalid (as Airflow would say)")
        return real(spec)

    monkeypatch.setattr(train, "train_params", params)
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    bag = dagbag()
    assert_shipped_pipelines_load(bag)
    assert not any(dag_id.startswith("fragile__") for dag_id in bag.dags)  # not even the ingest DAG built first
    _, message = only_import_error(bag)
    assert "fragile.yaml" in message and "fragile__train" in message and "Param 'time_limit' is invalid" in message


def test_a_copy_claiming_churns_endpoint_is_an_import_error_and_churn_loads(tmp_path, monkeypatch):
    """Observed: a copy of churn (new name and label, same endpoint) deployed over churn's endpoint."""
    include = copy_include(tmp_path)
    copy = add_variant(include, "churn_v2", ("endpoint: {enabled: false", "endpoint: {enabled: true"))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    bag = dagbag()
    assert_shipped_pipelines_load(bag)
    assert not any(dag_id.startswith("churn_v2__") for dag_id in bag.dags)
    _, message = only_import_error(bag)
    assert str(copy) in message and str(include / "pipelines" / "churn.yaml") in message
    assert "field 'deploy.endpoint.name'" in message and "'churn'" in message


def test_a_pipeline_saved_as_yml_gets_its_dags(tmp_path, monkeypatch):
    include = copy_include(tmp_path)
    add_variant(include, "fraud").rename(include / "pipelines" / "fraud.yml")
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    bag = dagbag()
    assert bag.import_errors == {}
    assert bag.dags["fraud__train"].get_task("split").spec.value["name"] == "fraud"


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [("time_limit: 120", "time_limit: 0", "trainer.time_limit"), ("time_limit:", "time_limt:", "trainer.time_limt")],
)
def test_broken_pipeline_leaves_the_others_active_in_airflows_database(
    airflow_db, tmp_path, monkeypatch, old, new, field
):
    """What the UI shows: Airflow marks every DAG of a file with an import error stale (hidden, never scheduled).

    The DAG processor's own path (a bundle DagBag, then ``sync_bag_to_db``): the broken pipeline is one
    import error naming its YAML file and field; the valid pipelines' DAGs stay active, without errors.
    """
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models import DagModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session
    from sqlalchemy import delete, select

    include = copy_include(tmp_path)
    add_variant(include, "quick", (old, new))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=str(PROJECT / "dags"), bundle_path=PROJECT / "dags", bundle_name="dags-folder")
    try:
        sync_bag_to_db(bag, "dags-folder", None)
        with create_session() as session:
            rows = {m.dag_id: m for m in session.scalars(select(DagModel).where(DagModel.dag_id.like("churn__%")))}
            assert {"churn__ingest", "churn__train", "churn__deploy"} <= set(rows)
            for dag_id, row in rows.items():
                assert not row.is_stale and not row.has_import_errors, dag_id
            errors = session.scalars(
                select(ParseImportError).where(ParseImportError.bundle_name == "dags-folder")
            ).all()
            assert [e.filename for e in errors] == ["conveyor_pipeline_errors.py"]
            assert "quick.yaml" in errors[0].stacktrace and f"field '{field}'" in errors[0].stacktrace
    finally:
        with create_session() as session:
            session.execute(delete(ParseImportError).where(ParseImportError.bundle_name == "dags-folder"))
