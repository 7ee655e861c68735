"""The tasks' report links: where they point, when they are given, and that Airflow stores them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conveyor.links import (
    BatchReportLink,
    EvaluationReportLink,
    GateReportLink,
    MonitorReportLink,
    ValidationReportLink,
    report_url,
)

RUN = "manual__2026-01-02T03:04:05+00:00"


def ti_key(dag_id: str = "churn__train", run_id: str = RUN) -> SimpleNamespace:
    return SimpleNamespace(dag_id=dag_id, task_id="evaluate", run_id=run_id, map_index=-1, try_number=1)


def test_report_url_quotes_the_run_and_honours_the_base_url():
    path = "/conveyor/reports/churn__train/manual__2026-01-02T03%3A04%3A05%2B00%3A00/evaluation/"
    assert report_url("churn__train", RUN, "evaluation", base_url="") == path
    assert (
        report_url("churn__train", RUN, "evaluation", base_url="https://airflow.example.com/")
        == "https://airflow.example.com" + path
    )


def test_base_url_comes_from_airflow_config(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://airflow.internal:8080")
    assert (
        report_url("churn__ingest", "r1", "validation")
        == "http://airflow.internal:8080/conveyor/reports/churn__ingest/r1/validation/"
    )


def test_link_only_when_the_report_exists(lake, monkeypatch):
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    operator = SimpleNamespace(pipeline="churn")
    link = EvaluationReportLink()
    assert link.get_link(operator, ti_key=ti_key()) == ""
    report = lake.reports("churn", RUN) / "evaluation"
    report.mkdir(parents=True)
    (report / "index.html").write_text("<html></html>")
    assert link.get_link(operator, ti_key=ti_key()) == report_url("churn__train", RUN, "evaluation")
    assert GateReportLink().get_link(operator, ti_key=ti_key()) == ""  # another section: no report yet


def test_a_report_this_process_uploaded_or_did_not_needs_no_lookup(lake, monkeypatch, tmp_path):
    """On the worker (Airflow 3 computes links when a try ends) the lake is not asked: what this process
    uploaded has a link; an operator that ran here and uploaded nothing has none."""
    from conveyor.lake import upload_tree
    from conveyor.links import RAN_HERE

    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "index.html").write_text("<html></html>")
    upload_tree(folder, lake.reports("churn", RUN) / "batch")
    asked = []
    monkeypatch.setattr(type(lake.reports("churn", RUN)), "exists", lambda self: asked.append(str(self)) or True)
    ran = SimpleNamespace(pipeline="churn", **{RAN_HERE: True})
    assert BatchReportLink().get_link(ran, ti_key=ti_key()) == report_url("churn__train", RUN, "batch")
    assert MonitorReportLink().get_link(ran, ti_key=ti_key()) == ""  # ran here, wrote no monitor report
    assert asked == []
    elsewhere = SimpleNamespace(pipeline="churn")  # e.g. a link computed in another process: the lake says
    assert MonitorReportLink().get_link(elsewhere, ti_key=ti_key()) == report_url("churn__train", RUN, "monitor")
    retry = SimpleNamespace(**{**vars(ti_key()), "try_number": 2})  # an earlier try may have written it
    assert MonitorReportLink().get_link(ran, ti_key=retry) == report_url("churn__train", RUN, "monitor")
    assert len(asked) == 2


def test_an_operator_method_marks_that_it_ran_here():
    from conveyor.links import RAN_HERE
    from conveyor.operators.base import translate_errors

    class Task:
        @translate_errors
        def execute(self, context):
            return context

    task = Task()
    assert not hasattr(task, RAN_HERE)
    assert task.execute(1) == 1 and getattr(task, RAN_HERE) is True


def test_the_pipeline_comes_from_the_operators_spec(lake, monkeypatch):
    from airflow.sdk import literal

    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)
    report = lake.reports("churn", RUN) / "evaluation"
    report.mkdir(parents=True)
    (report / "index.html").write_text("<html></html>")
    for spec in ({"name": "churn"}, literal({"name": "churn"})):
        operator = SimpleNamespace(spec=spec)
        assert EvaluationReportLink().get_link(operator, ti_key=ti_key()) == report_url(
            "churn__train", RUN, "evaluation"
        )


def test_each_link_has_its_own_name_section_and_xcom_key():
    links = [ValidationReportLink(), EvaluationReportLink(), GateReportLink(), BatchReportLink(), MonitorReportLink()]
    assert [link.name for link in links] == [
        "Validation report",
        "Evaluation report",
        "Gate report",
        "Batch report",
        "Monitoring report",
    ]
    assert [link.section for link in links] == ["validation", "evaluation", "gate", "batch", "monitor"]
    assert len({link.xcom_key for link in links}) == 5


@pytest.mark.parametrize(
    ("dag_kind", "task_id", "name"),
    [
        ("ingest", "validate", "Validation report"),
        ("train", "evaluate", "Evaluation report"),
        ("train", "gate", "Gate report"),
        ("batch_predict", "score", "Batch report"),
    ],
)
def test_the_pipeline_tasks_carry_their_report_link(dag_kind, task_id, name):
    """The serialized DAG (what the API server reads) names the link and its XCom key."""
    from airflow.serialization.serialized_objects import DagSerialization

    from conveyor.factory import build_all

    dag = build_all()[f"churn__{dag_kind}"]
    encoded = DagSerialization.to_dict(dag)["dag"]["tasks"]
    (task,) = [t.get("__var", t) for t in encoded if t.get("__var", t)["task_id"] == task_id]
    assert name in task["_operator_extra_links"]
    assert task["_operator_extra_links"][name].startswith("_link_")
