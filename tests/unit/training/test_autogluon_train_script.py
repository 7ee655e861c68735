"""The AutoGluon tabular training script: a real (tiny) training run as a child process, its
artifact and reports, and the command-line checks that refuse bad input before any training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conveyor.demo import churn_frame
from scripts import load_script, script_env

PROJECT = Path(__file__).resolve().parents[3]
TRAIN_PY = PROJECT / "include" / "training" / "autogluon_tabular" / "train.py"
FEATURES = [
    "tenure_months",
    "monthly_charges",
    "total_charges",
    "contract",
    "payment_method",
    "internet_service",
    "support_calls",
    "age",
    "region",
]
TINY_GBM = '{"GBM": {"num_boost_round": 40}}'


train_py = load_script("include/training/autogluon_tabular/train.py", "autogluon_tabular_train")


def run_train(channels: dict[str, Path], model_dir: Path, output_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """Run train.py as the local backend does: a fresh child process, paths in SM_* variables."""
    env = script_env({k: v for k, v in os.environ.items() if not k.startswith("SM_")})
    env |= {f"SM_CHANNEL_{name.upper()}": str(path) for name, path in channels.items()}
    env |= {"SM_MODEL_DIR": str(model_dir), "SM_OUTPUT_DATA_DIR": str(output_dir), "SM_NUM_GPUS": "0"}
    return subprocess.run([sys.executable, str(TRAIN_PY), *flags], env=env, capture_output=True, text=True, timeout=300)


def parse(*argv: str):
    """Parse a command line without reading the SM_* environment of the test process."""
    return train_py.get_args_parser().parse_args(list(argv))


@pytest.fixture(scope="module")
def churn() -> pd.DataFrame:
    return churn_frame(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, churn):
    """One binary training with refit, on 2 train files (parquet + csv) and a validation file."""
    root = tmp_path_factory.mktemp("ag-binary")
    (root / "train").mkdir()
    (root / "validation").mkdir()
    churn.iloc[:120].to_parquet(root / "train" / "part-0.parquet", index=False)
    churn.iloc[120:230].to_csv(root / "train" / "part-1.csv", index=False)
    (root / "train" / "_SUCCESS").write_text("")  # a drop marker is not data
    churn.iloc[230:].to_csv(root / "validation" / "validation.csv", index=False)
    result = run_train(
        {"train": root / "train", "validation": root / "validation"},
        root / "model",
        root / "output",
        "--label",
        "churned",
        "--problem-type",
        "binary",
        "--eval-metric",
        "roc_auc",
        "--id-column",
        "customer_id",
        "--time-limit",
        "15",
        "--hyperparameters",
        TINY_GBM,
        "--refit-full",
    )
    return result, root / "model", root / "output"


@pytest.fixture(scope="module")
def metadata(trained) -> dict:
    result, model_dir, _ = trained
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((model_dir / "metadata.json").read_text())


# ----------------------------------------------------------------------------- a real training


@pytest.mark.slow
def test_training_succeeds_and_streams_progress(trained):
    result, model_dir, _ = trained
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line for line in result.stdout.splitlines() if line.startswith("[train.py]")]
    text = "\n".join(progress)
    for step in ("start:", "data: train 230 rows x 9 features; validation 70 rows", "fit done", "refit:", "saved:"):
        assert step in text
    assert (model_dir / "predictor" / "predictor.pkl").is_file()
    assert not (model_dir / "predictor-work").exists()


@pytest.mark.slow
def test_metadata_describes_the_model(metadata):
    assert metadata["trainer"] == "autogluon_tabular"
    assert metadata["label"] == "churned"
    assert metadata["problem_type"] == "binary"
    assert metadata["eval_metric"] == metadata["validation_metric"] == "roc_auc"
    assert metadata["id_column"] == "customer_id"
    assert [f["name"] for f in metadata["features"]] == FEATURES
    dtypes = {f["name"]: f["dtype"] for f in metadata["features"]}
    assert dtypes["tenure_months"] == "int64" and dtypes["monthly_charges"] == "float64"
    assert dtypes["contract"] == "object"
    assert metadata["class_labels"] == ["no", "yes"]
    assert metadata["positive_class"] == "yes"
    assert metadata["best_model"].endswith("_FULL")
    assert metadata["validation_model"] == metadata["best_model"].removesuffix("_FULL")
    assert 0.5 < metadata["validation_score"] <= 1.0
    hyperparameters = metadata["hyperparameters"]
    assert hyperparameters["time_limit"] == 15
    assert hyperparameters["excluded_model_types"] == ["NN_TORCH", "FASTAI"]
    assert hyperparameters["hyperparameters"] == json.loads(TINY_GBM)
    assert hyperparameters["refit_full"] is True
    assert metadata["rows"] == {"train": 230, "validation": 70}
    # the keys the trainer sets, plus the contract's schema_version (no other field of ModelMetadata as null)
    assert set(metadata) == {
        "trainer",
        "label",
        "problem_type",
        "eval_metric",
        "id_column",
        "features",
        "class_labels",
        "positive_class",
        "decision_threshold",
        "best_model",
        "validation_score",
        "validation_metric",
        "validation_model",
        "hyperparameters",
        "rows",
        "training_seconds",
        "artifact_mb",
        "versions",
        "baseline",
        "schema_version",
    }
    assert metadata["schema_version"] == 1


@pytest.mark.slow
def test_metadata_baseline_holds_training_statistics(metadata, churn):
    baseline = metadata["baseline"]
    train = churn.iloc[:230]
    assert baseline["rows"] == 230
    assert list(baseline["features"]) == FEATURES

    total = baseline["features"]["total_charges"]
    assert total["kind"] == "numeric"
    assert total["count"] == int(train["total_charges"].notna().sum())
    assert total["missing_rate"] == pytest.approx(train["total_charges"].isna().mean())
    assert total["mean"] == pytest.approx(train["total_charges"].mean())
    assert total["min"] == pytest.approx(train["total_charges"].min())
    assert list(total["quantiles"]) == ["p01", "p05", "p25", "p50", "p75", "p95", "p99"]
    assert total["quantiles"]["p50"] == pytest.approx(train["total_charges"].median())
    histogram = total["histogram"]
    assert len(histogram["edges"]) == 11 and len(histogram["counts"]) == 10
    assert sum(histogram["counts"]) == total["count"]
    assert histogram["edges"] == sorted(histogram["edges"])

    region = baseline["features"]["region"]
    assert region["kind"] == "categorical"
    assert region["missing_rate"] == pytest.approx(train["region"].isna().mean())
    assert set(region["frequencies"]) == {"north", "south", "east", "west", "__other__"}
    assert sum(region["frequencies"].values()) == pytest.approx(1.0)
    assert region["frequencies"]["__other__"] == 0.0

    shares = train["churned"].value_counts(normalize=True)
    assert baseline["label_distribution"] == pytest.approx(shares.to_dict())
    assert "customer_id" not in baseline["features"]

    # The reference of prediction drift: the scored (not refit) model's predictions on the 70 validation rows.
    assert list(baseline["predictions"]) == ["no", "yes"]
    assert sum(baseline["predictions"].values()) == pytest.approx(1.0)
    assert all(round(share * 70, 6) == int(round(share * 70)) for share in baseline["predictions"].values())
    assert baseline["predictions_source"] == {
        "channel": "validation",
        "rows": 70,
        "model": metadata["validation_model"],
    }


@pytest.mark.slow
def test_reports_are_written(trained, metadata):
    _, _, output_dir = trained
    board = pd.read_csv(output_dir / "leaderboard.csv")
    assert {"model", "score_validation", "fit_time", "trained_on_validation"} <= set(board.columns)
    assert metadata["best_model"] in set(board["model"])
    summary = json.loads((output_dir / "fit_summary.json").read_text())
    assert summary["best_model"] == metadata["best_model"]
    assert summary["validation_score"] == metadata["validation_score"]
    assert {m["model"] for m in summary["models"]} == set(board["model"])


@pytest.mark.slow
def test_regression_without_validation_channel(tmp_path, churn):
    train = tmp_path / "train"
    train.mkdir()
    churn.drop(columns=["churned"]).to_csv(train / "data.csv", index=False)
    result = run_train(
        {"train": train},
        tmp_path / "model",
        tmp_path / "output",
        "--label",
        "monthly_charges",
        "--problem-type",
        "regression",
        "--id-column",
        "customer_id",
        "--time-limit",
        "15",
        "--hyperparameters",
        TINY_GBM,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["problem_type"] == "regression"
    assert metadata["eval_metric"] == "root_mean_squared_error"
    assert "class_labels" not in metadata and "label_distribution" not in metadata["baseline"]
    assert "predictions" not in metadata["baseline"]  # no validation channel: drift falls back to the label
    assert metadata["baseline"]["label"]["kind"] == "numeric"
    assert metadata["validation_score"] < 0  # AutoGluon's higher-is-better sign: -RMSE
    assert "monthly_charges" not in [f["name"] for f in metadata["features"]]
    assert metadata["rows"]["validation"] == 0
    assert "refit: none (auto: no validation rows to add)" in result.stdout  # the default is auto


def test_default_auto_refit_on_a_small_table_serves_the_refit_model(tmp_path, churn):
    """300 rows, a 40-round LightGBM and a 30 s budget: the fit leaves the time, auto refits on train + validation."""
    train, validation = tmp_path / "train", tmp_path / "validation"
    train.mkdir()
    validation.mkdir()
    churn.iloc[:230].to_csv(train / "data.csv", index=False)
    churn.iloc[230:].to_csv(validation / "data.csv", index=False)
    flags = ("--label", "churned", "--problem-type", "binary", "--id-column", "customer_id", "--time-limit", "30")
    result = run_train(
        {"train": train, "validation": validation},
        tmp_path / "model",
        tmp_path / "output",
        *flags,
        "--hyperparameters",
        TINY_GBM,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    refit = re.search(r"refit: (\S+) refit on train \+ validation as (\S+) \(auto: \1 fit in [0-9.]+s", result.stdout)
    assert refit is not None, result.stdout[-3000:]
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["best_model"] == refit[2] == refit[1] + "_FULL" and metadata["validation_model"] == refit[1]
    assert metadata["hyperparameters"]["refit_full"] == "auto"


# ---------------------------------------------------------------------- bad input, no training


@pytest.fixture
def channel(tmp_path):
    """Write a frame as the only file of a train channel; returns the writer."""

    def write(frame: pd.DataFrame, name: str = "data.csv") -> Path:
        folder = tmp_path / "train"
        folder.mkdir(exist_ok=True)
        frame.to_csv(folder / name, index=False)
        return folder

    return write


def refused(tmp_path, *argv: str) -> str:
    """Run main() in-process on arguments that must be refused; return the exit message."""
    args = parse("--model-dir", str(tmp_path / "model"), "--output-data-dir", str(tmp_path / "out"), *argv)
    with pytest.raises(SystemExit) as exit_info:
        train_py.main(args)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    assert not (tmp_path / "model" / "predictor").exists()
    return exit_info.value.code


def test_single_class_label_exits_non_zero_with_the_rule(tmp_path, channel):
    frame = churn_frame(40).assign(churned="yes")
    folder = channel(frame)
    result = run_train(
        {"train": folder},
        tmp_path / "model",
        tmp_path / "out",
        "--label",
        "churned",
        "--problem-type",
        "binary",
        "--time-limit",
        "10",
    )
    assert result.returncode == 1
    assert "train.py: label 'churned' has a single class 'yes': a classifier needs at least 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_label_column_is_named(tmp_path, channel):
    folder = channel(churn_frame(40).drop(columns=["churned"]))
    message = refused(tmp_path, "--train", str(folder), "--label", "churned", "--problem-type", "binary")
    assert message.startswith("train.py: label 'churned' is not a column of the train data")
    assert "tenure_months" in message


def test_empty_channel_folder_is_refused(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "_SUCCESS").write_text("")
    message = refused(tmp_path, "--train", str(folder), "--label", "churned", "--problem-type", "binary")
    assert message.startswith(f"train.py: train channel: folder {folder} holds no data file")


def test_missing_channel_folder_is_refused(tmp_path):
    message = refused(tmp_path, "--train", str(tmp_path / "nowhere"), "--label", "y", "--problem-type", "binary")
    assert message == f"train.py: train channel: folder {tmp_path / 'nowhere'} does not exist"


def test_train_data_without_rows_is_refused(tmp_path, channel):
    folder = channel(churn_frame(5).iloc[:0])
    message = refused(tmp_path, "--train", str(folder), "--label", "churned", "--problem-type", "binary")
    assert message == f"train.py: train data is empty: {folder} holds no rows"


def test_binary_with_three_classes_is_refused(tmp_path, channel):
    folder = channel(churn_frame(40))
    message = refused(tmp_path, "--train", str(folder), "--label", "contract", "--problem-type", "binary")
    assert "label 'contract' has 3 classes" in message and "needs exactly 2" in message


def test_validation_with_unknown_class_is_refused(tmp_path, channel):
    frame = churn_frame(40)
    folder = channel(frame)
    validation = tmp_path / "validation"
    validation.mkdir()
    frame.assign(churned="maybe").to_parquet(validation / "v.parquet")
    message = refused(
        tmp_path,
        "--train",
        str(folder),
        "--validation",
        str(validation),
        "--label",
        "churned",
        "--problem-type",
        "binary",
    )
    assert "never seen in training: 'maybe'" in message


def test_unknown_eval_metric_is_refused(tmp_path, channel):
    folder = channel(churn_frame(40))
    message = refused(
        tmp_path,
        "--train",
        str(folder),
        "--label",
        "churned",
        "--problem-type",
        "binary",
        "--eval-metric",
        "nope",
    )
    assert message.startswith("train.py: eval metric 'nope' is not an AutoGluon binary metric")


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_time_limit_must_be_a_positive_whole_number(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--label", "y", "--problem-type", "binary", "--time-limit", value)
    assert exit_info.value.code == 2
    assert "argument --time-limit" in capsys.readouterr().err


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--label", "y", "--problem-type", "binary", "--epochs", "3")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --epochs 3" in capsys.readouterr().err


def test_hyperparameters_must_be_a_json_object(capsys):
    with pytest.raises(SystemExit):
        parse("--label", "y", "--problem-type", "binary", "--hyperparameters", "[1, 2]")
    assert "expected a JSON object" in capsys.readouterr().err


def test_paths_default_to_the_sagemaker_environment(monkeypatch):
    monkeypatch.setenv("SM_CHANNEL_TRAIN", "/opt/ml/input/data/train")
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/ml/model")
    monkeypatch.setenv("SM_NUM_GPUS", "1")
    monkeypatch.delenv("SM_CHANNEL_VALIDATION", raising=False)
    args = parse("--label", "y", "--problem-type", "multiclass", "--excluded-model-types", "none")
    assert args.train == Path("/opt/ml/input/data/train") and args.model_dir == Path("/opt/ml/model")
    assert args.validation is None and args.num_gpus == 1
    assert args.excluded_model_types == [] and args.presets == "medium_quality" and args.seed == 0
    assert parse("--label", "y", "--problem-type", "binary").excluded_model_types == ["NN_TORCH", "FASTAI"]


def test_numeric_baseline_of_a_constant_and_an_empty_column():
    constant = train_py.numeric_baseline(pd.Series([3.0, 3.0, np.nan]))
    assert constant["histogram"] == {"edges": [3.0, 3.0], "counts": [2]}
    assert constant["missing_rate"] == pytest.approx(1 / 3) and constant["std"] == 0.0
    empty = train_py.numeric_baseline(pd.Series([np.nan, np.nan]))
    assert empty["count"] == 0 and empty["mean"] is None and empty["histogram"] is None


def test_categorical_baseline_keeps_the_top_values_and_an_other_share():
    values = pd.Series([f"v{i}" for i in range(60)] * 2 + ["v0"] * 10 + [None] * 10)
    stats = train_py.categorical_baseline(values)
    assert len(stats["frequencies"]) == 51
    assert stats["frequencies"]["v0"] == pytest.approx(12 / 130)
    assert stats["frequencies"]["__other__"] == pytest.approx(20 / 130)
    assert stats["missing_rate"] == pytest.approx(10 / 140)


class FakePredictor:
    """What prediction_baseline asks of a TabularPredictor: predict(rows, model=...) and class_labels."""

    def __init__(self, predictions, class_labels=None):
        self.predictions, self.class_labels, self.calls = predictions, class_labels, []

    def predict(self, rows, model=None):
        self.calls.append((list(rows.columns), model))
        return pd.Series(self.predictions)


def test_prediction_baseline_is_the_share_of_each_class_or_a_numeric_summary():
    rows = pd.DataFrame({"x": range(5), "y": ["a", "b", "a", "a", "b"]})
    fake = FakePredictor(["a", "a", "a", "a", "b"], class_labels=["a", "b", "c"])
    shares = train_py.prediction_baseline(fake, rows, "y", "multiclass", "GBM")
    assert shares == {"a": 0.8, "b": 0.2, "c": 0.0}  # every class, as label_distribution keys them
    assert fake.calls == [(["x"], "GBM")]  # the label is not given to the model; the scored model predicts
    flags = FakePredictor([True, False, True, True], class_labels=[False, True])
    assert train_py.prediction_baseline(flags, rows.iloc[:4], "y", "binary", "m") == {"False": 0.25, "True": 0.75}
    numeric = train_py.prediction_baseline(FakePredictor([1.0, 2.0, 3.0, 4.0, 5.0]), rows, "y", "regression", "m")
    assert numeric == train_py.numeric_baseline(pd.Series([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert numeric["kind"] == "numeric" and numeric["mean"] == 3.0


def test_validation_predictions_come_from_the_fit_and_are_predicted_again_only_for_other_rows():
    class Cached(FakePredictor):
        def __init__(self, cached):
            super().__init__(["b"] * 5)
            self.cached = cached

        def predict_multi(self, models):
            return {models[0]: self.cached}

    rows = pd.DataFrame({"x": range(5), "y": ["a"] * 5})
    fit_made = Cached(pd.Series(["a"] * 5))
    assert list(train_py.validation_predictions(fit_made, rows, "y", "GBM")) == ["a"] * 5
    assert fit_made.calls == []  # the fit's own predictions: no predict call
    other_rows = Cached(pd.Series(["a"] * 3))  # not these rows (e.g. a bagged fit's holdout)
    assert list(train_py.validation_predictions(other_rows, rows, "y", "GBM")) == ["b"] * 5
    assert other_rows.calls == [(["x"], "GBM")]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), "auto"),
        (("--refit-full",), True),
        (("--refit-full", "True"), True),
        (("--refit-full", "false"), False),
        (("--refit-full", "AUTO"), "auto"),
    ],
)
def test_refit_full_is_a_bare_flag_or_a_value_as_sagemaker_passes_it(argv, expected):
    assert parse("--label", "churned", "--problem-type", "binary", *argv).refit_full == expected


def refit_decision(choice, fit_time: float, elapsed: float, rows=(1000, 250), budget: float = 100.0):
    fit_py = sys.modules["fit"]  # the sibling train.py imported
    board = pd.DataFrame({"model": ["WeightedEnsemble_L2", "LightGBM"], "fit_time": [fit_time, fit_time - 1]})
    return fit_py.refit_decision(choice, board, "WeightedEnsemble_L2", rows, budget, elapsed)


def test_auto_refit_when_the_scaled_fit_time_fits_what_is_left_of_the_budget():
    # 10 s fit x 1.25 (the validation rows) x 1.5 = 18.75 s; 100 s budget less 10% reserve less 40 s spent = 50 s.
    refit, why = refit_decision("auto", fit_time=10.0, elapsed=40.0)
    assert refit and "WeightedEnsemble_L2 fit in 10.0s" in why and "~18.8s" in why and "50.0s" in why
    # The same model after 75 s of a 100 s budget: 15 s left < 18.75 s.
    refit, why = refit_decision("auto", fit_time=10.0, elapsed=75.0)
    assert not refit and "15.0s of the budget left" in why
    refit, why = refit_decision("auto", fit_time=1.0, elapsed=1.0, rows=(1000, 0))
    assert not refit and "no validation rows" in why


def test_asked_refit_and_refused_refit_ignore_the_time_left():
    assert refit_decision(True, fit_time=500.0, elapsed=99.0)[0] is True
    assert refit_decision(False, fit_time=0.1, elapsed=0.0) == (False, "not asked (--refit-full false)")


def test_refit_full_refuses_a_value_that_is_not_a_boolean():
    with pytest.raises(SystemExit):
        parse("--label", "churned", "--problem-type", "binary", "--refit-full", "maybe")


# ------------------------------------------------------------------------------ the model plan


def test_fit_gives_autogluon_the_plan_as_hyperparameters_and_time_limits(monkeypatch):
    import autogluon.tabular

    calls = {}

    class Recorder:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def fit(self, data, **kwargs):
            calls["fit"] = kwargs
            return self

    monkeypatch.setattr(autogluon.tabular, "TabularPredictor", Recorder)
    args = parse("--label", "y", "--problem-type", "multiclass", "--time-limit", "90")
    frame = pd.DataFrame({f"x{i}": np.arange(20_000.0) for i in range(16)} | {"y": np.arange(20_000) % 26})
    plan = train_py.build_plan(args, frame)
    assert plan.shape["classes"] == 26 and plan.shape["rows"] == 20_000
    train_py.fit_predictor(args, frame, None, Path("unused"), plan)
    assert calls["fit"]["hyperparameters"] == plan.hyperparameters()
    assert calls["fit"]["time_limit"] == plan.fit_time_limit == 72.0
    assert calls["fit"]["num_cpus"] == plan.shape["cores"]
    assert all(h["ag_args_fit"]["max_time_limit"] <= 72.0 for h in calls["fit"]["hyperparameters"].values())
    # --hyperparameters or --model-plan presets leave the models to the user or the presets.
    assert (
        train_py.build_plan(parse("--label", "y", "--problem-type", "binary", "--model-plan", "presets"), frame) is None
    )


@pytest.mark.slow
def test_training_many_classes_on_a_small_budget_fits_the_planned_models_with_their_limits(tmp_path):
    from sklearn.datasets import make_classification

    features, labels = make_classification(
        n_samples=780, n_features=6, n_informative=5, n_redundant=0, n_classes=26, n_clusters_per_class=1,
        class_sep=2.0, random_state=0,
    )  # fmt: skip
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(6)]).assign(letter=[chr(65 + v) for v in labels])
    for part, rows in (("train", frame.iloc[:600]), ("validation", frame.iloc[600:])):
        (tmp_path / part).mkdir()
        rows.to_parquet(tmp_path / part / "part.parquet", index=False)
    result = run_train(
        {"train": tmp_path / "train", "validation": tmp_path / "validation"},
        tmp_path / "model",
        tmp_path / "output",
        *("--label", "letter", "--problem-type", "multiclass", "--time-limit", "20", "--verbosity", "1"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[train.py] model plan: 600 rows x 6 columns, 26 classes" in result.stdout
    plan = json.loads((tmp_path / "output" / "model_plan.json").read_text())
    assert [m["key"] for m in plan["models"]][0] == "GBM" and {"CAT", "XGB"} <= set(plan["left_out"])
    assert "26 classes > 10" in plan["left_out"]["CAT"]  # (a loaded machine may leave out the forests too)
    summary = json.loads((tmp_path / "output" / "fit_summary.json").read_text())
    limits = {m["name"]: m["max_time_limit"] for m in plan["models"]}
    # The automatic refit (trainer.refit_full: auto, when the budget leaves time) adds <model>_FULL copies.
    refits = {m["model"] for m in summary["models"] if m["model"].endswith("_FULL") and m["stack_level"] == 1}
    assert refits <= {f"{name}_FULL" for name in limits}
    base = [m for m in summary["models"] if m["stack_level"] == 1 and m["model"] not in refits]
    assert {m["model"] for m in base} == set(limits)  # every planned model was fit: none ate the others' time
    assert all(m["time_limit"] == limits[m["model"]] for m in base)
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["model_plan"] == plan
    # AutoGluon got each model's limit: the saved models carry it in their fit arguments.
    from autogluon.tabular import TabularPredictor

    predictor = TabularPredictor.load(str(tmp_path / "model" / "predictor"), require_py_version_match=False)
    kept = [name for name in predictor.model_names() if name.removesuffix("_FULL") in limits]  # refits: theirs
    assert kept and all(
        predictor._trainer.load_model(n).params_aux["max_time_limit"] == limits[n.removesuffix("_FULL")] for n in kept
    )
