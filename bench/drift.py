"""Benchmark: the monitor's drift report against the same statistics written directly in numpy/scipy.

Issue: "drift computation on 1,000,000 rows x 20 features against computing the same statistics
with plain numpy/scipy in the same run; target ratio >= 0.8 of their speed."

Data (generated, seeded): 20 features, 14 numeric (normal, lognormal, uniform, gamma; 4 with some
missing values) and 6 categorical (object strings, 3 to 80 categories, one with more than the 50
the baseline lists, 2 with missing values). The baseline is built from a 100,000-row reference
sample by the tabular trainer's own ``build_baseline`` (``include/training/autogluon_tabular/train.py``),
exactly as ``metadata.json`` holds it. The batch (1,000,000 rows; 200,000 with ``--quick``) is drawn
from the same generator with drift in 5 features (3 numeric shifted or rescaled, a new category, a
category's share changed).

* ours: ``conveyor.monitoring.drift.drift_report(metadata, batch)``: per feature PSI, a KS or chi-square test,
  missing-rate change, the drift rule, a JSON-ready report;
* baseline: the same statistics in a plain loop over the columns: numeric values binned with
  ``np.searchsorted`` on the baseline edges (outer bins open), PSI, ``scipy.stats.kstest`` against
  the same piecewise-linear CDF (min, p01..p99, max and the histogram's inner edges) with ours'
  p-value method (``asymp`` above 10,000 rows: the default exact one alone takes up to 3 s per
  feature at 1,000,000 rows, on both sides), missing rate;
  categorical counts with pandas ``value_counts`` (faster than ``np.unique`` on object strings),
  PSI over the baseline categories + ``__other__``, ``scipy.stats.chisquare`` with the same pooling
  of cells expecting fewer than 5 rows. No report, no rule, no input checks.

Before timing, both run once and must agree on every PSI, test statistic, p-value and missing
rate within 1e-9 (the generated numeric features have no point mass at their minimum, where ours
deliberately departs from ``kstest``: see ``conveyor.monitoring.drift.ks_test``). Each side is then timed
``--repeats`` times, interleaved; the best time counts. ``ratio`` = baseline seconds / ours seconds
(ours' speed relative to the baseline's; target >= 0.8).

Usage: ``python bench/drift.py [--quick] [--rows N] [--repeats N]``; progress lines, then one JSON
object as the last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))
sys.path.append(str(ROOT / "tests"))  # scripts.load_script: the shared loader of the standalone scripts

FULL_ROWS, QUICK_ROWS, REFERENCE_ROWS = 1_000_000, 200_000, 100_000
TARGET_RATIO = 0.8
TOLERANCE = 1e-9
OTHER = "__other__"
LEVELS = {"p01": 0.01, "p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95, "p99": 0.99}
NUMERIC = 14
CATEGORY_SIZES = (3, 5, 8, 12, 30, 80)


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[drift bench] {message}", flush=True)


def load_trainer() -> Any:
    """The tabular training script as a module (include/ is not a package; it imports no Airflow)."""
    from scripts import load_script

    return load_script("include/training/autogluon_tabular/train.py", "bench_autogluon_train")


def generate(rows: int, seed: int, drift: bool) -> pd.DataFrame:
    """20 features: 14 numeric, 6 categorical (object strings sharing their str objects).

    :param rows: rows to draw.
    :param seed: the random seed.
    :param drift: whether to move 5 of the features.
    """
    rng = np.random.default_rng(seed)
    columns: dict[str, Any] = {}
    for i in range(NUMERIC):
        family = i % 4
        if family == 0:
            values = rng.normal(10.0 * i, 1.0 + i, rows)
        elif family == 1:
            values = rng.lognormal(1.0, 0.5 + i / 20, rows)
        elif family == 2:
            values = rng.uniform(-i, i + 1.0, rows)
        else:
            values = rng.gamma(2.0 + i / 4, 3.0, rows)
        if drift and i == 0:
            values = values + 0.5  # + 0.5 std
        if drift and i == 1:
            values = values * 1.6
        if drift and i == 2:
            values = values + 0.1 * (i + 1)  # a small shift: PSI below the limit
        if i in (3, 7, 11, 13):
            values[rng.random(rows) < (0.2 if drift and i == 3 else 0.05)] = np.nan
        columns[f"num_{i:02d}"] = values
    for j, size in enumerate(CATEGORY_SIZES):
        names = np.array([f"c{j}_{k}" for k in range(size)] + ["brand-new"], dtype=object)
        weights = 1.0 / np.arange(1, size + 1)
        if drift and j == 1:
            weights[0] *= 3.0
        shares = np.append(weights / weights.sum(), 0.0)
        if drift and j == 2:
            shares = np.append(shares[:-1] * 0.9, 0.1)
        codes = rng.choice(size + 1, rows, p=shares)
        column = names[codes]
        if j in (0, 4):
            column[rng.random(rows) < 0.03] = None
        columns[f"cat_{j}"] = column
    return pd.DataFrame(columns)


# --- the plain numpy/scipy baseline -------------------------------------------------------------


def plain_cdf_points(summary: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The same CDF points as ours: min, p01..p99, max, the histogram's inner edges with shares below."""
    points = [(summary["min"], 0.0), (summary["max"], 1.0)] + [(summary["quantiles"][k], v) for k, v in LEVELS.items()]
    counts = np.asarray(summary["histogram"]["counts"], dtype="float64")
    points += list(zip(summary["histogram"]["edges"][1:-1], np.cumsum(counts)[:-1] / counts.sum()))
    points.sort()
    xs = np.array([p[0] for p in points])
    ys = np.maximum.accumulate(np.array([p[1] for p in points]))
    keep = np.append(xs[1:] != xs[:-1], True)
    return xs[keep], ys[keep]


def plain_psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    expected, actual = np.maximum(expected, eps), np.maximum(actual, eps)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def plain_numeric(summary: dict[str, Any], column: pd.Series) -> dict[str, float]:
    values = column.to_numpy(dtype="float64")
    present = values[np.isfinite(values)]
    edges = np.asarray(summary["histogram"]["edges"])
    bins = np.clip(np.searchsorted(edges, present, side="right") - 1, 0, len(edges) - 2)
    actual = np.bincount(bins, minlength=len(edges) - 1) / len(present)
    counts = np.asarray(summary["histogram"]["counts"], dtype="float64")
    xs, ys = plain_cdf_points(summary)
    method = "exact" if len(present) <= 10_000 else "asymp"  # ours' p-value choice (conveyor.monitoring.drift.ks_test)
    ks = stats.kstest(present, lambda v: np.interp(v, xs, ys, left=0.0, right=1.0), method=method)
    return {
        "psi": plain_psi(counts / counts.sum(), actual),
        "statistic": float(ks.statistic),
        "pvalue": float(ks.pvalue),
        "missing_rate": 1.0 - len(present) / len(values),
    }


def plain_categorical(summary: dict[str, Any], column: pd.Series) -> dict[str, float]:
    counts = column.value_counts()
    total = int(counts.sum())
    categories = [k for k in summary["frequencies"] if k != OTHER]
    expected_shares = np.array([summary["frequencies"][k] for k in categories] + [summary["frequencies"][OTHER]])
    known = counts.reindex(categories, fill_value=0).to_numpy()
    observed = np.append(known, total - known.sum()).astype("float64")
    expected = expected_shares / expected_shares.sum() * total
    small = expected < 5.0
    if small.any():
        pooled_o, pooled_e = observed[small].sum(), expected[small].sum()
        observed, expected = observed[~small], expected[~small]
        if pooled_e >= 5.0:
            observed, expected = np.append(observed, pooled_o), np.append(expected, pooled_e)
        else:
            observed[np.argmin(expected)] += pooled_o
            expected[np.argmin(expected)] += pooled_e
    chi = stats.chisquare(observed, expected)
    return {
        "psi": plain_psi(expected_shares, np.append(known, total - known.sum()) / total),
        "statistic": float(chi.statistic),
        "pvalue": float(chi.pvalue),
        "missing_rate": 1.0 - total / len(column),
    }


def plain(metadata: dict[str, Any], batch: pd.DataFrame) -> dict[str, dict[str, float]]:
    """The baseline: the same statistics, column by column, with numpy/scipy (and pandas value counts)."""
    out = {}
    for feature in metadata["features"]:
        name = feature["name"]
        summary = metadata["baseline"]["features"][name]
        out[name] = (plain_numeric if summary["kind"] == "numeric" else plain_categorical)(summary, batch[name])
    return out


# --- the run ----------------------------------------------------------------------------------------


def agree(ours: dict[str, Any], theirs: dict[str, dict[str, float]]) -> float:
    """The largest difference between ours and the baseline over every figure; raises above TOLERANCE."""
    worst = 0.0
    for name, figures in theirs.items():
        for key, value in figures.items():
            difference = abs(ours["features"][name][key] - value)
            if not difference <= TOLERANCE:
                raise SystemExit(
                    f"drift bench: {name} {key} differs: ours {ours['features'][name][key]!r}, baseline {value!r}"
                )
            worst = max(worst, difference)
    return worst


def timed(function: Any) -> float:
    gc.collect()
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows instead of {FULL_ROWS:,}")
    parser.add_argument("--rows", type=int, default=None, help="batch rows (overrides --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best counts")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    from conveyor.model.metadata import ModelMetadata
    from conveyor.monitoring.drift import drift_report

    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    trainer = load_trainer()
    started = time.perf_counter()
    reference = generate(REFERENCE_ROWS, seed=1, drift=False)
    reference["label"] = np.random.default_rng(9).choice(["no", "yes"], REFERENCE_ROWS)
    metadata = {
        "label": "label",
        "id_column": None,
        "features": [{"name": c, "dtype": str(reference[c].dtype)} for c in reference.columns if c != "label"],
        "baseline": trainer.build_baseline(reference, "label", "binary"),
    }
    progress(
        f"baseline of {REFERENCE_ROWS:,} reference rows by the trainer's build_baseline "
        f"({time.perf_counter() - started:.1f}s)"
    )
    started = time.perf_counter()
    batch = generate(rows, seed=2, drift=True)
    progress(f"batch: {rows:,} rows x {batch.shape[1]} features ({time.perf_counter() - started:.1f}s)")

    model = ModelMetadata.from_dict({"trainer": "autogluon", "problem_type": "binary", **metadata})
    report = drift_report(model, batch)
    worst = agree(report, plain(metadata, batch))
    progress(
        f"agreement: every PSI, statistic, p-value and missing rate within {worst:.1e}; "
        f"drifted: {report['drifted_features']}"
    )
    json.dumps(report, allow_nan=False)

    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for repeat in range(args.repeats):
        times["ours"].append(timed(lambda: drift_report(model, batch)))
        times["baseline"].append(timed(lambda: plain(metadata, batch)))
        progress(
            f"run {repeat + 1}/{args.repeats}: ours {times['ours'][-1]:.3f}s, baseline {times['baseline'][-1]:.3f}s"
        )
    ours, theirs = min(times["ours"]), min(times["baseline"])
    ratio = theirs / ours
    return {
        "bench": "drift",
        "baseline": "the same statistics in plain numpy/scipy (pandas value_counts for categories)",
        "ratio": round(ratio, 3),
        "target": f">= {TARGET_RATIO}",
        "met": ratio >= TARGET_RATIO,
        "rows": rows,
        "features": batch.shape[1],
        "ours_seconds": round(ours, 4),
        "baseline_seconds": round(theirs, 4),
        "ours_rows_per_s": round(rows / ours),
        "baseline_rows_per_s": round(rows / theirs),
        "ours_all_seconds": [round(t, 4) for t in times["ours"]],
        "baseline_all_seconds": [round(t, 4) for t in times["baseline"]],
        "max_difference": worst,
        "drifted_features": report["drifted_features"],
        "repeats": args.repeats,
    }


if __name__ == "__main__":
    print(json.dumps(main(get_args_parser().parse_args())), flush=True)
