"""Ingest and validation on the local lake: the happy path, idempotency, and every bad input."""

from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from conveyor.data.datasets import latest_version
from conveyor.data.drops import find_complete_drops
from conveyor.errors import DropRejected, ValidationFailed
from conveyor.lake import read_json
from helpers import churn_csv, ingest_and_validate, pipeline_spec_dict, write_drop


def files_under(path) -> set[str]:
    base = path.path.rstrip("/")
    return {p.path[len(base) + 1 :] for p in path.rglob("*") if p.is_file()} if path.exists() else set()


def test_good_drop_becomes_a_validated_version(lake):
    payload = churn_csv(500)
    write_drop(lake, "d1", {"customers.csv": payload})
    ingested, validated = ingest_and_validate("d1")
    version = ingested["version"]
    assert version.startswith("v-") and ingested["rows"] == 500 and ingested["bytes"] == len(payload)
    manifest = read_json(lake.raw("churn", version) / "manifest.json")
    assert manifest["files"][0]["path"] == "customers.csv"
    assert manifest["files"][0]["sha256"] and manifest["rows"] == 500
    assert manifest["schema"]["tenure_months"] == "int64" and manifest["schema"]["contract"] == "string"
    assert (lake.raw("churn", version) / "data" / "customers.csv").read_bytes() == payload
    assert latest_version(lake, "churn") == version
    assert validated["statistics"]["unsuccessful_expectations"] == 0
    report = lake.reports("churn", "manual__test") / "validation"
    assert (report / "index.html").exists() and (report / "result.json").exists()
    assert read_json(lake.landing("churn", "d1") / "_PROCESSED")["version"] == version
    assert find_complete_drops(lake.landing("churn"), "_SUCCESS") == []


def test_same_bytes_twice_is_one_version_and_no_new_event(lake):
    payload = churn_csv(300)
    write_drop(lake, "d1", {"customers.csv": payload})
    first, _ = ingest_and_validate("d1", run_id="run1")
    write_drop(lake, "d2", {"customers.csv": payload})
    with pytest.raises(AirflowSkipException, match="validated before"):
        ingest_and_validate("d2", run_id="run2")
    assert [p.name for p in lake.raw("churn").iterdir() if p.is_dir()] == [first["version"]]
    assert (lake.landing("churn", "d2") / "_PROCESSED").exists()


def test_retry_after_a_crash_before_validation_rewrites_the_same_names(lake):
    from conveyor.operators.ingest import IngestDropOperator
    from helpers import context

    write_drop(lake, "d1", {"customers.csv": churn_csv(300)})
    op = IngestDropOperator(task_id="ingest", spec=pipeline_spec_dict("churn"), drop="d1")
    first = op.execute(context("run1"))
    second = op.execute(context("run1"))
    assert first == second
    assert len([p for p in lake.raw("churn").iterdir() if p.is_dir()]) == 1


@pytest.fixture
def parquet_pipeline(lake, tmp_path, monkeypatch):
    """The churn pipeline switched to Parquet drops, in a private include folder."""
    import shutil

    import yaml

    from conveyor import settings

    include = tmp_path / "include"
    shutil.copytree(settings.expectations_dir(), include / "expectations")
    spec = yaml.safe_load((settings.pipelines_dir() / "churn.yaml").read_text())
    spec["data"]["format"] = "parquet"
    (include / "pipelines").mkdir()
    (include / "pipelines" / "churn.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))


def test_parquet_drop_with_several_files(lake, parquet_pipeline):
    from conveyor.demo import churn_frame

    frame = churn_frame(400)
    write_drop(
        lake,
        "p1",
        {
            "part-0.parquet": frame.iloc[:200].to_parquet(index=False),
            "part-1.parquet": frame.iloc[200:].to_parquet(index=False),
        },
    )
    ingested, validated = ingest_and_validate("p1")
    assert ingested["rows"] == 400 and validated["rows"] == 400
    manifest = read_json(lake.raw("churn", ingested["version"]) / "manifest.json")
    assert [f["path"] for f in manifest["files"]] == ["part-0.parquet", "part-1.parquet"]


def assert_quarantined(lake, drop: str, payloads: dict[str, bytes]) -> dict:
    """The drop left landing, its bytes are untouched in quarantine, raw holds nothing of it."""
    assert not lake.landing("churn", drop).exists()
    target = lake.quarantine("churn", drop)
    for rel, payload in payloads.items():
        assert (target / rel).read_bytes() == payload
    assert (target / "_SUCCESS").exists()
    assert not lake.raw("churn").exists() or not [p for p in lake.raw("churn").iterdir() if p.is_dir()]
    assert latest_version(lake, "churn") is None
    return read_json(target / "_report.json")


REJECTED_AT_INGEST = {
    "empty file": ({"customers.csv": b""}, "customers.csv: rule 'not empty'"),
    "non-UTF-8 bytes": (
        {"customers.csv": b"customer_id,churned\nC1,yes\nC\xff\xfe2,no\n"},
        "customers.csv: rule 'encoding utf-8'",
    ),
    "wrong delimiter": (
        {"customers.csv": churn_csv(50).replace(b",", b";")},
        "customers.csv: rule 'delimiter ','': the header",
    ),
    "truncated parquet": ({"customers.parquet": b"PAR1\x00\x01garbage"}, "rule 'format csv'"),
    "wrong format": ({"customers.txt": b"a,b\n1,2\n"}, "customers.txt: rule 'format csv'"),
    "nothing but the marker": ({}, "rule 'data files'"),
}


@pytest.mark.parametrize("case", sorted(REJECTED_AT_INGEST))
def test_unreadable_drops_are_rejected_and_quarantined(lake, case):
    files, message = REJECTED_AT_INGEST[case]
    write_drop(lake, "bad", files)
    with pytest.raises(AirflowFailException) as err:  # not retried
        ingest_and_validate("bad")
    assert isinstance(err.value.__cause__, DropRejected)
    assert message in str(err.value) and "quarantine" in str(err.value)
    assert str(err.value) == str(err.value.__cause__)
    report = assert_quarantined(lake, "bad", files)
    assert report["stage"] == "ingest" and message in report["error"]


def test_truncated_parquet_in_a_parquet_pipeline(lake, parquet_pipeline):
    from conveyor.demo import churn_frame

    whole = churn_frame(100).to_parquet(index=False)
    files = {"customers.parquet": whole[: len(whole) // 2]}
    write_drop(lake, "bad", files)
    with pytest.raises(AirflowFailException, match="customers.parquet: rule 'readable Parquet'") as err:
        ingest_and_validate("bad")
    assert isinstance(err.value.__cause__, DropRejected)
    assert_quarantined(lake, "bad", files)


FAILING_VALIDATION = {
    "header only": (lambda: churn_csv(0), "expect_table_row_count_to_be_between"),
    "missing label column": (lambda: churn_csv(200, churned=None), "expect_table_columns_to_match_set"),
    "column of the wrong type": (
        lambda: churn_csv(200, age=["unknown"] * 200),
        "expect_column_values_to_be_in_type_list(column='age'",
    ),
    "label outside the allowed set": (
        lambda: churn_csv(200, churned=["yes", "no", "maybe", "no"] * 50),
        "expect_column_values_to_be_in_set(column='churned'",
    ),
    "duplicate ids": (lambda: churn_csv(200, customer_id=["C1"] * 200), "expect_column_values_to_be_unique"),
}


@pytest.mark.parametrize("case", sorted(FAILING_VALIDATION))
def test_drops_failing_their_suite_are_quarantined_with_the_report(lake, case):
    make, expectation = FAILING_VALIDATION[case]
    files = {"customers.csv": make()}
    write_drop(lake, "bad", files)
    with pytest.raises(AirflowFailException) as err:  # not retried
        ingest_and_validate("bad", run_id="run-bad")
    cause = err.value.__cause__
    assert isinstance(cause, ValidationFailed)
    assert any(expectation in line for line in cause.failures) and cause.report_uri.endswith("index.html")
    message = str(err.value)
    assert expectation in message
    assert "index.html" in message and "quarantined at" in message
    report = assert_quarantined(lake, "bad", files)
    assert report["success"] is False and any(expectation in line for line in report["failures"])
    docs = lake.reports("churn", "run-bad") / "validation"
    assert (docs / "index.html").exists()
    assert json.loads((docs / "result.json").read_text())["success"] is False


def test_failure_message_lists_at_most_ten_expectations():
    err = ValidationFailed("drop 'x'", [f"expectation {i}" for i in range(14)], "file:///r/index.html")
    assert "expectation 9" in str(err) and "expectation 10" not in str(err)
    assert "and 4 more" in str(err) and "file:///r/index.html" in str(err)


def test_a_drop_without_its_marker_is_not_picked(lake):
    write_drop(lake, "incomplete", {"customers.csv": churn_csv(50)}, marker=False)
    write_drop(lake, "feedback", {"labels.csv": b"id,label\n"})
    write_drop(lake, "b-complete", {"customers.csv": churn_csv(50)})
    write_drop(lake, "a-complete", {"customers.csv": churn_csv(50, seed=3)})
    assert find_complete_drops(lake.landing("churn"), "_SUCCESS") == ["a-complete", "b-complete"]


def test_quarantining_the_same_drop_name_twice_keeps_both(lake):
    for run in ("run1", "run2"):
        write_drop(lake, "bad", {"customers.csv": b""})
        with pytest.raises(AirflowFailException) as err:
            ingest_and_validate("bad", run_id=run)
        assert isinstance(err.value.__cause__, DropRejected)
    names = sorted(p.name for p in lake.path("quarantine", "churn").iterdir())
    assert names == ["bad", "bad__run2"]


# --- the domain functions raise Conveyor's errors; the operators get the spec, never the file -----------


def test_ingest_drop_raises_drop_rejected_after_quarantining(lake):
    from conveyor.data.datasets import ingest_drop
    from conveyor.operators.base import pipeline_spec

    write_drop(lake, "bad", {"customers.csv": b""})
    with pytest.raises(DropRejected, match="customers.csv: rule 'not empty'.*kept in quarantine at") as err:
        ingest_drop(lake, pipeline_spec(pipeline_spec_dict("churn")), "bad", "run1")
    assert not isinstance(err.value, AirflowFailException)
    assert_quarantined(lake, "bad", {"customers.csv": b""})


def test_validate_version_raises_validation_failed_after_quarantining(lake):
    from conveyor.data.datasets import ingest_drop
    from conveyor.data.validation import validate_version
    from conveyor.operators.base import pipeline_spec
    from conveyor.reports import data_docs

    spec = pipeline_spec(pipeline_spec_dict("churn"))
    files = {"customers.csv": churn_csv(200, churned=["maybe"] * 200)}
    write_drop(lake, "bad", files)
    version = ingest_drop(lake, spec, "bad", "run1")["version"]
    with pytest.raises(ValidationFailed, match="churned") as err:
        validate_version(lake, spec, "bad", version, "run1", data_docs)
    assert not isinstance(err.value, AirflowFailException)
    assert err.value.report_uri == str(lake.reports("churn", "run1") / "validation" / "index.html")
    assert_quarantined(lake, "bad", files)


def test_bytes_changing_during_the_copy_are_retried_not_failed(lake, monkeypatch):
    import conveyor.data.datasets
    from conveyor.data.datasets import DropChanged
    from conveyor.errors import TransientError
    from conveyor.operators.ingest import IngestDropOperator
    from helpers import context

    monkeypatch.setattr(conveyor.data.datasets, "copy_verified", lambda src, dst, chunk: ("0" * 64, 1))
    write_drop(lake, "d1", {"customers.csv": churn_csv(50)})
    with pytest.raises(DropChanged, match="changed while being ingested") as err:
        IngestDropOperator(task_id="ingest", spec=pipeline_spec_dict("churn"), drop="d1").execute(context("run1"))
    assert isinstance(err.value, TransientError) and not isinstance(err.value, AirflowFailException)
    assert (lake.landing("churn", "d1") / "customers.csv").exists()  # not quarantined: a retry copies again
    assert not lake.quarantine("churn", "d1").exists()


def test_the_operators_never_read_the_pipeline_file(lake, tmp_path, monkeypatch):
    import shutil

    from conveyor import settings

    spec = pipeline_spec_dict("churn")
    include = tmp_path / "include"  # the expectation suites only: no pipelines/ folder at run time
    shutil.copytree(settings.expectations_dir(), include / "expectations")
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    write_drop(lake, "d1", {"customers.csv": churn_csv(300)})
    ingested, validated = ingest_and_validate("d1", spec=spec)
    assert validated["version"] == ingested["version"] == latest_version(lake, "churn")


def test_the_ingest_dag_hands_the_spec_to_its_tasks():
    from conveyor import settings
    from conveyor.factory.ingest import ingest_dag
    from conveyor.operators.base import pipeline_spec
    from conveyor.spec import load_spec

    spec = load_spec(settings.pipelines_dir() / "churn.yaml")
    dag = ingest_dag(spec)
    for task_id in ("ingest", "validate"):
        task = dag.get_task(task_id)
        assert "spec" in task.template_fields and task.template_fields_renderers["spec"] == "json"
        assert task.spec.value == spec.model_dump(mode="json")  # literal(): Jinja leaves its strings alone
        assert pipeline_spec(task.spec).model_dump() == spec.model_dump()  # same fields; not where it was read
    assert dag.get_task("validate").pipeline == "churn"  # the report link finds the report by it
    sensor = dag.get_task("wait_for_drop")
    assert (sensor.pipeline, sensor.marker) == ("churn", spec.data.marker)
