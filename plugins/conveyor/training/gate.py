"""The champion/challenger gate: absolute thresholds, then a minimum improvement over the live model.

Both models are scored on the same test set in the same run; the decision and every reason for it
go into a comparison report (``conveyor.reports.gate``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.spec import GateSpec


@dataclass
class GateDecision:
    """The gate's verdict with its reasons (each a sentence a person can read)."""

    passed: bool
    metric: str
    challenger: dict[str, float]
    champion: dict[str, float] | None
    champion_version: str | None
    reasons: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "REJECTED"
        return f"gate {verdict}: " + "; ".join(self.reasons)


def _better(metric: str) -> bool:
    from conveyor.model.metrics import HIGHER_IS_BETTER

    return HIGHER_IS_BETTER.get(metric, True)


def decide(
    gate: GateSpec, challenger: dict[str, float], champion: dict[str, float] | None, champion_version: str | None
) -> GateDecision:
    """Apply the gate.

    :param gate: the spec's gate (metric, thresholds, min_improvement).
    :param challenger: the new model's test metrics.
    :param champion: the live model's metrics on the same test set, or None when there is none.
    :param champion_version: the live model's registry version.
    """
    decision = GateDecision(True, gate.metric, challenger, champion, champion_version)
    for metric, threshold in sorted({gate.metric: None, **gate.thresholds}.items()):
        if threshold is None:
            continue
        value = challenger.get(metric)
        higher = _better(metric)
        ok = value is not None and (value >= threshold if higher else value <= threshold)
        check = f"{metric} {'>=' if higher else '<='} {threshold}"
        decision.checks.append({"check": check, "value": value, "passed": ok})
        if not ok:
            decision.passed = False
            shown = "not computed" if value is None else f"{value:.4f}"
            decision.reasons.append(f"{metric} = {shown} misses the threshold {'>=' if higher else '<='} {threshold}")
    if gate.metric not in challenger:
        decision.passed = False
        decision.reasons.append(f"gate metric {gate.metric!r} was not computed for this problem type")
        return decision
    if champion is None or gate.metric not in champion:
        decision.reasons.append("no champion to beat: the first model only has to pass the thresholds")
    else:
        higher = _better(gate.metric)
        gain = (challenger[gate.metric] - champion[gate.metric]) * (1 if higher else -1)
        ok = gain >= gate.min_improvement - 1e-9  # a gain of exactly the minimum passes despite rounding
        decision.checks.append(
            {
                "check": f"{gate.metric} improves on champion v{champion_version} by >= {gate.min_improvement}",
                "value": round(gain, 6),
                "passed": ok,
            }
        )
        verb = "beats" if ok else "does not beat"
        decision.reasons.append(
            f"challenger {gate.metric} {challenger[gate.metric]:.4f} {verb} champion v{champion_version} "
            f"{champion[gate.metric]:.4f} by the required {gate.min_improvement} (gain {gain:+.4f})"
        )
        decision.passed = decision.passed and ok
    if all(check["passed"] for check in decision.checks if "improves on champion" not in check["check"]):
        decision.reasons.insert(0, "all thresholds met")
    return decision


def markdown(decision: GateDecision) -> str:
    """A short Markdown comparison (shown to the person who approves)."""
    lines = [f"**{decision.summary}**", "", "| metric | challenger | champion |", "|---|---|---|"]
    for metric in sorted(decision.challenger):
        champ = (decision.champion or {}).get(metric)
        lines.append(f"| {metric} | {decision.challenger[metric]:.4f} | {'' if champ is None else f'{champ:.4f}'} |")
    return "\n".join(lines)
