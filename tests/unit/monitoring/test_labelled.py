"""Labelled rows for retraining (conveyor.monitoring.labelled): predictions whose truth came back as
training rows, and adding them to a dataset version (types cast, the newer truth wins, bad files refused).

The suite here asks for one row only: these tests are about reading and joining; the checks and the
suite on labelled rows are tested in tests/unit/data/test_validation_labelled.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conveyor.errors import ConveyorError
from conveyor.model.metadata import Feature, ModelMetadata
from conveyor.monitoring import labelled
from conveyor.spec import get_spec


@pytest.fixture(scope="module")
def spec():
    return get_spec("churn")


@pytest.fixture(autouse=True)
def lenient(tmp_path, monkeypatch):
    """A private include folder whose churn suite only asks for one row."""
    import json
    import shutil

    from conveyor import settings

    include = tmp_path / "include"
    shutil.copytree(settings.pipelines_dir(), include / "pipelines")
    (include / "expectations").mkdir()
    suite = {
        "name": "churn",
        "expectations": [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1}}],
    }
    (include / "expectations" / "churn.json").write_text(json.dumps(suite))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))


def join(frame, uri, spec, lake):
    joined = labelled.with_labelled_rows(frame, uri, spec, lake, "manual__t")
    return joined.rows, joined.added


def labelled_rows() -> pd.DataFrame:
    """Labelled predictions as the monitor joins them (observations and labels)."""
    n = 3
    return pd.DataFrame(
        {
            "_id": [f"C-{i}" for i in range(n)],
            "_label": ["no", "yes", "no"],
            "prediction": ["no", "no", "yes"],
            "model_version": "1",
            "tenure_months": np.arange(n),
        }
    )


def test_labelled_training_rows_are_features_id_and_label():
    rows = labelled_rows().iloc[:3]
    frame = labelled.labelled_training_rows(rows, ["tenure_months"], "churned", "customer_id")
    assert list(frame.columns) == ["tenure_months", "customer_id", "churned"]
    assert frame["customer_id"].tolist() == ["C-0", "C-1", "C-2"]
    assert frame["churned"].tolist() == rows["_label"].tolist()
    assert list(labelled.labelled_training_rows(rows, ["tenure_months"], "churned", None).columns) == [
        "tenure_months",
        "churned",
    ]


def test_labelled_rows_are_saved_for_the_retraining_run(lake, spec):
    metadata = ModelMetadata(
        trainer="autogluon", problem_type="binary", label="churned", features=(Feature("tenure_months", "int64"),)
    )
    uri, count = labelled.save_labelled_rows(lake, spec, "scheduled__1", labelled_rows(), metadata)
    assert uri == str(lake.monitor("churn", "retrain", "scheduled__1", "labelled.parquet")) and count == 3
    rows = pd.read_parquet(uri.removeprefix("file://"))
    assert rows.to_dict("list") == {
        "tenure_months": [0, 1, 2],
        "customer_id": ["C-0", "C-1", "C-2"],
        "churned": ["no", "yes", "no"],
    }


# ------------------------------------------------------------------------ with labelled rows


def write_rows(tmp_path: Path, frame: pd.DataFrame) -> str:
    path = tmp_path / "retrain" / "labelled.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path.as_uri()


def dataset() -> pd.DataFrame:
    return pd.DataFrame({"customer_id": [101, 102, 103], "tenure_months": [1, 2, 3], "churned": ["no", "no", "yes"]})


def test_labelled_rows_are_added_and_replace_rows_of_the_same_id(tmp_path, spec, lake):
    uri = write_rows(
        tmp_path,
        pd.DataFrame(
            {"tenure_months": [20, 30], "customer_id": ["102", "900"], "churned": ["yes", "no"], "_extra": [1, 2]}
        ),
    )
    rows, added = join(dataset(), uri, spec, lake)
    assert added == 2
    assert rows.to_dict("records") == [
        {"customer_id": 101, "tenure_months": 1, "churned": "no"},
        {"customer_id": 103, "tenure_months": 3, "churned": "yes"},
        {"customer_id": 102, "tenure_months": 20, "churned": "yes"},
        {"customer_id": 900, "tenure_months": 30, "churned": "no"},
    ]
    assert str(rows["customer_id"].dtype) == "int64"  # ids came back as text; cast to the dataset's type


def test_labels_read_as_text_are_cast_to_the_datasets_label_type(tmp_path, spec, lake):
    frame = pd.DataFrame({"customer_id": [1, 2], "tenure_months": [5, 6], "churned": [True, False]})
    uri = write_rows(
        tmp_path,
        pd.DataFrame(
            {
                "customer_id": ["3", "4", "5", "6"],
                "tenure_months": ["7", "8", "9", "10"],
                "churned": ["True", "false", "1", " 0 "],
            }
        ),
    )
    rows, added = join(frame, uri, spec, lake)
    assert added == 4 and rows["churned"].dtype == bool
    assert rows["churned"].tolist() == [True, False, True, False, True, False]
    assert rows["tenure_months"].tolist() == [5, 6, 7, 8, 9, 10]

    bad = write_rows(tmp_path, pd.DataFrame({"customer_id": ["3"], "tenure_months": ["7"], "churned": ["maybe"]}))
    with pytest.raises(labelled.LabelledRowsError, match="labels cannot be read as the dataset's label type bool"):
        join(frame, bad, spec, lake)
    numeric = pd.DataFrame({"customer_id": [1], "tenure_months": [5], "churned": [0.5]})
    text = write_rows(tmp_path, pd.DataFrame({"customer_id": ["3"], "tenure_months": ["7"], "churned": ["high"]}))
    with pytest.raises(labelled.LabelledRowsError, match=r"labelled.parquet: labels cannot be read .* float64"):
        join(numeric, text, spec, lake)


def test_labelled_rows_lacking_a_column_or_unreadable_are_refused(tmp_path, spec, lake):
    assert issubclass(labelled.LabelledRowsError, ConveyorError)  # deterministic: the operator fails, no retry
    assert issubclass(labelled.LabelledRowsError, ValueError)
    uri = write_rows(tmp_path, pd.DataFrame({"customer_id": ["9"], "churned": ["yes"]}))
    with pytest.raises(labelled.LabelledRowsError, match=r"lack dataset column\(s\) \['tenure_months'\]"):
        join(dataset(), uri, spec, lake)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(labelled.LabelledRowsError, match=r"garbage.parquet: labelled rows cannot be read \("):
        join(dataset(), garbage.as_uri(), spec, lake)
    with pytest.raises(labelled.LabelledRowsError, match="cannot be read"):
        join(dataset(), (tmp_path / "absent.parquet").as_uri(), spec, lake)
