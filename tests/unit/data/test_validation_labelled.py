"""Feedback labels pass the pipeline's checks and suite before they reach a split, and the duplicate
policy (``monitor.feedback_duplicates``) decides which label of an id counts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conveyor.lake import read_json
from conveyor.monitoring import labelled
from conveyor.spec import get_spec

LENIENT_SUITE = {
    "name": "churn",
    "expectations": [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1}}],
}


@pytest.fixture(scope="module")
def spec():
    return get_spec("churn")


def with_policy(spec, policy: str):
    return spec.model_copy(update={"monitor": spec.monitor.model_copy(update={"feedback_duplicates": policy})})


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


def write_rows(lake, frame: pd.DataFrame) -> str:
    from conveyor.monitoring.records import write_parquet

    target = lake.monitor("churn", "retrain", "scheduled__1", "labelled.parquet")
    write_parquet(target, frame)
    return str(target)


def churn(rows: int, seed: int) -> pd.DataFrame:
    from conveyor.demo import churn_frame

    return churn_frame(rows, seed)


def test_labelled_rows_failing_the_suite_or_the_checks_are_kept_aside(lake, spec):
    dataset = churn(200, 7)
    rows = churn(6, 99)
    rows.loc[0, "age"] = 500  # the suite: age between 16 and 120
    rows.loc[1, "churned"] = "maybe"  # binary label: a third value
    rows.loc[2, "total_charges"] = float("inf")  # finite numbers
    uri = write_rows(lake, rows)
    joined = labelled.with_labelled_rows(dataset, uri, spec, lake, "manual__retrain")
    assert joined.added == 3 and joined.rejected == 3 and len(joined.rows) == 203
    assert set(joined.rows["customer_id"]) >= set(rows["customer_id"].iloc[3:])
    assert not set(joined.rows["customer_id"]) & set(rows["customer_id"].iloc[:3])
    where = lake.quarantine("churn", "labelled/manual__retrain")
    assert joined.quarantine == str(where)
    kept = pd.read_parquet(str(where / "rejected.parquet").removeprefix("file://"))
    assert kept["customer_id"].tolist() == rows["customer_id"].iloc[:3].tolist()
    rules = kept["_rule"].tolist()
    assert "expect_column_values_to_be_between(column='age'" in rules[0]
    assert rules[1].startswith("rule 'binary label'") and rules[2].startswith("rule 'finite numbers'")
    report = read_json(where / "_report.json")
    assert report["rejected"] == 3 and report["added"] == 3 and report["source"] == uri


def test_a_table_wide_failure_caused_by_the_rows_rejects_them_all(lenient, spec):
    from conveyor import settings

    mean = {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "tenure_months", "max_value": 100}}
    suite = {**LENIENT_SUITE, "expectations": [*LENIENT_SUITE["expectations"], mean]}
    (settings.expectations_dir() / "churn.json").write_text(json.dumps(suite))
    dataset = churn(200, 7).assign(tenure_months=10)
    rows = churn(100, 98).assign(tenure_months=590)  # each row is fine; the mean of the whole is not
    joined = labelled.with_labelled_rows(dataset, write_rows(lenient, rows), spec, lenient, "run2")
    assert joined.added == 0 and joined.rejected == 100 and len(joined.rows) == 200
    assert joined.rules == {"suite (the dataset with these rows added)": 100}


def test_a_value_that_is_not_of_the_datasets_type_rejects_its_row(lenient, spec):
    dataset = churn(200, 7)
    rows = churn(3, 97).astype({"age": object})
    rows.loc[1, "age"] = "unknown"
    joined = labelled.with_labelled_rows(dataset, write_rows(lenient, rows.astype({"age": str})), spec, lenient, "r")
    assert joined.added == 2 and joined.rejected == 1 and str(joined.rows["age"].dtype) == "int64"
    kept = pd.read_parquet(joined.quarantine.removeprefix("file://") + "/rejected.parquet")
    assert kept["age"].tolist() == ["unknown"] and kept["_rule"].iloc[0].startswith("rule 'dataset types'")


def test_a_rejected_row_does_not_replace_the_dataset_row_of_its_id(lake, spec):
    dataset = churn(200, 7)
    rows = dataset.iloc[:2].copy()
    rows["age"] = [30, 999]
    joined = labelled.with_labelled_rows(dataset, write_rows(lake, rows), spec, lake, "run3")
    assert joined.added == 1 and joined.rejected == 1 and len(joined.rows) == 200
    second = joined.rows[joined.rows["customer_id"] == rows["customer_id"].iloc[1]]
    assert second["age"].tolist() == [dataset["age"].iloc[1]]  # the validated row stays


POLICY_ROWS = pd.DataFrame(
    {
        "customer_id": ["A", "B", "A", "C", "C"],
        "tenure_months": [1, 2, 3, 4, 5],
        "churned": ["no", "no", "yes", "yes", "yes"],
    }
)


@pytest.mark.parametrize(
    ("policy", "expected", "rejected", "superseded"),
    [
        ("last", {"A": (3, "yes"), "B": (2, "no"), "C": (5, "yes")}, 0, 2),
        ("first", {"A": (1, "no"), "B": (2, "no"), "C": (4, "yes")}, 0, 2),
        ("reject", {"B": (2, "no"), "C": (5, "yes")}, 2, 1),
    ],
)
def test_the_duplicate_policy_decides_which_label_of_an_id_counts(
    lenient, spec, policy, expected, rejected, superseded
):
    dataset = pd.DataFrame({"customer_id": ["Z"], "tenure_months": [9], "churned": ["no"]})
    uri = write_rows(lenient, POLICY_ROWS)
    joined = labelled.with_labelled_rows(dataset, uri, with_policy(spec, policy), lenient, f"run-{policy}")
    added = joined.rows.iloc[1:]
    got = {r["customer_id"]: (r["tenure_months"], r["churned"]) for r in added.to_dict("records")}
    assert got == expected and joined.rejected == rejected and joined.superseded == superseded
    if rejected:
        kept = pd.read_parquet(joined.quarantine.removeprefix("file://") + "/rejected.parquet")
        assert kept["customer_id"].tolist() == ["A", "A"]
        assert kept["_rule"].str.startswith("rule 'feedback_duplicates reject'").all()


def test_resolve_duplicates_in_label_order():
    reasons, superseded = labelled.resolve_duplicates(POLICY_ROWS, "customer_id", "churned", "reject")
    assert reasons.notna().tolist() == [True, False, True, False, False] and superseded == 1
    reasons, superseded = labelled.resolve_duplicates(POLICY_ROWS, "customer_id", "churned", "last")
    assert reasons.isna().all() and superseded == 2


def test_feedback_keeps_a_later_label_unless_the_policy_is_first():
    from conveyor.monitoring.feedback import check_rows

    rows = pd.DataFrame({"id": ["A", "B", "B"], "label": ["yes", "no", "yes"]}, dtype=object)
    known, earlier = {"A", "B"}, {"A"}
    accepted, rejected = check_rows(rows, ["no", "yes"], known, earlier, "last")
    assert accepted["id"].tolist() == ["A", "B", "B"] and rejected.empty
    accepted, rejected = check_rows(rows, ["no", "yes"], known, earlier, "first")
    assert accepted["id"].tolist() == ["B"] and len(rejected) == 2


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("last", {"A": "yes", "B": "no"}), ("first", {"A": "no", "B": "no"}), ("reject", {"B": "no"})],
)
def test_live_metrics_and_retraining_count_one_label_per_id(policy, expected):
    joined = pd.DataFrame(
        {
            "_id": ["A", "B", "A"],
            "_label": ["no", "no", "yes"],
            "received_at": ["2026-01-02", "2026-01-01", "2026-01-03"],
            "prediction": ["no", "no", "no"],
        }
    )
    current = labelled.current_labels(joined, policy)
    assert dict(zip(current["_id"], current["_label"], strict=True)) == expected


def test_the_split_task_adds_only_the_rows_that_pass_and_reports_the_rest(lake):
    from conveyor.operators.train import SplitDatasetOperator
    from helpers import churn_csv, context, ingest_and_validate, pipeline_spec_dict, write_drop

    write_drop(lake, "d1", {"customers.csv": churn_csv(200)})
    ingested, _ = ingest_and_validate("d1")
    rows = churn(10, 96)
    rows.loc[4, "contract"] = "lifetime"  # the suite: contract in its set
    uri = write_rows(lake, rows)
    op = SplitDatasetOperator(task_id="split", spec=pipeline_spec_dict("churn"), labelled_rows=uri)
    result = op.execute({**context("manual__retrain"), "triggering_asset_events": {}})
    assert result["dataset_version"] == ingested["version"]
    assert result["labelled"]["rows"] == 9 and result["labelled"]["rejected"] == 1
    assert result["labelled"]["quarantine"] == str(lake.quarantine("churn", "labelled/manual__retrain"))
    assert sum(part["rows"] for part in result["parts"].values()) == 209
