"""Feedback labels: ground truth for predictions already made, from drops or the endpoint's ``POST /feedback``.

A feedback drop is a folder ``landing/<pipeline>/feedback/<drop>/`` with its completion marker
and one or more files (``.csv``, ``.jsonl``, ``.json``, ``.parquet``) holding two columns: the
prediction's id and its true label. The id column is ``id`` or the pipeline's id column, the label
column ``label`` or the pipeline's label name.

Every row is checked; a row that breaks a rule is kept, with the rule, in
``quarantine/<pipeline>/feedback/<drop>/rejected.csv`` and the rest is accepted:

* ``unknown id``: no stored prediction has this id (feedback can only be joined with a
  prediction Conveyor made and kept: a batch row, or a captured endpoint request);
* ``label outside the class set``: a classifier's label the model does not know (a regressor's
  label must be a number);
* ``duplicate id in this drop`` / ``id already labelled``: with ``monitor.feedback_duplicates:
  first`` the first label of an id wins and a later one is rejected; with ``last`` (the default)
  or ``reject`` every label is kept and the policy picks the one that counts when labels are
  joined with predictions (``conveyor.monitoring.labelled.current_labels``), so an id still
  counts once.

A drop that cannot be read at all (no such columns, unreadable file, no rows) is rejected whole
and moved to quarantine with a report, like a bad data drop. A storage or network failure while
reading it (``conveyor.lake.is_transient``) is not the drop's fault: it propagates, the drop stays
in landing, and the task is retried.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pandas as pd

from conveyor.errors import ConveyorError
from conveyor.lake import is_transient, write_atomic

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import Lake
    from conveyor.spec import PipelineSpec

ID, LABEL = "id", "label"
FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
RULE_UNKNOWN = "unknown id: no stored prediction has this id"
RULE_CLASS = "label outside the class set"
RULE_NUMBER = "label is not a finite number (regression)"
RULE_DUPLICATE = "duplicate id in this drop: the first label wins"
RULE_LABELLED = "id already labelled: the first label wins"
RULE_MISSING = "id or label is empty"


class FeedbackDropError(ConveyorError, ValueError):
    """A feedback drop that cannot be read at all; names the file and the rule."""


def _columns(frame: pd.DataFrame, spec: PipelineSpec, name: str) -> pd.DataFrame:
    """The id and label columns of one file, renamed to ``id`` and ``label``.

    :param frame: the file's rows.
    :param spec: the pipeline (its id column and label name are accepted too).
    :param name: the file name, for errors.
    """
    columns = {str(c): c for c in frame.columns}
    id_col = next((columns[c] for c in (ID, spec.data.id_column) if c and c in columns), None)
    label_col = next((columns[c] for c in (LABEL, spec.data.label) if c in columns), None)
    if id_col is None or label_col is None:
        wanted = f"'{ID}'" + (f" (or '{spec.data.id_column}')" if spec.data.id_column else "")
        raise FeedbackDropError(
            f"{name}: a feedback file needs an id column {wanted} and a label column '{LABEL}' (or "
            f"'{spec.data.label}'); found {sorted(columns)}"
        )
    return pd.DataFrame({ID: frame[id_col], LABEL: frame[label_col]})


def read_file(path: ObjectStoragePath, spec: PipelineSpec) -> pd.DataFrame:
    """The ``id``/``label`` rows of one feedback file, both as text (None where empty).

    :param path: a ``.csv``, ``.jsonl``, ``.json`` or ``.parquet`` file.
    :param spec: the pipeline.
    :raises FeedbackDropError: an unreadable file or one without the two columns.
    """
    name = path.name
    try:
        data = path.read_bytes()
        if name.endswith(".parquet"):
            frame = pd.read_parquet(io.BytesIO(data))
        elif name.endswith(".csv"):
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""])
        elif name.endswith(".jsonl"):
            frame = pd.DataFrame([json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()])
        else:
            document = json.loads(data.decode("utf-8"))
            if isinstance(document, dict):
                # {"feedback": [...]}, columns {"id": [...], "label": [...]}, or one record
                columnar = all(isinstance(v, list) for v in document.values())
                document = document.get("feedback", document if columnar else [document])
            frame = pd.DataFrame(document)
    except FeedbackDropError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault; say which file
        if is_transient(exc):
            raise  # the store failed, not the file: the drop stays in landing and the task is retried
        raise FeedbackDropError(f"{name}: not a readable feedback file ({type(exc).__name__}: {exc})") from None
    frame = _columns(frame, spec, name)

    def text(value: Any) -> str | None:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return None
        value = str(value).strip()
        return value or None

    return pd.DataFrame({ID: [text(v) for v in frame[ID]], LABEL: [text(v) for v in frame[LABEL]]}, dtype=object)


def read_drop(files: Iterable[tuple[str, ObjectStoragePath]], spec: PipelineSpec) -> pd.DataFrame:
    """Every row of a feedback drop's files, in file order, with the file each came from.

    :param files: ``(relative name, path)`` of the drop's data files.
    :param spec: the pipeline.
    :raises FeedbackDropError: no feedback file, an unreadable one, or no rows at all.
    """
    frames = []
    names = []
    for rel, path in files:
        names.append(rel)
        if not rel.endswith(FILE_SUFFIXES):
            raise FeedbackDropError(f"{rel}: feedback files must be one of {', '.join(FILE_SUFFIXES)}")
        frame = read_file(path, spec)
        frame["file"] = rel
        frames.append(frame)
    if not frames:
        raise FeedbackDropError("the drop holds no feedback file (csv, jsonl, json or parquet with id and label)")
    rows = pd.concat(frames, ignore_index=True)
    if rows.empty:
        raise FeedbackDropError(f"{', '.join(names)}: no feedback rows (only a header?)")
    return rows


def canonical_label(value: str, classes: list[str] | None) -> str | None:
    """The class a label names (exact text, else a number written another way: ``1.0`` for ``1``), or None.

    :param value: the label as text.
    :param classes: the model's class labels as text.
    """
    if classes is None:
        return value
    if value in classes:
        return value
    lowered = {c.lower(): c for c in classes}
    if value.lower() in lowered:
        return lowered[value.lower()]
    try:
        number = float(value)
    except ValueError:
        return None
    for c in classes:
        try:
            if float(c) == number:
                return c
        except ValueError:
            continue
    return None


def check_rows(
    rows: pd.DataFrame,
    classes: list[str] | None,
    known_ids: set[str],
    labelled_ids: set[str],
    duplicates: str = "first",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split feedback rows into accepted and rejected (with the rule each broke).

    :param rows: ``id``/``label`` rows (text), in arrival order.
    :param classes: the model's class labels as text, or None for a regressor.
    :param known_ids: ids of stored predictions.
    :param labelled_ids: ids labelled by earlier feedback.
    :param duplicates: ``monitor.feedback_duplicates``: ``first`` rejects a later label of an id;
        ``last`` and ``reject`` accept it (the policy is applied where labels are joined).
    :return: ``(accepted, rejected)``; rejected has a ``rule`` column.
    """
    accepted, rejected = [], []
    seen: set[str] = set()
    if duplicates != "first":  # every label is kept; current_labels picks the one that counts
        labelled_ids = set()
    for record in rows.to_dict("records"):
        ident, label = record[ID], record[LABEL]
        rule = None
        if ident is None or label is None:
            rule = RULE_MISSING
        elif ident in labelled_ids:
            rule = RULE_LABELLED
        elif ident in seen and duplicates == "first":
            rule = RULE_DUPLICATE
        elif ident not in known_ids:
            rule = RULE_UNKNOWN
        elif classes is not None and canonical_label(label, classes) is None:
            rule = f"{RULE_CLASS} {classes}"
        elif classes is None:
            try:
                if not math.isfinite(float(label)):
                    rule = RULE_NUMBER
            except ValueError:
                rule = RULE_NUMBER
        if rule:
            rejected.append({**record, "rule": rule})
            continue
        seen.add(ident)
        accepted.append({**record, LABEL: canonical_label(label, classes)})
    columns = [*rows.columns]
    return (
        pd.DataFrame(accepted, columns=columns, dtype=object),
        pd.DataFrame(rejected, columns=[*columns, "rule"], dtype=object),
    )


def feedback_records(payload: Any) -> list[dict[str, str]]:
    """The ``{"id", "label"}`` records of a ``POST /feedback`` body (one object, a list, or ``{"feedback": [...]}``).

    :param payload: the decoded JSON body.
    :raises ValueError: naming what is wrong with the body.
    """
    if isinstance(payload, dict) and "feedback" in payload:
        payload = payload["feedback"]
    if isinstance(payload, dict):
        payload = [payload]
    if not isinstance(payload, list) or not payload:
        raise ValueError('feedback must be {"id": ..., "label": ...}, a list of them, or {"feedback": [...]}')
    records = []
    for number, item in enumerate(payload, start=1):
        if not isinstance(item, dict) or ID not in item or LABEL not in item:
            raise ValueError(f"feedback record {number}: needs 'id' and 'label'")
        ident, label = item[ID], item[LABEL]
        if ident is None or label is None or str(ident).strip() == "" or str(label).strip() == "":
            raise ValueError(f"feedback record {number}: 'id' and 'label' must not be empty")
        if isinstance(ident, (dict, list)) or isinstance(label, (dict, list)):
            raise ValueError(f"feedback record {number}: 'id' and 'label' must be plain values")
        records.append({ID: str(ident), LABEL: str(label)})
    return records


def rule_counts(rejected: pd.DataFrame) -> dict[str, int]:
    """How many rejected rows broke each counted rule: ``unknown_ids``, ``duplicates``, ``out_of_set``.

    :param rejected: the rejected rows of :func:`check_rows` (a ``rule`` column).
    """
    counts = {"unknown_ids": 0, "duplicates": 0, "out_of_set": 0}
    for rule, key in (
        (RULE_UNKNOWN, "unknown_ids"),
        (RULE_CLASS, "out_of_set"),
        (RULE_DUPLICATE, "duplicates"),
        (RULE_LABELLED, "duplicates"),
    ):
        counts[key] += int(rejected["rule"].str.startswith(rule).sum()) if len(rejected) else 0
    return counts


def save_rejected(lake: Lake, pipeline: str, drop: str, rejected: pd.DataFrame) -> ObjectStoragePath:
    """Keep a feedback drop's rejected rows, each with its rule, in ``quarantine/<pipeline>/feedback/<drop>/``.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param drop: the feedback drop's name.
    :param rejected: the rejected rows of :func:`check_rows`.
    """
    target = lake.quarantine(pipeline, f"feedback/{drop}") / "rejected.csv"
    write_atomic(target, rejected.to_csv(index=False).encode("utf-8"))
    return target
