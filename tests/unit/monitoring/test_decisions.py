"""The monitor's decisions (conveyor.monitoring.decisions): the retraining decision and its cool-down, the
drift history, and the records a run leaves (its checks, history and trigger)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.lake import read_json
from conveyor.monitoring import decisions
from conveyor.spec import get_spec

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def spec():
    return get_spec("churn")


def with_monitor(spec, **changes):
    """The churn spec with other monitor settings."""
    return spec.model_copy(update={"monitor": spec.monitor.model_copy(update=changes)})


def check(
    share: float,
    drifted: list[str],
    features: int = 4,
    prediction: dict | None = None,
    source: str = "batch",
    ident: str = "run-1",
) -> dict:
    names = drifted + [f"f{i}" for i in range(features - len(drifted))]
    return {
        "source": source,
        "id": ident,
        "rows": 100,
        "error": None,
        "report": {
            "drift_share": share,
            "drifted_features": drifted,
            "features": {n: {} for n in names},
            "prediction": prediction,
            "drifted": bool(drifted) or bool(prediction and prediction["drifted"]),
        },
    }


NO_LIVE = {"metric": "roc_auc", "value": None, "labels": 0, "version": "1"}


# ---------------------------------------------------------------------------------- decide


def test_drift_share_above_the_limit_retrains_and_says_why(spec):
    s = with_monitor(spec, max_drift_share=0.25)
    decision = decisions.decide(s, [check(0.5, ["contract", "tenure_months"])], NO_LIVE, [], NOW)
    assert decision["retrain"] is True and decision["suppressed_by_cooldown"] is False
    assert decision["reasons"] == [
        "data drift in batch run-1: 2 of 4 features drifted (50% > 25%): contract, tenure_months"
    ]
    assert decision["last_trigger"] is None and decision["cooldown_until"] is None
    assert decision["at"] == NOW.isoformat()
    assert decision["thresholds"]["max_drift_share"] == 0.25 and decision["thresholds"]["cooldown_hours"] == 24
    json.dumps(decision, allow_nan=False)


def test_drift_share_at_or_below_the_limit_does_not(spec):
    s = with_monitor(spec, max_drift_share=0.25, retrain_on_prediction_drift=False)
    for share, drifted in ((0.25, ["a"]), (0.0, [])):
        decision = decisions.decide(s, [check(share, drifted)], NO_LIVE, [], NOW)
        assert decision["retrain"] is False and decision["reasons"] == []
    errored = {"source": "input", "id": "x.csv", "rows": 0, "report": None, "error": "input x.csv: missing"}
    assert decisions.decide(s, [errored], NO_LIVE, [], NOW)["reasons"] == []


def test_a_source_with_too_few_rows_gets_no_drift_verdict(spec):
    s = with_monitor(spec, max_drift_share=0.25, min_rows=100)
    small = check(1.0, ["a", "b", "c", "d"], prediction={"drifted": True, "reasons": ["psi 1.2 > 0.2"]}) | {"rows": 99}
    decision = decisions.decide(s, [small], NO_LIVE, [], NOW)
    assert decision["retrain"] is False and decision["reasons"] == []
    assert decision["notes"] == ["batch run-1: 99 rows, fewer than monitor.min_rows (100): reported, no drift verdict"]
    assert decisions.decide(s, [small | {"rows": 100}], NO_LIVE, [], NOW)["retrain"] is True


def test_prediction_drift_retrains_only_when_the_spec_says_so(spec):
    moved = {"drifted": True, "reasons": ["psi 0.412 > 0.2"]}
    checks = [check(0.0, [], prediction=moved, source="capture", ident="2026-03-10/1@0-10/v1")]
    on = decisions.decide(with_monitor(spec, retrain_on_prediction_drift=True), checks, NO_LIVE, [], NOW)
    assert on["retrain"] and on["reasons"] == ["prediction drift in capture 2026-03-10/1@0-10/v1: psi 0.412 > 0.2"]
    off = decisions.decide(with_monitor(spec, retrain_on_prediction_drift=False), checks, NO_LIVE, [], NOW)
    assert not off["retrain"] and off["reasons"] == []


def test_live_metric_counts_only_with_enough_new_labels(spec):
    s = with_monitor(spec, min_live_metric=0.65, min_new_labels=200)
    poor = {"metric": "roc_auc", "value": 0.58, "labels": 199, "version": "3"}
    assert decisions.decide(s, [], poor, [], NOW)["retrain"] is False
    decision = decisions.decide(s, [], poor | {"labels": 200}, [], NOW)
    assert decision["retrain"] is True
    assert decision["reasons"] == [
        "live roc_auc of version 3 is 0.5800 < 0.65 over 200 new labels (at least 200 needed)"
    ]
    good = {"metric": "roc_auc", "value": 0.65, "labels": 5000, "version": "3"}
    assert decisions.decide(s, [], good, [], NOW)["retrain"] is False  # not below
    assert decisions.decide(s, [], poor | {"labels": 500, "value": None}, [], NOW)["retrain"] is False
    unset = with_monitor(spec, min_live_metric=None)
    assert decisions.decide(unset, [], poor | {"labels": 500}, [], NOW)["retrain"] is False


def test_cool_down_suppresses_and_is_recorded(spec):
    s = with_monitor(spec, max_drift_share=0.25, cooldown_hours=24)
    fired = {"at": (NOW - timedelta(hours=6)).isoformat(), "retrain": True}
    older = {"at": (NOW - timedelta(hours=60)).isoformat(), "retrain": True}
    suppressed_before = {"at": (NOW - timedelta(hours=1)).isoformat(), "retrain": False}
    checks = [check(0.75, ["a", "b", "c"])]
    decision = decisions.decide(s, checks, NO_LIVE, [older, fired, suppressed_before], NOW)
    assert decision["retrain"] is False and decision["suppressed_by_cooldown"] is True
    assert decision["reasons"]  # the reasons are kept although nothing fired
    assert decision["last_trigger"] == fired["at"]
    assert decision["cooldown_until"] == (NOW + timedelta(hours=18)).isoformat()
    later = decisions.decide(s, checks, NO_LIVE, [older, fired], NOW + timedelta(hours=19))
    assert later["retrain"] is True and later["suppressed_by_cooldown"] is False
    calm = decisions.decide(s, [check(0.0, [])], NO_LIVE, [fired], NOW)
    assert calm["suppressed_by_cooldown"] is False and calm["retrain"] is False  # nothing to suppress
    assert decisions.last_fired([suppressed_before]) is None


# --------------------------------------------------------------------------------- history


def test_history_record_summarises_a_check():
    at = NOW.isoformat()
    report = {
        "drift_share": 0.5,
        "drifted_features": ["a"],
        "drifted": True,
        "prediction": {"psi": 0.31},
        "features": {"a": {"psi": 0.9}, "b": {"psi": 0.05}, "c": {"psi": None}},
    }
    line = decisions.history_record({"source": "batch", "id": "r1", "rows": 10, "report": report, "error": None}, at)
    assert line == {
        "at": at,
        "source": "batch",
        "id": "r1",
        "rows": 10,
        "drift_share": 0.5,
        "drifted_features": ["a"],
        "max_psi": 0.9,
        "prediction_psi": 0.31,
        "drifted": True,
        "error": None,
    }
    failed = decisions.history_record({"source": "input", "id": "x", "report": None, "error": "x: no rows"}, at)
    assert failed == {
        "at": at,
        "source": "input",
        "id": "x",
        "rows": 0,
        "drift_share": None,
        "drifted_features": [],
        "max_psi": None,
        "prediction_psi": None,
        "drifted": False,
        "error": "x: no rows",
    }


def test_a_runs_checks_history_and_decision_are_recorded_under_its_run(lake):
    at = NOW.isoformat()
    mine = {"source": "batch", "id": "r1", "run_id": "scheduled__2", "rows": 10, "report": None, "error": "r1: gone"}
    other = {
        "source": "capture",
        "id": "2026-03-10/1@0-9/v1",
        "run_id": "scheduled__1",
        "rows": 3,
        "report": None,
        "error": None,
    }
    for check in (mine, other):
        decisions.save_check(lake, "churn", check)
    assert (lake.monitor("churn", "checks", f"{decisions.source_key('capture', other['id'])}.json")).exists()
    assert decisions.run_checks(lake, "churn", "scheduled__2") == [mine]
    assert decisions.run_checks(lake, "churn", "manual__none") == []

    decisions.save_history(lake, "churn", "scheduled__2", at, [mine])
    decisions.save_history(lake, "churn", "scheduled__1", (NOW - timedelta(hours=1)).isoformat(), [other])
    assert [(line["id"], line["error"]) for line in decisions.load_history(lake, "churn")] == [
        (other["id"], None),
        ("r1", "r1: gone"),
    ]  # oldest first, whatever the file names
    assert read_json(lake.monitor("churn", "history", "scheduled__2.json"))["run_id"] == "scheduled__2"

    decisions.save_decision(lake, "churn", "scheduled__2", {"at": at, "retrain": True, "run_id": "scheduled__2"})
    decisions.save_decision(
        lake,
        "churn",
        "scheduled__1",
        {"at": (NOW - timedelta(hours=1)).isoformat(), "retrain": False, "run_id": "scheduled__1"},
    )
    triggers = decisions.load_triggers(lake, "churn")
    assert [t["run_id"] for t in triggers] == ["scheduled__1", "scheduled__2"]
    assert decisions.last_fired(triggers) == NOW
