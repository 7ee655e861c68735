"""The tuning step on the evaluation report: a table of the trials and a plot of the metric by trial.

Drawn from the model's metadata (``tuning``, written by ``conveyor.training.tuning`` locally or
``conveyor.aws.tuning`` on SageMaker); static HTML and a PNG, no script (the reports' CSP).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from conveyor.reports.plots import figure, plain, save

PLOT = "tuning_trials.png"


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) and math.isfinite(value) else "—"


def plot_trials(path: Path, tuning: dict[str, Any]) -> Path:
    """The metric of every complete trial by trial number, the best so far as a step line, the best
    trial ringed, failed trials as crosses on the lower edge.

    :param path: the PNG file.
    :param tuning: the search (``metadata.json``'s ``tuning``).
    """
    trials = tuning.get("trials") or []
    done = [t for t in trials if t.get("status") == "complete" and isinstance(t.get("value"), int | float)]
    failed = [t["number"] for t in trials if t.get("status") == "failed"]
    drawn = figure(6.4, 3.4)
    axes = drawn.add_subplot()
    maximize = tuning.get("direction", "maximize") == "maximize"
    if done:
        numbers, values = [t["number"] for t in done], [float(t["value"]) for t in done]
        axes.plot(numbers, values, "o", color="#1f77b4", label="trial")
        best_so_far, running = [], None
        for value in values:
            running = value if running is None else (max if maximize else min)(running, value)
            best_so_far.append(running)
        axes.step(numbers, best_so_far, where="post", color="#2ca02c", label="best so far")
        best = [t for t in done if t["number"] == tuning.get("best_trial")]
        if best:
            axes.plot([best[0]["number"]], [best[0]["value"]], "o", ms=14, mfc="none", mec="#d62728", label="best")
    if failed:
        low = axes.get_ylim()[0] if done else 0.0
        axes.plot(failed, [low] * len(failed), "x", color="#d62728", label="failed")
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel(plain(f"validation {tuning.get('metric')} ({tuning.get('direction')})", 60))
    axes.set_title(plain(f"{len(done)} of {len(trials)} trials complete", 80))
    if done or failed:
        axes.legend(loc="best", fontsize="small")
    return save(drawn, path)


def tuning_section(tuning: dict[str, Any], out: Path) -> str:
    """The report's section on the search: a summary line, the plot (written into ``out``) and the table.

    :param tuning: the search (``metadata.json``'s ``tuning``).
    :param out: the report folder.
    """
    plot_trials(out / PLOT, tuning)
    rows = []
    for trial in tuning.get("trials") or []:
        best = trial.get("number") == tuning.get("best_trial")
        params = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in (trial.get("params") or {}).items())
        error = (trial.get("error") or "").strip().splitlines()
        mark = ' class="best"' if best else ""
        rows.append(
            f'<tr{mark}><td class="num">{int(trial.get("number", -1))}</td>'
            f"<td>{html.escape(str(trial.get('status')))}{' (best)' if best else ''}</td>"
            f'<td class="num">{_value(trial.get("value"))}</td>'
            f'<td class="num">{_value(trial.get("seconds"))}</td>'
            f"<td>{html.escape(params)}</td><td>{html.escape(error[-1][:300] if error else '')}</td>"
            f"<td>{html.escape(str(trial.get('mlflow_run_id') or trial.get('training_job') or ''))}</td></tr>"
        )
    head = (
        f"<p>{html.escape(str(tuning.get('backend', 'local')))} search, {html.escape(str(tuning.get('strategy')))}: "
        f"{len(rows)} trials ({html.escape(str(tuning.get('parallel')))} at a time, "
        f"{html.escape(str(tuning.get('trial_seconds')))} s each of a {html.escape(str(tuning.get('budget')))} s "
        f"budget), {html.escape(str(tuning.get('direction')))} validation "
        f"<strong>{html.escape(str(tuning.get('metric')))}</strong>; best trial "
        f"<strong>{html.escape(str(tuning.get('best_trial')))}</strong> ({_value(tuning.get('best_value'))}), "
        "whose model is the one evaluated on this page.</p>"
    )
    plot = (
        f'<figure><img src="{PLOT}" alt="validation metric by trial"><figcaption>Metric by trial</figcaption></figure>'
    )
    table = (
        '<table class="trials"><tr><th>trial</th><th>status</th><th>value</th><th>seconds</th><th>hyperparameters</th>'
        "<th>error</th><th>run</th></tr>" + "".join(rows) + "</table>"
    )
    return head + plot + table
