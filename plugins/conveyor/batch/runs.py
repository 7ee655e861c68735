"""A batch run around the scoring: what it scores, its one timestamp, its table, and what it leaves behind.

A run scores the input it is given (a file or folder inside the lake: another scheme, host, bucket
or a path leaving the lake's root is refused), else the oldest complete drop in
``landing/<pipeline>/inference/`` not scored yet (:func:`batch_input`; None when there is none, and
the operator skips). After the parts are written (locally or by a SageMaker transform job),
:func:`load_run` replaces the run's rows in the predictions table and summarises them for the
report, and :func:`mark_scored` writes ``_SCORED.json`` into the drop so the next run passes it by.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.batch.readers import lake_path, local_copies, opened
from conveyor.batch.scoring import PROBA_PREFIX

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.batch.parts import BatchResult
    from conveyor.lake import Lake
    from conveyor.spec import PipelineSpec

SCORED_MARKER = "_SCORED.json"


def predictions_table(spec: PipelineSpec) -> str:
    """The SQL table a pipeline's batch rows go to: ``deploy.batch.table``, else ``<name>_predictions``.

    :param spec: the pipeline.
    """
    return spec.deploy.batch.table or f"{spec.name}_predictions"


def run_timestamp(context: Mapping[str, Any]) -> datetime:
    """The one ``scored_at`` of a batch run: its logical date, else its interval end, else when it ran.

    :param context: the task context.
    """
    return context.get("logical_date") or context.get("data_interval_end") or context["dag_run"].run_after


def pending_inference_drop(lake: Lake, pipeline: str, marker: str) -> str | None:
    """The oldest complete drop in ``landing/<pipeline>/inference/`` not scored yet.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param marker: the marker that makes a drop complete.
    """
    from conveyor.data.drops import find_complete_drops

    root = lake.landing(pipeline, "inference")
    if root.protocol not in ("file", "local", ""):
        return _pending_on_store(root, marker)
    for drop in find_complete_drops(root, marker):
        if not (root / drop / SCORED_MARKER).exists():
            return drop
    return None


def _pending_on_store(root: ObjectStoragePath, marker: str) -> str | None:
    """:func:`pending_inference_drop` on an object store: one listing of every key below ``root``
    instead of existence checks per drop and marker (the same rules as ``find_complete_drops``).

    :param root: ``landing/<pipeline>/inference/``.
    :param marker: the marker that makes a drop complete.
    """
    from conveyor.lake import PROCESSED_MARKER

    try:
        keys = root.fs.find(root.path)
    except FileNotFoundError:
        return None
    base = root.path.rstrip("/") + "/"
    held: dict[str, set[str]] = {}
    for key in keys:
        drop, _, rest = key[len(base) :].partition("/") if key.startswith(base) else ("", "", "")
        if drop and rest:
            held.setdefault(drop, set()).add(rest)
    for drop in sorted(held):
        names = held[drop]
        if drop.startswith((".", "_")) or marker not in names or PROCESSED_MARKER in names:
            continue
        if SCORED_MARKER not in names:
            return drop
    return None


def batch_input(lake: Lake, pipeline: str, marker: str, input_uri: str | None) -> tuple[str, str | None] | None:
    """What a batch run scores: the given input, else the oldest complete, unscored inference drop.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param marker: the marker that makes a drop complete.
    :param input_uri: the run's input (Param ``input``): a file or folder inside the lake
        (:meth:`~conveyor.lake.Lake.inside`); empty for the pending drop.
    :return: the input's URI (normalised, below the lake's root) and the drop's name (None for a
        given input); None when no input is given and no drop is pending (nothing to score).
    :raises LocationRefused: the given input is not inside the lake (another scheme, host or
        bucket, or a path that leaves the root).
    """
    if input_uri:
        return lake.inside(input_uri, "Param 'input'"), None
    drop = pending_inference_drop(lake, pipeline, marker)
    if drop is None:
        return None
    return lake.uri("landing", pipeline, "inference", drop), drop


def load_run(
    result: BatchResult, *, table: str, pipeline: str, run_id: str, conn_id: str | None
) -> tuple[int, dict[str, Any]]:
    """Replace the run's rows in the predictions table with its parts' rows; the rows and the summary.

    :param result: the parts the run wrote.
    :param table: the predictions table.
    :param pipeline: the pipeline (the table's rows are keyed by pipeline and run).
    :param run_id: the run.
    :param conn_id: the lake's connection (for parts on an object store).
    """
    from conveyor.batch.warehouse import warehouse_url, write_table

    with local_copies():  # a part on an object store is fetched once for the table and the summary (one GET)
        rows = write_table(warehouse_url(), table, result.parts, run_id, pipeline=pipeline, conn_id=conn_id)
        return rows, summarize(result.parts, conn_id=conn_id)


def mark_scored(lake: Lake, pipeline: str, drop: str, run_id: str, rows: int) -> None:
    """Mark an inference drop scored (``_SCORED.json``), so the next run takes the next one.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param drop: the drop's name.
    :param run_id: the run that scored it.
    :param rows: the rows it scored.
    """
    from conveyor.lake import write_json

    write_json(lake.landing(pipeline, "inference", drop) / SCORED_MARKER, {"run_id": run_id, "rows": rows})


def summarize(parts: Sequence[str | Path | ObjectStoragePath], conn_id: str | None = None) -> dict[str, Any]:
    """The analysts' summary of a run: rows, the prediction distribution, mean probability per class.

    Returns ``{"rows", "predictions": {label: {"count", "share"}}, "mean_probability": {class: p}}``;
    for a regression (floating predictions) ``predictions`` is ``{"mean", "min", "max"}`` instead.

    :param parts: the run's Parquet part files.
    :param conn_id: the Airflow connection for non-local parts.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import pyarrow.types as t

    rows, counts = 0, Counter[str]()
    sums: dict[str, float] = {}
    present: dict[str, int] = {}
    numeric: dict[str, float] | None = None
    for part in parts:
        with opened(lake_path(part, conn_id)) as source:
            parquet = pq.ParquetFile(source)
            proba = [name for name in parquet.schema_arrow.names if name.startswith(PROBA_PREFIX)]
            for batch in parquet.iter_batches(columns=["prediction", *proba]):
                rows += batch.num_rows
                prediction = batch.column("prediction")
                if t.is_floating(prediction.type) and not proba:
                    low, high = pc.min_max(prediction).values()  # type: ignore[attr-defined]
                    total = pc.sum(prediction).as_py() or 0.0  # type: ignore[attr-defined]
                    numeric = numeric or {"sum": 0.0, "min": float("inf"), "max": float("-inf"), "n": 0}
                    numeric["sum"] += total
                    numeric["n"] += len(prediction) - prediction.null_count
                    if low.is_valid:
                        numeric["min"] = min(numeric["min"], low.as_py())
                        numeric["max"] = max(numeric["max"], high.as_py())
                else:
                    for item in pc.value_counts(prediction).to_pylist():  # type: ignore[attr-defined]
                        counts["null" if item["values"] is None else str(item["values"])] += item["counts"]
                for name in proba:
                    column = batch.column(name)
                    sums[name] = sums.get(name, 0.0) + (pc.sum(column).as_py() or 0.0)  # type: ignore[attr-defined]
                    present[name] = present.get(name, 0) + len(column) - column.null_count
    if numeric is not None:
        n = numeric["n"]
        predictions: dict[str, Any] = {
            "mean": numeric["sum"] / n if n else None,
            "min": numeric["min"] if n else None,
            "max": numeric["max"] if n else None,
        }
    else:
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        predictions = {label: {"count": count, "share": count / rows} for label, count in ordered}
    means = {name[len(PROBA_PREFIX) :]: (sums[name] / present[name] if present[name] else None) for name in sums}
    return {"rows": rows, "predictions": predictions, "mean_probability": means}
