"""Labelled rows for retraining: predictions whose truth came back, as rows of the pipeline's dataset.

A fired trigger writes them to ``monitor/<pipeline>/retrain/<run>/labelled.parquet``
(:func:`save_labelled_rows`); the retraining run's split task adds them to the dataset version
(:func:`with_labelled_rows`), a row with an id already in the dataset replacing it.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from conveyor.errors import ConveyorError
from conveyor.lake import Lake, safe_name
from conveyor.monitoring.records import ID, read_parquet, write_parquet

if TYPE_CHECKING:
    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec


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
    frame = labelled_training_rows(rows, metadata.feature_names, spec.data.label, spec.data.id_column)
    target = lake.monitor(spec.name, "retrain", safe_name(run_id), "labelled.parquet")
    write_parquet(target, frame)
    return str(target), int(len(frame))


def with_labelled_rows(
    frame: pd.DataFrame, uri: str, spec: PipelineSpec, conn_id: str | None = None
) -> tuple[pd.DataFrame, int]:
    """A dataset plus newly labelled rows (retraining): the rows' label cast to the dataset's, a row
    with an id already in the dataset replacing it (the newer truth wins).

    :param frame: the dataset version's rows.
    :param uri: the labelled rows (``monitor/<pipeline>/retrain/<run>/labelled.parquet``).
    :param spec: the pipeline.
    :param conn_id: the lake's Airflow connection.
    :return: ``(rows, added)``.
    :raises LabelledRowsError: unreadable, or lacking a column the dataset has.
    """
    from airflow.sdk import ObjectStoragePath

    try:
        rows = read_parquet(ObjectStoragePath(uri, conn_id=conn_id))
    except Exception as exc:  # noqa: BLE001 - any read failure is the file's
        raise LabelledRowsError(f"{uri}: labelled rows cannot be read ({type(exc).__name__}: {exc})") from None
    missing = [c for c in frame.columns if c not in rows.columns]
    if missing:
        raise LabelledRowsError(
            f"{uri}: labelled rows lack dataset column(s) {missing}: features must match the dataset"
        )
    rows = rows[list(frame.columns)].copy()
    for column in frame.columns:
        try:
            if pd.api.types.is_bool_dtype(frame[column].dtype) and rows[column].dtype == object:
                rows[column] = rows[column].map(lambda v: _TRUTH[str(v).strip().lower()])
            rows[column] = rows[column].astype(frame[column].dtype)
        except (TypeError, ValueError, KeyError):
            if column == spec.data.label:
                raise LabelledRowsError(
                    f"{uri}: labels cannot be read as the dataset's label type {frame[column].dtype}"
                ) from None
    id_column = spec.data.id_column
    if id_column and id_column in frame:
        frame = frame[~frame[id_column].astype(str).isin(set(rows[id_column].astype(str)))]
    return pd.concat([frame, rows], ignore_index=True), int(len(rows))
