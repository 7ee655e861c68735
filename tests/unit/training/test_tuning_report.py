"""The trials on the evaluation report: a table and a plot of the metric by trial, static HTML (no script)."""

from __future__ import annotations

from PIL import Image

from conveyor.reports.tuning import PLOT, tuning_section

TUNING = {
    "backend": "local",
    "metric": "balanced_accuracy",
    "direction": "maximize",
    "strategy": "tpe",
    "budget": 60,
    "trial_seconds": 20,
    "parallel": 2,
    "best_trial": 2,
    "best_value": 0.91,
    "trials": [
        {
            "number": 0,
            "params": {"lr": 0.1},
            "status": "complete",
            "value": 0.7,
            "seconds": 12.5,
            "mlflow_run_id": "r0",
        },
        {
            "number": 1,
            "params": {"lr": 1.0},
            "status": "failed",
            "value": None,
            "seconds": 3.0,
            "error": "x\n<b>diverged</b>",
        },
        {
            "number": 2,
            "params": {"lr": 0.01},
            "status": "complete",
            "value": 0.91,
            "seconds": 13.0,
            "mlflow_run_id": "r2",
        },
        {"number": 3, "params": {}, "status": "not run", "value": None, "seconds": 0.0},
    ],
}


def test_the_section_has_a_row_per_trial_and_the_plot(tmp_path):
    page = tuning_section(TUNING, tmp_path)
    assert page.count("<tr") == 5  # the header and four trials
    assert '<tr class="best"><td class="num">2</td><td>complete (best)</td><td class="num">0.9100</td>' in page
    assert "lr=0.01" in page and "r2" in page and "not run" in page
    assert "&lt;b&gt;diverged&lt;/b&gt;" in page and "<b>" not in page  # the error's last line, escaped
    assert f'<img src="{PLOT}"' in page and "<script" not in page
    with Image.open(tmp_path / PLOT) as image:
        assert image.format == "PNG" and image.width > 300


def test_a_search_without_a_complete_trial_still_draws(tmp_path):
    failed = {**TUNING, "best_trial": None, "best_value": None, "trials": [TUNING["trials"][1]]}
    page = tuning_section(failed, tmp_path)
    assert "failed" in page and (tmp_path / PLOT).stat().st_size > 0
