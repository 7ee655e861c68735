"""The champion/challenger gate: thresholds, direction of each metric, minimum improvement, reports."""

from __future__ import annotations

import json

import pytest

from conveyor.reports.gate import write_report
from conveyor.spec import GateSpec
from conveyor.training.gate import GateDecision, decide, markdown


def auc_gate(**changes) -> GateSpec:
    return GateSpec(**{"metric": "roc_auc", "thresholds": {"roc_auc": 0.70, "balanced_accuracy": 0.60}, **changes})


GOOD = {"roc_auc": 0.82, "balanced_accuracy": 0.71, "log_loss": 0.41, "accuracy": 0.8}


# --- thresholds ------------------------------------------------------------------------------------


def test_first_model_passes_on_its_thresholds():
    decision = decide(auc_gate(), GOOD, None, None)
    assert decision.passed is True
    assert decision.champion is None and decision.champion_version is None
    assert "no champion to beat: the first model only has to pass the thresholds" in decision.reasons
    assert not any("misses" in r for r in decision.reasons)
    assert [(c["check"], c["passed"]) for c in decision.checks] == [
        ("balanced_accuracy >= 0.6", True),
        ("roc_auc >= 0.7", True),
    ]
    assert decision.summary.startswith("gate PASSED: ")


def test_first_model_report_says_its_thresholds_were_met():
    decision = decide(auc_gate(), GOOD, None, None)
    assert decision.reasons[0] == "all thresholds met"


def test_a_model_beating_a_champion_says_its_thresholds_were_met():
    decision = decide(auc_gate(), GOOD, {"roc_auc": 0.75}, "1")
    assert decision.passed is True
    assert decision.reasons[0] == "all thresholds met"
    assert decision.summary.startswith("gate PASSED: all thresholds met; challenger roc_auc 0.8200 beats champion v1")


def test_a_value_exactly_on_the_threshold_passes():
    assert decide(auc_gate(), {**GOOD, "roc_auc": 0.70}, None, None).passed


def test_missing_a_threshold_rejects_and_names_metric_value_and_threshold():
    decision = decide(auc_gate(), {**GOOD, "balanced_accuracy": 0.55}, None, None)
    assert decision.passed is False
    assert "balanced_accuracy = 0.5500 misses the threshold >= 0.6" in decision.reasons
    assert "all thresholds met" not in decision.reasons
    assert {"check": "balanced_accuracy >= 0.6", "value": 0.55, "passed": False} in decision.checks
    assert decision.summary.startswith("gate REJECTED: ")


def test_missing_a_threshold_rejects_even_when_the_champion_is_beaten():
    decision = decide(auc_gate(), {**GOOD, "balanced_accuracy": 0.5}, {"roc_auc": 0.6}, "3")
    assert decision.passed is False
    assert any("beats champion v3" in r for r in decision.reasons)
    assert any("balanced_accuracy = 0.5000 misses" in r for r in decision.reasons)


@pytest.mark.parametrize(
    ("value", "passed"),
    [(0.45, True), (0.5, True), (0.55, False)],
)
def test_log_loss_threshold_is_an_upper_bound(value, passed):
    gate = auc_gate(thresholds={"roc_auc": 0.7, "log_loss": 0.5})
    decision = decide(gate, {**GOOD, "log_loss": value}, None, None)
    assert decision.passed is passed
    check = next(c for c in decision.checks if c["check"].startswith("log_loss"))
    assert check["check"] == "log_loss <= 0.5" and check["passed"] is passed
    if not passed:
        assert f"log_loss = {value:.4f} misses the threshold <= 0.5" in decision.reasons


@pytest.mark.parametrize(("rmse", "passed"), [(9.0, True), (11.0, False)])
def test_rmse_gate_metric_threshold_is_an_upper_bound(rmse, passed):
    gate = GateSpec(metric="rmse", thresholds={"rmse": 10.0, "r2": 0.5})
    decision = decide(gate, {"rmse": rmse, "r2": 0.8, "mae": 5.0}, None, None)
    assert decision.passed is passed
    assert {c["check"] for c in decision.checks} == {"rmse <= 10.0", "r2 >= 0.5"}


def test_a_threshold_metric_that_was_not_computed_rejects():
    gate = auc_gate(thresholds={"roc_auc": 0.7, "pr_auc": 0.5})
    decision = decide(gate, GOOD, None, None)
    assert decision.passed is False
    assert "pr_auc = not computed misses the threshold >= 0.5" in decision.reasons
    assert {"check": "pr_auc >= 0.5", "value": None, "passed": False} in decision.checks


def test_the_gate_metric_not_computed_rejects():
    gate = GateSpec(metric="roc_auc", thresholds={})
    decision = decide(gate, {"accuracy": 0.9, "log_loss": 0.2}, {"roc_auc": 0.5}, "1")
    assert decision.passed is False
    assert "gate metric 'roc_auc' was not computed for this problem type" in decision.reasons
    assert not any("champion" in r for r in decision.reasons)


# --- champion comparison ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenger", "passed"),
    [(0.8110, True), (0.8100, True), (0.8090, False), (0.79, False)],
)
def test_min_improvement_over_the_champion(challenger, passed):
    gate = auc_gate(min_improvement=0.01)
    decision = decide(gate, {**GOOD, "roc_auc": challenger}, {"roc_auc": 0.80}, "4")
    assert decision.passed is passed
    check = decision.checks[-1]
    assert check["check"] == "roc_auc improves on champion v4 by >= 0.01"
    assert check["value"] == pytest.approx(challenger - 0.80, abs=1e-6)
    verb = "beats" if passed else "does not beat"
    assert any(
        r.startswith(f"challenger roc_auc {challenger:.4f} {verb} champion v4 0.8000 by the required 0.01")
        for r in decision.reasons
    )


def test_an_improvement_of_exactly_the_required_gain_passes_despite_float_rounding():
    decision = decide(auc_gate(thresholds={}, min_improvement=0.01), {"roc_auc": 0.57}, {"roc_auc": 0.56}, "1")
    assert decision.passed is True


def test_no_min_improvement_means_a_tie_is_enough():
    assert decide(auc_gate(), GOOD, {"roc_auc": GOOD["roc_auc"]}, "2").passed
    assert not decide(auc_gate(), GOOD, {"roc_auc": GOOD["roc_auc"] + 0.001}, "2").passed


@pytest.mark.parametrize(
    ("challenger", "passed"),
    [(9.4, True), (9.5, True), (9.6, False), (10.5, False)],
)
def test_lower_is_better_gate_metric_must_go_down_by_the_required_gain(challenger, passed):
    gate = GateSpec(metric="rmse", thresholds={"rmse": 20.0}, min_improvement=0.5)
    decision = decide(gate, {"rmse": challenger, "r2": 0.7}, {"rmse": 10.0, "r2": 0.6}, "7")
    assert decision.passed is passed
    assert decision.checks[-1]["value"] == pytest.approx(10.0 - challenger, abs=1e-6)


def test_a_champion_without_the_gate_metric_is_treated_as_no_champion():
    decision = decide(auc_gate(min_improvement=0.05), GOOD, {"accuracy": 0.99}, "5")
    assert decision.passed is True
    assert "no champion to beat: the first model only has to pass the thresholds" in decision.reasons


def test_decision_is_json_serialisable():
    decision = decide(auc_gate(min_improvement=0.01), GOOD, {"roc_auc": 0.7, "accuracy": 0.75}, "1")
    document = json.loads(json.dumps(decision.to_dict()))
    assert document["passed"] is True and document["champion_version"] == "1"
    assert document["challenger"] == GOOD and document["metric"] == "roc_auc"


# --- reports ---------------------------------------------------------------------------------------


def test_markdown_shows_both_models_side_by_side():
    decision = decide(auc_gate(), GOOD, {"roc_auc": 0.75, "balanced_accuracy": 0.7}, "3")
    text = markdown(decision)
    lines = text.splitlines()
    assert lines[0] == f"**{decision.summary}**"
    assert "| roc_auc | 0.8200 | 0.7500 |" in lines
    assert "| log_loss | 0.4100 |  |" in lines
    assert len([line for line in lines if line.startswith("| ") and "metric" not in line]) == len(GOOD)


def test_write_report_writes_gate_json_and_an_html_page(tmp_path):
    decision = decide(auc_gate(), {**GOOD, "balanced_accuracy": 0.5}, {"roc_auc": 0.7}, "2")
    page = write_report(tmp_path / "gate", decision, {"pipeline": "churn", "run_id": "manual__1"})
    assert page == tmp_path / "gate" / "index.html"
    document = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert document["passed"] is False and document["champion_version"] == "2"
    assert document["reasons"] == decision.reasons and document["checks"] == decision.checks
    assert document["context"] == {"pipeline": "churn", "run_id": "manual__1"}
    html = page.read_text()
    assert "REJECTED" in html and "balanced_accuracy = 0.5000 misses the threshold &gt;= 0.6" in html
    assert "<td>0.8200</td><td>0.7000</td>" in html


def test_write_report_escapes_hostile_text(tmp_path):
    hostile = "<script>alert(1)</script>"
    decision = decide(GateSpec(metric="roc_auc"), {"roc_auc": 0.9, hostile: 0.5}, {"roc_auc": 0.8}, hostile)
    page = write_report(tmp_path, decision, {"pipeline": hostile, hostile: "run"}).read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_write_report_of_a_first_model_has_no_champion_column_values(tmp_path):
    decision = decide(auc_gate(), GOOD, None, None)
    html = write_report(tmp_path, decision, {}).read_text()
    assert "PASSED" in html and " v" not in html.split("Challenger vs champion")[1].split("</h2>")[0]
    assert isinstance(decision, GateDecision)
