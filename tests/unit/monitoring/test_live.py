"""The live metric (conveyor.monitoring.live): the evaluation's metric over labelled predictions, per day
and model version, and over the live version's labels since the last trigger."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from conveyor.lake import write_json
from conveyor.model.metadata import Feature, ModelMetadata
from conveyor.monitoring import live


def labelled_rows(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 120
    truth = rng.choice(["no", "yes"], n, p=[0.6, 0.4])
    p_yes = np.clip(np.where(truth == "yes", 0.65, 0.35) + rng.normal(0, 0.25, n), 0, 1)
    days = np.array(["2026-03-01T08:00:00+00:00", "2026-03-02T23:59:00+00:00", "2026-03-02T01:00:00+01:00"])[
        np.arange(n) % 3
    ]
    return pd.DataFrame(
        {
            "_id": [f"C-{i}" for i in range(n)],
            "_label": truth,
            "prediction": np.where(p_yes >= 0.5, "yes", "no"),
            "proba_no": 1 - p_yes,
            "proba_yes": p_yes,
            "scored_at": days,
            "model_version": np.where(np.arange(n) < 90, "1", "2"),
            "tenure_months": np.arange(n),
        }
    )


def test_score_is_the_binary_roc_auc_from_probabilities():
    from sklearn.metrics import roc_auc_score

    rows = labelled_rows()
    value = live.score(rows, "binary", "roc_auc", ["no", "yes"], "yes")
    assert value == pytest.approx(roc_auc_score(rows["_label"] == "yes", rows["proba_yes"]))
    accuracy = live.score(rows, "binary", "accuracy", ["no", "yes"], "yes")
    assert accuracy == pytest.approx((rows["_label"] == rows["prediction"]).mean())
    assert live.score(rows.iloc[0:0], "binary", "roc_auc", ["no", "yes"], "yes") is None
    one_class = rows[rows["_label"] == "yes"]
    assert live.score(one_class, "binary", "roc_auc", ["no", "yes"], "yes") is None


def test_score_of_a_regressor():
    rows = pd.DataFrame({"_label": ["1.0", "2.0", "4.0"], "prediction": ["1.5", "2.0", "3.0"]})
    rmse = live.score(rows, "regression", "rmse", None, None)
    assert rmse == pytest.approx(np.sqrt((0.25 + 0 + 1) / 3))


def test_live_series_per_day_and_version():
    from sklearn.metrics import roc_auc_score

    rows = labelled_rows()
    series = live.live_series(rows, "binary", "roc_auc", ["no", "yes"], "yes")
    # "2026-03-02T01:00:00+01:00" is 2026-03-02 00:00 UTC: the same UTC day as 23:59 UTC
    days = pd.to_datetime(rows["scored_at"], utc=True).dt.strftime("%Y-%m-%d")
    assert [(s["day"], s["model_version"]) for s in series] == [
        ("2026-03-01", "1"),
        ("2026-03-01", "2"),
        ("2026-03-02", "1"),
        ("2026-03-02", "2"),
    ]
    for line in series:
        group = rows[(days == line["day"]) & (rows["model_version"] == line["model_version"])]
        assert line["labels"] == len(group) and line["metric"] == "roc_auc"
        assert line["value"] == pytest.approx(roc_auc_score(group["_label"] == "yes", group["proba_yes"]))
    assert sum(line["labels"] for line in series) == len(rows)
    assert live.live_series(rows.iloc[0:0], "binary", "roc_auc", ["no", "yes"], "yes") == []
    single = rows.assign(_label="no")
    assert {line["value"] for line in live.live_series(single, "binary", "roc_auc", ["no", "yes"], "yes")} == {None}


def churn_metadata(**fields) -> ModelMetadata:
    return ModelMetadata(
        trainer="autogluon",
        problem_type="binary",
        label="churned",
        features=(Feature("tenure_months", "int64"),),
        **fields,
    )


def test_the_live_version_is_scored_on_its_labels_since_the_last_trigger():
    rows = labelled_rows().assign(
        received_at=lambda f: np.where(np.arange(len(f)) < 30, "2026-03-01T00:00:00+00:00", "2026-03-05T00:00:00+00:00")
    )
    metadata = churn_metadata(class_labels=["no", "yes"], positive_class="yes")
    assert live.scoring(metadata) == (["no", "yes"], "yes")
    assert live.scoring(churn_metadata(class_labels=[0, 1], positive_class=1)) == (["0", "1"], "1")
    assert live.scoring(churn_metadata()) == (None, None)

    everything = live.live_metric(rows, "binary", "roc_auc", "1", metadata, None)
    version_1 = rows[rows["model_version"] == "1"]
    assert everything == {
        "metric": "roc_auc",
        "version": "1",
        "labels": 90,
        "value": pytest.approx(live.score(version_1, "binary", "roc_auc", ["no", "yes"], "yes")),
    }
    since = datetime(2026, 3, 2, tzinfo=UTC)
    newer = live.new_labels(rows, "1", since)
    assert len(newer) == 60 and set(newer["model_version"]) == {"1"}
    assert live.live_metric(rows, "binary", "roc_auc", "1", metadata, since)["labels"] == 60
    nothing = live.live_metric(rows, "binary", "roc_auc", "7", metadata, None)
    assert nothing == {"metric": "roc_auc", "version": "7", "labels": 0, "value": None}
    assert live.new_labels(rows.iloc[0:0], "1", since).empty


def test_the_evaluation_score_is_read_from_the_training_runs_metrics(lake):
    write_json(lake.reports("churn", "train-1") / "evaluation" / "metrics.json", {"roc_auc": 0.81, "labels": ["no"]})
    assert live.evaluation_score(lake, "churn", "train-1", "roc_auc") == 0.81
    assert live.evaluation_score(lake, "churn", "train-1", "labels") is None  # not a number
    assert live.evaluation_score(lake, "churn", "train-2", "roc_auc") is None
    assert live.evaluation_score(lake, "churn", None, "roc_auc") is None
