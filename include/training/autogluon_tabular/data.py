"""Data of the AutoGluon tabular trainer: a channel's ``.parquet`` / ``.csv`` files, the label
checks, and both channels made ready to fit (id column dropped, validation in training's column order).

Also the trainer's :class:`TrainingInputError` and progress lines. A sibling of ``train.py``,
imported as a plain module (SageMaker puts the source folder on ``sys.path``; ``python train.py``
puts the script's folder there). It imports nothing from Airflow or Conveyor.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz")


class TrainingInputError(ValueError):
    """Bad input data or options: the CLI reports it as ``train.py: <message>`` and exits 1."""


def log(message: str) -> None:
    """Print one progress line to stdout at once, so a parent process can stream it.

    :param message: the line to print.
    """
    print(f"[train.py] {message}", flush=True)


def list_data_files(folder: Path | None, channel: str, env_name: str) -> list[Path]:
    """The data files of a channel folder, sorted, searched recursively; hidden files skipped.

    :param folder: the channel folder.
    :param channel: the channel's name, for messages.
    :param env_name: the environment variable that names it, for messages.
    """
    if folder is None:
        raise TrainingInputError(f"{channel} channel: no folder given (set {env_name} or pass --{channel})")
    if not folder.is_dir():
        raise TrainingInputError(f"{channel} channel: folder {folder} does not exist")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.name.lower().endswith(DATA_SUFFIXES)
        and not any(part.startswith((".", "_")) for part in path.relative_to(folder).parts)
    )
    if not files:
        raise TrainingInputError(f"{channel} channel: folder {folder} holds no data file ({', '.join(DATA_SUFFIXES)})")
    return files


def read_channel(folder: Path | None, channel: str, env_name: str) -> pd.DataFrame:
    """Read and concatenate every data file of a channel; all files must have the same columns.

    :param folder: the channel folder.
    :param channel: the channel's name, for messages.
    :param env_name: the environment variable that names it, for messages.
    """
    frames = []
    for path in list_data_files(folder, channel, env_name):
        try:
            if path.name.lower().endswith((".parquet", ".pq")):
                frame = pd.read_parquet(path)
            else:
                frame = pd.read_csv(path, low_memory=False)
        except Exception as error:  # noqa: BLE001 - any reader failure is bad input here
            raise TrainingInputError(f"{channel} channel: cannot read {path}: {error}") from error
        if frames and list(frame.columns) != list(frames[0].columns):
            if set(frame.columns) != set(frames[0].columns):
                raise TrainingInputError(
                    f"{channel} channel: {path.name} has columns {list(frame.columns)}, "
                    f"but the first file has {list(frames[0].columns)}"
                )
            frame = frame[list(frames[0].columns)]
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if data.empty:
        raise TrainingInputError(f"{channel} data is empty: {folder} holds no rows")
    return data


def _class_list(values: pd.Series, limit: int = 10) -> str:
    """A short, readable list of distinct values.

    :param values: the distinct values.
    :param limit: how many to show at most.
    """
    shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in list(values)[:limit])
    return shown + (", ..." if len(values) > limit else "")


def check_label(data: pd.DataFrame, label: str, problem_type: str, channel: str) -> pd.DataFrame:
    """Check the label column of one channel; rows without a label are dropped (with a note).

    :param data: the channel's rows.
    :param label: the label column.
    :param problem_type: binary, multiclass or regression.
    :param channel: the channel's name, for messages.
    """
    if label not in data.columns:
        shown = ", ".join(map(str, list(data.columns)[:20])) + (", ..." if data.shape[1] > 20 else "")
        raise TrainingInputError(f"label '{label}' is not a column of the {channel} data (columns: {shown})")
    missing = int(data[label].isna().sum())
    if missing:
        if missing == len(data):
            raise TrainingInputError(f"{channel} data: label '{label}' is missing in every row")
        log(f"{channel}: dropping {missing} rows without a label")
        data = data[data[label].notna()].reset_index(drop=True)
    if problem_type == "regression":
        if not pd.api.types.is_numeric_dtype(data[label]) or pd.api.types.is_bool_dtype(data[label]):
            raise TrainingInputError(
                f"label '{label}' has dtype {data[label].dtype} in the {channel} data: "
                "problem type 'regression' needs a numeric label"
            )
    elif channel == "train":
        classes = data[label].unique()
        if len(classes) < 2:
            value = classes[0].item() if hasattr(classes[0], "item") else classes[0]
            raise TrainingInputError(f"label '{label}' has a single class {value!r}: a classifier needs at least 2")
        if problem_type == "binary" and len(classes) > 2:
            raise TrainingInputError(
                f"label '{label}' has {len(classes)} classes ({_class_list(classes)}): "
                "problem type 'binary' needs exactly 2 (use multiclass)"
            )
    return data


def prepare_data(
    train: pd.DataFrame, validation: pd.DataFrame | None, label: str, problem_type: str, id_column: str | None
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Check both channels and return them without the id column, validation in training's column order.

    :param train: the training rows.
    :param validation: the validation rows, if any.
    :param label: the label column.
    :param problem_type: binary, multiclass or regression.
    :param id_column: the row identifier column, if any.
    """
    train = check_label(train, label, problem_type, "train")
    if id_column is not None:
        if id_column == label:
            raise TrainingInputError(f"id column '{id_column}' is also the label")
        if id_column not in train.columns:
            raise TrainingInputError(f"id column '{id_column}' is not a column of the train data")
        train = train.drop(columns=[id_column])
    if train.shape[1] < 2:
        raise TrainingInputError("train data has no feature column besides the label and the id column")
    if validation is None:
        return train, None
    validation = check_label(validation, label, problem_type, "validation")
    missing = [c for c in train.columns if c not in validation.columns]
    if missing:
        raise TrainingInputError(f"validation data lacks columns of the train data: {', '.join(map(str, missing))}")
    extra = [c for c in validation.columns if c not in train.columns and c != id_column]
    if extra:
        log(f"validation: ignoring columns absent from train: {', '.join(map(str, extra))}")
    validation = validation[list(train.columns)]
    if problem_type != "regression":
        unseen = pd.Index(validation[label].unique()).difference(pd.Index(train[label].unique()))
        if len(unseen):
            raise TrainingInputError(
                f"label '{label}' has classes in the validation data never seen in training: {_class_list(unseen)}"
            )
    return train, validation
