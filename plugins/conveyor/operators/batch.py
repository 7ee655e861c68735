"""Batch predictions for analysts: Parquet files and a SQL table, with the model behind every row."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import BatchReportLink

WAREHOUSE_CONN_ID = "conveyor_warehouse"
SCORED_MARKER = "_SCORED.json"


def warehouse_url() -> str:
    """The predictions warehouse: ``CONVEYOR_WAREHOUSE_URL``, the Airflow connection
    ``conveyor_warehouse``, or SQLite in the state folder."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from conveyor import settings

    if settings.warehouse_url_override():
        return settings.warehouse_url_override()
    try:
        uri = BaseHook.get_connection(WAREHOUSE_CONN_ID).get_uri()
    except AirflowNotFoundException:
        return settings.default_warehouse_url()
    # Airflow writes Postgres connections as postgres://; SQLAlchemy 2.1 reads postgresql:// as psycopg 3,
    # while the installed driver is psycopg2.
    return uri.replace("postgres://", "postgresql+psycopg2://", 1)


def pending_inference_drop(lake: Lake, pipeline: str, marker: str) -> str | None:
    """The oldest complete drop in ``landing/<pipeline>/inference/`` not scored yet."""
    from conveyor.data.drops import find_complete_drops

    root = lake.landing(pipeline, "inference")
    for drop in find_complete_drops(root, marker):
        if not (root / drop / SCORED_MARKER).exists():
            return drop
    return None


def report_html(summary: dict[str, Any], context: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in context.items())
    dist = summary.get("prediction_distribution") or summary.get("predictions") or {}
    body = html.escape(json.dumps(dist, indent=2, default=str))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Batch predictions</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 10px;"
            f"text-align:left}}table{{border-collapse:collapse}}</style></head><body><h1>Batch predictions</h1>"
            f"<table>{rows}</table><h2>Prediction distribution</h2><pre>{body}</pre>"
            f"<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre></body></html>")


class BatchPredictOperator(BaseOperator):
    """Score an input with a registered model into ``predictions/<pipeline>/<run>/`` and a SQL table.

    The input streams in chunks to worker processes (bounded memory). Rows carry the input's id,
    the prediction, class probabilities, the model's name and version, the run and one scoring
    time. A re-run of the same run replaces its own files and rows; a crash leaves no
    ``_SUCCESS.json`` and no rows of the run visible. Writes a report to
    ``reports/<pipeline>/<run>/batch/`` and updates the predictions Asset.

    :param pipeline: the pipeline's name.
    :param model: the resolve task's result (templated XCom).
    :param input_uri: a file or folder URI (templated); empty: the oldest complete, unscored drop
        in ``landing/<pipeline>/inference/``.
    """

    template_fields = ("pipeline", "model", "input_uri")
    operator_extra_links = (BatchReportLink(),)

    def __init__(self, *, pipeline: str, model: Any, input_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.model = model
        self.input_uri = input_uri

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.model.artifacts import fetch
        from conveyor.batch.scoring import BatchInputError, score_file
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        source, drop = batch_input(lake, self.pipeline, spec.data.marker, self.input_uri)
        table = spec.deploy.batch.table or f"{self.pipeline}_predictions"
        scored_at = run_timestamp(context)
        out = lake.predictions(self.pipeline, run_id)
        self.log.info("Scoring %s with %s version %s into %s and table %s", source, self.pipeline,
                      self.model["version"], out, table)
        with tempfile.TemporaryDirectory(prefix="conveyor-batch-") as tmp:
            model_dir = fetch(self.model["model_uri"], Path(tmp) / "model", lake.conn_id)
            try:
                result = score_file(source, model_dir, out, run_id=run_id, model_name=self.pipeline,
                                    model_version=self.model["version"], scored_at=scored_at,
                                    chunk_rows=spec.deploy.batch.chunk_rows, workers=spec.deploy.batch.workers,
                                    conn_id=lake.conn_id)
            except BatchInputError as exc:
                raise AirflowFailException(str(exc)) from None
        return finish_batch(context, lake=lake, pipeline=self.pipeline, table=table, model=self.model,
                            source=source, drop=drop, result=result, log=self.log)


def run_timestamp(context: Any) -> Any:
    """The one ``scored_at`` of a batch run: its logical date, else its interval end, else when it ran.

    :param context: the task context.
    """
    return context.get("logical_date") or context.get("data_interval_end") or context["dag_run"].run_after


def batch_input(lake: Lake, pipeline: str, marker: str, input_uri: str | None) -> tuple[str, str | None]:
    """What a batch run scores: the given input, else the oldest complete, unscored inference drop.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param marker: the marker that makes a drop complete.
    :param input_uri: the run's input (Param); empty for the pending drop.
    :return: the input's URI and the drop's name (None for a given input).
    :raises AirflowSkipException: no input given and no drop pending.
    """
    if input_uri:
        return input_uri, None
    drop = pending_inference_drop(lake, pipeline, marker)
    if drop is None:
        raise AirflowSkipException(f"no complete, unscored drop in {lake.uri('landing', pipeline, 'inference')}")
    return lake.uri("landing", pipeline, "inference", drop), drop


def finish_batch(context: Any, *, lake: Lake, pipeline: str, table: str, model: dict[str, Any], source: str,
                 drop: str | None, result: Any, log: Any, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """After the parts are written: the SQL table, the report, the drop marked scored, the predictions Asset.

    Shared by the local and the SageMaker batch transforms.

    :param context: the task context (run id, outlet events).
    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param table: the predictions table.
    :param model: the resolve task's result.
    :param source: the input's URI.
    :param drop: the inference drop scored, or None for a given input.
    :param result: the ``BatchResult`` of the parts.
    :param log: the task's logger.
    :param details: more lines for the report (e.g. the transform job).
    :return: the task's result: rows, parquet, table, report, model_version.
    """
    from conveyor.assets import predictions_asset
    from conveyor.batch.scoring import summarize, write_table
    from conveyor.lake import upload_tree, write_json

    run_id = context["run_id"]
    rows = write_table(warehouse_url(), table, result.parts, run_id, conn_id=lake.conn_id)
    summary = summarize(result.parts, conn_id=lake.conn_id)
    with tempfile.TemporaryDirectory(prefix="conveyor-batch-report-") as tmp:
        report = Path(tmp) / "report"
        report.mkdir()
        report_context = {"pipeline": pipeline, "run": run_id, "input": source,
                          "model": f"{pipeline} v{model['version']}", "rows": rows,
                          "parquet": result.uri, "table": table, "seconds": result.seconds, **(details or {})}
        (report / "summary.json").write_text(json.dumps({**report_context, **summary}, indent=2, default=str))
        (report / "index.html").write_text(report_html(summary, report_context))
        upload_tree(report, lake.reports(pipeline, run_id) / "batch")
    if drop is not None:
        write_json(lake.landing(pipeline, "inference", drop) / SCORED_MARKER, {"run_id": run_id, "rows": rows})
    context["outlet_events"][predictions_asset(pipeline)].extra = {
        "run_id": run_id, "rows": rows, "model_version": model["version"], "table": table, "parquet": result.uri}
    report_uri = str(lake.reports(pipeline, run_id) / "batch" / "index.html")
    log.info("Scored %s rows in %.1fs; report: %s", rows, result.seconds, report_uri)
    return {"rows": rows, "parquet": result.uri, "table": table, "report": report_uri, "model_version": model["version"]}
