"""Evaluation metrics against hand-computed and scikit-learn values, and the report they write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from conveyor.model.metrics import COUNT_KEYS, HIGHER_IS_BETTER, compute_metrics
from conveyor.reports.evaluation import write_evaluation_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Binary: tp=3, fn=2, fp=1, tn=4 with "pos" the positive class.
B_TRUE = ["pos", "pos", "pos", "pos", "pos", "neg", "neg", "neg", "neg", "neg"]
B_PRED = ["pos", "pos", "pos", "neg", "neg", "pos", "neg", "neg", "neg", "neg"]
B_P_POS = [0.9, 0.8, 0.7, 0.4, 0.35, 0.6, 0.3, 0.2, 0.1, 0.05]
B_PROBA = pd.DataFrame({"neg": [1 - p for p in B_P_POS], "pos": B_P_POS})

# Multiclass over three classes, one of them ("c") never predicted correctly.
M_TRUE = ["a", "a", "a", "b", "b", "c", "c", "a"]
M_PRED = ["a", "a", "b", "b", "b", "a", "b", "a"]
M_PROBA = pd.DataFrame(
    {
        "a": [0.7, 0.6, 0.3, 0.1, 0.2, 0.5, 0.2, 0.8],
        "b": [0.2, 0.3, 0.5, 0.8, 0.7, 0.3, 0.5, 0.1],
        "c": [0.1, 0.1, 0.2, 0.1, 0.1, 0.2, 0.3, 0.1],
    }
)

# Regression: errors (pred - true) are 1, 0, -1, 2; one zero target.
R_TRUE = [0.0, 2.0, 4.0, 5.0]
R_PRED = [1.0, 2.0, 3.0, 7.0]


def _binary() -> dict:
    return compute_metrics("binary", B_TRUE, B_PRED, B_PROBA)


def _multiclass() -> dict:
    return compute_metrics("multiclass", M_TRUE, M_PRED, M_PROBA)


def _regression() -> dict:
    return compute_metrics("regression", R_TRUE, R_PRED)


def _image(n_classes: int) -> dict:
    rng = np.random.default_rng(7)
    truth = np.arange(12) % n_classes
    proba = rng.dirichlet(np.ones(n_classes), size=12)
    labels = list(range(n_classes))
    return compute_metrics("image_classification", truth, proba.argmax(axis=1), proba, class_labels=labels)


# ------------------------------------------------------------------------------------ binary


def test_binary_metrics_match_the_confusion_matrix_and_sklearn():
    m = _binary()
    assert m["labels"] == ["neg", "pos"] and m["positive_class"] == "pos"
    assert m["confusion_matrix"] == [[4, 1], [2, 3]]
    assert m["support"] == {"neg": 5, "pos": 5}
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(B_TRUE, B_PRED))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(B_TRUE, B_PRED))
    is_pos = [t == "pos" for t in B_TRUE]
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(is_pos, B_P_POS))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(is_pos, B_P_POS))
    assert m["log_loss"] == pytest.approx(skm.log_loss(B_TRUE, B_PROBA.to_numpy(), labels=["neg", "pos"]))
    assert m["notes"] == []


def test_binary_positive_class_can_be_chosen():
    m = compute_metrics("binary", B_TRUE, B_PRED, B_PROBA, positive_class="neg")
    assert m["positive_class"] == "neg"
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(0.8)
    assert m["roc_auc"] == pytest.approx(_binary()["roc_auc"])  # the same ranking, seen from the other side


def test_binary_integer_labels_become_strings_and_default_positive_is_the_larger():
    m = compute_metrics("binary", np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), np.array([0.2, 0.9, 0.4, 0.1]))
    assert m["labels"] == ["0", "1"] and m["positive_class"] == "1"
    assert m["support"] == {"0": 2, "1": 2}
    assert m["recall"] == pytest.approx(0.5) and m["precision"] == pytest.approx(1.0)


def test_proba_as_dataframe_array_in_class_label_order_and_1d_agree():
    as_frame = _binary()
    reordered = B_PROBA[["pos", "neg"]].to_numpy()
    as_array = compute_metrics("binary", B_TRUE, B_PRED, reordered, class_labels=["pos", "neg"])
    as_vector = compute_metrics("binary", B_TRUE, B_PRED, np.array(B_P_POS), class_labels=["neg", "pos"])
    for name in ("roc_auc", "pr_auc", "log_loss", "precision", "recall"):
        assert as_array[name] == pytest.approx(as_frame[name])
        assert as_vector[name] == pytest.approx(as_frame[name])
    assert as_array["labels"] == ["pos", "neg"]  # the model's order is kept


def test_single_class_test_set_leaves_out_ranking_metrics_with_a_note():
    m = compute_metrics("binary", ["neg"] * 4, ["neg", "pos", "neg", "neg"], B_PROBA.iloc[:4])
    assert "roc_auc" not in m and "pr_auc" not in m
    assert any("roc_auc" in note and "only class 'neg'" in note for note in m["notes"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[3, 1], [0, 0]]
    json.dumps(m, allow_nan=False)


def test_binary_without_proba_notes_what_is_missing():
    m = compute_metrics("binary", B_TRUE, B_PRED)
    assert not {"roc_auc", "pr_auc", "log_loss"} & set(m)
    assert m["notes"] == ["no class probabilities were given: roc_auc, pr_auc and log_loss left out"]


# -------------------------------------------------------------------------------- multiclass


def test_multiclass_matches_sklearn_including_per_class():
    m = _multiclass()
    labels = ["a", "b", "c"]
    assert m["labels"] == labels
    assert m["confusion_matrix"] == skm.confusion_matrix(M_TRUE, M_PRED, labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(M_TRUE, M_PRED))
    for average in ("macro", "weighted"):
        kwargs = {"labels": labels, "average": average, "zero_division": 0}
        assert m[f"f1_{average}"] == pytest.approx(skm.f1_score(M_TRUE, M_PRED, **kwargs))
        assert m[f"precision_{average}"] == pytest.approx(skm.precision_score(M_TRUE, M_PRED, **kwargs))
        assert m[f"recall_{average}"] == pytest.approx(skm.recall_score(M_TRUE, M_PRED, **kwargs))
    assert m["log_loss"] == pytest.approx(skm.log_loss(M_TRUE, M_PROBA.to_numpy(), labels=labels))
    precision, recall, f1, support = skm.precision_recall_fscore_support(M_TRUE, M_PRED, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        row = m["per_class"][label]
        expected = {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]}
        assert row == pytest.approx(expected)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert "top_3_accuracy" not in m  # top-k is for image classification


def test_multiclass_proba_missing_a_seen_class_leaves_out_log_loss():
    m = compute_metrics("multiclass", ["a", "b", "z"], ["a", "b", "b"], M_PROBA.iloc[:3])
    assert "log_loss" not in m
    assert m["labels"] == ["a", "b", "c", "z"]
    assert any("no column" in note and "'z'" in note for note in m["notes"])


# ---------------------------------------------------------------------------- image classification


def test_image_classification_top_k_by_hand():
    labels = ["cat", "dog", "cow", "owl"]
    proba = np.array(
        [
            [0.10, 0.20, 0.30, 0.40],  # cat ranked 4th
            [0.40, 0.30, 0.20, 0.10],  # dog ranked 2nd
            [0.10, 0.40, 0.20, 0.30],  # cow ranked 3rd
            [0.40, 0.30, 0.20, 0.10],  # owl ranked 4th
        ]
    )
    m = compute_metrics("image_classification", labels, ["owl", "cat", "dog", "cat"], proba, class_labels=labels)
    assert m["top_3_accuracy"] == pytest.approx(0.5)
    assert m["top_3_accuracy"] == pytest.approx(skm.top_k_accuracy_score([0, 1, 2, 3], proba, k=3, labels=[0, 1, 2, 3]))
    assert "top_5_accuracy" not in m
    assert m["accuracy"] == 0.0 and "per_class" in m


def test_image_classification_top_k_thresholds():
    assert "top_3_accuracy" not in _image(2)
    assert "top_3_accuracy" in _image(3) and "top_5_accuracy" not in _image(5)
    six = _image(6)
    assert six["top_3_accuracy"] <= six["top_5_accuracy"] <= 1.0
    assert six["accuracy"] <= six["top_3_accuracy"]


# -------------------------------------------------------------------------------- regression


def test_regression_by_hand_with_a_zero_target():
    m = _regression()
    assert m["n"] == 4
    assert m["rmse"] == pytest.approx(math.sqrt(6 / 4))
    assert m["mae"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1 - 6 / 14.75)
    assert m["r2"] == pytest.approx(skm.r2_score(R_TRUE, R_PRED))
    assert m["mape"] == pytest.approx((0 / 2 + 1 / 4 + 2 / 5) / 3)
    assert m["mape_ignored_rows"] == 1
    assert m["notes"] == ["mape ignores 1 row(s) where y_true is 0"]


def test_regression_undefined_r2_and_mape_are_left_out_with_notes():
    m = compute_metrics("regression", pd.Series([0.0, 0.0]), pd.Series([1.0, -1.0]))
    assert m["rmse"] == pytest.approx(1.0)
    assert "r2" not in m and "mape" not in m
    assert len(m["notes"]) == 3


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("ranking", [1], [1]), {}, "unknown problem_type 'ranking'"),
        (("binary", [1, 0, 1], [1, 0]), {}, "length mismatch: y_true has 3 rows but y_pred has 2"),
        (("regression", [], []), {}, "empty"),
        (("regression", [1.0, None], [1.0, 2.0]), {}, "y_true has 1 missing value"),
        (("regression", ["x", "y"], ["x", "y"]), {}, "numeric"),
        (("binary", ["a", "b", "c"], ["a", "b", "c"]), {}, "at most 2 classes"),
        (("binary", ["a", "b"], ["a", "b"]), {"positive_class": "z"}, "positive_class 'z'"),
        (("multiclass", ["a", "b"], ["a", "b"], np.full((2, 2), 0.5)), {}, "pass class_labels"),
        (("multiclass", ["a", "b"], ["a", "b"], np.full((3, 2), 0.5)), {"class_labels": ["a", "b"]}, "shape (3, 2)"),
        (("multiclass", ["a", "b"], ["a", "b"], np.full((2, 2), 1.5)), {"class_labels": ["a", "b"]}, "[0, 1]"),
    ],
)
def test_bad_input_is_a_clear_value_error(args, kwargs, message):
    with pytest.raises(ValueError) as caught:
        compute_metrics(*args, **kwargs)
    assert message in str(caught.value)


def test_report_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown problem_type 'ranking'"):
        write_evaluation_report(tmp_path / "report", {}, "ranking", [1], [1])
    with pytest.raises(ValueError, match="length mismatch"):
        write_evaluation_report(tmp_path / "report", _binary(), "binary", B_TRUE, B_PRED[:3], B_PROBA)
    assert not (tmp_path / "report").exists()


# ------------------------------------------------------------------- serialisable and gateable


@pytest.mark.parametrize(
    "make", [_binary, _multiclass, _regression, lambda: _image(6)], ids=["binary", "multiclass", "regression", "image"]
)
def test_metrics_are_json_and_every_scalar_has_a_direction(make):
    m = make()
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    scalars = {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert scalars - COUNT_KEYS <= HIGHER_IS_BETTER.keys()
    assert all(isinstance(m[k], float) for k in scalars - COUNT_KEYS)
    assert all(isinstance(m[k], int) for k in scalars & COUNT_KEYS)


def test_lower_is_better_for_errors_and_losses():
    assert {k for k, better in HIGHER_IS_BETTER.items() if not better} == {"rmse", "mae", "mape", "log_loss"}


# ------------------------------------------------------------------------------------ report


def _assert_png(reference: str) -> None:
    """A plot is the page's ``<figure id=name>``, its PNG inlined as a ``data:`` URI (no file beside the page)."""
    import base64
    import re

    page, name = reference.split("#")
    html = Path(page).read_text(encoding="utf-8")
    found = re.search(rf'<figure id="{name}"><img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert found, f"no inlined {name} in {page}"
    assert base64.b64decode(found.group(1))[:8] == PNG_MAGIC
    assert not (Path(page).parent / f"{name}.png").exists()


def test_binary_report_writes_plots_json_and_an_escaped_page(tmp_path):
    out = tmp_path / "report"
    paths = write_evaluation_report(
        out,
        _binary(),
        "binary",
        B_TRUE,
        B_PRED,
        B_PROBA,
        feature_importance={"age": 0.4, "income$": -0.2, "<b>zip</b>": 0.1},
        title="<script>alert(1)</script>",
        context={"model": "churn", "version": 3, "run_id": "manual__<x>"},
        extra_sections=[("Misclassified", "<div class='grid'>ok</div>")],
    )
    assert set(paths) == {"html", "metrics", "confusion_matrix", "roc_curve", "pr_curve", "feature_importance"}
    for name in ("confusion_matrix", "roc_curve", "pr_curve", "feature_importance"):
        assert paths[name] == f"{out / 'index.html'}#{name}"
        _assert_png(paths[name])
    assert sorted(path.name for path in out.iterdir()) == ["index.html", "metrics.json"]  # one page, one document

    html = (out / "index.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;zip&lt;/b&gt;" in html and "manual__&lt;x&gt;" in html
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "mcc", "log_loss", "churn"):
        assert name in html
    assert 'src="' not in html.replace('src="data:image/png;base64,', "")  # nothing the page must fetch
    assert "<h2>Misclassified</h2>\n<div class='grid'>ok</div>" in html

    document = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert document["accuracy"] == pytest.approx(0.7)
    assert document["context"] == {"model": "churn", "version": 3, "run_id": "manual__<x>"}
    assert document["feature_importance"]["age"] == 0.4


def test_multiclass_report_has_a_per_class_table_and_drops_stale_plots(tmp_path):
    (tmp_path / "roc_curve.png").write_bytes(b"from an earlier run")
    paths = write_evaluation_report(tmp_path, _multiclass(), "multiclass", M_TRUE, M_PRED, M_PROBA)
    assert set(paths) == {"html", "metrics", "confusion_matrix"}
    assert not (tmp_path / "roc_curve.png").exists()
    html = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<h2>Per class</h2>" in html and "f1_macro" in html and "Feature importance" not in html


def test_regression_report_plots_residuals(tmp_path):
    paths = write_evaluation_report(tmp_path, _regression(), "regression", R_TRUE, R_PRED, title="Prices")
    assert set(paths) == {"html", "metrics", "residuals", "predicted_vs_actual"}
    _assert_png(paths["residuals"])
    _assert_png(paths["predicted_vs_actual"])
    html = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert all(name in html for name in ("rmse", "mae", "r2", "mape", "mape ignores 1 row(s)"))


# ------------------------------------------------------------------ bounded permutation importance


class _TimedModel:
    """A ``LoadedModel`` stand-in whose predictions cost ``seconds_per_row`` (a real sleep), counting rows.

    It predicts "yes" when feature ``x0`` is positive, so shuffling ``x0`` costs accuracy and the others do not.
    """

    def __init__(self, seconds_per_row: float, features: int, time_limit: int = 10) -> None:
        from types import SimpleNamespace

        self.seconds_per_row = seconds_per_row
        self.feature_names = [f"x{i}" for i in range(features)]
        self.metadata = SimpleNamespace(
            class_labels=["no", "yes"], positive_class="yes", hyperparameters={"time_limit": time_limit}
        )
        self.predicted_rows = 0
        self.slow_after = None  # rows after which each prediction is 50x slower (the time box's test)

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        import time

        slow = self.slow_after is not None and self.predicted_rows >= self.slow_after
        time.sleep(len(frame) * self.seconds_per_row * (50 if slow else 1))
        self.predicted_rows += len(frame)
        p_yes = np.where(frame["x0"].to_numpy() > 0, 0.9, 0.1)
        return pd.DataFrame(
            {"prediction": np.where(p_yes > 0.5, "yes", "no"), "proba_no": 1 - p_yes, "proba_yes": p_yes}
        )


def _labelled(rows: int, features: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({f"x{i}": rng.normal(size=rows) for i in range(features)})
    frame["churned"] = np.where(frame["x0"] > 0, "yes", "no")
    return frame


@pytest.fixture(scope="module")
def churn_spec():
    from conveyor.spec import get_spec

    return get_spec("churn")  # binary, label "churned"


def test_importance_of_a_big_frame_runs_on_a_sample_sized_from_the_predict_speed(churn_spec):
    from conveyor.training.evaluate import IMPORTANCE_PROBE_ROWS, IMPORTANCE_ROWS, permutation_importance

    model, frame = _TimedModel(seconds_per_row=2e-4, features=4), _labelled(50_000, 4)  # ~5,000 rows/s
    result = permutation_importance(model, frame, churn_spec, "accuracy", budget=1.5)

    assert result.available_rows == 50_000 and result.rows < IMPORTANCE_ROWS  # capped by the budget, not the frame
    assert result.repeats in (1, 3) and result.features == 4
    # Sized so that the sample once plus once per feature and repeat fit the budget at the probe's speed.
    assert result.rows * (1 + 4 * result.repeats) <= result.budget_seconds * result.rows_per_second
    # Every prediction counted: the probe, the sample, each feature done (in order) times its repeats.
    done = len(result.values)
    probe = 5 + IMPORTANCE_PROBE_ROWS // 10 + IMPORTANCE_PROBE_ROWS  # a warm-up call, then two timed calls
    assert model.predicted_rows == probe + result.rows * (1 + done * result.repeats)
    assert done >= 1 and list(result.values) == ["x0", "x1", "x2", "x3"][:done]
    assert result.values["x0"] > 0.3 and all(result.values[f"x{i}"] == 0 for i in range(1, done))
    assert f"permutation importance on {result.rows:,} of 50,000 test rows, {result.repeats} repeat" in result.summary()


def test_importance_of_a_fast_model_is_capped_at_the_row_limit_with_repeats(churn_spec):
    from conveyor.training.evaluate import (
        IMPORTANCE_REPEATS,
        IMPORTANCE_ROWS,
        importance_budget,
        permutation_importance,
    )

    model = _TimedModel(seconds_per_row=0.0, features=3, time_limit=90)
    assert importance_budget(model, churn_spec) == pytest.approx(9.0)  # 10% of the model's training budget
    result = permutation_importance(model, _labelled(20_000, 3), churn_spec, "accuracy")
    assert (result.rows, result.repeats) == (IMPORTANCE_ROWS, IMPORTANCE_REPEATS)
    assert result.budget_seconds == 9.0 and result.seconds < 9.0


def test_importance_stops_at_its_time_box_when_the_model_slows_down(churn_spec):
    from conveyor.training.evaluate import permutation_importance

    model = _TimedModel(seconds_per_row=2e-5, features=6)
    model.slow_after = 1000  # after the probe and the first scoring, every call is 50x slower than the probe said
    result = permutation_importance(model, _labelled(5_000, 6), churn_spec, "accuracy", budget=0.5)
    assert len(result.values) < 6
    assert f"time box reached: {len(result.values)} of 6 features" in result.summary()


def test_model_report_shows_the_importance_sample_and_the_model_plan(tmp_path, churn_spec):
    from types import SimpleNamespace

    from conveyor.reports.evaluation import write_model_report
    from conveyor.training.evaluate import Importance

    plan = {
        "budget": 90.0,
        "fit_time_limit": 72.0,
        "models": [{"key": "GBM", "name": "LightGBM", "size": 507, "max_time_limit": 44.3}],
        "left_out": {"CAT": "26 classes > 10: its multiclass fit is slow per class"},
    }
    meta = SimpleNamespace(
        dataset_version="v-1",
        code_version="c",
        best_model="LightGBM",
        class_labels=["neg", "pos"],
        positive_class="pos",
        extra={"model_plan": plan},
    )
    test = pd.DataFrame({"customer_id": range(10), "churned": B_TRUE})
    scored = SimpleNamespace(metadata=meta, test=test, y_true=B_TRUE, y_pred=B_PRED, proba=B_PROBA, metrics=_binary())
    importance = Importance({"age": 0.2}, 400, 5000, 3, 1.25, 18.0, 2500.0, 1)
    write_model_report(tmp_path, scored, churn_spec, "run-1", "Challenger", importance)

    html = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "permutation importance on 400 of 5,000 test rows, 3 repeats, 1.2 s (budget 18.0 s" in html
    assert "GBM (LightGBM, size 507, limit 44.3 s)" in html and "left out CAT: 26 classes &gt; 10" in html
    settings = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))["feature_importance_settings"]
    assert settings["rows"] == 400 and settings["repeats"] == 3 and settings["seconds"] == 1.25
