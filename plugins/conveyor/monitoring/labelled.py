"""Labelled rows for retraining: predictions whose truth came back, as rows of the pipeline's dataset.

A fired trigger writes them to ``monitor/<pipeline>/retrain/<run>/labelled.parquet``
(:func:`save_labelled_rows`); the retraining run's split task adds them to the dataset version
(:func:`with_labelled_rows`), a row with an id already in the dataset replacing it. Before they
reach the split, the rows pass what a drop passes: the pipeline's duplicate policy
(``monitor.feedback_duplicates``), the implicit checks (``conveyor.data.checks``) and the
expectation suite, run on the dataset with the rows added. A row that fails is kept aside in
``quarantine/<pipeline>/labelled/<run>/`` (``rejected.parquet`` with a ``_rule`` column, and
``_report.json``), never silently dropped.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from conveyor.errors import ConveyorError
from conveyor.lake import Lake, is_transient, safe_name, write_json
from conveyor.monitoring.records import ID, read_parquet, write_parquet

if TYPE_CHECKING:
    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec


log = logging.getLogger(__name__)

RULE = "_rule"
_TRUTH = {"true": True, "1": True, "false": False, "0": False}  # booleans read back as text


class LabelledRowsError(ConveyorError, ValueError):
    """Newly labelled rows that cannot be added to a dataset; names the file and the rule."""


def labelled_training_rows(rows: pd.DataFrame, features: list[str], label: str, id_column: str | None) -> pd.DataFrame:
    """Labelled predictions as training rows: the features, the id column if any, and the label.

    :param rows: labelled predictions.
    :param features: the model's feature names.
    :param label: the pipeline's label column.
    :param id_column: the pipeline's id column.
    """
    frame = rows[features].copy()
    if id_column:
        frame[id_column] = rows[ID].to_numpy()
    frame[label] = rows["_label"].to_numpy()
    return frame


def save_labelled_rows(
    lake: Lake, spec: PipelineSpec, run_id: str, rows: pd.DataFrame, metadata: ModelMetadata
) -> tuple[str, int]:
    """Write the labelled predictions as training rows for a retraining run; returns ``(uri, rows)``.

    :param lake: the lake.
    :param spec: the pipeline (its label and id column).
    :param run_id: the monitor run that fired.
    :param rows: labelled predictions.
    :param metadata: the live model's metadata (its feature names).
    """
    if "received_at" in rows:  # file order is label order: the duplicate policy reads it
        rows = rows.sort_values("received_at", kind="stable")
    frame = labelled_training_rows(rows, metadata.feature_names, spec.data.label, spec.data.id_column)
    target = lake.monitor(spec.name, "retrain", safe_name(run_id), "labelled.parquet")
    write_parquet(target, frame)
    return str(target), int(len(frame))


@dataclass
class LabelledJoin:
    """A dataset with newly labelled rows added, and what happened to the rows that were not."""

    rows: pd.DataFrame
    added: int
    rejected: int = 0
    superseded: int = 0
    quarantine: str | None = None
    rules: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The counts and the quarantine folder, for the split task's result."""
        return {
            "rows": self.added,
            "rejected": self.rejected,
            "superseded": self.superseded,
            "quarantine": self.quarantine,
            "rules": self.rules,
        }


def resolve_duplicates(rows: pd.DataFrame, id_column: str, label: str, policy: str) -> tuple[pd.Series, int]:
    """Apply a duplicate policy to rows in label order (oldest first): which rows stay, and why not.

    ``last``: the most recent label of an id wins (earlier ones are superseded); ``first``: the
    first one stays; ``reject``: an id with two different labels is kept out entirely (identical
    repeats count once, the last kept).

    :param rows: the rows, oldest label first.
    :param id_column: the id column.
    :param label: the label column.
    :param policy: ``last``, ``first`` or ``reject`` (``monitor.feedback_duplicates``).
    :return: per row the rule that rejects it (``None``: kept), and how many rows were superseded.
    """
    reasons = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    ids = rows[id_column].astype(str)
    superseded = ids.duplicated(keep="first" if policy == "first" else "last")
    if policy == "reject":
        labels_per_id = rows[label].astype(str).groupby(ids).nunique()
        conflicting = ids.isin(set(labels_per_id[labels_per_id > 1].index))
        reasons[conflicting] = f"rule 'feedback_duplicates reject': id has conflicting labels in {id_column!r}"
        superseded &= ~conflicting
    return reasons, int(superseded.sum())


def current_labels(rows: pd.DataFrame, policy: str) -> pd.DataFrame:
    """Labelled predictions with at most one label per id, the one ``monitor.feedback_duplicates`` picks:
    the most recent (``last``), the first (``first``), or none for an id labelled two ways (``reject``).

    :param rows: labelled predictions (``records.joined``: ``_id``, ``_label``, ``received_at``).
    :param policy: ``last``, ``first`` or ``reject``.
    """
    if rows.empty or ID not in rows or "_label" not in rows:
        return rows
    ordered = rows.sort_values("received_at", kind="stable") if "received_at" in rows else rows
    reasons, _ = resolve_duplicates(ordered, ID, "_label", policy)
    keep = ~ordered[ID].astype(str).duplicated(keep="first" if policy == "first" else "last") & reasons.isna()
    return ordered[keep].sort_index()


def with_labelled_rows(frame: pd.DataFrame, uri: str, spec: PipelineSpec, lake: Lake, run_id: str) -> LabelledJoin:
    """A dataset plus newly labelled rows (retraining) that pass the pipeline's checks and suite; a row
    with an id already in the dataset replacing it.

    The rows' columns are cast to the dataset's; duplicates of an id are resolved by
    ``monitor.feedback_duplicates``; a row breaking an implicit check or a row-wise expectation of the
    suite (run on the dataset with the rows added) is rejected; when a table-wide expectation fails
    only with the rows added, every row is. Rejected rows go to ``quarantine/<pipeline>/labelled/<run>/``.

    :param frame: the dataset version's rows (validated).
    :param uri: the labelled rows (``monitor/<pipeline>/retrain/<run>/labelled.parquet``).
    :param spec: the pipeline.
    :param lake: the lake (its connection reads ``uri``; rejected rows are kept in its quarantine).
    :param run_id: the run adding the rows (names the quarantine folder).
    :raises LabelledRowsError: unreadable, or lacking a column the dataset has.
    """
    from conveyor.data.checks import row_problems

    original = _read_rows(frame, uri, spec, lake.conn_id)
    rows, reasons = _cast_rows(original, frame, uri, spec)
    id_column, label = spec.data.id_column, spec.data.label
    superseded = 0
    if id_column and id_column in rows:
        duplicates, superseded = resolve_duplicates(rows, id_column, label, spec.monitor.feedback_duplicates)
        reasons = reasons.where(reasons.notna(), duplicates)
        keep = ~rows[id_column].astype(str).duplicated(
            keep="first" if spec.monitor.feedback_duplicates == "first" else "last"
        )
        rows, reasons = rows[keep | reasons.notna()], reasons[keep | reasons.notna()]
    known = set(frame[label].dropna().unique()) if spec.data.problem_type == "binary" else None
    reasons = reasons.where(reasons.notna(), row_problems(rows, spec, known))
    reasons = reasons.where(reasons.notna(), _suite_problems(frame, rows[reasons.isna()], spec, run_id))
    accepted = rows[reasons.isna()]
    if id_column and id_column in frame:
        frame = frame[~frame[id_column].astype(str).isin(set(accepted[id_column].astype(str)))]
    joined = LabelledJoin(pd.concat([frame, accepted], ignore_index=True), int(len(accepted)), superseded=superseded)
    if reasons.notna().any():
        bad = reasons[reasons.notna()]
        _keep_aside(joined, original.loc[bad.index].assign(**{RULE: bad}), uri, spec, lake, run_id)
    return joined


def _read_rows(frame: pd.DataFrame, uri: str, spec: PipelineSpec, conn_id: str | None) -> pd.DataFrame:
    """The labelled rows with the dataset's columns, as stored (in file order, index 0..n-1)."""
    from airflow.sdk import ObjectStoragePath

    try:
        rows = read_parquet(ObjectStoragePath(uri, conn_id=conn_id))
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's
        if is_transient(exc):
            raise  # the store failed, not the file (an S3 5xx, a timeout): the task is retried
        raise LabelledRowsError(f"{uri}: labelled rows cannot be read ({type(exc).__name__}: {exc})") from None
    missing = [c for c in frame.columns if c not in rows.columns]
    if missing:
        raise LabelledRowsError(
            f"{uri}: labelled rows lack dataset column(s) {missing}: features must match the dataset"
        )
    return rows[list(frame.columns)].reset_index(drop=True)


def _cast_rows(rows: pd.DataFrame, frame: pd.DataFrame, uri: str, spec: PipelineSpec) -> tuple[pd.DataFrame, pd.Series]:
    """The rows cast to the dataset's column types, and per row the rule of a value that does not cast
    (a number column: that row is rejected, the others are cast)."""
    rows = rows.copy()
    reasons = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    for column in frame.columns:
        kind = frame[column].dtype
        try:
            if pd.api.types.is_bool_dtype(kind) and rows[column].dtype == object:
                rows[column] = rows[column].map(lambda v: _TRUTH[str(v).strip().lower()])
            rows[column] = rows[column].astype(kind)
        except (TypeError, ValueError, KeyError):
            if column == spec.data.label:
                raise LabelledRowsError(f"{uri}: labels cannot be read as the dataset's label type {kind}") from None
            if not pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_bool_dtype(kind):
                continue
            numbers = pd.to_numeric(rows[column], errors="coerce")
            bad = numbers.isna() & rows[column].notna()
            reasons[bad & reasons.isna()] = f"rule 'dataset types': column {column!r} is not a number ({kind})"
            filled = numbers.mask(bad, 0)  # those rows are rejected; a missing value stays missing
            try:
                rows[column] = filled.astype(kind)
            except (TypeError, ValueError):  # e.g. 1.5 in an integer column: the suite's type check judges it
                rows[column] = filled
    return rows, reasons


def _suite_problems(dataset: pd.DataFrame, rows: pd.DataFrame, spec: PipelineSpec, run_id: str) -> pd.Series:
    """Per row, the suite's failure it causes: the suite runs on the dataset with the rows added (row-wise
    expectations name rows; a table-wide failure that remains without those rows rejects every row)."""
    from conveyor.data.validation import load_suite, validate_frame

    reasons = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    if rows.empty:
        return reasons
    suite = load_suite(spec.suite_name)
    id_column = spec.data.id_column
    base = dataset
    if id_column and id_column in dataset:
        base = dataset[~dataset[id_column].astype(str).isin(set(rows[id_column].astype(str)))]
    base = base.reset_index(drop=True)
    for attempt in range(2):  # once, and again without the rows a row-wise expectation named
        candidates = rows[reasons.isna()]
        if candidates.empty:
            break
        combined = pd.concat([base, candidates.set_axis(range(len(base), len(base) + len(candidates)))])
        where = dict(zip(range(len(base), len(base) + len(candidates)), candidates.index, strict=True))
        outcome = validate_frame(
            combined, suite, run_name=f"{spec.name}-labelled-{run_id}", result_format={"result_format": "COMPLETE"}
        )
        failed = [row for row in outcome.results if not row["success"]]
        table_wide, named = [], 0
        for row, line in zip(failed, outcome.failures, strict=True):
            if "unexpected_index" not in row:
                table_wide.append(line)
                continue
            for index in row["unexpected_index"]:
                if index in where and reasons[where[index]] is None:
                    reasons[where[index]] = f"suite: {line}"
                    named += 1
        if not table_wide:
            break
        if not named or attempt == 1:  # the table-wide failure is not explained by single rows
            reasons[reasons.isna()] = f"suite (the dataset with these rows added): {table_wide[0]}"
            break
    return reasons


def _keep_aside(
    joined: LabelledJoin, rejected: pd.DataFrame, uri: str, spec: PipelineSpec, lake: Lake, run_id: str
) -> None:
    """Write the rejected rows (with their rule) and a report to ``quarantine/<pipeline>/labelled/<run>/``."""
    target = lake.quarantine(spec.name, f"labelled/{safe_name(run_id)}")
    try:
        write_parquet(target / "rejected.parquet", rejected)
    except (TypeError, ValueError):  # a column mixing types (a value that did not cast): keep it as text
        write_parquet(target / "rejected.parquet", rejected.astype(str))
    rules = rejected[RULE].str.split(":").str[0].value_counts().to_dict()
    joined.rejected, joined.quarantine, joined.rules = int(len(rejected)), str(target), rules
    write_json(
        target / "_report.json",
        {
            "source": uri,
            "run_id": run_id,
            "added": joined.added,
            "rejected": joined.rejected,
            "rules": rules,
            "examples": rejected[RULE].head(20).tolist(),
        },
    )
    log.warning(
        "%s of the labelled rows from %s failed the pipeline's checks or suite; kept aside in %s: %s",
        joined.rejected,
        uri,
        target,
        rules,
    )
