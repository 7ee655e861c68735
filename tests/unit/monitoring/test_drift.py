"""Drift of a batch against a model's training baseline: PSI, KS and chi-square, the drift rule,
prediction and image drift, bad input. Baselines come from the trainers' own baseline functions."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conveyor.errors import ConveyorError
from conveyor.model.metadata import Feature, ModelMetadata
from conveyor.monitoring.drift import (
    OTHER,
    DriftInputError,
    baseline_cdf,
    categorical_drift,
    drift_report,
    image_drift,
    numeric_drift,
    prediction_drift,
    psi,
)
from scripts import load_script

tabular = load_script("include/training/autogluon_tabular/train.py", "drift_test_autogluon_train")


def reference_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """A training-like table: two numeric features, a categorical, a boolean, a constant, a label."""
    rng = np.random.default_rng(seed)
    income = rng.normal(50.0, 10.0, rows)
    income[rng.random(rows) < 0.05] = np.nan
    return pd.DataFrame(
        {
            "income": income,
            "tenure": rng.integers(0, 60, rows),
            "plan": rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2]),
            "autopay": rng.random(rows) < 0.4,
            "version": np.full(rows, 3.0),
            "churned": rng.choice(["no", "yes"], rows, p=[0.8, 0.2]),
        }
    )


def metadata_for(train: pd.DataFrame, problem_type: str = "binary", label: str = "churned") -> ModelMetadata:
    """Metadata as the tabular trainer writes it (features and baseline), built by its own functions."""
    return ModelMetadata.from_dict(
        {
            "trainer": "autogluon",
            "label": label,
            "problem_type": problem_type,
            "id_column": None,
            "features": [{"name": c, "dtype": str(train[c].dtype)} for c in train.columns if c != label],
            "baseline": tabular.build_baseline(train, label, problem_type),
        }
    )


def table_metadata(baseline: dict, *names: str) -> ModelMetadata:
    """The metadata of a model of numeric features with this baseline."""
    return ModelMetadata(
        trainer="autogluon",
        problem_type="binary",
        label="y",
        features=tuple(Feature(name, "float64") for name in names),
        baseline=baseline,
    )


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return reference_frame(20_000, seed=1)


@pytest.fixture(scope="module")
def metadata(train) -> ModelMetadata:
    return metadata_for(train)


@pytest.fixture
def batch() -> pd.DataFrame:
    return reference_frame(5_000, seed=2).drop(columns="churned")


def test_psi_matches_hand_computation():
    # (0.6-0.5)ln(0.6/0.5) + (0.4-0.5)ln(0.4/0.5) = 0.1*0.182322 + 0.1*0.223144
    assert psi([0.5, 0.5], [0.6, 0.4]) == pytest.approx(0.0405465, abs=1e-6)
    # (0.2-0.25)ln(0.8) + (0.3-0.25)ln(1.2) + (0.5-0.5)*0
    assert psi([0.25, 0.25, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.05 * (math.log(1.2) - math.log(0.8)), abs=1e-12)
    assert psi([0.3, 0.7], [0.3, 0.7]) == 0.0
    # an empty bin is floored at eps: (0.5 - 1e-4) * ln(0.5 / 1e-4) + (0.5 - 1) * ln(0.5)
    assert psi([1.0, 0.0], [0.5, 0.5]) == pytest.approx((0.5 - 1e-4) * math.log(5000) + 0.5 * math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="same length"):
        psi([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        psi([0.5, 0.5], [1.5, -0.5])


def test_identical_distribution_does_not_drift(metadata, batch):
    report = drift_report(metadata, batch)
    assert report["rows"] == 5_000
    assert not report["drifted"] and report["drifted_features"] == [] and report["drift_share"] == 0.0
    for name in ("income", "tenure", "plan", "autopay", "version"):
        assert report["features"][name]["psi"] < 0.02, name
        assert not report["features"][name]["drifted"]
    income = report["features"]["income"]
    assert income["pvalue"] > 0.001 and income["statistic"] < 0.03
    assert income["missing_rate"] == pytest.approx(0.05, abs=0.01)
    assert sum(income["actual_shares"]) == pytest.approx(1.0)


def test_shifted_numeric_column_drifts(metadata, batch):
    batch["income"] = batch["income"] + 20.0  # + 2 std
    report = drift_report(metadata, batch)
    income = report["features"]["income"]
    assert income["drifted"] and report["drifted"] and report["drifted_features"] == ["income"]
    assert income["psi"] > 2.0 and income["pvalue"] < 1e-12 and income["statistic"] > 0.5
    assert income["mean_shift_std"] == pytest.approx(2.0, abs=0.1)
    assert income["reasons"][0].startswith("psi ")
    assert report["drift_share"] == pytest.approx(1 / 5)


def test_numeric_binning_and_ks_follow_the_baseline():
    summary = tabular.numeric_baseline(pd.Series(np.arange(1.0, 101.0)))
    edges = summary["histogram"]["edges"]
    # values below the first edge and above the last go to the outer bins; an edge opens its bin
    result = numeric_drift(summary, [-5.0, edges[0], edges[1], edges[-1], 1e6, np.inf, None], "x")
    assert result["count"] == 5 and result["missing_rate"] == pytest.approx(2 / 7)
    counts = np.round(np.array(result["actual_shares"]) * 5).astype(int)
    assert counts.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    # KS against the piecewise-linear CDF through min, p01..p99, max, exactly as scipy computes it
    values = np.random.default_rng(0).uniform(0, 110, 300)
    expected = stats.kstest(values, baseline_cdf(summary))
    got = numeric_drift(summary, values)
    assert got["statistic"] == pytest.approx(expected.statistic, abs=1e-12)
    assert got["pvalue"] == pytest.approx(expected.pvalue, abs=1e-12)
    cdf = baseline_cdf(summary)
    assert cdf(np.array([0.0, 1.0, 50.5, 100.0, 200.0])).tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])


def test_ks_handles_a_point_mass_at_the_minimum():
    rng = np.random.default_rng(4)

    def sample(rows):  # 30% zeros, the rest spread: a zero-inflated amount
        return np.where(rng.random(rows) < 0.3, 0.0, rng.exponential(100.0, rows))

    summary = tabular.numeric_baseline(pd.Series(sample(20_000)))
    values = sample(5_000)
    result = numeric_drift(summary, values)
    # the summary only pins F(0) between p25's 0.25 and the next point: the KS floor here is ~0.05
    assert result["statistic"] < 0.06 and result["psi"] < 0.02
    assert (
        drift_report(table_metadata({"features": {"amount": summary}}, "amount"), pd.DataFrame({"amount": values}))[
            "drifted"
        ]
        is False
    )
    # scipy's kstest assumes a continuous CDF: it compares the rebuilt F(0) = 0.25 with no rows below 0
    assert stats.kstest(values, baseline_cdf(summary)).statistic >= 0.25


def test_new_category_is_listed(metadata, batch):
    batch.loc[:999, "plan"] = "enterprise"
    batch.loc[1000:1049, "plan"] = "trial"
    plan = drift_report(metadata, batch)["features"]["plan"]
    assert plan["new_categories"] == {"enterprise": pytest.approx(0.2), "trial": pytest.approx(0.01)}
    assert plan["new_category_share"] == pytest.approx(0.21)
    assert plan["categories"][-1] == OTHER and plan["actual_shares"][-1] == pytest.approx(0.21)
    assert plan["drifted"] and plan["psi"] > 1.0 and plan["pvalue"] < 1e-12


def test_chi_square_pools_tiny_cells():
    summary = tabular.categorical_baseline(pd.Series(["a"] * 900 + ["b"] * 98 + ["c"] * 2))
    values = pd.Series(["a"] * 90 + ["b"] * 9 + ["z"])  # expected: a 90, b 9.8, c 0.2, other 0
    result = categorical_drift(summary, values, "letter")
    # c and other expect < 5 rows: pooled (0.2 expected, 1 observed), then joined to b
    expected = stats.chisquare([90, 10], [90, 10])
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["pvalue"] == pytest.approx(expected.pvalue)
    assert result["new_categories"] == {"z": 0.01}


def test_missing_rate_jump_is_reported(metadata, batch):
    batch.loc[: len(batch) // 2, "plan"] = None
    plan = drift_report(metadata, batch)["features"]["plan"]
    assert plan["baseline_missing_rate"] == 0.0 and plan["missing_rate"] == pytest.approx(0.5, abs=0.001)
    assert plan["missing_rate_change"] == pytest.approx(0.5, abs=0.001)
    assert plan["psi"] < 0.02  # the distribution of the values present did not move
    assert plan["drifted"] and plan["reasons"] == ["missing rate 0.000 -> 0.500"]


def test_constant_baseline_feature(metadata, batch):
    summary = metadata.baseline["features"]["version"]
    assert summary["std"] == 0.0 and summary["histogram"]["edges"] == [3.0, 3.0]
    same = numeric_drift(summary, batch["version"], "version")
    assert same["constant_baseline"] and same["bins"] == ["== 3", "!= 3"]
    assert same["actual_shares"] == [1.0, 0.0] and same["psi"] == 0.0 and same["mean_shift_std"] is None
    batch.loc[:999, "version"] = 4.0
    report = drift_report(metadata, batch)
    version = report["features"]["version"]
    assert version["actual_shares"] == [0.8, 0.2] and version["psi"] > 1.0 and version["drifted"]
    assert version["statistic"] == pytest.approx(0.2)


def test_prediction_drift_classification_and_regression(metadata, train, batch):
    rng = np.random.default_rng(5)
    steady = rng.choice(["no", "yes"], len(batch), p=[0.8, 0.2])
    assert not drift_report(metadata, batch, predictions=steady)["prediction"]["drifted"]
    shifted = rng.choice(["no", "yes"], len(batch), p=[0.4, 0.6])
    report = drift_report(metadata, batch, predictions=pd.Series(shifted))
    prediction = report["prediction"]
    assert prediction["problem"] == "classification" and prediction["drifted"] and report["drifted"]
    assert report["drifted_features"] == []  # the verdict comes from the predictions alone
    assert prediction["actual_shares"][:2] == pytest.approx([0.4, 0.6], abs=0.02) and prediction["pvalue"] < 1e-12
    unknown = prediction_drift(metadata.baseline["label_distribution"], ["no", "maybe", "yes", "no"])
    assert unknown["new_categories"] == {"maybe": 0.25}

    regression = metadata_for(train.assign(spend=train["tenure"] * 2.0).drop(columns="churned"), "regression", "spend")
    values = batch["tenure"].to_numpy() * 2.0
    assert not drift_report(regression, batch, predictions=values)["prediction"]["drifted"]
    moved = drift_report(regression, batch, predictions=values + 60.0)["prediction"]
    assert moved["problem"] == "regression" and moved["drifted"] and moved["test"] == "ks"


def image_baseline(stats_frame: pd.DataFrame) -> dict:
    """The resnet trainer's baseline structure; numeric summaries by the tabular trainer's function,
    whose format the resnet trainer's ``numeric_summary`` repeats (checked by the slow test below)."""
    return {
        "kind": "image",
        "rows": len(stats_frame),
        "sampled_images": len(stats_frame),
        "pixel": {
            "channels": ["red", "green", "blue"],
            "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.2, 0.2],
            "histogram": {
                "edges": [i / 16 for i in range(17)],
                "counts": {c: [1] * 16 for c in ("red", "green", "blue")},
            },
        },
        "brightness": tabular.numeric_baseline(stats_frame["brightness"]) | {"missing_rate": 0.0},
        "width": tabular.numeric_baseline(stats_frame["width"]),
        "height": tabular.numeric_baseline(stats_frame["height"]),
        "label_distribution": {"cat": 0.5, "dog": 0.5},
    }


def image_stats(rows: int, seed: int, brightness: float = 0.45, red: float = 0.5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "width": rng.choice([224, 256, 320], rows),
            "height": np.full(rows, 224),
            "brightness": rng.normal(brightness, 0.08, rows).clip(0, 1),
            "mean_red": rng.normal(red, 0.05, rows),
            "mean_green": rng.normal(0.4, 0.05, rows),
            "mean_blue": rng.normal(0.3, 0.05, rows),
        }
    )


def test_image_stats_drift():
    baseline = image_baseline(image_stats(500, seed=0))
    same = image_drift(baseline, image_stats(400, seed=1), predictions=["cat", "dog"] * 200)
    assert not same["drifted"] and same["features"]["height"]["constant_baseline"]
    assert same["prediction"]["psi"] == pytest.approx(0.0, abs=1e-12)
    whole = ModelMetadata(
        trainer="resnet",
        problem_type="multiclass",
        label="label",
        features=(Feature("image", "object"),),
        baseline=baseline,
    )
    darker = image_drift(whole, image_stats(400, seed=2, brightness=0.25, red=0.6))  # the metadata, or its baseline
    assert darker["drifted"] and darker["drifted_features"] == ["brightness", "mean_red"]
    assert darker["features"]["brightness"]["psi"] > 1.0
    assert darker["features"]["mean_red"]["mean_shift_std"] == pytest.approx(0.5, abs=0.05)
    with pytest.raises(DriftInputError, match=r"missing \['mean_blue'\], unexpected \['blue'\]"):
        image_drift(baseline, image_stats(10, seed=3).rename(columns={"mean_blue": "blue"}))


@pytest.mark.slow
def test_image_drift_reads_the_resnet_trainers_baseline(tmp_path):
    pytest.importorskip("torch")
    resnet = load_script("include/training/resnet_image/train.py", "drift_test_resnet_train")
    from PIL import Image

    items = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32 + i % 3, 32), (100 + 5 * i, 80, 60)).save(path)
        items.append(resnet.Item(path=path, name=path.name, label="a" if i % 2 else "b", line=i + 2))
    baseline = resnet.build_baseline(items, seed=0)
    frame = pd.DataFrame(
        {
            "width": [32, 33, 34],
            "height": [32, 32, 32],
            "brightness": [0.35, 0.36, 0.37],
            "mean_red": [0.5, 0.6, 0.7],
            "mean_green": [0.31] * 3,
            "mean_blue": [0.24] * 3,
        }
    )
    report = image_drift(baseline, frame, predictions=["a", "b", "a"])
    assert set(report["features"]) == {"width", "height", "brightness", "mean_red", "mean_green", "mean_blue"}
    assert report["features"]["height"]["constant_baseline"] and report["prediction"]["problem"] == "classification"
    json.dumps(report, allow_nan=False)


def test_missing_column_is_named(metadata, batch):
    with pytest.raises(DriftInputError, match=r"batch lacks feature column\(s\) \['tenure'\]"):
        drift_report(metadata, batch.drop(columns="tenure"))


def test_renamed_column_lists_missing_and_unexpected(metadata, batch):
    renamed = batch.rename(columns={"income": "Income"}).assign(churned="no")  # the label is not "unexpected"
    with pytest.raises(DriftInputError, match=r"missing \['income'\], unexpected \['Income'\]"):
        drift_report(metadata, renamed)


def test_empty_batch(metadata, batch):
    with pytest.raises(DriftInputError, match="no rows"):
        drift_report(metadata, batch.iloc[:0])


def test_text_in_numeric_column(metadata, batch):
    batch["tenure"] = batch["tenure"].astype(object)
    batch.loc[3, "tenure"] = "twelve"
    with pytest.raises(
        DriftInputError,
        match=r"column 'tenure' is numeric in the baseline but holds 1 value\(s\) "
        r"that are not numbers \(e\.g\. 'twelve'\)",
    ):
        drift_report(metadata, batch)
    batch.loc[3, "tenure"] = "12"  # numbers read as text are fine
    assert not drift_report(metadata, batch)["features"]["tenure"]["drifted"]


def test_bad_thresholds_and_metadata(metadata, batch):
    assert issubclass(DriftInputError, ConveyorError) and issubclass(DriftInputError, ValueError)
    with pytest.raises(DriftInputError, match="unknown drift threshold 'psl'"):
        drift_report(metadata, batch, thresholds={"psl": 0.1})
    with pytest.raises(DriftInputError, match="no training 'baseline'"):
        drift_report(dataclasses.replace(metadata, baseline=None), batch)
    with pytest.raises(DriftInputError, match="'features' must list the model's features"):
        drift_report(dataclasses.replace(metadata, features=()), batch)
    with pytest.raises(DriftInputError, match="no statistics for feature 'extra'"):
        drift_report(table_metadata(metadata.baseline, "income", "extra"), batch.assign(extra=1.0))


def test_thresholds_change_the_verdict(metadata, batch):
    batch["income"] = batch["income"] + 3.0  # +0.3 std: a modest shift
    income = drift_report(metadata, batch)["features"]["income"]
    assert 0.05 < income["psi"] < 0.2 and income["pvalue"] < 1e-6 and not income["drifted"]
    strict = drift_report(metadata, batch, thresholds={"psi": 0.1})["features"]["income"]
    assert strict["drifted"]


def test_report_is_json_serialisable(metadata, batch):
    batch["income"] = np.nan  # all missing: figures that do not exist are None, never NaN
    batch.loc[0, "plan"] = "new"
    report = drift_report(metadata, batch, predictions=np.array(["no"] * len(batch)))
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["features"]["income"]["psi"] is None
    assert report["features"]["income"]["drifted"]  # missing rate 0.05 -> 1.0


def test_predictions_are_compared_with_the_validation_predictions_when_stored(metadata, train, batch):
    # A model that predicts "yes" for 40% of held-out rows although 20% of training labels are "yes".
    stored = dataclasses.replace(metadata, baseline={**metadata.baseline, "predictions": {"no": 0.6, "yes": 0.4}})
    predictions = np.random.default_rng(8).choice(["no", "yes"], len(batch), p=[0.6, 0.4])
    prediction = drift_report(stored, batch, predictions=predictions)["prediction"]
    assert prediction["reference"] == "predictions" and not prediction["drifted"]
    assert prediction["expected_shares"] == [0.6, 0.4, 0.0]
    old = drift_report(metadata, batch, predictions=predictions)["prediction"]  # a model trained before
    assert old["reference"] == "label_distribution" and old["drifted"]
    assert old["expected_shares"][:2] == pytest.approx([0.8, 0.2], abs=0.01)

    regression = metadata_for(train.assign(spend=train["tenure"] * 2.0).drop(columns="churned"), "regression", "spend")
    values = batch["tenure"].to_numpy() * 2.0 + 60.0
    regression.baseline["predictions"] = tabular.numeric_baseline(pd.Series(train["tenure"] * 2.0 + 60.0))
    numeric = drift_report(regression, batch, predictions=values)["prediction"]
    assert numeric["reference"] == "predictions" and numeric["problem"] == "regression" and not numeric["drifted"]
    del regression.baseline["predictions"]
    assert drift_report(regression, batch, predictions=values)["prediction"]["reference"] == "label"

    images = image_baseline(image_stats(200, seed=0)) | {"predictions": {"cat": 0.9, "dog": 0.1}}
    mostly_cats = image_drift(images, image_stats(200, seed=1), predictions=["cat"] * 180 + ["dog"] * 20)["prediction"]
    assert mostly_cats["reference"] == "predictions" and not mostly_cats["drifted"]
    images.pop("predictions")
    moved = image_drift(images, image_stats(200, seed=1), predictions=["cat"] * 180 + ["dog"] * 20)["prediction"]
    assert moved["drifted"]
