"""The implicit checks every drop passes whatever its suite says, the size caps, and the bounded attempts.

The suite here checks nothing but the row count, so every rejection below comes from the implicit checks.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from airflow.sdk.exceptions import AirflowFailException

from conveyor.errors import ValidationFailed
from conveyor.lake import read_json
from helpers import churn_csv, ingest_and_validate, pipeline_spec_dict, write_drop

LENIENT_SUITE = {
    "name": "churn",
    "expectations": [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1}}],
}


@pytest.fixture
def lenient(lake, tmp_path, monkeypatch):
    """A private include folder whose churn suite only asks for one row."""
    import shutil

    from conveyor import settings

    include = tmp_path / "include"
    shutil.copytree(settings.pipelines_dir(), include / "pipelines")
    (include / "expectations").mkdir()
    (include / "expectations" / "churn.json").write_text(json.dumps(LENIENT_SUITE))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    return lake


def spec_with(data: dict | None = None, validation: dict | None = None) -> dict:
    spec = pipeline_spec_dict("churn")
    return {
        **spec,
        "data": {**spec["data"], **(data or {})},
        "validation": {**spec["validation"], **(validation or {})},
    }


PARQUET = {"format": "parquet"}


def parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def churn_frame(rows: int = 120) -> pd.DataFrame:
    from conveyor.demo import churn_frame as make

    return make(rows, 7)


def rejected(lake, drop: str, files: dict[str, bytes], spec: dict, rule: str) -> dict:
    """Ingest + validate a drop that must be rejected by ``rule``; returns the quarantine report."""
    write_drop(lake, drop, files)
    with pytest.raises(AirflowFailException) as err:
        ingest_and_validate(drop, run_id=f"run-{drop}", spec=spec)
    assert isinstance(err.value.__cause__, ValidationFailed), err.value
    assert rule in str(err.value) and "quarantined at" in str(err.value)
    assert not lake.landing("churn", drop).exists()
    target = lake.quarantine("churn", drop)
    for rel, payload in files.items():
        assert (target / rel).read_bytes() == payload
    assert not [p for p in lake.raw("churn").iterdir() if p.is_dir() and not (p / "validation.json").exists()]
    report = read_json(target / "_report.json")
    assert any(rule in line for line in report["failures"])
    assert (lake.reports("churn", f"run-{drop}") / "validation" / "index.html").exists()
    return report


def test_a_label_the_data_lacks_is_rejected(lenient):
    spec = spec_with({"label": "cancelled"})
    report = rejected(lenient, "nolabel", {"c.csv": churn_csv(120)}, spec, "rule 'spec columns'")
    assert any("data.label names column 'cancelled'" in line for line in report["failures"])


def test_an_id_column_or_feature_the_data_lacks_is_rejected(lenient):
    spec = spec_with({"id_column": "account", "features": ["age", "shoe_size"]})
    report = rejected(lenient, "noid", {"c.csv": churn_csv(120)}, spec, "rule 'spec columns'")
    assert any("'account'" in line for line in report["failures"])
    assert any("data.features names column 'shoe_size'" in line for line in report["failures"])


def test_infinite_numbers_are_rejected_unless_allowed(lenient):
    payload = churn_csv(120, total_charges=[float("inf"), float("-inf")] + [10.5] * 118)
    report = rejected(lenient, "inf", {"c.csv": payload}, spec_with(), "rule 'finite numbers'")
    assert any("'total_charges' holds 2 infinite" in line for line in report["failures"])
    write_drop(lenient, "inf-ok", {"c.csv": payload})
    _, validated = ingest_and_validate("inf-ok", spec=spec_with(validation={"allow_non_finite": True}))
    assert validated["rows"] == 120


def test_missing_numbers_are_left_to_the_suite(lenient):
    write_drop(lenient, "nan", {"c.csv": churn_csv(120, total_charges=[None] * 120)})
    _, validated = ingest_and_validate("nan", spec=spec_with())
    assert validated["rows"] == 120


def test_a_binary_problem_with_three_label_values_is_rejected(lenient):
    payload = churn_csv(120, churned=["yes", "no", "maybe"] * 40)
    report = rejected(lenient, "three", {"c.csv": payload}, spec_with(), "rule 'binary label'")
    assert any("found 3" in line and "'maybe'" in line for line in report["failures"])


def copied_without_ingest_checks(lake, spec, drop: str, files: dict[str, bytes]) -> str:
    """A version copied as ingest did before it refused such files (a version already in raw/); returns it."""
    import hashlib

    import pyarrow.parquet as pq

    from conveyor.data.datasets import copy_drop, version_of

    write_drop(lake, drop, files)
    entries, paths = [], []
    for rel, payload in files.items():
        schema = pq.ParquetFile(io.BytesIO(payload)).schema_arrow
        rows = pq.ParquetFile(io.BytesIO(payload)).metadata.num_rows
        digest = hashlib.sha256(payload).hexdigest()
        entries.append(
            {
                "path": rel,
                "bytes": len(payload),
                "sha256": digest,
                "rows": rows,
                "schema": {f.name: str(f.type) for f in schema},
            }
        )
        paths.append((rel, lake.landing("churn", drop) / rel))
    version = version_of(entries)
    copy_drop(lake, spec, drop, paths, entries, version, "run-copy")
    return version


def test_a_version_with_a_binary_column_is_one_clean_rejection(lenient, monkeypatch):
    import conveyor.data.validation as validation
    from conveyor.data.validation import validate_version
    from conveyor.operators.base import pipeline_spec
    from conveyor.reports import data_docs

    spec = pipeline_spec(spec_with(PARQUET))
    frame = churn_frame().assign(blob=[b"\xff\xfe\x00"] * 120)
    files = {"c.parquet": parquet(frame)}
    version = copied_without_ingest_checks(lenient, spec, "blob", files)
    calls = []
    real = validation.validate_frame
    monkeypatch.setattr(validation, "validate_frame", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ValidationFailed, match="rule 'no raw bytes': column 'blob' is binary") as err:
        # once: a rejection, not a retried error
        validate_version(lenient, spec, "blob", version, "run-blob", data_docs)
    assert "quarantined at" in str(err.value) and len(calls) == 1
    assert (lenient.quarantine("churn", "blob") / "c.parquet").read_bytes() == files["c.parquet"]
    assert not lenient.raw("churn", version).exists()
    report = read_json(lenient.quarantine("churn", "blob") / "_report.json")
    assert report["implicit_checks"]["unusable"] == ["blob"]


def test_a_parquet_drop_with_a_binary_column_is_rejected_at_ingest_or_validation(lenient):
    from conveyor.errors import DropRejected

    files = {"c.parquet": parquet(churn_frame().assign(blob=[b"\xff\xfe\x00"] * 120))}
    write_drop(lenient, "blob", files)
    with pytest.raises(AirflowFailException, match="'blob'") as err:
        ingest_and_validate("blob", spec=spec_with(PARQUET))
    assert isinstance(err.value.__cause__, (DropRejected, ValidationFailed)) and "quarantine" in str(err.value)
    assert (lenient.quarantine("churn", "blob") / "c.parquet").read_bytes() == files["c.parquet"]


def test_a_nested_column_is_rejected_in_a_tabular_pipeline(lenient):
    frame = churn_frame().assign(tags=[[1, 2]] * 120, where={"city": "x"})
    frame["where"] = [{"city": "x"}] * 120
    report = rejected(lenient, "nested", {"c.parquet": parquet(frame)}, spec_with(PARQUET), "rule 'no nested columns'")
    assert sorted(report["implicit_checks"]["unusable"]) == ["tags", "where"]
    assert not [p for p in lenient.raw("churn").iterdir() if p.is_dir()]


def test_a_column_changing_type_is_schema_drift(lenient):
    write_drop(lenient, "first", {"c.csv": churn_csv(120)})
    ingest_and_validate("first", run_id="run-first", spec=spec_with())
    changed = churn_csv(120, seed=8, age=["unknown"] * 120)
    report = rejected(lenient, "second", {"c.csv": changed}, spec_with(), "rule 'schema drift'")
    assert any("column 'age' was int64" in line and "now string" in line for line in report["failures"])


def test_schema_drift_is_accepted_and_reported_when_the_spec_says_so(lenient):
    write_drop(lenient, "first", {"c.csv": churn_csv(120)})
    ingest_and_validate("first", run_id="run-first", spec=spec_with())
    write_drop(lenient, "second", {"c.csv": churn_csv(120, seed=8, age=["unknown"] * 120, region=None)})
    _, validated = ingest_and_validate(
        "second", run_id="run-second", spec=spec_with(validation={"allow_schema_drift": True})
    )
    result = read_json(lenient.reports("churn", "run-second") / "validation" / "result.json")
    drift = result["implicit_checks"]["schema_drift"]
    assert validated["rows"] == 120 and len(drift) == 2
    assert any("'region'" in line and "missing" in line for line in drift)


def test_integers_becoming_floats_are_not_drift(lenient):
    write_drop(lenient, "first", {"c.csv": churn_csv(120)})
    ingest_and_validate("first", run_id="run-first", spec=spec_with())
    write_drop(lenient, "second", {"c.csv": churn_csv(120, seed=8, age=[30.5] * 120)})
    _, validated = ingest_and_validate("second", run_id="run-second", spec=spec_with())
    assert validated["rows"] == 120


def test_a_drop_over_the_caps_is_rejected_before_it_is_loaded(lenient, monkeypatch):
    import conveyor.data.datasets

    def never(*args, **kwargs):
        raise AssertionError("the table was loaded")

    monkeypatch.setattr(conveyor.data.datasets, "read_table", never)
    report = rejected(
        lenient, "big", {"c.csv": churn_csv(150)}, spec_with(validation={"max_rows": 100}), "rule 'size caps'"
    )
    assert any("150 rows, more than validation.max_rows 100" in line for line in report["failures"])
    assert report["suite_run"] is False
    rejected(
        lenient,
        "heavy",
        {"c.csv": churn_csv(150, seed=2)},
        spec_with(validation={"max_bytes": 1000}),
        "validation.max_bytes 1000",
    )


def test_a_validation_that_never_finishes_is_rejected_not_retried_forever(lenient, monkeypatch):
    import conveyor.data.validation as validation
    from conveyor.data.datasets import ingest_drop
    from conveyor.data.validation import validate_version
    from conveyor.operators.base import pipeline_spec
    from conveyor.reports import data_docs

    spec = pipeline_spec(spec_with())
    write_drop(lenient, "oom", {"c.csv": churn_csv(120)})
    version = ingest_drop(lenient, spec, "oom", "run1")["version"]

    def killed(*args, **kwargs):
        raise MemoryError("killed")

    monkeypatch.setattr(validation, "validate_frame", killed)
    for attempt in range(3):
        with pytest.raises(MemoryError):
            validate_version(lenient, spec, "oom", version, f"run{attempt}", data_docs)
    with pytest.raises(ValidationFailed, match="rule 'validation finishes': 3 earlier validation run"):
        validate_version(lenient, spec, "oom", version, "run3", data_docs)
    assert lenient.quarantine("churn", "oom").exists() and not lenient.raw("churn", version).exists()


def test_a_table_that_cannot_be_read_is_a_rejection(lenient, monkeypatch):
    import conveyor.data.datasets

    def unreadable(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(conveyor.data.datasets, "read_table", unreadable)
    rejected(lenient, "bad", {"c.csv": churn_csv(120)}, spec_with(), "rule 'readable table': UnicodeDecodeError")


def test_image_versions_are_capped_by_rows_not_by_the_bytes_of_their_images(lake):
    from PIL import Image

    def png(n: int, c: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (20 * n, 80 * c, 5 * n + c)).save(buffer, "PNG")
        return buffer.getvalue()

    spec = pipeline_spec_dict("shapes")
    files = {f"{name}/{n}.png": png(n, c) for c, name in enumerate(("circle", "square", "triangle")) for n in range(10)}
    write_drop(lake, "imgs", files, pipeline="shapes")
    tiny = {**spec, "validation": {**spec["validation"], "max_bytes": 10}}
    _, validated = ingest_and_validate("imgs", pipeline="shapes", run_id="run-imgs", spec=tiny)
    assert validated["rows"] == 30
    write_drop(lake, "imgs2", {**files, "circle/extra.png": png(9, 9)}, pipeline="shapes")
    few = {**spec, "validation": {**spec["validation"], "max_rows": 5}}
    with pytest.raises(AirflowFailException, match="31 rows, more than validation.max_rows 5"):
        ingest_and_validate("imgs2", pipeline="shapes", run_id="run-imgs2", spec=few)


def test_a_torn_attempts_record_counts_afresh(lenient):
    from conveyor.data.datasets import ingest_drop
    from conveyor.data.validation import ATTEMPTS, validate_version
    from conveyor.operators.base import pipeline_spec
    from conveyor.reports import data_docs

    spec = pipeline_spec(spec_with())
    write_drop(lenient, "torn", {"c.csv": churn_csv(120)})
    version = ingest_drop(lenient, spec, "torn", "run1")["version"]
    (lenient.raw("churn", version) / ATTEMPTS).write_bytes(b'{"runs": ["a", ')
    assert validate_version(lenient, spec, "torn", version, "run1", data_docs)["rows"] == 120
