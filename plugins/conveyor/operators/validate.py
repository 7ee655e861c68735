"""Validate a dataset version with Great Expectations, then publish it or quarantine its drop."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from conveyor.lake import Lake
from conveyor.links import ValidationReportLink
from conveyor.operators.base import pipeline_spec, translate_errors


class ValidateDatasetOperator(BaseOperator):
    """Run the implicit checks (``conveyor.data.checks``) and the expectation suite on a dataset version.

    A version over ``validation.max_rows``/``max_bytes`` is rejected before it is loaded; one whose
    validation started ``validation.max_attempts`` times without finishing (killed, e.g. out of
    memory) is rejected instead of being tried again. Writes ``reports/<pipeline>/<run>/validation/``
    (``result.json`` and GX Data Docs, entry ``index.html``). On success the version is marked
    validated, becomes the pipeline's latest, the drop is marked processed and the dataset Asset is
    updated (extra: the version). On failure the drop moves to quarantine untouched with the
    report, the unvalidated copy in ``raw/`` is removed, and the task fails with the failed checks
    and expectations (``AirflowFailException`` caused by ``ValidationFailed``, not retried). A
    version that was validated before is not published again (the task is skipped).

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param drop: the drop the version came from (templated).
    :param version: the dataset version to validate (templated).
    """

    template_fields = ("spec", "drop", "version")
    template_fields_renderers = {"spec": "json"}
    operator_extra_links = (ValidationReportLink(),)
    ui_color = "#e8fdf0"

    def __init__(self, *, spec: Any, drop: str, version: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.drop = drop
        self.version = version

    @property
    def pipeline(self) -> str:
        """The pipeline's name (the report link finds the report by it)."""
        return pipeline_spec(self.spec).name

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.assets import dataset_asset
        from conveyor.data.validation import validate_version
        from conveyor.reports import data_docs

        spec = pipeline_spec(self.spec)
        published = validate_version(Lake.from_env(), spec, self.drop, self.version, context["run_id"], data_docs)
        if published is None:
            raise AirflowSkipException(f"Dataset version {self.version} was validated before: nothing new to publish")
        context["outlet_events"][dataset_asset(spec.name)].extra = {
            "version": self.version,
            "rows": published["rows"],
            "uri": published["uri"],
        }
        self.log.info("Published dataset version %s (%s rows)", self.version, published["rows"])
        return {key: published[key] for key in ("version", "rows", "report", "statistics")}
