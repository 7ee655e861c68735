"""Great Expectations 1.x validation of a table against a pipeline's expectation suite.

The suite is ``include/expectations/<suite>.json`` in GX's own suite format. Each run builds an
ephemeral GX context (no ``great_expectations/`` folder to keep in sync), runs a checkpoint that
renders Data Docs into a folder, and returns a small, JSON-serialisable outcome.
:func:`validate_version` runs it on a dataset version, then publishes the version or quarantines its drop.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor import settings
from conveyor.errors import ConveyorError, ValidationFailed
from conveyor.lake import Lake, remove_tree, upload_tree, write_json

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

log = logging.getLogger(__name__)

SITE = "conveyor"
# BASIC: counts and a sample of unexpected values, without row indices of every unexpected value.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 5}


@dataclass
class ValidationOutcome:
    """What a validation found: success, statistics and one line per failed expectation."""

    success: bool
    statistics: dict[str, Any]
    failures: list[str] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_suite(name: str) -> dict[str, Any]:
    """Read an expectation suite document by name.

    :param name: the suite's name (``include/expectations/<name>.json``).
    :raises ConveyorError: when the file is missing or not a GX suite.
    """
    path = settings.expectations_dir() / f"{name}.json"
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConveyorError(f"{path}: not a readable expectation suite: {exc}") from exc
    if not isinstance(document.get("expectations"), list):
        raise ConveyorError(f"{path}: field 'expectations' must be a list of GX expectations")
    return document


def _describe(result: Any) -> str:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k not in {"batch_id"}}
    detail = result.result or {}
    found = []
    if "unexpected_count" in detail:
        found.append(f"{detail['unexpected_count']} unexpected of {detail.get('element_count')}")
    if detail.get("partial_unexpected_list"):
        found.append(f"e.g. {detail['partial_unexpected_list'][:3]}")
    if "observed_value" in detail:
        found.append(f"observed {detail['observed_value']!r}")
    if result.exception_info and result.exception_info.get("raised_exception"):
        found.append(f"error: {result.exception_info.get('exception_message')}")
    return f"{config.type}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {'; '.join(found) or 'failed'}"


def _result_row(result: Any) -> dict[str, Any]:
    config = result.expectation_config
    return {"expectation": config.type, "kwargs": dict(config.kwargs), "success": result.success}


def as_arrow_strings(frame: Any) -> Any:
    """Text columns as Arrow-backed strings (dtype ``string``, pandas 3's default): GX filters them

    :param frame: the table to validate.
    several times faster than Python-object columns. Other columns are left as they are."""
    text = {name: "string[pyarrow]" for name, dtype in frame.dtypes.items() if str(dtype) == "object"}
    return frame.astype(text) if text else frame


def validate_frame(frame: Any, suite: dict[str, Any], run_name: str, docs_dir: Path | None = None) -> ValidationOutcome:
    """Validate a pandas DataFrame against a suite, optionally rendering Data Docs.

    :param frame: the table to validate.
    :param suite: the suite document (GX 1.x JSON).
    :param run_name: names the validation run (and its Data Docs page) deterministically.
    :param docs_dir: a local folder for the Data Docs site, or None for no HTML.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    import great_expectations.execution_engine.pandas_execution_engine as pandas_engine
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core import ExpectationSuite
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # GX fingerprints a batch under 1 GB by hashing every row (the slowest step on large tables);
    # the dataset version is already a content hash of the drop, so every batch skips it.
    pandas_engine.HASH_THRESHOLD = 0
    frame = as_arrow_strings(frame)
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions: list[Any] = []
    if docs_dir is not None:
        context.add_data_docs_site(
            SITE,
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            },
        )
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=[SITE]))
    name = suite["name"]
    try:
        gx_suite = context.suites.add(ExpectationSuite(**suite))
    except Exception as exc:  # GX raises several types for a malformed suite
        raise ConveyorError(f"expectation suite {name!r} is not valid GX 1.x: {exc}") from exc
    asset = context.data_sources.add_pandas("conveyor").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=gx_suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=actions,
            result_format=RESULT_FORMAT,
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=RunIdentifier(run_name=run_name))
    (validation,) = run.run_results.values()
    failed = [r for r in validation.results if not r.success]
    return ValidationOutcome(
        success=bool(run.success),
        statistics=dict(validation.statistics),
        failures=[_describe(r) for r in failed],
        results=[_result_row(r) for r in validation.results],
    )


def validate_version(lake: Lake, spec: PipelineSpec, drop: str, version: str, run_id: str) -> dict[str, Any] | None:
    """Run the pipeline's expectation suite on a dataset version, then publish it or quarantine its drop.

    Writes ``reports/<pipeline>/<run>/validation/`` (``result.json`` and GX Data Docs, entry
    ``index.html``). On success the version is marked validated and becomes the pipeline's latest,
    and the drop is marked processed. On failure the drop moves to quarantine untouched with the
    report and the unvalidated copy in ``raw/`` is removed.

    :param lake: the lake.
    :param spec: the pipeline.
    :param drop: the drop the version came from.
    :param version: the dataset version to validate.
    :param run_id: the Airflow run (names the report folder).
    :return: ``{"version", "rows", "report", "statistics", "uri"}``, or None when the version was
        validated before (the drop is marked processed; there is nothing new to publish).
    :raises ValidationFailed: listing the failed expectations, the report and the quarantine folder.
    """
    from conveyor.data.datasets import LATEST, VALIDATED, is_validated, load_manifest
    from conveyor.data.drops import mark_processed, quarantine_drop

    receipt = {"version": version, "run_id": run_id}
    if is_validated(lake, spec.name, version):
        mark_processed(lake, spec.name, drop, receipt)
        return None
    manifest = load_manifest(lake, spec.name, version)
    if manifest is None:
        raise FileNotFoundError(f"dataset version {version} has no manifest: was the ingest task run?")
    outcome, report, report_uri = _judge_version(lake, spec, manifest, drop, version, run_id)
    if not outcome.success:
        where = quarantine_drop(lake, spec.name, drop, run_id, report, spec.ingest.chunk_bytes)
        remove_tree(lake.raw(spec.name, version))
        raise ValidationFailed(
            f"drop {drop!r} (version {version}, quarantined at {where})", outcome.failures, report_uri
        )
    document = {**receipt, "report": report_uri, "statistics": outcome.statistics, "rows": manifest["rows"]}
    write_json(lake.raw(spec.name, version) / VALIDATED, document)
    write_json(lake.raw(spec.name) / LATEST, document)
    mark_processed(lake, spec.name, drop, receipt)
    return {
        "version": version,
        "rows": manifest["rows"],
        "report": report_uri,
        "statistics": outcome.statistics,
        "uri": manifest["uri"],
    }


def _judge_version(
    lake: Lake, spec: PipelineSpec, manifest: dict[str, Any], drop: str, version: str, run_id: str
) -> tuple[ValidationOutcome, dict[str, Any], str]:
    """Validate a version's table (and, for images, each file), write the report; returns outcome, report, URI."""
    from conveyor.data.datasets import read_table

    suite = load_suite(spec.suite_name)
    log.info("Validating %s (%s rows) against suite %s", version, manifest["rows"], suite["name"])
    frame = read_table(lake, manifest, spec)
    extra: dict[str, Any] = {}
    problems: list[str] = []
    if spec.data.format == "images":
        from conveyor.data.images import judge_images

        frame, extra, problems = judge_images(frame, spec.data.max_bad_file_share)
    report_dir = lake.reports(spec.name, run_id) / "validation"
    with tempfile.TemporaryDirectory(prefix="conveyor-docs-") as tmp:
        outcome = validate_frame(frame, suite, run_name=f"{spec.name}-{version}", docs_dir=Path(tmp))
        upload_tree(Path(tmp), report_dir)
    del frame
    if problems:
        outcome.success = False
        outcome.failures = problems + outcome.failures
    report = {
        "pipeline": spec.name,
        "drop": drop,
        "version": version,
        "run_id": run_id,
        "suite": suite["name"],
        **extra,
        **outcome.to_dict(),
    }
    write_json(report_dir / "result.json", report)
    report_uri = str(report_dir / "index.html")
    log.info("Validation report: %s", report_uri)
    log.info("Statistics: %s", outcome.statistics)
    return outcome, report, report_uri
