"""Benchmark: the pipeline's validation step against the same checks written directly in pandas.

What is compared, in one run and on the same generated churn table (``churn_frame``, 1,000,000
rows; 200,000 with ``--quick``):

* ours: ``validate_frame(frame, suite, run_name="bench")``, the pipeline's Great Expectations
  step, without Data Docs (``docs_dir=None``; the operator renders them on top of this);
* baseline: a hand-written pandas interpretation of the same 21 expectations, driven from the same
  suite JSON (``include/expectations/churn.json``) and computing the same pass/fail for each.

Before anything is timed, both are run on the clean frame and on a copy with a few bad values
injected, and must agree on every expectation's success; otherwise the benchmark stops.

Each side is timed ``--repeats`` times (interleaved, after a warm-up); the best time counts.
Peak memory is measured in a fresh child process per side: it builds the frame, runs a warm-up on a
tiny frame (imports and caches are not data), resets the peak-RSS counter, runs the step once and
reports peak RSS minus RSS before the step. Divided by the frame's own size
(``memory_usage(deep=True)``) this gives ``*_peak_memory_ratio``.

Output: progress lines, then as the last line one JSON object. ``ratio`` is ours rows/s divided
by pandas rows/s (1.0 = as fast as hand-written pandas); the targets are ``ratio >= 0.5`` and
``ours_peak_memory_ratio <= 3``, and ``met`` says which hold.

Usage: ``python bench/validation.py [--quick] [--rows N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

FULL_ROWS = 1_000_000
QUICK_ROWS = 200_000
WARMUP_ROWS = 1_000
SUITE = "churn"
TARGET_RATIO = 0.5
TARGET_PEAK_MEMORY = 3.0
MEASURE_FLAG = "--measure-memory"
# Fixed malloc thresholds for the memory children: large blocks are always mmapped and returned,
# so RSS follows what a step allocates instead of glibc's adaptive heap reuse.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

Frame = Any  # a pandas DataFrame; pandas is imported lazily
Check = Callable[[Frame, dict[str, Any]], bool]


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[validation bench] {message}", flush=True)


def quiet_logs() -> None:
    """Keep GX's import-time INFO chatter (routed to stdout by Airflow's logging) out of the output."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


# --- the hand-written pandas baseline ---------------------------------------------------------


def _mostly(considered: int, unexpected: int, mostly: float) -> bool:
    """GX's rule: vacuously true on no rows, else the share of good rows must reach ``mostly``."""
    return considered == 0 or (considered - unexpected) / considered >= mostly


def _column_map(frame: Frame, kwargs: dict[str, Any], unexpected: Callable[[Any], Any]) -> bool:
    """A column-map check as GX does it: nulls are skipped, ``mostly`` applies to non-null rows."""
    column = frame[kwargs["column"]]
    values = column[column.notna()]
    return _mostly(len(values), int(unexpected(values).sum()), kwargs.get("mostly", 1.0))


def check_columns_match_set(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_table_columns_to_match_set: same set, or (exact_match false) all expected present."""
    expected, actual = set(kwargs["column_set"]), set(frame.columns)
    return expected == actual if kwargs.get("exact_match", True) else expected <= actual


def check_row_count_between(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_table_row_count_to_be_between, bounds inclusive unless strict."""
    return _within(len(frame), kwargs)


def check_unique(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_column_values_to_be_unique: every non-null value occurs once."""
    return _column_map(frame, kwargs, lambda values: values.duplicated(keep=False))


def check_not_null(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_column_values_to_not_be_null: ``mostly`` applies to all rows."""
    column = frame[kwargs["column"]]
    return _mostly(len(column), int(column.isna().sum()), kwargs.get("mostly", 1.0))


def check_in_type_list(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_column_values_to_be_in_type_list: the dtype, or each value's type for object columns.

    Names resolve as GX 1.x resolves them: numpy dtype names, pandas classes by attribute name
    (``Int64Dtype``, not ``Int64``), and Python type names (``int``, ``float``, ``str``...).
    """
    import numpy as np

    column = frame[kwargs["column"]]
    accepted = [t for name in kwargs["type_list"] for t in _type_candidates(name)]
    if column.dtype != object:
        return any(column.dtype == t for t in accepted)
    scalar_types = tuple(t for t in accepted if isinstance(t, type) and not _is_dtype_class(t))
    wrong_type = lambda values: ~values.map(lambda v: isinstance(v, scalar_types)).astype(np.bool_)  # noqa: E731
    return _column_map(frame, kwargs, wrong_type)


NATIVE_TYPES: dict[str, tuple[type, ...]] = {
    "none": (type(None),),
    "bool": (bool,),
    "int": (int,),
    "long": (int,),
    "float": (float,),
    "bytes": (bytes,),
    "complex": (complex,),
    "str": (str,),
    "string_types": (str,),
    "list": (list,),
    "dict": (dict,),
}


def _type_candidates(name: str) -> list[Any]:
    """What a type name matches: numpy scalar type and dtype, else a pandas class, plus Python types."""
    import numpy as np
    import pandas as pd

    try:
        candidates: list[Any] = [np.dtype(name).type, np.dtype(name)]
    except TypeError:
        candidates = []
        pandas_type = getattr(pd, name, None)
        if isinstance(pandas_type, type):
            candidates.append(pandas_type)
            if _is_dtype_class(pandas_type):
                try:
                    candidates.append(pandas_type())
                except TypeError:
                    pass
    return candidates + list(NATIVE_TYPES.get(name.lower(), ()))


def _is_dtype_class(candidate: type) -> bool:
    import pandas as pd

    return issubclass(candidate, pd.api.extensions.ExtensionDtype)


def check_values_between(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_column_values_to_be_between on a numeric column, bounds inclusive unless strict."""
    return _column_map(frame, kwargs, lambda values: ~_between_mask(values, kwargs))


def check_in_set(frame: Frame, kwargs: dict[str, Any]) -> bool:
    """expect_column_values_to_be_in_set."""
    return _column_map(frame, kwargs, lambda values: ~values.isin(kwargs["value_set"]))


def _within(value: float, kwargs: dict[str, Any]) -> bool:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    above = low is None or (value > low if kwargs.get("strict_min") else value >= low)
    below = high is None or (value < high if kwargs.get("strict_max") else value <= high)
    return above and below


def _between_mask(values: Any, kwargs: dict[str, Any]) -> Any:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    mask = values == values  # all true on non-null values
    if low is not None:
        mask &= values > low if kwargs.get("strict_min") else values >= low
    if high is not None:
        mask &= values < high if kwargs.get("strict_max") else values <= high
    return mask


CHECKS: dict[str, Check] = {
    "expect_table_columns_to_match_set": check_columns_match_set,
    "expect_table_row_count_to_be_between": check_row_count_between,
    "expect_column_values_to_be_unique": check_unique,
    "expect_column_values_to_not_be_null": check_not_null,
    "expect_column_values_to_be_in_type_list": check_in_type_list,
    "expect_column_values_to_be_between": check_values_between,
    "expect_column_values_to_be_in_set": check_in_set,
}


def pandas_validate(frame: Frame, suite: dict[str, Any]) -> dict[tuple[str, str | None], bool]:
    """Run every expectation of the suite with the hand-written checks.

    :param frame: the table to check.
    :param suite: the suite document (GX 1.x JSON).
    :return: success per expectation, keyed by (type, column).
    """
    return {_key(e["type"], e["kwargs"]): CHECKS[e["type"]](frame, e["kwargs"]) for e in suite["expectations"]}


def _key(expectation: str, kwargs: dict[str, Any]) -> tuple[str, str | None]:
    return expectation, kwargs.get("column")


# --- ours ---------------------------------------------------------------------------------------


def ours_validate(frame: Frame, suite: dict[str, Any]) -> dict[tuple[str, str | None], bool]:
    """Run the pipeline's validation step and return success per expectation, keyed by (type, column).

    :param frame: the table to validate.
    :param suite: the suite document (GX 1.x JSON).
    """
    from conveyor.data.validation import validate_frame

    outcome = validate_frame(frame, suite, run_name="bench")
    return {_key(r["expectation"], r["kwargs"]): bool(r["success"]) for r in outcome.results}


STEPS: dict[str, Callable[[Frame, dict[str, Any]], dict[tuple[str, str | None], bool]]] = {
    "ours": ours_validate,
    "pandas": pandas_validate,
}


# --- agreement, timing, memory ---------------------------------------------------------------


def with_bad_values(frame: Frame) -> Frame:
    """A copy of the frame with a few values each expectation family should catch."""
    bad = frame.copy()
    bad.loc[3, "churned"] = "maybe"  # outside the label set
    bad.loc[5, "age"] = -4  # below the age range
    bad.loc[7, "customer_id"] = bad.loc[8, "customer_id"]  # duplicate key
    bad.loc[11, "contract"] = None  # null in a required column
    bad["support_calls"] = bad["support_calls"].astype("float64")  # dtype not in the type list
    return bad


def check_agreement(label: str, frame: Frame, suite: dict[str, Any]) -> dict[str, int]:
    """Run both sides on a frame and stop when they disagree on any expectation's success.

    :param label: names the frame in messages.
    :param frame: the table to check.
    :param suite: the suite document.
    :return: how many expectations passed and failed (same on both sides).
    """
    expected_keys = {_key(e["type"], e["kwargs"]) for e in suite["expectations"]}
    if len(expected_keys) != len(suite["expectations"]):
        raise SystemExit("suite has two expectations of one type on one column; the bench cannot pair them")
    ours, pandas = ours_validate(frame, suite), pandas_validate(frame, suite)
    if set(ours) != expected_keys:
        extra = sorted(set(ours) ^ expected_keys)
        raise SystemExit(f"{label}: GX returned other expectations than the suite's: {extra}")
    differ = {key: (ours[key], pandas[key]) for key in expected_keys if ours[key] != pandas[key]}
    if differ:
        raise SystemExit(f"{label}: ours and pandas disagree (ours, pandas): {differ}")
    failed = sorted(f"{t}({c})" for (t, c), ok in ours.items() if not ok)
    progress(f"{label}: both agree on all {len(ours)} expectations; failing: {failed or 'none'}")
    return {"passed": len(ours) - len(failed), "failed": len(failed)}


def time_steps(frame: Frame, suite: dict[str, Any], repeats: int) -> dict[str, float]:
    """Best wall time of each step over ``repeats`` interleaved runs (after the agreement warm-up)."""
    best = {name: float("inf") for name in STEPS}
    for attempt in range(1, repeats + 1):
        for name, step in STEPS.items():
            started = time.perf_counter()
            step(frame, suite)
            seconds = time.perf_counter() - started
            best[name] = min(best[name], seconds)
            progress(f"run {attempt}/{repeats} {name}: {seconds:.3f} s")
    return best


def _rss_kib() -> tuple[int, int] | None:
    """(current RSS, peak RSS) of this process in KiB, from one /proc snapshot; None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = [re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE) for field in ("VmRSS", "VmHWM")]
    return (int(found[0].group(1)), int(found[1].group(1))) if all(found) else None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _rss_kib() is not None


def measure_memory_child(step_name: str, rows: int) -> dict[str, Any]:
    """In this (fresh) process: build the frame, run the step once, return its extra peak RSS."""
    from conveyor.data.validation import load_suite
    from conveyor.demo import churn_frame

    suite, step = load_suite(SUITE), STEPS[step_name]
    step(churn_frame(WARMUP_ROWS), suite)  # imports, GX context machinery: not per-row memory
    frame = churn_frame(rows)
    gc.collect()
    reset = _reset_peak()
    before = _rss_kib()[0] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(frame, suite)
    peak = _rss_kib()[1] if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "step": step_name,
        "peak_extra_bytes": max(0, peak - before) * 1024,
        "frame_bytes": int(frame.memory_usage(deep=True).sum()),
        "peak_counter_reset": reset,
    }


def measure_memory(step_name: str, rows: int) -> dict[str, Any]:
    """Run :func:`measure_memory_child` in a fresh interpreter and return what it reports."""
    command = [sys.executable, str(Path(__file__).resolve()), MEASURE_FLAG, step_name, "--rows", str(rows)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"memory child for {step_name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


# --- command line -----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows instead of {FULL_ROWS:,}")
    parser.add_argument("--rows", type=int, default=None, help="rows to generate (overrides --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the best counts")
    parser.add_argument(MEASURE_FLAG, choices=sorted(STEPS), default=None, help=argparse.SUPPRESS)
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison and return the figures (the JSON line)."""
    from conveyor.data.validation import load_suite
    from conveyor.demo import churn_frame

    rows = args.rows or (QUICK_ROWS if args.quick else FULL_ROWS)
    suite = load_suite(SUITE)
    progress(f"warm-up on {WARMUP_ROWS:,} rows (imports GX)")
    for step in STEPS.values():
        step(churn_frame(WARMUP_ROWS), suite)
    progress(f"generating {rows:,} rows")
    frame = churn_frame(rows)
    frame_bytes = int(frame.memory_usage(deep=True).sum())
    progress(f"frame: {frame_bytes / 2**20:.1f} MiB in memory")
    agreement = {"clean": check_agreement("clean frame", frame, suite)}
    agreement["injected"] = check_agreement("frame with injected bad values", with_bad_values(frame), suite)
    best = time_steps(frame, suite, args.repeats)
    del frame
    gc.collect()
    memory = {}
    for name in STEPS:
        progress(f"peak memory of {name} in a fresh process")
        memory[name] = measure_memory(name, rows)
        how = "VmHWM reset" if memory[name]["peak_counter_reset"] else "ru_maxrss, may under-count"
        progress(f"{name}: peak {memory[name]['peak_extra_bytes'] / 2**20:.1f} MiB over the frame ({how})")
    ours_rate, pandas_rate = rows / best["ours"], rows / best["pandas"]
    figures = {
        "ratio": ours_rate / pandas_rate,
        "rows": rows,
        "ours_rows_per_s": ours_rate,
        "pandas_rows_per_s": pandas_rate,
        "ours_seconds": best["ours"],
        "pandas_seconds": best["pandas"],
        "frame_bytes": frame_bytes,
        "ours_peak_memory_ratio": memory["ours"]["peak_extra_bytes"] / frame_bytes,
        "pandas_peak_memory_ratio": memory["pandas"]["peak_extra_bytes"] / frame_bytes,
        "ours_peak_extra_bytes": memory["ours"]["peak_extra_bytes"],
        "pandas_peak_extra_bytes": memory["pandas"]["peak_extra_bytes"],
        "repeats": args.repeats,
        "expectations": len(suite["expectations"]),
        "agreement": agreement,
    }
    return {
        "bench": "validation",
        "baseline": "hand-written pandas checks",
        **figures,
        "targets": {"ratio": f">= {TARGET_RATIO}", "ours_peak_memory_ratio": f"<= {TARGET_PEAK_MEMORY:g}"},
        "met": {
            "ratio": figures["ratio"] >= TARGET_RATIO,
            "ours_peak_memory_ratio": figures["ours_peak_memory_ratio"] <= TARGET_PEAK_MEMORY,
        },
    }


if __name__ == "__main__":
    quiet_logs()
    cli = get_args_parser().parse_args()
    if cli.measure_memory:
        print(json.dumps(measure_memory_child(cli.measure_memory, cli.rows or FULL_ROWS)), flush=True)
    else:
        print(json.dumps(main(cli)), flush=True)
