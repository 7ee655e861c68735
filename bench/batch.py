"""Benchmark: the local batch transform (``score_file``) against one in-memory predict of the whole frame.

What is compared, in one run, with the same small churn model (AutoGluon, LightGBM + weighted
ensemble, trained here as ``tests/conftest.py``'s ``churn_model`` fixture trains it) on the same
input files: ``churn_frame(N)`` without its label, written once as one Parquet file (``--format
csv``: one CSV file), at two sizes: 1,000,000 and 5,000,000 rows (``--quick``: 200,000 and
1,000,000; ``--sizes`` to choose):

* ours: ``conveyor.batch.scoring.score_file(source, model_dir, out, ..., chunk_rows=100,000, workers=2)``
  (and again with ``workers=1`` at the small size): the model loaded once, chunks (rows from the
  memory budget) streamed from pyarrow to scoring threads that share it, written as Parquet parts
  with the id, prediction, probabilities and the run's constant columns, then ``_SUCCESS.json``;
* baseline: ``pandas.read_parquet`` (``read_csv``) of the whole file, ``LoadedModel(model_dir)``,
  one ``predict_frame`` on the whole frame, and its result (id, prediction, probabilities; no
  constant columns) written with ``to_parquet``.

Each side runs in a fresh child process; its clock starts after the libraries that are not the
model are imported (pandas/pyarrow; for ours also ``conveyor.batch.scoring`` and Airflow's
``ObjectStoragePath``, with Airflow initialised by making one path, as it is in a task) and
includes loading the model (AutoGluon's import and the predictor). ``*_rows_per_s`` = rows / that time.

Peak memory counts every process of a side: while a child runs, this process polls its process
tree every 50 ms and keeps each process's last-seen peak RSS (``VmHWM``); the child reports its
own exact ``VmHWM`` at its end. ``peak_bytes`` is the sum of the peaks of all processes.

Before the figures are reported, ours (workers=2) and the baseline must agree on every row (same
id and prediction, probabilities within 1e-9) at every size.

Output: progress lines, then as the last line one JSON object. ``ratio`` = ours (workers=2) rows/s /
baseline rows/s at the large size (target >= 1.0); ``growth`` = ours peak at the large size / ours
peak at the small size (target <= 1.1); ``memory_ratio`` = ours peak / baseline peak at the large
size (target <= 0.5).

Usage: ``python bench/batch.py [--quick] [--sizes N,N] [--format parquet|csv] [--chunk-rows N]
[--model-dir DIR]`` (``--model-dir``: an extracted ``model.tar.gz`` of the churn model, to skip
training).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))
from _common import isolate, train_model  # noqa: E402

FULL_SIZES, QUICK_SIZES = (1_000_000, 5_000_000), (200_000, 1_000_000)
CHUNK_ROWS = 100_000
WORKERS = 2
TARGET_RATIO = 1.0
TARGET_GROWTH = 1.1
TARGET_MEMORY = 0.5
POLL_S = 0.05
CHILD_FLAG = "--child"
LABEL = "churned"


def progress(message: str) -> None:
    """Print one progress line at once."""
    print(f"[batch bench] {message}", flush=True)


def status_kib(pid: int | str = "self") -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a process in KiB from ``/proc/<pid>/status``; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = [re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE) for field in ("VmRSS", "VmHWM")]
    return (int(found[0].group(1)), int(found[1].group(1))) if all(found) else None


# --- the model ----------------------------------------------------------------------------------


# --- the children (each side runs in a fresh process) -------------------------------------------


class PartClock:
    """Records when ``score_file`` logs each part written (a logging handler on ``conveyor.batch.scoring``)."""

    def __init__(self) -> None:
        import logging

        self.times: list[float] = []
        handler = logging.Handler()
        handler.emit = self._emit  # type: ignore[method-assign]
        logger = logging.getLogger("conveyor.batch.scoring")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def _emit(self, record: Any) -> None:
        if record.getMessage().startswith("wrote part-"):
            self.times.append(record.created)


def child_ours(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: ``score_file`` once, timed; worker start-up and part times."""
    import datetime as dt

    import pyarrow  # noqa: F401 - imported before the clock, as pandas/pyarrow on the baseline side
    from airflow.sdk import ObjectStoragePath

    from conveyor.batch import scoring as batch

    # Airflow initialised before the clock, as in a task: the batch task has listed its drops (and so
    # registered the providers' filesystems, ~1 s of imports) before it scores.
    _ = ObjectStoragePath(Path(args.source).resolve().as_uri()).fs

    memory_after_imports = status_kib() or (0, 0)
    parts = PartClock()
    started_wall, started = time.time(), time.perf_counter()
    result = batch.score_file(
        args.source,
        Path(args.model_dir),
        args.out,
        run_id="bench",
        model_name="churn",
        model_version="1",
        scored_at=dt.datetime(2026, 11, 21, tzinfo=dt.UTC),
        chunk_rows=args.chunk_rows,
        workers=args.workers,
    )
    seconds = time.perf_counter() - started
    memory = status_kib() or (0, 0)
    return {
        "side": f"ours_w{args.workers}",
        "seconds": seconds,
        "rows": result.rows,
        "parts": len(result.parts),
        "part_written_s": [t - started_wall for t in parts.times],
        "self_peak_bytes": memory[1] * 1024,
        "self_rss_after_imports_bytes": memory_after_imports[0] * 1024,
        "children_max_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def child_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: read the whole file, load the model, one predict_frame, write; timed by step."""
    import pandas as pd
    import pyarrow  # noqa: F401

    from conveyor.model.artifacts import LoadedModel

    memory_after_imports = status_kib() or (0, 0)
    marks: dict[str, Any] = {}
    started = time.perf_counter()
    frame = pd.read_csv(args.source) if args.source.endswith(".csv") else pd.read_parquet(args.source)
    marks["read_s"] = time.perf_counter() - started
    marks["rss_after_read_bytes"] = (status_kib() or (0, 0))[0] * 1024
    loaded = LoadedModel(Path(args.model_dir))
    marks["model_load_s"] = time.perf_counter() - started - marks["read_s"]
    marks["rss_after_model_load_bytes"] = (status_kib() or (0, 0))[0] * 1024
    before = time.perf_counter()
    predicted = loaded.predict_frame(frame)
    marks["predict_s"] = time.perf_counter() - before
    before = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    predicted.to_parquet(Path(args.out) / "predictions.parquet", index=False)
    marks["write_s"] = time.perf_counter() - before
    seconds = time.perf_counter() - started
    memory = status_kib() or (0, 0)
    return {
        "side": "baseline",
        "seconds": seconds,
        "rows": len(predicted),
        "steps": marks,
        "frame_bytes": int(frame.memory_usage(deep=True).sum()),
        "self_peak_bytes": memory[1] * 1024,
        "self_rss_after_imports_bytes": memory_after_imports[0] * 1024,
        "children_max_peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


# --- running a side and watching its memory -----------------------------------------------------


class TreeWatcher:
    """Polls a process tree: each process's last-seen peak RSS and the peak of the summed RSS."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.peak_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            total = 0
            for proc in procs:
                memory = status_kib(proc.pid)
                if memory is None:
                    continue
                total += memory[0] * 1024
                self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), memory[1] * 1024)
                if proc.pid not in self.names:
                    try:
                        self.names[proc.pid] = " ".join(proc.cmdline()[1:4])[:80]
                    except psutil.Error:
                        self.names[proc.pid] = "?"
            self.peak_sum = max(self.peak_sum, total)
            self._stop.wait(POLL_S)


def run_side(
    side: str, args: argparse.Namespace, source: Path, model_dir: Path, out: Path, work: Path, workers: int = WORKERS
) -> dict[str, Any]:
    """Run one side in a fresh child process while watching its memory; the figures."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        CHILD_FLAG,
        side,
        "--source",
        str(source),
        "--model-dir",
        str(model_dir),
        "--out",
        str(out),
        "--work",
        str(work),
        "--workers",
        str(workers),
        "--chunk-rows",
        str(args.chunk_rows),
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with TreeWatcher(process.pid) as watcher:
            stdout, stderr = process.communicate(timeout=args.side_timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise SystemExit(f"{side}: did not finish within {args.side_timeout:g} s") from None
    wall = time.perf_counter() - started
    lines = stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed ({process.returncode}):\n{stderr[-3000:]}\n{stdout[-2000:]}")
    report = json.loads(lines[-1])
    peaks = dict(watcher.peaks)
    peaks[process.pid] = max(peaks.get(process.pid, 0), report["self_peak_bytes"])  # exact for the child itself
    others = {pid: peak for pid, peak in peaks.items() if pid != process.pid}
    report.update(
        process_wall_s=wall,
        peak_bytes=sum(peaks.values()),
        peak_of_sum_bytes=max(watcher.peak_sum, report["self_peak_bytes"]),
        processes={
            str(pid): {"peak_bytes": peak, "command": watcher.names.get(pid, "child" if pid == process.pid else "?")}
            for pid, peak in sorted(peaks.items())
        },
        other_processes_peak_bytes=sum(others.values()),
        max_other_process_peak_seen_bytes=max(others.values(), default=0),
    )
    # ru_maxrss of the children is exact for the largest one: the poll must not have missed its peak
    if report["children_max_peak_bytes"] > report["max_other_process_peak_seen_bytes"] * 1.02 + (4 << 20):
        report["poll_missed_peak_bytes"] = (
            report["children_max_peak_bytes"] - report["max_other_process_peak_seen_bytes"]
        )
    return report


def check_agreement(ours_out: Path, baseline_out: Path, rows: int) -> dict[str, Any]:
    """Ours (all parts, in order) and the baseline's output hold the same ids, predictions and probabilities."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conveyor.batch.parts import completed_parts

    baseline = pq.read_table(baseline_out / "predictions.parquet")
    columns = baseline.column_names
    ours = pa.concat_tables([pq.read_table(part.path, columns=columns) for part in completed_parts(str(ours_out))])
    if ours.num_rows != rows or baseline.num_rows != rows:
        raise SystemExit(f"row counts differ: ours {ours.num_rows}, baseline {baseline.num_rows}, input {rows}")
    for name in columns:
        mine, theirs = ours.column(name).to_numpy(), baseline.column(name).to_numpy()
        if name.startswith("proba_"):
            worst = float(np.max(np.abs(mine.astype("float64") - theirs.astype("float64"))))
            if worst > 1e-9:
                raise SystemExit(f"{name}: ours and the baseline differ by up to {worst}")
        elif not np.array_equal(mine, theirs):
            raise SystemExit(f"{name}: ours and the baseline differ on {int(np.sum(mine != theirs))} rows")
    return {"rows": rows, "columns": columns}


# --- command line -----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} instead of {FULL_SIZES}")
    parser.add_argument("--sizes", default=None, help="two comma-separated row counts, small then large")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet", help="the input file's format")
    parser.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS, help="score_file's chunk_rows")
    parser.add_argument("--model-dir", type=Path, default=None, help="an extracted churn model.tar.gz (skip training)")
    parser.add_argument("--side-timeout", type=float, default=900.0, help="seconds one side may run at most")
    parser.add_argument(CHILD_FLAG, choices=("ours", "baseline"), default=None, help=argparse.SUPPRESS)
    for hidden in ("--source", "--out", "--work"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=WORKERS, help=argparse.SUPPRESS)
    return parser


def write_input(tmp: Path, rows: int, fmt: str) -> tuple[Path, int]:
    """The churn input of ``rows`` rows as one file (without the label); the path and its pandas bytes."""
    from conveyor.demo import churn_frame

    progress(f"generating {rows:,} rows and writing them as one {fmt} file")
    frame = churn_frame(rows).drop(columns=[LABEL])
    source = tmp / f"input-{rows}" / f"churn.{fmt}"
    source.parent.mkdir()
    if fmt == "csv":
        frame.to_csv(source, index=False)
    else:
        frame.to_parquet(source, index=False)
    frame_bytes = int(frame.memory_usage(deep=True).sum())
    progress(f"input: {source.stat().st_size / 2**20:.1f} MiB on disk, {frame_bytes / 2**20:.1f} MiB as a pandas frame")
    return source, frame_bytes


def run_size(args: argparse.Namespace, tmp: Path, model_dir: Path, rows: int, with_w1: bool) -> dict[str, Any]:
    """Every side at one input size (the figures by side name), checked to agree."""
    source, frame_bytes = write_input(tmp, rows, args.format)
    sides: dict[str, Any] = {"frame_bytes": frame_bytes}
    plan = [("baseline", "baseline", WORKERS), ("ours_w2", "ours", 2)] + ([("ours_w1", "ours", 1)] if with_w1 else [])
    for name, side, workers in plan:
        progress(f"{rows:,} rows, {name}: running in a fresh process")
        report = run_side(side, args, source, model_dir, tmp / f"out-{rows}-{name}", tmp, workers)
        sides[name] = report
        progress(
            f"{rows:,} rows, {name}: {report['seconds']:.2f} s, {report['rows'] / report['seconds']:,.0f} rows/s; "
            f"peak memory {report['peak_bytes'] / 2**20:.0f} MiB summed over {len(report['processes'])} process(es)"
        )
        if "steps" in report:
            steps = report["steps"]
            progress(
                f"  read {steps['read_s']:.2f} s, model load {steps['model_load_s']:.2f} s, "
                f"predict {steps['predict_s']:.2f} s, write {steps['write_s']:.2f} s"
            )
    check_agreement(tmp / f"out-{rows}-ours_w2", tmp / f"out-{rows}-baseline", rows)
    progress(f"{rows:,} rows: ours and the baseline agree on every row")
    for name in plan:
        remove_tree_quietly(tmp / f"out-{rows}-{name[0]}")
    source.unlink()
    return sides


def remove_tree_quietly(folder: Path) -> None:
    """Delete a side's output (the disk is shared)."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison and return the figures (the JSON line)."""
    small, large = (
        tuple(int(n) for n in args.sizes.split(",")) if args.sizes else QUICK_SIZES if args.quick else FULL_SIZES
    )
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-batch-") as tmp_name:
        tmp = Path(tmp_name)
        isolate(tmp)
        if args.model_dir is not None:
            model_dir = args.model_dir.resolve()
            progress(f"using the model at {model_dir}")
        else:
            progress("training the churn model (AutoGluon GBM, 20 s budget, as the churn_model fixture)")
            started = time.perf_counter()
            model_dir = train_model(tmp / "train")
            progress(f"trained and packed in {time.perf_counter() - started:.1f} s")
        by_size = {
            small: run_size(args, tmp, model_dir, small, True),
            large: run_size(args, tmp, model_dir, large, False),
        }

    def rate(rows: int, name: str) -> float:
        return by_size[rows][name]["rows"] / by_size[rows][name]["seconds"]

    def peak(rows: int, name: str) -> int:
        return by_size[rows][name]["peak_bytes"]

    ratio = rate(large, "ours_w2") / rate(large, "baseline")
    growth = peak(large, "ours_w2") / peak(small, "ours_w2")
    memory_ratio = peak(large, "ours_w2") / peak(large, "baseline")
    figures = {
        "ratio": ratio,
        "growth": growth,
        "memory_ratio": memory_ratio,
        "ratio_small": rate(small, "ours_w2") / rate(small, "baseline"),
        "ratio_small_w1": rate(small, "ours_w1") / rate(small, "baseline"),
        "memory_ratio_small": peak(small, "ours_w2") / peak(small, "baseline"),
        "baseline_growth": peak(large, "baseline") / peak(small, "baseline"),
        "sizes": [small, large],
        "format": args.format,
        "chunk_rows": args.chunk_rows,
        "rows_per_s": {f"{n}": {k: rate(n, k) for k in by_size[n] if k != "frame_bytes"} for n in by_size},
        "peak_bytes": {f"{n}": {k: peak(n, k) for k in by_size[n] if k != "frame_bytes"} for n in by_size},
        "sides": {f"{n}": by_size[n] for n in by_size},
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],
    }
    targets = {"ratio": TARGET_RATIO, "growth": TARGET_GROWTH, "memory_ratio": TARGET_MEMORY}
    return {
        "bench": "batch",
        "baseline": "pandas read of the whole file + one LoadedModel.predict_frame + to_parquet, in one process",
        **figures,
        "targets": {
            "ratio": f">= {TARGET_RATIO}",
            "growth": f"<= {TARGET_GROWTH}",
            "memory_ratio": f"<= {TARGET_MEMORY}",
        },
        "met": {
            "ratio": ratio >= targets["ratio"],
            "growth": growth <= targets["growth"],
            "memory_ratio": memory_ratio <= targets["memory_ratio"],
        },
    }


if __name__ == "__main__":
    cli = get_args_parser().parse_args()
    if cli.child == "ours":
        print(json.dumps(child_ours(cli)), flush=True)
    elif cli.child == "baseline":
        print(json.dumps(child_baseline(cli)), flush=True)
    else:
        print(json.dumps(main(cli)), flush=True)
