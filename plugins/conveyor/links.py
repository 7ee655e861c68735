"""Extra links from a task to the report it wrote, opened through the Airflow API server.

A report lives in the lake (``reports/<pipeline>/<run>/<section>/index.html``), which a browser
cannot open directly on S3 or on the server's disk; the links point at Conveyor's report viewer
(``conveyor.reports.viewer``, mounted by the ``conveyor`` Airflow plugin), which reads the lake
and checks the person's Airflow permissions. A task that wrote no report gets no link.

Airflow 3 computes the links on the worker when a try ends (and stores them in XCom). There the
task's process knows what it uploaded (``conveyor.lake.uploaded_here``) and whether it ran the
task (``RAN_HERE``, set by ``conveyor.operators.base.translate_errors``): a first try that ran
here and uploaded nothing has no report. The lake is asked only where neither tells (a retry,
whose earlier try may have written the report; a link computed in another process).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

VIEWER_PREFIX = "/conveyor"
RAN_HERE = "_conveyor_ran_here"  # an operator attribute: its execute/execute_complete ran in this process


def report_url(dag_id: str, run_id: str, section: str, base_url: str | None = None) -> str:
    """The viewer's address of a run's report.

    :param dag_id: the DAG the run belongs to (the viewer checks the person may read it).
    :param run_id: the run that wrote the report.
    :param section: the report's folder under ``reports/<pipeline>/<run>/`` (``evaluation``, ...).
    :param base_url: the API server's public address (``[api] base_url``); relative when empty.
    """
    if base_url is None:
        from airflow.configuration import conf

        base_url = conf.get("api", "base_url", fallback="") or ""
    path = f"{VIEWER_PREFIX}/reports/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/{quote(section, safe='')}/"
    return base_url.rstrip("/") + path


def pipeline_of(operator: object) -> str:
    """The pipeline a task belongs to: its spec's name (a dict, or an unrendered ``literal()``), else ``pipeline``.

    :param operator: the task (on a worker, the real operator; elsewhere its serialized form).
    """
    spec = getattr(operator, "spec", None)
    spec = getattr(spec, "value", spec)
    if isinstance(spec, dict) and spec.get("name"):
        return str(spec["name"])
    return str(operator.pipeline)  # type: ignore[attr-defined]


class ReportLink(BaseOperatorLink):
    """A link to the report a task wrote under ``reports/<pipeline>/<run>/<section>/``.

    The pipeline is the operator's ``spec`` name (or its ``pipeline`` attribute). Subclasses set
    ``name`` (the button) and
    ``section`` (the report's folder); each has its own XCom key (its class name).
    """

    name: ClassVar[str] = "Report"
    section: ClassVar[str] = ""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from conveyor.lake import Lake, uploaded_here

        page = Lake.from_env().reports(pipeline_of(operator), ti_key.run_id) / self.section / "index.html"
        if uploaded_here(page):
            return report_url(ti_key.dag_id, ti_key.run_id, self.section)
        first_try_here = getattr(operator, RAN_HERE, False) and int(getattr(ti_key, "try_number", 1) or 1) <= 1
        if first_try_here or not page.exists():  # the run's first try wrote none (an earlier try may have)
            return ""
        return report_url(ti_key.dag_id, ti_key.run_id, self.section)


class ValidationReportLink(ReportLink):
    name = "Validation report"
    section = "validation"


class EvaluationReportLink(ReportLink):
    name = "Evaluation report"
    section = "evaluation"


class GateReportLink(ReportLink):
    name = "Gate report"
    section = "gate"


class BatchReportLink(ReportLink):
    name = "Batch report"
    section = "batch"


class MonitorReportLink(ReportLink):
    name = "Monitoring report"
    section = "monitor"
