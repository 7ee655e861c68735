"""The monitoring report rendered from real drift reports: tables, plots per drifted feature, history,
live metric, labels, the verdict, escaping, empty inputs and monitor.json without NaN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from markupsafe import escape

from conveyor.model.metadata import Feature, ModelMetadata
from conveyor.monitoring.drift import OTHER, DriftInputError, drift_report, image_drift
from conveyor.reports import monitoring, plots
from conveyor.reports.monitoring import write_monitor_report
from scripts import load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"


tabular = load_script("include/training/autogluon_tabular/train.py", "monitoring_test_autogluon_train")


def frame(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "income": rng.normal(50.0, 10.0, rows),
            "plan": rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2]),
            "version": np.full(rows, 3.0),
            "churned": rng.choice(["no", "yes"], rows, p=[0.8, 0.2]),
        }
    )


def metadata_for(train: pd.DataFrame, problem_type: str, label: str) -> ModelMetadata:
    return ModelMetadata(
        trainer="autogluon",
        problem_type=problem_type,
        label=label,
        features=tuple(Feature(c, str(train[c].dtype)) for c in train.columns if c != label),
        baseline=tabular.build_baseline(train, label, problem_type),
    )


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return frame(4_000, seed=1)


@pytest.fixture(scope="module")
def classifier(train) -> ModelMetadata:
    return metadata_for(train, "binary", "churned")


@pytest.fixture(scope="module")
def regressor(train) -> ModelMetadata:
    return metadata_for(train.assign(spend=train["income"] * 2.0).drop(columns="churned"), "regression", "spend")


@pytest.fixture(scope="module")
def batch_report(classifier) -> dict:
    """A batch with a shifted numeric feature, a new (malicious) category and shifted predictions."""
    batch = frame(1_000, seed=2).drop(columns="churned")
    batch["income"] += 20.0
    batch.loc[:299, "plan"] = EVIL
    predictions = np.random.default_rng(3).choice(["no", "yes"], len(batch), p=[0.4, 0.6])
    return drift_report(classifier, batch, predictions=predictions)


@pytest.fixture(scope="module")
def capture_report(regressor) -> dict:
    """Captured traffic of a regressor: the constant-in-training feature moved, predictions moved."""
    batch = frame(1_000, seed=4).drop(columns="churned")
    batch.loc[:199, "version"] = 4.0
    return drift_report(regressor, batch, predictions=batch["income"].to_numpy() * 2.0 + 60.0)


@pytest.fixture(scope="module")
def bad_batch_error(classifier) -> str:
    batch = frame(50, seed=5).drop(columns="churned").rename(columns={"income": "Income"})
    with pytest.raises(DriftInputError) as caught:
        drift_report(classifier, batch)
    return str(caught.value)


def history(n_past: int = 3) -> list[dict]:
    records = [
        {
            "at": f"2024-05-0{day}T06:00:00+00:00",
            "source": "batch",
            "id": f"run_{day}",
            "rows": 1000,
            "drift_share": 0.0,
            "drifted_features": [],
            "max_psi": 0.01 * day,
            "prediction_psi": 0.005,
            "drifted": False,
        }
        for day in range(1, n_past + 1)
    ]
    records.append(
        {
            "at": "2024-05-04T06:00:00+00:00",
            "source": "capture",
            "id": "2024-05-03",
            "rows": 1000,
            "drift_share": 1 / 3,
            "drifted_features": ["version"],
            "max_psi": float("nan"),
            "prediction_psi": np.float64(3.2),
            "drifted": np.bool_(True),
        }
    )
    return records


LIVE = [
    {"day": "2024-05-01", "labels": 120, "metric": "accuracy", "value": 0.91, "model_version": "3"},
    {"day": "2024-05-02", "labels": 0, "metric": "accuracy", "value": None, "model_version": "3"},
    {"day": "2024-05-03", "labels": 150, "metric": "accuracy", "value": 0.71, "model_version": "3"},
]
LABELS = {
    "received": 300,
    "accepted": 270,
    "unknown_ids": 20,
    "duplicates": 6,
    "out_of_set": 4,
    "new_since_training": 270,
    "rejected_examples": [
        {"id": "p-404", "label": "no", "rule": "unknown prediction id"},
        {"id": "p-7", "label": "<b>maybe</b>", "rule": "label outside the class set ['no', 'yes']"},
    ],
}
MODEL = {"name": "churn", "version": "3", "metric": "accuracy", "baseline_metric": 0.9}


def drawn(page: str) -> dict[str, bytes]:
    """The plots a page holds, inlined (``data-plot`` names them): name -> PNG bytes."""
    import base64
    import re

    found = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)" data-plot="([\w.\-]+)"', page)
    return {name: base64.b64decode(encoded) for encoded, name in found}


def render(
    out: Path,
    sources: list[dict],
    *,
    decision: dict | None = None,
    hist: list[dict] | None = None,
    live: list[dict] | None = None,
    labels: dict | None = None,
) -> tuple[Path, str]:
    decision = (
        decision
        if decision is not None
        else {
            "retrain": True,
            "reasons": ["drift: 2 of 3 features drifted in batch run_a", "live accuracy 0.71 < 0.8"],
            "suppressed_by_cooldown": False,
            "cooldown_until": None,
            "last_trigger": "2024-04-20T06:00:00+00:00",
            "thresholds": {
                "psi": 0.2,
                "max_drift_share": 0.25,
                "min_live_metric": 0.8,
                "min_new_labels": 100,
                "cooldown_hours": 24.0,
            },
        }
    )
    index = write_monitor_report(
        out,
        pipeline="churn",
        model=MODEL,
        sources=sources,
        history=history() if hist is None else hist,
        live=LIVE if live is None else live,
        labels=LABELS if labels is None else labels,
        decision=decision,
    )
    return index, index.read_text(encoding="utf-8")


def no_nan(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"monitor.json holds {constant}")

    return json.loads(text, parse_constant=refuse)


def drifted_with_shares(report: dict) -> list[str]:
    return [name for name, r in report["features"].items() if r["drifted"] and r.get("expected_shares")]


def test_full_report(tmp_path, batch_report, capture_report, bad_batch_error):
    sources = [
        {"source": "batch", "id": "run_a", "rows": 1000, "report": batch_report, "error": None},
        {"source": "capture", "id": "2024-05-03", "rows": 1000, "report": capture_report, "error": None},
        {"source": "batch", "id": "run_bad", "rows": 50, "report": None, "error": bad_batch_error},
    ]
    assert batch_report["drifted_features"] == ["income", "plan"]
    assert capture_report["drifted_features"] == ["version"]
    index, page = render(tmp_path / "report", sources)
    out = index.parent
    assert index == out / "index.html"

    # one plot per drifted feature, none for the others; a prediction plot per source that has predictions
    plots = drawn(page)
    assert sorted(n for n in plots if n.startswith("drift_s1_")) == ["drift_s1_1_income", "drift_s1_2_plan"]
    assert [n for n in plots if n.startswith("drift_s2_")] == ["drift_s2_1_version"]
    assert not [n for n in plots if n.startswith("drift_s3_")]
    drifted = drifted_with_shares(batch_report) + drifted_with_shares(capture_report)
    assert len([n for n in plots if n.startswith("drift_")]) == len(drifted) == 3
    expected_plots = {"prediction_s1.png", "prediction_s2.png", "history.png", "live_metric.png"}
    assert {f"{n}.png" for n in plots} >= expected_plots and "prediction_s3" not in plots
    for png in plots.values():
        assert png[:8] == PNG_MAGIC and len(png) > 2_000
    assert not list(out.glob("*.png"))  # inlined: the page is the one file to upload and read

    # header and verdict
    assert "Monitoring: churn" in page and "version <strong>3</strong>" in page
    assert '<p class="verdict retrain">Retrain triggered</p>' in page
    assert "live accuracy 0.71 &lt; 0.8" in page and "2024-04-20T06:00:00+00:00" in page

    # the feature tables: every feature, drifted ones first, with PSI, test, p-value and reasons
    first = page.split("<h3>Batch run run_a</h3>")[1].split("<h3>")[0]
    income = batch_report["features"]["income"]
    assert f"<td>{income['psi']:.3f}</td>" in first and str(escape(income["reasons"][0])) in first
    assert first.index("<td>income</td>") < first.index("<td>plan</td>") < first.index("<td>version</td>")
    assert "<td>prediction (classification)</td>" in first and "chi2:" in first and "ks:" in first
    assert "30.0%" in first  # the new category's share
    second = page.split("<h3>Endpoint capture 2024-05-03</h3>")[1].split("<h3>")[0]
    assert "constant in training" in second and "<td>prediction (regression)</td>" in second
    assert second.count('class="drifted"') == 2  # version and the predictions

    # the errored source, prominently and escaped
    third = page.split("<h3>Batch run run_bad</h3>")[1]
    assert '<div class="error">' in third and str(escape(bad_batch_error)) in third
    assert "missing [&#39;income&#39;], unexpected [&#39;Income&#39;]" in third

    # history, live metric, labels
    assert page.count("<td>run_") == 3 and "<td>33.3%</td>" in page
    assert "<td>0.71</td>" in page and "<th>rejected: duplicate</th><td>6</td>" in page
    assert "<td>p-404</td>" in page and "unknown prediction id" in page

    # monitor.json: every input, no NaN, numpy values plain
    document = no_nan((out / "monitor.json").read_text(encoding="utf-8"))
    assert document["sources"][0]["report"] == json.loads(json.dumps(batch_report))
    assert document["sources"][2] == {
        "source": "batch",
        "id": "run_bad",
        "rows": 50,
        "report": None,
        "error": bad_batch_error,
    }
    assert document["history"][-1]["max_psi"] is None and document["history"][-1]["drifted"] is True
    assert document["history"][-1]["prediction_psi"] == 3.2
    assert document["live"] == LIVE and document["labels"] == LABELS and document["model"] == MODEL
    assert document["verdict"] == "Retrain triggered" and {f"{n}.png" for n in document["plots"]} >= expected_plots


def test_html_from_data_is_escaped(tmp_path, batch_report):
    evil_feature = {
        ("<b>x</b>" if name == "income" else name): result for name, result in batch_report["features"].items()
    }
    report = batch_report | {"features": evil_feature, "drifted_features": ["<b>x</b>", "plan"]}
    sources = [{"source": "batch", "id": "<i>run</i>", "rows": 1000, "report": report, "error": None}]
    labels = LABELS | {"rejected_examples": [{"id": "<img src=x onerror=alert(1)>", "label": EVIL, "rule": "a & b"}]}
    decision = {"retrain": False, "reasons": ["<b>bold</b>"], "suppressed_by_cooldown": False, "thresholds": {}}
    _, page = render(tmp_path, sources, decision=decision, labels=labels)
    assert batch_report["features"]["plan"]["new_categories"][EVIL] == pytest.approx(0.3)
    for raw in (EVIL, "<i>run</i>", "<img src=x", "<b>bold</b>", "<b>x</b>"):
        assert raw not in page
    assert str(escape(EVIL)) in page and "&lt;i&gt;run&lt;/i&gt;" in page and "a &amp; b" in page
    assert "<td>&lt;b&gt;x&lt;/b&gt;</td>" in page and "drift_s1_1__b_x_b_" in drawn(page)
    assert "<script" not in page


def test_empty_inputs_render_cleanly(tmp_path):
    decision = {
        "retrain": False,
        "reasons": [],
        "suppressed_by_cooldown": False,
        "cooldown_until": None,
        "last_trigger": None,
        "thresholds": {},
    }
    index, page = render(tmp_path / "empty", [], decision=decision, hist=[], live=[], labels={})
    assert '<p class="verdict ok">No action</p>' in page and "No trigger condition was met." in page
    assert "No batch or captured traffic was checked" in page and "No monitoring history yet." in page
    assert "No live metric yet" in page and "No feedback labels received yet." in page
    assert "Last trigger: never" in page
    assert not list(index.parent.glob("*.png")) and not drawn(page)
    document = no_nan((index.parent / "monitor.json").read_text(encoding="utf-8"))
    assert document["sources"] == [] and document["history"] == [] and document["plots"] == []


def test_error_only_and_missing_report(tmp_path):
    sources = [
        {
            "source": "batch",
            "id": "run_empty",
            "rows": 0,
            "report": None,
            "error": "batch has no rows: there is nothing to compare with the baseline",
        },
        {"source": "capture", "id": "w1", "rows": 0, "report": None, "error": None},
    ]
    _, page = render(
        tmp_path,
        sources,
        live=[{"day": "2024-05-01", "labels": 0, "metric": "accuracy", "value": None, "model_version": "3"}],
    )
    assert "<strong>This data could not be checked:</strong> batch has no rows" in page
    assert "No drift report for this source." in page
    assert not [n for n in drawn(page) if n.startswith(("drift_", "prediction_"))]
    assert "live_metric" not in drawn(page)  # a day without a value is tabled, not plotted


def test_suppressed_verdict_and_stale_plots_removed(tmp_path, batch_report, classifier):
    out = tmp_path / "r"
    (out / "drift_s1_9_old.png").parent.mkdir(parents=True, exist_ok=True)
    (out / "drift_s1_9_old.png").write_bytes(b"a plot file of an earlier render")
    _, first = render(out, [{"source": "batch", "id": "run_a", "rows": 1000, "report": batch_report, "error": None}])
    assert len([n for n in drawn(first) if n.startswith("drift_")]) == 2 and not list(out.glob("*.png"))
    calm = drift_report(classifier, frame(500, seed=9).drop(columns="churned"))
    assert not calm["drifted"]
    decision = {
        "retrain": False,
        "reasons": ["drift: psi 0.4 > 0.2"],
        "suppressed_by_cooldown": True,
        "cooldown_until": "2024-05-05T06:00:00+00:00",
        "last_trigger": "2024-05-04T06:00:00+00:00",
        "thresholds": {"cooldown_hours": 24},
    }
    _, page = render(
        out, [{"source": "batch", "id": "run_b", "rows": 500, "report": calm, "error": None}], decision=decision
    )
    assert '<p class="verdict suppressed">Retrain suppressed by cool-down until 2024-05-05T06:00:00+00:00</p>' in page
    assert not [n for n in drawn(page) if n.startswith("drift_")] and "prediction_s1" not in drawn(page)
    assert "0 of 3 features drifted" in page and "no drift" in page


def test_image_report_channel_means_are_tabled_not_plotted(tmp_path):
    rng = np.random.default_rng(0)

    def stats(rows, brightness, red):
        return pd.DataFrame(
            {
                "width": rng.choice([224, 256], rows),
                "height": np.full(rows, 224),
                "brightness": rng.normal(brightness, 0.08, rows).clip(0, 1),
                "mean_red": rng.normal(red, 0.05, rows),
                "mean_green": rng.normal(0.4, 0.05, rows),
                "mean_blue": rng.normal(0.3, 0.05, rows),
            }
        )

    reference = stats(400, 0.45, 0.5)
    baseline = {
        "kind": "image",
        "pixel": {"channels": ["red", "green", "blue"], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
        "brightness": tabular.numeric_baseline(reference["brightness"]),
        "width": tabular.numeric_baseline(reference["width"]),
        "height": tabular.numeric_baseline(reference["height"]),
        "label_distribution": {"cat": 0.5, "dog": 0.5},
    }
    report = image_drift(baseline, stats(300, 0.25, 0.6), predictions=["cat"] * 250 + ["dog"] * 50)
    assert report["drifted_features"] == ["brightness", "mean_red"]
    _, page = render(tmp_path, [{"source": "batch", "id": "img_run", "rows": 300, "report": report, "error": None}])
    assert [n for n in drawn(page) if n.startswith("drift_")] == ["drift_s1_1_brightness"]
    assert f"mean moved {report['features']['mean_red']['mean_shift_std']:+.2f} pixel std" in page
    assert str(escape(report["features"]["mean_red"]["reasons"][0])) in page
    assert "prediction_s1" in drawn(page)


def test_bin_labels():
    numeric = {"bins": [[0.0, 10.0], [10.0, 20.5], [20.5, 30.0]]}
    assert monitoring._bin_labels(numeric) == ["< 10", "[10, 20.5)", ">= 20.5"]
    assert monitoring._bin_labels({"bins": ["== 3", "!= 3"]}) == ["== 3", "!= 3"]
    assert monitoring._bin_labels({"bins": [[1.0, 2.0]]}) == ["all values"]
    assert monitoring._bin_labels({"categories": ["a", "<b>", OTHER]}) == ["a", "<b>", "other/new"]
    assert monitoring.OTHER == OTHER


def test_history_with_times_that_are_not_iso_is_plotted_by_position(tmp_path):
    records = [
        {
            "at": "yesterday",
            "source": "batch",
            "id": "r1",
            "rows": 10,
            "drift_share": 0.5,
            "drifted_features": [f"f{i}" for i in range(12)],
            "max_psi": 0.5,
            "prediction_psi": None,
            "drifted": True,
        },
        {
            "at": "2024-05-02T00:00:00",
            "source": "batch",
            "id": "r2",
            "rows": 10,
            "drift_share": None,
            "drifted_features": [],
            "max_psi": None,
            "prediction_psi": None,
            "drifted": False,
        },
    ]
    _, page = render(tmp_path, [], hist=records, live=[], labels={})
    assert drawn(page)["history"][:8] == PNG_MAGIC
    assert "f9 (+2 more)" in page and "f10" not in page


def test_many_categories_are_cut_to_the_largest(tmp_path):
    baseline = tabular.categorical_baseline(pd.Series([f"c{i:02d}" for i in range(45)] * 20))
    metadata = ModelMetadata(
        trainer="autogluon",
        problem_type="binary",
        label="churned",
        features=(Feature("city", "object"),),
        baseline={"features": {"city": baseline}},
    )
    values = [f"c{i:02d}" for i in range(10)] * 60 + ["new_town"] * 100
    report = drift_report(metadata, pd.DataFrame({"city": values}))
    assert report["features"]["city"]["drifted"] and len(report["features"]["city"]["categories"]) == 46
    _, page = render(tmp_path, [{"source": "capture", "id": "w", "rows": len(values), "report": report, "error": None}])
    assert drawn(page)["drift_s1_1_city"][:8] == PNG_MAGIC and "new_town (14.3%)" in page


def test_the_plotting_helper_draws_on_an_agg_canvas_without_pyplot(tmp_path):
    figure, axes = plots.stacked(4, 3, rows=2)
    assert len(axes) == 2 and axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    axes[0].plot([0, 1], [1, 0], label=plots.plain("cost in $"))
    assert plots.save(figure, tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert plots.save(plots.figure(2, 2), tmp_path / "q.png").read_bytes()[:8] == PNG_MAGIC
    assert tuple(figure.get_size_inches()) == (4.0, 3.0) and type(figure.canvas).__name__ == "FigureCanvasAgg"
    assert plots.plain("a $x$ b") == r"a \$x\$ b" and plots.plain("x" * 50, 40) == "x" * 39 + "…"
    assert plots.plain("short", 40) == "short"
