"""The gate's comparison report: ``gate.json`` and ``index.html`` (both models side by side, the decision, why)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from conveyor.training.gate import GateDecision


def write_report(out_dir: Path, decision: GateDecision, context: dict[str, Any]) -> Path:
    """Write ``gate.json`` and ``index.html`` (both models' metrics side by side, the decision, why)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gate.json").write_text(json.dumps({**decision.to_dict(), "context": context}, indent=2, default=str))
    esc = html.escape
    champion = decision.champion or {}
    rows = "".join(
        f"<tr><td>{esc(m)}</td><td>{decision.challenger[m]:.4f}</td>"
        f"<td>{'' if champion.get(m) is None else f'{champion[m]:.4f}'}</td></tr>"
        for m in sorted(decision.challenger)
    )
    checks = "".join(
        f"<tr class='{'ok' if c['passed'] else 'bad'}'><td>{esc(c['check'])}</td><td>{esc(str(c['value']))}</td>"
        f"<td>{'pass' if c['passed'] else 'FAIL'}</td></tr>"
        for c in decision.checks
    )
    ctx = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in context.items())
    reasons = "".join(f"<li>{esc(r)}</li>" for r in decision.reasons)
    verdict = "PASSED" if decision.passed else "REJECTED"
    versus = "" if decision.champion_version is None else f" v{esc(str(decision.champion_version))}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Gate: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}.ok{{background:#eafbea}}.bad{{background:#fde8e8}}
h1 span{{color:{"#1a7f37" if decision.passed else "#b42318"}}}</style></head><body>
<h1>Gate: <span>{verdict}</span></h1><table>{ctx}</table><h2>Why</h2><ul>{reasons}</ul>
<h2>Checks</h2><table><tr><th>check</th><th>value</th><th>result</th></tr>{checks}</table>
<h2>Challenger vs champion{versus} (same test set)</h2>
<table><tr><th>metric</th><th>challenger</th><th>champion</th></tr>{rows}</table></body></html>"""
    (out_dir / "index.html").write_text(page)
    return out_dir / "index.html"
