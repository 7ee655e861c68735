"""The evaluate task's bounded cost (``conveyor.training.evaluate``): the importance budget left by
loading and scoring, the speed solved from timed calls, the sample that fits, and the test set's
predictions reused. Times are given to the functions, never asserted."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest


class CountingModel:
    """A ``LoadedModel`` stand-in: predicts "yes" when ``x0`` is positive, and counts the rows it predicts."""

    def __init__(self, features: int, time_limit: float = 90, training_seconds: float | None = None) -> None:
        self.feature_names = [f"x{i}" for i in range(features)]
        self.metadata = SimpleNamespace(
            class_labels=["no", "yes"],
            positive_class="yes",
            hyperparameters={"time_limit": time_limit},
            training_seconds=training_seconds,
        )
        self.calls: list[int] = []

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        self.calls.append(len(frame))
        p_yes = np.where(frame["x0"].to_numpy() > 0, 0.9, 0.1)
        return pd.DataFrame(
            {"prediction": np.where(p_yes > 0.5, "yes", "no"), "proba_no": 1 - p_yes, "proba_yes": p_yes}
        )


def labelled(rows: int, features: int) -> pd.DataFrame:
    """Normal features; the label is "yes" where ``x0`` is positive (what :class:`CountingModel` predicts)."""
    values = np.random.default_rng(0).normal(size=(rows, features))
    frame = pd.DataFrame(values, columns=[f"x{i}" for i in range(features)])
    return frame.assign(churned=np.where(values[:, 0] > 0, "yes", "no"))


@pytest.fixture(scope="module")
def churn_spec():
    from conveyor.spec import get_spec

    return get_spec("churn")  # binary, label "churned"


def test_importance_budget_is_the_lesser_of_its_share_and_what_the_evaluate_share_leaves(churn_spec):
    from conveyor.training.evaluate import EVALUATE_SHARE, IMPORTANCE_SHARE, REPORT_SECONDS, importance_budget

    # No training time recorded: 10% of the training budget.
    assert importance_budget(CountingModel(3, time_limit=90), churn_spec) == pytest.approx(IMPORTANCE_SHARE * 90)
    # A long training leaves the whole share; a slow load and scoring eat into it.
    model = CountingModel(3, time_limit=90, training_seconds=100.0)
    assert importance_budget(model, churn_spec, spent=5.0) == pytest.approx(9.0)
    left = EVALUATE_SHARE * 100 - 15.0 - REPORT_SECONDS
    assert importance_budget(model, churn_spec, spent=15.0) == pytest.approx(left)
    assert importance_budget(model, churn_spec, spent=30.0) == 0.0  # nothing left: never negative


def test_speed_is_solved_from_two_timed_calls():
    from conveyor.training.evaluate import solve_speed

    # t(n) = 0.5 s + n / 1,000 rows/s: 20 rows in 0.52 s, 3,000 rows in 3.5 s.
    per_call, rate = solve_speed((20, 0.52), (3000, 3.5))
    assert per_call == pytest.approx(0.5) and rate == pytest.approx(1000.0)
    # A small call slower than the big one (noise) is not taken for an infinitely fast model.
    per_call, rate = solve_speed((20, 4.0), (3000, 3.0))
    assert rate == pytest.approx(100 * 3000 / 3.0) and per_call == pytest.approx(4.0 - 20 / rate)


@pytest.mark.parametrize(
    ("rate", "budget", "features", "available", "expected"),
    [
        (1e6, 9.0, 16, 3000, (1000, 3)),  # a fast model: the row cap, three repeats
        (5000.0, 9.0, 16, 3000, (918, 3)),  # 9 s x 5,000 rows/s / (1 + 16 x 3) predictions a row
        (1000.0, 9.0, 16, 3000, (529, 1)),  # fewer than 200 rows with 3 repeats: one repeat
        (100.0, 9.0, 16, 3000, (52, 1)),  # a slow model: what fits
        (100.0, 0.0, 16, 3000, (1, 1)),  # no time: one row
        (1e6, 9.0, 4, 150, (150, 3)),  # a small test set: all of it
    ],
)
def test_sample_size_fits_rows_times_predictions_in_the_budget(rate, budget, features, available, expected):
    from conveyor.training.evaluate import importance_sample_size

    rows, repeats = importance_sample_size(rate, budget, features, available)
    assert (rows, repeats) == expected
    if rows > 1:
        assert rows * (1 + features * repeats) <= budget * rate


def test_bounded_importance_reuses_the_test_predictions_and_their_timing(churn_spec):
    from conveyor.training.evaluate import IMPORTANCE_PROBE_ROWS, Scored, bounded_importance, predictions

    # A budget no loaded machine reaches: the time box never cuts this test short.
    model, test = CountingModel(4, time_limit=3600, training_seconds=2000.0), labelled(2000, 4)
    y_pred, proba = predictions(model, test)
    scored = Scored(model, test, test["churned"].to_numpy(), y_pred, proba, {}, {"load": 1.0, "scoring": 0.002})
    model.calls.clear()

    importance = bounded_importance(scored, churn_spec, "accuracy")
    # One small timed call instead of a probe, no call for the unshuffled score, then each feature and repeat.
    assert model.calls[0] == IMPORTANCE_PROBE_ROWS // 10
    assert model.calls[1:] == [importance.rows] * (len(importance.values) * importance.repeats)
    assert importance.values["x0"] > 0.3 and all(importance.values[f"x{i}"] == 0 for i in range(1, 4))
    assert importance.budget_seconds == pytest.approx(360.0)  # 10% of 3,600 s: less than 20% of 2,000 s - 3 s
    assert scored.timings["importance"] == importance.seconds
    cost = scored.cost()
    assert cost.startswith("load 1.0 s, scoring 0.0 s, importance ") and "2,000 test rows at" in cost
    assert cost.endswith("target 20% of the 2000 s training = 400.0 s")


def test_bounded_importance_is_skipped_when_loading_and_scoring_took_the_evaluate_share(churn_spec):
    from conveyor.training.evaluate import Scored, bounded_importance

    model, test = CountingModel(4, time_limit=90, training_seconds=50.0), labelled(500, 4)
    scored = Scored(model, test, test["churned"].to_numpy(), None, None, {}, {"load": 6.0, "scoring": 4.0})
    importance = bounded_importance(scored, churn_spec, "accuracy")
    assert model.calls == [] and importance.rows == 0 and importance.values == {}
    assert importance.summary().startswith("permutation importance skipped: the time left fits fewer than 50 test")
    assert "(budget 0.0 s" in importance.summary()
    assert scored.timings["importance"] == 0.0


def test_importance_is_skipped_when_its_budget_fits_only_a_handful_of_rows(churn_spec):
    from conveyor.training.evaluate import IMPORTANCE_FLOOR_ROWS, permutation_importance, predictions

    model, test = CountingModel(16), labelled(3000, 16)
    y_pred, proba = predictions(model, test)
    # The test set took 30 s to score (100 rows/s): 0.5 s of budget fits a row or two, not 50.
    result = permutation_importance(model, test, churn_spec, "accuracy", budget=0.5, scored=(y_pred, proba, 30.0))
    assert result.rows == 0 and result.values == {} and result.available_rows == 3000
    assert f"fewer than {IMPORTANCE_FLOOR_ROWS} test rows" in result.summary()
