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
from typing import TYPE_CHECKING, Any, Protocol

from conveyor import settings
from conveyor.errors import ConveyorError, ValidationFailed
from conveyor.lake import Lake, remove_tree, upload_tree, write_json

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

log = logging.getLogger(__name__)

SITE = "conveyor"
# BASIC: counts and a sample of unexpected values, without row indices of every unexpected value.
RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 5}


class DataDocs(Protocol):
    """How Data Docs pages are configured and made safe (:mod:`conveyor.reports.data_docs`; the operator passes
    it in, so this domain module builds no HTML of its own and never imports ``reports``)."""

    def site_config(self, docs_dir: Path) -> Any: ...

    def make_offline(self, docs_dir: Path, success: bool | None = None, failures: Any = ()) -> None: ...

    def write_index(self, docs_dir: Path, success: bool | None = None, failures: Any = ()) -> Path: ...


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
    row = {"expectation": config.type, "kwargs": dict(config.kwargs), "success": result.success}
    detail = result.result or {}
    if not result.success and "unexpected_index_list" in detail:  # COMPLETE format, a row-wise expectation
        row["unexpected_index"] = list(detail["unexpected_index_list"])
    return row


def as_arrow_strings(frame: Any) -> Any:
    """Text columns as Arrow-backed strings (dtype ``string``, pandas 3's default): GX filters them

    :param frame: the table to validate.
    several times faster than Python-object columns. Other columns are left as they are."""
    text = {name: "string[pyarrow]" for name, dtype in frame.dtypes.items() if str(dtype) == "object"}
    return frame.astype(text) if text else frame


def validate_frame(
    frame: Any,
    suite: dict[str, Any],
    run_name: str,
    docs_dir: Path | None = None,
    result_format: dict[str, Any] | None = None,
    docs: DataDocs | None = None,
) -> ValidationOutcome:
    """Validate a pandas DataFrame against a suite, optionally rendering Data Docs.

    :param frame: the table to validate.
    :param suite: the suite document (GX 1.x JSON).
    :param run_name: names the validation run (and its Data Docs page) deterministically.
    :param docs_dir: a local folder for the Data Docs site, or None for no HTML.
    :param result_format: GX's result format (default :data:`RESULT_FORMAT`); with ``COMPLETE`` a failed
        row-wise expectation's result row lists the frame index of every unexpected row (``unexpected_index``).
    :param docs: renders the Data Docs site safely (required with ``docs_dir``).
    """
    if docs_dir is not None and docs is None:
        raise ValueError("validate_frame: docs_dir needs docs (conveyor.reports.data_docs) to render the pages safely")
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
        context.add_data_docs_site(SITE, docs.site_config(docs_dir))  # type: ignore[union-attr]  # data values escaped
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
            result_format=result_format or RESULT_FORMAT,
        )
    )
    run = checkpoint.run(batch_parameters={"dataframe": frame}, run_id=RunIdentifier(run_name=run_name))
    (validation,) = run.run_results.values()
    failed = [r for r in validation.results if not r.success]
    if docs_dir is not None and docs is not None:  # no CDN scripts or styles, nothing active, an index without JS
        docs.make_offline(docs_dir, bool(run.success), [_describe(r) for r in failed])
    return ValidationOutcome(
        success=bool(run.success),
        statistics=dict(validation.statistics),
        failures=[_describe(r) for r in failed],
        results=[_result_row(r) for r in validation.results],
    )


ATTEMPTS = "validation-attempts.json"


def validate_version(
    lake: Lake, spec: PipelineSpec, drop: str, version: str, run_id: str, docs: DataDocs
) -> dict[str, Any] | None:
    """Run the implicit checks and the pipeline's suite on a dataset version, then publish it or quarantine its drop.

    Writes ``reports/<pipeline>/<run>/validation/`` (``result.json`` and GX Data Docs, entry
    ``index.html``). On success the version is marked validated and becomes the pipeline's latest,
    and the drop is marked processed. On failure the drop moves to quarantine untouched with the
    report and the unvalidated copy in ``raw/`` is removed. A version over the spec's size caps is
    rejected before it is loaded; one whose validation was started ``validation.max_attempts`` times
    without finishing (the task killed, e.g. out of memory) is rejected instead of being tried again.

    :param lake: the lake.
    :param spec: the pipeline.
    :param drop: the drop the version came from.
    :param version: the dataset version to validate.
    :param run_id: the Airflow run (names the report folder).
    :param docs: renders the Data Docs pages safely (:mod:`conveyor.reports.data_docs`).
    :return: ``{"version", "rows", "report", "statistics", "uri"}``, or None when the version was
        validated before (the drop is marked processed; there is nothing new to publish).
    :raises ValidationFailed: listing the failed checks and expectations, the report and the quarantine folder.
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
    suite = load_suite(spec.suite_name)
    unfinished = _count_attempt(lake, spec.name, version, run_id)
    if unfinished >= spec.validation.max_attempts:
        reason = (
            f"rule 'validation finishes': {unfinished} earlier validation run(s) of {version} did not finish "
            f"(validation.max_attempts {spec.validation.max_attempts}; the task was killed, e.g. out of memory, "
            "or storage kept failing): see those runs' logs"
        )
        outcome, report, report_uri = _rejected_unread(lake, spec, manifest, drop, run_id, suite, docs, [reason])
    else:
        outcome, report, report_uri = _judge_version(lake, spec, manifest, drop, version, run_id, suite, docs)
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


def _count_attempt(lake: Lake, pipeline: str, version: str, run_id: str) -> int:
    """Record that a validation of a version starts; returns how many earlier ones never finished.

    A finished validation either publishes the version (it is not validated again) or removes its
    copy with this record, so every attempt recorded before this one was cut short.
    """
    from conveyor.lake import read_json

    path = lake.raw(pipeline, version) / ATTEMPTS
    try:
        runs: list[str] = list(read_json(path).get("runs", [])) if path.exists() else []
    except ValueError:  # a torn record (not JSON) counts afresh rather than failing every run
        runs = []
    write_json(path, {"runs": [*runs, run_id]})
    return len(runs)


def _previous_schema(lake: Lake, pipeline: str, version: str) -> tuple[str | None, dict[str, str] | None]:
    """The last validated version of a pipeline other than this one, and its schema (None, None if none)."""
    from conveyor.data.datasets import latest_version, load_manifest

    previous = latest_version(lake, pipeline)
    if previous is None or previous == version:
        return None, None
    manifest = load_manifest(lake, pipeline, previous)
    return (previous, manifest.get("schema")) if manifest else (None, None)


def _judge_version(
    lake: Lake,
    spec: PipelineSpec,
    manifest: dict[str, Any],
    drop: str,
    version: str,
    run_id: str,
    suite: dict[str, Any],
    docs: DataDocs,
) -> tuple[ValidationOutcome, dict[str, Any], str]:
    """Check a version (caps, implicit checks, the suite; for images each file), write the report;
    returns outcome, report, URI."""
    from conveyor.data.checks import CheckReport, check_caps, check_schema, check_values
    from conveyor.data.datasets import read_table

    too_big = check_caps(manifest, spec)
    if too_big:
        return _rejected_unread(lake, spec, manifest, drop, run_id, suite, docs, too_big)
    checks = CheckReport()
    if spec.data.format != "images":
        previous_version, previous = _previous_schema(lake, spec.name, version)
        checks = check_schema(manifest["schema"], spec, previous, previous_version)
    log.info("Validating %s (%s rows) against suite %s", version, manifest["rows"], suite["name"])
    try:
        frame = read_table(lake, manifest, spec)
    except (ValueError, TypeError, NotImplementedError) as exc:  # the data's fault (UnicodeDecodeError, Arrow, pandas)
        reason = f"rule 'readable table': {type(exc).__name__}: {exc}"
        return _rejected_unread(lake, spec, manifest, drop, run_id, suite, docs, [*checks.failures, reason], checks)
    extra: dict[str, Any] = {}
    problems = list(checks.failures)
    if spec.data.format == "images":
        from conveyor.data.images import judge_images

        frame, extra, image_problems = judge_images(frame, spec.data.max_bad_file_share)
        problems += image_problems
    else:
        frame = frame.drop(columns=checks.unusable)  # reported above; GX cannot read raw bytes or nested values
        problems += check_values(frame, spec)
    for line in checks.warnings:
        log.warning("Accepted (validation.allow_schema_drift): %s", line)
    report_dir = lake.reports(spec.name, run_id) / "validation"
    with tempfile.TemporaryDirectory(prefix="conveyor-docs-") as tmp:
        outcome = validate_frame(frame, suite, run_name=f"{spec.name}-{version}", docs_dir=Path(tmp), docs=docs)
        docs.write_index(Path(tmp), outcome.success and not problems, problems + outcome.failures)
        upload_tree(Path(tmp), report_dir)
    del frame
    if problems:
        outcome.success = False
        outcome.failures = problems + outcome.failures
    report = {**_report_head(spec, manifest, drop, run_id, suite), **extra, "implicit_checks": checks.to_dict()}
    return _written(outcome, report | outcome.to_dict(), report_dir)


def _report_head(
    spec: PipelineSpec, manifest: dict[str, Any], drop: str, run_id: str, suite: dict[str, Any]
) -> dict[str, Any]:
    return {
        "pipeline": spec.name,
        "drop": drop,
        "version": manifest["version"],
        "run_id": run_id,
        "suite": suite["name"],
    }


def _written(
    outcome: ValidationOutcome, report: dict[str, Any], report_dir: Any
) -> tuple[ValidationOutcome, dict[str, Any], str]:
    write_json(report_dir / "result.json", report)
    report_uri = str(report_dir / "index.html")
    log.info("Validation report: %s", report_uri)
    log.info("Statistics: %s", outcome.statistics)
    return outcome, report, report_uri


def _rejected_unread(
    lake: Lake,
    spec: PipelineSpec,
    manifest: dict[str, Any],
    drop: str,
    run_id: str,
    suite: dict[str, Any],
    docs: DataDocs,
    failures: list[str],
    checks: Any = None,
) -> tuple[ValidationOutcome, dict[str, Any], str]:
    """A rejection decided without running the suite (over a cap, unreadable, never finishing): the
    report is ``result.json`` and an ``index.html`` listing the reasons (escaped), no GX pages."""
    for line in failures:
        log.error("Rejected: %s", line)
    outcome = ValidationOutcome(success=False, statistics={}, failures=failures)
    report_dir = lake.reports(spec.name, run_id) / "validation"
    with tempfile.TemporaryDirectory(prefix="conveyor-docs-") as tmp:
        docs.write_index(Path(tmp), False, failures)
        upload_tree(Path(tmp), report_dir)
    report = _report_head(spec, manifest, drop, run_id, suite) | {"suite_run": False}
    if checks is not None:
        report["implicit_checks"] = checks.to_dict()
    return _written(outcome, report | outcome.to_dict(), report_dir)
