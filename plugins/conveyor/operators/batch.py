"""Batch predictions for analysts: Parquet files and a SQL table, with the model behind every row."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import BatchReportLink
from conveyor.operators.base import pipeline_spec, translate_errors

if TYPE_CHECKING:
    from conveyor.batch.parts import BatchResult
    from conveyor.spec import PipelineSpec


class BaseBatchPredictOperator(BaseOperator):
    """What the local and the SageMaker batch predictions share: their arguments, the input, the finish.

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param model: the resolve task's result (templated XCom).
    :param input_uri: a file or folder URI (templated); empty: the oldest complete, unscored drop
        in ``landing/<pipeline>/inference/``.
    """

    template_fields = ("spec", "model", "input_uri")
    template_fields_renderers = {"spec": "json"}
    operator_extra_links = (BatchReportLink(),)

    def __init__(self, *, spec: Any, model: Any, input_uri: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model
        self.input_uri = input_uri

    @property
    def pipeline(self) -> str:
        """The pipeline's name (the report link finds the report by it)."""
        return pipeline_spec(self.spec).name

    def batch_input(self, spec: PipelineSpec, lake: Lake) -> tuple[str, str | None]:
        """The input's URI and the inference drop it is (None for a given input); skips when there is none.

        :param spec: the pipeline.
        :param lake: the lake.
        """
        from conveyor.batch.runs import batch_input

        found = batch_input(lake, spec.name, spec.data.marker, self.input_uri)
        if found is None:
            raise AirflowSkipException(f"no complete, unscored drop in {lake.uri('landing', spec.name, 'inference')}")
        return found

    def finish(
        self,
        context: Any,
        *,
        spec: PipelineSpec,
        lake: Lake,
        source: str,
        drop: str | None,
        result: BatchResult,
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """After the parts are written: the SQL table, the report, the drop marked scored, the predictions Asset.

        :param context: the task context (run id, outlet events).
        :param spec: the pipeline.
        :param lake: the lake.
        :param source: the input's URI.
        :param drop: the inference drop scored, or None for a given input.
        :param result: the parts written.
        :param details: more lines for the report (e.g. the transform job).
        :return: the task's result: rows, parquet, table, report, model_version.
        """
        from conveyor.assets import predictions_asset
        from conveyor.batch.runs import load_run, mark_scored, predictions_table
        from conveyor.reports.batch import write_report

        run_id, version, table = context["run_id"], self.model["version"], predictions_table(spec)
        rows, summary = load_run(result, table=table, pipeline=spec.name, run_id=run_id, conn_id=lake.conn_id)
        facts = {
            "pipeline": spec.name,
            "run": run_id,
            "input": source,
            "model": f"{spec.name} v{version}",
            "rows": rows,
            "parquet": result.uri,
            "table": table,
            "seconds": result.seconds,
            **(details or {}),
        }
        report = write_report(lake, spec.name, run_id, summary, facts)
        if drop is not None:
            mark_scored(lake, spec.name, drop, run_id, rows)
        context["outlet_events"][predictions_asset(spec.name)].extra = {
            "run_id": run_id,
            "rows": rows,
            "model_version": version,
            "table": table,
            "parquet": result.uri,
        }
        self.log.info("Scored %s rows in %.1fs; report: %s", rows, result.seconds, report)
        return {"rows": rows, "parquet": result.uri, "table": table, "report": report, "model_version": version}


class BatchPredictOperator(BaseBatchPredictOperator):
    """Score an input with a registered model into ``predictions/<pipeline>/<run>/`` and a SQL table.

    The input streams in chunks to worker processes (bounded memory). Rows carry the input's id,
    the prediction, class probabilities, the model's name and version, the run and one scoring
    time. A re-run of the same run replaces its own files and rows; a crash leaves no
    ``_SUCCESS.json`` and no rows of the run visible. Writes a report to
    ``reports/<pipeline>/<run>/batch/`` and updates the predictions Asset. Bad input fails the
    task (``AirflowFailException`` caused by ``BatchInputError``, not retried).

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param model: the resolve task's result (templated XCom).
    :param input_uri: a file or folder URI (templated); empty: the oldest complete, unscored drop
        in ``landing/<pipeline>/inference/``.
    """

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        import tempfile

        from conveyor.batch.runs import predictions_table, run_timestamp
        from conveyor.batch.scoring import score_file
        from conveyor.model.artifacts import RegisteredArchive, fetch

        spec = pipeline_spec(self.spec)
        lake = Lake.from_env()
        run_id = context["run_id"]
        source, drop = self.batch_input(spec, lake)
        out = lake.predictions(spec.name, run_id)
        self.log.info(
            "Scoring %s with %s version %s into %s and table %s",
            source,
            spec.name,
            self.model["version"],
            out,
            predictions_table(spec),
        )
        with tempfile.TemporaryDirectory(prefix="conveyor-batch-") as tmp:
            registered = RegisteredArchive.of({"model_name": spec.name, **self.model})  # its sha256 checked
            model_dir = fetch(self.model["model_uri"], Path(tmp) / "model", lake.conn_id, registered=registered)
            result = score_file(
                source,
                model_dir,
                out,
                run_id=run_id,
                model_name=spec.name,
                model_version=self.model["version"],
                scored_at=run_timestamp(context),
                chunk_rows=spec.deploy.batch.chunk_rows,
                workers=spec.deploy.batch.workers,
                conn_id=lake.conn_id,
            )
        return self.finish(context, spec=spec, lake=lake, source=source, drop=drop, result=result)
