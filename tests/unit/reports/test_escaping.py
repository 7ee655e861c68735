"""Every report Conveyor writes shows values from drops, models and runs only as escaped text.

A class label, a feature or column name, a category, a run id, a reason: each of the two payloads
below is put in every text a report shows, and the page must hold no element or attribute that
came from them (no ``<script>``, no ``<img onerror>``), only their escaped text.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser
from pathlib import Path

import pytest
from markupsafe import escape

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'


class Active(HTMLParser):
    """The scripts, event handlers and images a browser would find in a page."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.found.append("<script>")
        for name, value in attrs:
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}={value}>")
            if tag == "img" and name == "src" and value == "x":
                self.found.append("<img src=x>")

    handle_startendtag = handle_starttag


def assert_only_escaped(page: str, *payloads: str) -> None:
    parser = Active()
    parser.feed(page)
    parser.close()
    assert parser.found == []
    for payload in payloads:
        assert payload not in page
        escaped = {str(escape(payload)), html.escape(payload), html.escape(payload, quote=False)}
        assert any(text in page for text in escaped), payload


def test_evaluation_report(tmp_path):
    from conveyor.model.metrics import compute_metrics
    from conveyor.reports.evaluation import write_evaluation_report

    labels = [SCRIPT, IMG]
    truth = [SCRIPT, IMG, SCRIPT, IMG, SCRIPT, IMG]
    pred = [SCRIPT, IMG, IMG, IMG, SCRIPT, SCRIPT]
    metrics = compute_metrics("multiclass", truth, pred, class_labels=labels)
    out = write_evaluation_report(
        tmp_path,
        metrics,
        "multiclass",
        truth,
        pred,
        class_labels=labels,
        feature_importance={SCRIPT: 0.5, IMG: 0.25},
        title=f"churn {SCRIPT}",
        context={"run": IMG, SCRIPT: "dataset"},
    )
    page = Path(out["html"]).read_text()
    assert_only_escaped(page, SCRIPT, IMG)


def test_gate_report(tmp_path):
    from conveyor.reports.gate import write_report
    from conveyor.training.gate import GateDecision

    decision = GateDecision(
        passed=False,
        metric="accuracy",
        challenger={"accuracy": 0.5, SCRIPT: 0.1},
        champion={"accuracy": 0.9},
        champion_version=IMG,
        reasons=[f"accuracy below threshold {SCRIPT}"],
        checks=[{"check": IMG, "value": SCRIPT, "passed": False}],
    )
    page = write_report(tmp_path, decision, {"run": SCRIPT, IMG: "x"}).read_text()
    assert_only_escaped(page, SCRIPT, IMG)


def test_batch_report():
    from conveyor.reports.batch import report_html

    summary = {"prediction_distribution": {SCRIPT: 3, IMG: 4}, "rows": 7, "notes": [IMG]}
    page = report_html(summary, {"pipeline": "churn", "input": f"s3://lake/{SCRIPT}", IMG: "run"})
    parser = Active()
    parser.feed(page)
    assert parser.found == []
    assert SCRIPT not in page and IMG not in page
    assert str(escape(SCRIPT)) in page


def test_monitoring_report(tmp_path):
    from conveyor.reports.monitoring import write_monitor_report

    index = write_monitor_report(
        tmp_path,
        pipeline=f"churn{SCRIPT}",
        model={"name": IMG, "version": SCRIPT, "metric": "accuracy", "baseline_metric": 0.9},
        sources=[{"source": "batch", "id": IMG, "rows": 10, "report": None, "error": f"unreadable {SCRIPT}"}],
        history=[{"at": "2026-01-01T00:00:00+00:00", "source": SCRIPT, "id": IMG, "rows": 3, "drifted": True}],
        live=[{"day": "2026-01-01", "labels": 3, "metric": "accuracy", "value": 0.5, "model_version": IMG}],
        labels={"received": 1, "rejected_examples": [{"id": IMG, "label": SCRIPT, "rule": IMG}]},
        decision={"retrain": True, "reasons": [SCRIPT], "notes": [IMG], "last_trigger": IMG, "thresholds": {}},
    )
    assert_only_escaped(index.read_text(), SCRIPT, IMG)


def test_viewer_run_index():
    from conveyor.reports.viewer import index_page

    class Folder:
        def __init__(self, name=None):
            self.name = name

        def exists(self):
            return True

        def iterdir(self):
            return [Section(SCRIPT), Section(IMG)]

    class Section:
        def __init__(self, name):
            self.name = name

        def __truediv__(self, other):
            return self

        def exists(self):
            return True

    page = index_page(f"churn{SCRIPT}__train", IMG, Folder()).body.decode()
    assert_only_escaped(page, SCRIPT)
    assert IMG not in page


def test_validation_index(tmp_path):
    from conveyor.reports.data_docs import write_index

    page = write_index(tmp_path, False, [SCRIPT, IMG]).read_text()
    assert_only_escaped(page, SCRIPT, IMG)


@pytest.mark.parametrize("payload", [SCRIPT, IMG])
def test_validation_data_docs(tmp_path, payload):
    import pandas as pd

    from conveyor.data.validation import validate_frame
    from conveyor.reports import data_docs

    suite = {
        "name": "escaping",
        "expectations": [
            {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "plan", "value_set": ["basic"]}},
            {"type": "expect_column_distinct_values_to_equal_set", "kwargs": {"column": "plan", "value_set": ["a"]}},
        ],
    }
    validate_frame(pd.DataFrame({"plan": ["basic", payload]}), suite, "escaping-run", docs_dir=tmp_path, docs=data_docs)
    for path in tmp_path.rglob("*.html"):
        page = path.read_text()
        parser = Active()
        parser.feed(page)
        assert parser.found == [], path
        assert payload not in page, path
