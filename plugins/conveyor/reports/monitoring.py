"""The monitoring report: this run's drift checks, drift over time, the live metric, feedback labels, the verdict.

``write_monitor_report`` turns the JSON-like results of a monitor run (``conveyor.monitoring.drift`` reports per
checked source, the history of past checks, the live metric per day, feedback label counts and the
retrain decision) into ``index.html``, its PNG plots inlined (one self-contained page), and ``monitor.json``
holding every input (NaN and infinities as null). Importing this module is cheap: matplotlib and jinja2 are
imported by the functions that use them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

from conveyor.model.metadata import OTHER  # the baseline's bucket of values it does not list
from conveyor.reports.plots import embed_images, plain, save, stacked

MAX_PLOTTED_CATEGORIES = 30
MAX_HISTORY_ROWS = 100
_SOURCE_NAMES = {"batch": "Batch run", "capture": "Endpoint capture"}
_FEATURE_HEAD = (
    "feature",
    "kind",
    "PSI",
    "test: statistic",
    "p-value",
    "missing rate (baseline -> now)",
    "details",
    "new categories",
    "drifted",
    "reasons",
)
_HISTORY_HEAD = (
    "at",
    "source",
    "id",
    "rows",
    "drift share",
    "drifted features",
    "max PSI",
    "prediction PSI",
    "drifted",
)
_LIVE_KEYS = ("day", "labels", "metric", "value", "model_version")
_LABEL_COUNTS = (
    ("received", "labels received"),
    ("accepted", "accepted (joined with a prediction)"),
    ("unknown_ids", "rejected: unknown prediction id"),
    ("duplicates", "rejected: duplicate"),
    ("out_of_set", "rejected: label outside the class set"),
    ("new_since_training", "new labels since the model was trained"),
)


def write_monitor_report(
    out_dir: Path,
    *,
    pipeline: str,
    model: dict,
    sources: list[dict],
    history: list[dict],
    live: list[dict],
    labels: dict,
    decision: dict,
) -> Path:
    """Render out_dir/index.html (its PNG plots inlined; ``monitor.json`` with all inputs and the plots' names)
    and return the index path.

    :param out_dir: the report folder (created; plot files of an earlier render are removed).
    :param pipeline: the pipeline's name.
    :param model: ``name``, ``version``, ``metric`` (the gate metric) and ``baseline_metric`` (its test score).
    :param sources: this run's drift checks: ``source``, ``id``, ``rows``, ``report`` (or None) and ``error``.
    :param history: every monitor record, oldest first, this run's included.
    :param live: the live metric per day: ``day``, ``labels``, ``metric``, ``value``, ``model_version``.
    :param labels: feedback label counts and up to 20 ``rejected_examples`` (``id``, ``label``, ``rule``).
    :param decision: ``retrain``, ``reasons``, ``suppressed_by_cooldown``, ``cooldown_until``, ``last_trigger``
        and ``thresholds``.
    """
    data = _clean(
        {
            "pipeline": pipeline,
            "model": model or {},
            "sources": sources or [],
            "history": history or [],
            "live": live or [],
            "labels": labels or {},
            "decision": decision or {},
        }
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [*out.glob("drift_*.png"), *out.glob("prediction_*.png"), out / "history.png", out / "live_metric.png"]
    for path in stale:
        path.unlink(missing_ok=True)  # the plots of an earlier render of this folder

    verdict, verdict_class = _verdict(data["decision"])
    thresholds = dict(data["decision"].get("thresholds") or {})
    sections = [_source_section(out, index, source) for index, source in enumerate(data["sources"], 1)]
    psi_limit = _first(thresholds, "psi", "psi_threshold") or next(
        (s["thresholds"].get("psi") for s in sections if s["thresholds"].get("psi") is not None), None
    )
    share_limit = _first(thresholds, "max_drift_share", "drift_share")
    history_plot = _plot_history(out / "history.png", data["history"], psi_limit, share_limit)
    live_plot = _plot_live(out / "live_metric.png", data["live"], data["model"], _first(thresholds, "min_live_metric"))

    plots = [f for s in sections for f in [*(row["plot"] for row in s["rows"]), s["prediction_plot"]] if f]
    plots += [path.name for path in (history_plot, live_plot) if path]
    plots = [Path(name).stem for name in plots]  # the page's data-plot names (the files are inlined, then gone)
    (out / "monitor.json").write_text(
        json.dumps(data | {"verdict": verdict, "plots": plots}, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )

    records, rejected = data["history"], data["labels"].get("rejected_examples") or []
    page = _render(
        data=data,
        verdict=verdict,
        verdict_class=verdict_class,
        sections=sections,
        thresholds=[(False, [k, _fmt(v)]) for k, v in thresholds.items()],
        history_plot=history_plot and history_plot.name,
        live_plot=live_plot and live_plot.name,
        history_rows=[_history_row(r) for r in reversed(records[-MAX_HISTORY_ROWS:])],
        history_total=len(records),
        live_rows=[(False, [_fmt(r.get(k)) for k in _LIVE_KEYS]) for r in data["live"]],
        label_counts=_label_counts(data["labels"]),
        rejected=[(False, [_text(e.get(k)) for k in ("id", "label", "rule")]) for e in rejected],
    )
    index = out / "index.html"
    index.write_text(embed_images(page, out), encoding="utf-8")  # one self-contained page: one upload
    return index


# -------------------------------------------------------------------------------------- data


def _clean(value: Any) -> Any:
    """Plain JSON data: numpy values as Python ones, NaN and infinities as None, dates as ISO text."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # numpy scalars and arrays
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def _first(mapping: Mapping[str, Any], *names: str) -> float | None:
    """The first of ``names`` that holds a number in ``mapping`` (thresholds), or None."""
    for name in names:
        value = mapping.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _fmt(value: Any, spec: str = ".4g") -> str:
    """A value for a table, floats in ``spec``; ``-`` for a figure that does not exist."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, float) else str(value)


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _verdict(decision: Mapping[str, Any]) -> tuple[str, str]:
    """The headline and its CSS class: retrain triggered, suppressed by cool-down, or no action."""
    if decision.get("retrain"):
        return "Retrain triggered", "retrain"
    if decision.get("suppressed_by_cooldown"):
        until = decision.get("cooldown_until")
        return "Retrain suppressed by cool-down" + (f" until {until}" if until else ""), "suppressed"
    return "No action", "ok"


def _bin_labels(result: Mapping[str, Any]) -> list[str]:
    """Readable names of a feature result's bins or categories; the outer numeric bins are open-ended."""
    if result.get("categories"):
        return ["other/new" if c == OTHER else str(c) for c in result["categories"]]
    bins = result.get("bins") or []
    labels = []
    for i, item in enumerate(bins):
        if isinstance(item, str) or len(bins) == 1:  # a constant's "== c" / "!= c", or a single bin
            labels.append(str(item) if isinstance(item, str) else "all values")
        elif i == 0:
            labels.append(f"< {item[1]:.4g}")
        elif i == len(bins) - 1:
            labels.append(f">= {item[0]:.4g}")
        else:
            labels.append(f"[{item[0]:.4g}, {item[1]:.4g})")
    return labels


def _feature_row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """One line of a source's feature table, as text, from a feature's (or the predictions') drift result."""
    before, after, change = (result.get(k) for k in ("baseline_missing_rate", "missing_rate", "missing_rate_change"))
    missing = (
        "-"
        if after is None
        else f"{_fmt(before, '.3f')} -> {after:.3f}" + (f" ({change:+.3f})" if change is not None else "")
    )
    details = []
    if result.get("constant_baseline"):
        details.append("constant in training")
    if result.get("mean_shift_std") is not None:
        unit = "pixel std" if result.get("kind") == "channel_mean" else "std"
        details.append(f"mean moved {result['mean_shift_std']:+.2f} {unit}")
    if result.get("out_of_range_share") is not None:
        details.append(f"{result['out_of_range_share']:.1%} outside the training range")
    new = result.get("new_categories") or {}
    listed = ", ".join(f"{k} ({v:.1%})" for k, v in new.items())
    if new and result.get("new_category_share") is not None:
        listed += f"; {result['new_category_share']:.1%} of rows in all"
    test, drifted, reasons = result.get("test"), bool(result.get("drifted")), "; ".join(result.get("reasons") or [])
    psi = _fmt(result.get("psi"), ".3f")
    statistic = f"{test}: {_fmt(result.get('statistic'), '.4g')}" if test else "-"
    cells = [
        name,
        _text(result.get("kind")),
        psi,
        statistic,
        _fmt(result.get("pvalue"), ".2g"),
        missing,
        "; ".join(details) or "-",
        listed or "-",
        _fmt(drifted),
        reasons,
    ]
    return {"name": name, "psi": psi, "drifted": drifted, "reasons": reasons, "cells": cells, "plot": None}


def _source_section(out: Path, index: int, source: Mapping[str, Any]) -> dict[str, Any]:
    """A source's heading, summary and feature rows; draws its plots into ``out``, named by its position ``index``."""
    report = source.get("report") or {}
    kind = _SOURCE_NAMES.get(str(source.get("source")), _text(source.get("source")))
    section: dict[str, Any] = {
        "title": f"{kind} {_text(source.get('id'))}",
        "error": source.get("error"),
        "has_report": bool(report),
        "rows_count": _text(source.get("rows", report.get("rows"))),
        "rule": report.get("rule"),
        "thresholds": report.get("thresholds") or {},
        "drifted": bool(report.get("drifted")),
        "rows": [],
        "prediction": None,
        "prediction_plot": None,
        "drifted_features": report.get("drifted_features") or [],
        "feature_count": len(report.get("features") or {}),
        "drift_share": _fmt(report.get("drift_share"), ".1%"),
    }
    features = sorted((report.get("features") or {}).items(), key=lambda item: not item[1].get("drifted"))
    for number, (name, result) in enumerate(features, 1):
        row = _feature_row(name, result)
        if row["drifted"] and result.get("expected_shares") and result.get("actual_shares"):
            slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40]
            path = _plot_shares(out / f"drift_s{index}_{number}_{slug}.png", f"{name}: psi {row['psi']}", result)
            row["plot"] = path.name
        section["rows"].append(row)
    prediction = report.get("prediction")
    if prediction:
        section["prediction"] = _feature_row(f"prediction ({prediction.get('problem', '')})", prediction)
        if prediction.get("expected_shares") and prediction.get("actual_shares"):
            title = f"predictions: psi {section['prediction']['psi']}"
            section["prediction_plot"] = _plot_shares(out / f"prediction_s{index}.png", title, prediction).name
    shown = section["rows"] + ([section["prediction"]] if section["prediction"] else [])
    section["table"] = [(row["drifted"], row["cells"]) for row in shown]
    return section


def _history_row(record: Mapping[str, Any]) -> tuple[bool, list[str]]:
    features, drifted = record.get("drifted_features") or [], bool(record.get("drifted"))
    shown = ", ".join(map(str, features[:10])) + (f" (+{len(features) - 10} more)" if len(features) > 10 else "")
    return drifted, [
        *(_text(record.get(k)) for k in ("at", "source", "id", "rows")),
        _fmt(record.get("drift_share"), ".1%"),
        shown or "-",
        _fmt(record.get("max_psi"), ".3f"),
        _fmt(record.get("prediction_psi"), ".3f"),
        _fmt(drifted),
    ]


def _label_counts(labels: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(text, _text(labels.get(key, 0))) for key, text in _LABEL_COUNTS] if labels else []


# ------------------------------------------------------------------------------------- plots


def _plot_shares(path: Path, title: str, result: Mapping[str, Any]) -> Path:
    """Grouped bars of the baseline's and the batch's share per bin or category of a drift result."""
    labels, expected, actual = _bin_labels(result), result["expected_shares"], result["actual_shares"]
    keep = list(range(len(labels)))
    if len(keep) > MAX_PLOTTED_CATEGORIES:  # the largest categories, and other/new always
        ranked = sorted(keep[:-1], key=lambda i: -max(expected[i] or 0.0, actual[i] or 0.0))
        keep = sorted(ranked[: MAX_PLOTTED_CATEGORIES - 1]) + [keep[-1]]
        title += f" ({len(keep)} of {len(labels)} categories)"
    figure, (ax,) = stacked(max(6.0, 1.2 + 0.45 * len(keep)), 4.5)
    xs = range(len(keep))
    ax.bar([x - 0.2 for x in xs], [expected[i] or 0.0 for i in keep], 0.4, label="baseline (training)", color="#7f9fbf")
    ax.bar([x + 0.2 for x in xs], [actual[i] or 0.0 for i in keep], 0.4, label="current", color="#d9822b")
    rotate = len(keep) > 5 or any(len(labels[i]) > 10 for i in keep)
    ax.set_xticks(
        list(xs), [plain(labels[i], 25) for i in keep], rotation=45 if rotate else 0, ha="right" if rotate else "center"
    )
    ax.set(ylabel="share of rows", title=plain(title, 80))
    ax.legend()
    return save(figure, path)


def _times(values: list[Any]) -> list[Any] | None:
    """ISO texts as datetimes, or None when one of them is not a date (then positions are plotted)."""
    try:
        return [datetime.fromisoformat(str(v)) for v in values]
    except ValueError:
        return None


def _time_axis(figure: Any, ax: Any, xs: list[Any], spec: str) -> None:
    """Ticks at the points themselves (labelled with ``spec``) when they are few, else concise dates."""
    from matplotlib import dates

    if len(set(xs)) <= 12:
        ax.set_xticks(xs, [x.strftime(spec) for x in xs])
    else:
        locator = dates.AutoDateLocator(minticks=3, maxticks=10)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    figure.autofmt_xdate()


def _plot_history(path: Path, history: list[dict], psi_limit: float | None, share_limit: float | None) -> Path | None:
    """Drift share and the largest PSI of every check over time, a line per source, drifted checks ringed."""
    if not history:
        return None
    xs = _times([r.get("at") for r in history]) or list(range(len(history)))
    with_tz = {x.tzinfo is not None for x in xs if isinstance(x, datetime)}
    if len(with_tz) > 1:  # naive and aware times cannot share an axis
        xs = list(range(len(history)))
    figure, (share_ax, psi_ax) = stacked(9, 6, rows=2)
    for source in dict.fromkeys(str(r.get("source")) for r in history):
        picked = [(x, r) for x, r in zip(xs, history, strict=True) if str(r.get("source")) == source]
        for ax, key in ((share_ax, "drift_share"), (psi_ax, "max_psi")):
            points = [(x, r[key], r.get("drifted")) for x, r in picked if r.get(key) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=plain(source, 40))
                ringed = [p for p in points if p[2]]
                ax.scatter(
                    [p[0] for p in ringed], [p[1] for p in ringed], s=120, facecolors="none", edgecolors="red", zorder=3
                )
    for ax, limit, name in ((share_ax, share_limit, "drift share"), (psi_ax, psi_limit, "max PSI")):
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", label=f"threshold {limit:g}")
        ax.set_ylabel(name)
        if ax.has_data():
            ax.legend(loc="upper left")
    share_ax.set_title("Drift over time (red rings: checks that drifted)")
    psi_ax.set_xlabel("check time" if isinstance(xs[0], datetime) else "check number")
    if isinstance(xs[0], datetime):
        _time_axis(figure, psi_ax, xs, "%Y-%m-%d %H:%M")
    return save(figure, path)


def _plot_live(path: Path, live: list[dict], model: Mapping[str, Any], minimum: float | None) -> Path | None:
    """The live metric per day, a line per model version, with the minimum and the evaluation baseline."""
    points = [r for r in live if r.get("value") is not None]
    if not points:
        return None
    days = _times([r.get("day") for r in points])
    xs = days or list(range(len(points)))
    figure, (ax,) = stacked(9, 4.5)
    for version in dict.fromkeys(str(r.get("model_version")) for r in points):
        chosen = [(x, r["value"]) for x, r in zip(xs, points, strict=True) if str(r.get("model_version")) == version]
        ax.plot([c[0] for c in chosen], [c[1] for c in chosen], marker="o", label=plain(f"model version {version}", 40))
    if minimum is not None:
        ax.axhline(minimum, color="red", linestyle="--", label=f"minimum {minimum:g}")
    if model.get("baseline_metric") is not None:
        ax.axhline(
            model["baseline_metric"],
            color="grey",
            linestyle=":",
            label=f"evaluation (test set) {model['baseline_metric']:.4g}",
        )
    metric = points[0].get("metric") or model.get("metric") or "metric"
    ax.set(
        ylabel=plain(metric, 40),
        xlabel="day" if days else "record",
        title=plain(f"Live {metric} on labelled predictions", 80),
    )
    ax.legend(loc="lower left")
    if days:
        _time_axis(figure, ax, days, "%Y-%m-%d")
    return save(figure, path)


# -------------------------------------------------------------------------------------- html

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Monitoring: {{ data.pipeline }}</title>
<style>
body { font-family: system-ui, sans-serif; color: #222; max-width: 80rem; margin: 2rem auto; padding: 0 1rem; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr.drifted td { background: #fff1e6; }
figure { margin: 1rem 0 2rem; } .plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.plots figure { flex: 1 1 30rem; max-width: 38rem; margin: .5rem 0 1rem; }
img { max-width: 100%; border: 1px solid #eee; }
.verdict { padding: .6rem 1rem; border-radius: .3rem; font-size: 1.2rem; font-weight: 600; }
.verdict.retrain { background: #fde2e1; } .verdict.suppressed { background: #fff3cd; }
.verdict.ok { background: #e3f4e1; }
.error { background: #fde2e1; border-left: .4rem solid #c0392b; padding: .6rem 1rem; }
.muted { color: #666; }
</style>
</head>
<body>
{% macro table(head, rows) %}<table><tr>{% for h in head %}<th>{{ h }}</th>{% endfor %}</tr>
{% for marked, cells in rows %}<tr{% if marked %} class="drifted"{% endif %}>
{%- for cell in cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endmacro %}
<h1>Monitoring: {{ data.pipeline }}</h1>
<p>Model <strong>{{ data.model.name or "-" }}</strong> version <strong>{{ data.model.version or "-" }}</strong>;
gate metric <strong>{{ data.model.metric or "-" }}</strong>, {{ baseline }} at evaluation.</p>
<p class="verdict {{ verdict_class }}">{{ verdict }}</p>
{% if data.decision.reasons %}<ul>{% for reason in data.decision.reasons %}<li>{{ reason }}</li>{% endfor %}</ul>
{% else %}<p class="muted">No trigger condition was met.</p>{% endif %}
{% if data.decision.notes %}<p class="muted">Not judged:</p><ul class="muted">
{%- for note in data.decision.notes %}<li>{{ note }}</li>{% endfor %}</ul>{% endif %}
<p>Last trigger: {{ data.decision.last_trigger or "never" }};
cool-down until: {{ data.decision.cooldown_until or "-" }}.</p>
{% if thresholds %}{{ table(("threshold", "value"), thresholds) }}{% endif %}

<h2>Drift in this run</h2>
{% if not sections %}<p class="muted">No batch or captured traffic was checked in this run.</p>{% endif %}
{% for s in sections %}
<h3>{{ s.title }}</h3>
{% if s.error %}<div class="error"><strong>This data could not be checked:</strong> {{ s.error }}</div>{% endif %}
{% if s.has_report %}
<p>{{ s.rows_count }} rows; {{ s.drifted_features|length }} of {{ s.feature_count }} features drifted
({{ s.drift_share }}); verdict: <strong>{{ "drifted" if s.drifted else "no drift" }}</strong>.
{% if s.rule %}<span class="muted">Rule: {{ s.rule }}.</span>{% endif %}</p>
{{ table(feature_head, s.table) }}
<div class="plots">
{% for r in s.rows if r.plot %}
<figure><img src="{{ r.plot }}" alt="{{ r.name }}: baseline and current shares">
<figcaption>{{ r.name }}: share of rows per bin or category, training baseline against this data
({{ r.reasons }})</figcaption></figure>
{% endfor %}
{% if s.prediction_plot %}<figure><img src="{{ s.prediction_plot }}" alt="prediction distribution">
<figcaption>Predictions: share per class or value range, training baseline against this data</figcaption></figure>
{% endif %}
</div>
{% elif not s.error %}<p class="muted">No drift report for this source.</p>{% endif %}
{% endfor %}

<h2>Drift over time</h2>
{% if history_plot %}<figure><img src="{{ history_plot }}" alt="drift over time"></figure>{% endif %}
{% if history_rows %}
{% if history_total > history_rows|length %}
<p class="muted">The latest {{ history_rows|length }} of {{ history_total }} checks, newest first.</p>{% endif %}
{{ table(history_head, history_rows) }}
{% else %}<p class="muted">No monitoring history yet.</p>{% endif %}

<h2>Live {{ data.model.metric or "metric" }}</h2>
{% if live_plot %}<figure><img src="{{ live_plot }}" alt="live metric over time"></figure>{% endif %}
{% if live_rows %}{{ table(("day", "labelled predictions", "metric", "value", "model version"), live_rows) }}
{% else %}<p class="muted">No live metric yet: no feedback label has been joined with a prediction.</p>{% endif %}

<h2>Feedback labels</h2>
{% if label_counts %}<table>{% for name, value in label_counts %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% else %}<p class="muted">No feedback labels received yet.</p>{% endif %}
{% if rejected %}<h3>Rejected labels (examples)</h3>
{{ table(("id", "label", "rule broken"), rejected) }}{% endif %}
</body>
</html>
"""


def _render(**context: Any) -> str:
    """The page, every text from the data escaped."""
    from jinja2 import Environment

    model = context["data"]["model"]
    baseline = model.get("baseline_metric")
    context["baseline"] = f"{baseline:.4g}" if isinstance(baseline, (int, float)) else "no score recorded"
    context |= {"feature_head": _FEATURE_HEAD, "history_head": _HISTORY_HEAD}
    return Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(_PAGE).render(**context)
