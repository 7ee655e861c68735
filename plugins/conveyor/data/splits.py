"""Deterministic, stratified train/validation/test split of a dataset version, stored under the run.

``models/<pipeline>/<run>/split/{train,validation,test}/data.parquet`` plus ``split.json`` (seed,
shares, rows and class counts per part, dataset version), so every later step and every later
model of the run is judged on a known test set.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError
from conveyor.lake import Lake, make_folder, write_json

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

log = logging.getLogger(__name__)

PARTS = ("train", "validation", "test")
MIN_ROWS = 30
MIN_PER_CLASS = 3


class SplitError(ConveyorError):
    """The dataset cannot be split as the spec asks (names the rule)."""


def _classification(spec: PipelineSpec) -> bool:
    return spec.data.problem_type != "regression"


def check_splittable(frame: Any, spec: PipelineSpec, version: str) -> None:
    """Refuse a dataset that cannot give three usable parts.

    :param frame: the dataset as a pandas DataFrame.
    :param spec: the pipeline (label, problem type, split settings).
    :param version: the dataset version, for messages.
    :raises SplitError: naming the dataset version and the rule.
    """
    label = spec.data.label
    if label not in frame.columns:
        raise SplitError(f"dataset {version}: rule 'label column': {label!r} is not a column")
    labelled = frame[label].notna().sum()
    if labelled < MIN_ROWS:
        raise SplitError(
            f"dataset {version}: rule 'big enough to split': {labelled} labelled rows, at least {MIN_ROWS} needed"
        )
    if _classification(spec):
        counts = frame[label].value_counts()
        if len(counts) < 2:
            only = counts.index[0] if len(counts) else None
            raise SplitError(
                f"dataset {version}: rule 'at least 2 classes': label {label!r} has a single class {only!r}"
            )
        rare = counts[counts < MIN_PER_CLASS]
        if spec.split.stratify and len(rare):
            raise SplitError(
                f"dataset {version}: rule 'at least {MIN_PER_CLASS} rows per class to stratify': "
                f"{dict(rare.astype(int))}"
            )


def split_frame(frame: Any, spec: PipelineSpec, version: str = "") -> dict[str, Any]:
    """Split a labelled table into train, validation and test parts (seeded, stratified).

    :param frame: the dataset as a pandas DataFrame.
    :param spec: the pipeline (label, problem type, split settings).
    :param version: the dataset version, for messages.
    :raises SplitError: when a class is too rare to reach every part.
    """
    from sklearn.model_selection import train_test_split

    frame = frame[frame[spec.data.label].notna()].reset_index(drop=True)
    seed = spec.split.seed
    stratify = _classification(spec) and spec.split.stratify
    holdout = spec.split.validation + spec.split.test
    try:
        train, rest = train_test_split(
            frame, test_size=holdout, random_state=seed, stratify=frame[spec.data.label] if stratify else None
        )
        validation, test = train_test_split(
            rest,
            test_size=spec.split.test / holdout,
            random_state=seed,
            stratify=rest[spec.data.label] if stratify else None,
        )
    except ValueError as exc:
        raise SplitError(
            f"dataset {version}: rule 'enough rows of every class to stratify into train, validation and test': {exc}"
        ) from None
    return {"train": train, "validation": validation, "test": test}


def describe(parts: dict[str, Any], spec: PipelineSpec) -> dict[str, Any]:
    """Rows and, for a classifier, rows per class of every part (the split record's ``parts``).

    :param parts: the parts by name.
    :param spec: the pipeline (for the label).
    """
    summary: dict[str, Any] = {}
    for name, part in parts.items():
        entry: dict[str, Any] = {"rows": int(len(part))}
        if _classification(spec):
            entry["classes"] = {str(k): int(v) for k, v in part[spec.data.label].value_counts().sort_index().items()}
        summary[name] = entry
    return summary


def write_split(lake: Lake, spec: PipelineSpec, version: str, run_id: str, frame: Any) -> dict[str, Any]:
    """Split a dataset version and store the parts under the run; returns the split record.

    :param lake: the lake.
    :param spec: the pipeline.
    :param version: the dataset version being split.
    :param run_id: the Airflow run.
    :param frame: the dataset as a pandas DataFrame.
    """
    if spec.data.format == "images":
        frame = frame[frame["decodes"]].reset_index(drop=True)  # corrupt images within tolerance stay out
    check_splittable(frame, spec, version)
    parts = split_frame(frame, spec, version)
    for name, part in parts.items():
        if _classification(spec) and part[spec.data.label].nunique() < 2:
            raise SplitError(f"dataset {version}: rule 'every part holds 2 classes': the {name} part does not")
    root = lake.models(spec.name, run_id) / "split"
    for name, part in parts.items():
        if spec.data.format == "images":
            write_image_channel(lake, spec.name, version, part, root / name)
            continue
        buffer = io.BytesIO()
        part.to_parquet(buffer, index=False)
        target = root / name / "data.parquet"
        make_folder(target.parent)  # nothing on an object store (s3fs's mkdir is a HeadBucket)
        target.write_bytes(buffer.getvalue())
    summary = describe(parts, spec)
    record: dict[str, Any] = {
        "pipeline": spec.name,
        "dataset_version": version,
        "run_id": run_id,
        "seed": spec.split.seed,
        "shares": {"validation": spec.split.validation, "test": spec.split.test},
        "stratified": _classification(spec) and spec.split.stratify,
        "parts": summary,
        "uri": str(root),
    }
    write_json(root / "split.json", record)
    log.info("Split %s: %s", version, {k: v["rows"] for k, v in summary.items()})
    return record


def write_image_channel(lake: Lake, pipeline: str, version: str, part: Any, target: Any) -> None:
    """An image part as a training channel: the images and a ``manifest.csv`` (``path,label``).

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param version: the dataset version the images come from.
    :param part: the part's rows of the image table.
    :param target: the channel's folder.
    """
    from conveyor.lake import copy_verified

    source = lake.raw(pipeline, version) / "data"
    for rel in part["path"]:
        copy_verified(source / rel, target / rel, 1 << 20)
    (target / "manifest.csv").write_bytes(part[["path", "label"]].to_csv(index=False).encode())


def read_part(lake: Lake, pipeline: str, run_id: str, part: str) -> Any:
    """One part of a run's split as a pandas DataFrame.

    :param lake: the lake.
    :param pipeline: the pipeline's name.
    :param run_id: the run that wrote the split.
    :param part: ``train``, ``validation`` or ``test``.
    """
    import pandas as pd

    from conveyor.lake import read_bytes

    # Read whole (the frame is in memory anyway): one GET on an object store, no HEAD for the size first.
    return pd.read_parquet(io.BytesIO(read_bytes(lake.models(pipeline, run_id) / "split" / part / "data.parquet")))
