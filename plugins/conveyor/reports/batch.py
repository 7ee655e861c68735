"""The batch predictions report: ``summary.json`` and ``index.html`` under ``reports/<pipeline>/<run>/batch/``."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.lake import Lake


def report_html(summary: dict[str, Any], context: dict[str, Any]) -> str:
    """The report page: the run's facts, the prediction distribution, the whole summary.

    :param summary: ``conveyor.batch.runs.summarize``'s result.
    :param context: the run's facts (pipeline, run, input, model, rows, parquet, table, ...), shown first.
    """
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in context.items())
    dist = summary.get("prediction_distribution") or summary.get("predictions") or {}
    body = html.escape(json.dumps(dist, indent=2, default=str))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Batch predictions</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 10px;"
        f"text-align:left}}table{{border-collapse:collapse}}</style></head><body><h1>Batch predictions</h1>"
        f"<table>{rows}</table><h2>Prediction distribution</h2><pre>{body}</pre>"
        f"<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre></body></html>"
    )


def write_report(lake: Lake, pipeline: str, run_id: str, summary: dict[str, Any], context: dict[str, Any]) -> str:
    """Write ``summary.json`` (the facts and the summary) and ``index.html`` into the lake; the page's URI.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param run_id: the batch run.
    :param summary: ``conveyor.batch.runs.summarize``'s result.
    :param context: the run's facts (see :func:`report_html`).
    """
    from conveyor.lake import upload_tree

    target = lake.reports(pipeline, run_id) / "batch"
    with tempfile.TemporaryDirectory(prefix="conveyor-batch-report-") as tmp:
        report = Path(tmp) / "report"
        report.mkdir()
        (report / "summary.json").write_text(json.dumps({**context, **summary}, indent=2, default=str))
        (report / "index.html").write_text(report_html(summary, context))
        upload_tree(report, target)
    return str(target / "index.html")
