"""Validate a dataset version with Great Expectations, then publish it or quarantine its drop."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowSkipException

from conveyor.errors import ValidationFailed
from conveyor.lake import Lake
from conveyor.links import ValidationReportLink


class ValidateDatasetOperator(BaseOperator):
    """Run the pipeline's expectation suite on a dataset version.

    Writes ``reports/<pipeline>/<run>/validation/`` (``result.json`` and GX Data Docs, entry
    ``index.html``). On success the version is marked validated, becomes the pipeline's latest,
    the drop is marked processed and the dataset Asset is updated (extra: the version). On failure
    the drop moves to quarantine untouched with the report, the unvalidated copy in ``raw/`` is
    removed, and the task fails with the failed expectations (not retried). A version that was
    validated before is not published again (the task is skipped).

    :param pipeline: the pipeline's name.
    :param drop: the drop the version came from (templated).
    :param version: the dataset version to validate (templated).
    """

    template_fields = ("pipeline", "drop", "version")
    operator_extra_links = (ValidationReportLink(),)
    ui_color = "#e8fdf0"

    def __init__(self, *, pipeline: str, drop: str, version: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.drop = drop
        self.version = version

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.assets import dataset_asset
        from conveyor.data.datasets import LATEST, VALIDATED, is_validated, load_manifest, read_table
        from conveyor.data.drops import mark_processed, quarantine_drop
        from conveyor.lake import remove_tree, upload_tree, write_json
        from conveyor.spec import get_spec
        from conveyor.data.validation import load_suite, validate_frame

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        receipt = {"version": self.version, "run_id": run_id}
        if is_validated(lake, self.pipeline, self.version):
            mark_processed(lake, self.pipeline, self.drop, receipt)
            raise AirflowSkipException(f"Dataset version {self.version} was validated before: nothing new to publish")

        manifest = load_manifest(lake, self.pipeline, self.version)
        if manifest is None:
            raise FileNotFoundError(f"dataset version {self.version} has no manifest: was the ingest task run?")
        suite = load_suite(spec.suite_name)
        self.log.info("Validating %s (%s rows) against suite %s", self.version, manifest["rows"], suite["name"])
        frame = read_table(lake, manifest, spec)
        extra: dict[str, Any] = {}
        problems: list[str] = []
        if spec.data.format == "images":
            frame, extra, problems = self.judge_images(frame, spec)
        report_dir = lake.reports(self.pipeline, run_id) / "validation"
        with tempfile.TemporaryDirectory(prefix="conveyor-docs-") as tmp:
            outcome = validate_frame(frame, suite, run_name=f"{self.pipeline}-{self.version}", docs_dir=Path(tmp))
            upload_tree(Path(tmp), report_dir)
        del frame
        if problems:
            outcome.success = False
            outcome.failures = problems + outcome.failures
        report = {"pipeline": self.pipeline, "drop": self.drop, "version": self.version, "run_id": run_id,
                  "suite": suite["name"], **extra, **outcome.to_dict()}
        write_json(report_dir / "result.json", report)
        report_uri = str(report_dir / "index.html")
        self.log.info("Validation report: %s", report_uri)
        self.log.info("Statistics: %s", outcome.statistics)

        if not outcome.success:
            where = quarantine_drop(lake, self.pipeline, self.drop, run_id, report, spec.ingest.chunk_bytes)
            remove_tree(lake.raw(self.pipeline, self.version))
            raise ValidationFailed(f"drop {self.drop!r} (version {self.version}, quarantined at {where})",
                                   outcome.failures, report_uri)

        document = {**receipt, "report": report_uri, "statistics": outcome.statistics, "rows": manifest["rows"]}
        write_json(lake.raw(self.pipeline, self.version) / VALIDATED, document)
        write_json(lake.raw(self.pipeline) / LATEST, document)
        mark_processed(lake, self.pipeline, self.drop, receipt)
        context["outlet_events"][dataset_asset(self.pipeline)].extra = {
            "version": self.version, "rows": manifest["rows"], "uri": manifest["uri"]}
        return {"version": self.version, "rows": manifest["rows"], "report": report_uri, "statistics": outcome.statistics}

    def judge_images(self, frame: Any, spec: Any) -> tuple[Any, dict[str, Any], list[str]]:
        """Add the per-image checks, apply the tolerated share of bad files, keep the decodable rows.

        :return: the rows GX validates, report sections (classes, corrupt files), problems found.
        """
        from conveyor.data.images import class_report, with_checks

        frame = with_checks(frame)
        bad = frame[~frame["decodes"]]
        corrupt = [{"path": p, "error": e} for p, e in zip(bad["path"], bad["error"])]
        good = frame[frame["decodes"]].reset_index(drop=True)
        extra = {"classes": class_report(good), "corrupt_files": corrupt}
        self.log.info("Images per class: %s", extra["classes"])
        share = len(bad) / max(len(frame), 1)
        problems = []
        if share > spec.data.max_bad_file_share:
            problems.append(
                f"{len(bad)} of {len(frame)} image(s) ({share:.1%}) do not decode; tolerated: "
                f"{spec.data.max_bad_file_share:.1%}"
            )
            problems += [f"corrupt image {item['path']}: {item['error']}" for item in corrupt]
        elif corrupt:
            self.log.warning("%s corrupt image(s) within the tolerated share; they are left out: %s",
                             len(corrupt), [item["path"] for item in corrupt])
        return good, extra, problems
