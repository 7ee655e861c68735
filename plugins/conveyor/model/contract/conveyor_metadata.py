"""The ``metadata.json`` of a Conveyor model, and the drift-baseline layout inside it (versioned).

One definition, shipped beside ``train.py`` and ``inference.py`` (it imports only the standard
library, and numpy inside the functions that summarise values) and imported by Conveyor as
``conveyor.model.metadata``. The trainer writes the fields it knows; the train task adds the run's
(pipeline, run, dataset and code versions) and packs the result as the first member of
``model.tar.gz`` and as ``metadata.json`` beside it, so nothing downloads a model to read it.

Readers call :meth:`ModelMetadata.from_dict` (or :func:`read`): an unknown ``schema_version`` is
refused with the file and the rule; keys this version does not know are kept in ``extra`` and
written back unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

SCHEMA_VERSION = 1
FILENAME = "metadata.json"

# --------------------------------------------------------------------------- drift baseline layout
# A numeric summary: count, missing rate, moments, these quantiles, and a histogram whose edges are
# the distinct deciles of the values (HISTOGRAM_BINS bins, fewer when deciles coincide).
QUANTILES: dict[str, float] = {
    "p01": 0.01,
    "p05": 0.05,
    "p25": 0.25,
    "p50": 0.50,
    "p75": 0.75,
    "p95": 0.95,
    "p99": 0.99,
}
HISTOGRAM_BINS = 10
# A categorical summary: the shares of the TOP_VALUES most frequent values, the rest under OTHER.
TOP_VALUES = 50
OTHER = "__other__"
# An image baseline: per-channel pixel statistics in PIXEL_BINS bins of [0, 1].
PIXEL_BINS = 16
IMAGE_CHANNELS = ("red", "green", "blue")


class Histogram(TypedDict):
    edges: list[float]
    counts: list[int]


class NumericSummary(TypedDict, total=False):
    kind: str  # "numeric"
    count: int
    missing_rate: float | None
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    quantiles: dict[str, float | None]
    histogram: Histogram | None


class CategoricalSummary(TypedDict, total=False):
    kind: str  # "categorical" or "boolean"
    count: int
    missing_rate: float | None
    distinct: int
    frequencies: dict[str, float]


class Baseline(TypedDict, total=False):
    """Training statistics the drift monitor compares live data with (tables, or ``kind: image``)."""

    kind: str
    rows: int
    features: dict[str, Any]  # name -> NumericSummary | CategoricalSummary | datetime summary
    label: NumericSummary  # regression
    label_distribution: dict[str, float]  # classification
    predictions: Any  # class shares, or a NumericSummary of predicted values (validation channel)
    predictions_source: dict[str, Any]
    sampled_images: int
    pixel: dict[str, Any]
    brightness: NumericSummary
    width: NumericSummary
    height: NumericSummary


def finite(value: Any) -> float | None:
    """A float, or None for NaN and infinities (``metadata.json`` is strict JSON)."""
    number = float(value)
    return number if math.isfinite(number) else None


def numeric_summary(values: Any, rows: int | None = None) -> NumericSummary:
    """The numeric summary of finite values (see the layout above).

    :param values: the column's values (non-finite ones count as missing).
    :param rows: the column's length, missing values included (default: ``len(values)``).
    """
    import numpy as np

    array = np.asarray(values, dtype="float64")
    total = len(array) if rows is None else rows
    array = array[np.isfinite(array)]
    missing = finite((total - len(array)) / total) if total else None
    summary: NumericSummary = {"kind": "numeric", "count": int(len(array)), "missing_rate": missing}
    if not len(array):
        return summary | {"mean": None, "std": None, "min": None, "max": None, "quantiles": {}, "histogram": None}
    edges = np.unique(np.quantile(array, np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)))
    if len(edges) == 1:
        edges, counts = np.array([edges[0], edges[0]]), np.array([len(array)])
    else:
        counts, _ = np.histogram(array, bins=edges)
    return summary | {
        "mean": finite(array.mean()),
        "std": finite(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": finite(array.min()),
        "max": finite(array.max()),
        "quantiles": {name: finite(np.quantile(array, q)) for name, q in QUANTILES.items()},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


# ------------------------------------------------------------------------------------- metadata


class MetadataError(ValueError):
    """A ``metadata.json`` that breaks the contract (names the file and the rule)."""


@dataclass(frozen=True)
class Feature:
    """One input of the model, in the order the model takes them."""

    name: str
    dtype: str


@dataclass(frozen=True)
class ModelMetadata:
    """What every reader of a model needs: schema, classes, scores, provenance, drift baseline.

    Trainer fields first (both trainers), then the ResNet trainer's, then what the train task adds.
    """

    trainer: str
    problem_type: str
    label: str
    features: tuple[Feature, ...]
    class_labels: list[Any] | None = None
    positive_class: Any = None
    decision_threshold: float | None = None
    eval_metric: str | None = None
    id_column: str | None = None
    best_model: str | None = None
    validation_score: float | None = None
    validation_metric: str | None = None
    validation_model: str | None = None
    validation_metrics: dict[str, Any] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    training_seconds: float | None = None
    artifact_mb: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    baseline: Baseline | None = None
    # ResNet trainer
    arch: str | None = None
    image_size: int | None = None
    preprocessing: dict[str, Any] | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped: str | None = None
    device: dict[str, Any] | None = None
    # added by the train task
    pipeline: str | None = None
    run_id: str | None = None
    dataset_version: str | None = None
    labelled: dict[str, Any] | None = None
    split: dict[str, Any] | None = None
    code_version: str | None = None
    conveyor_version: str | None = None
    backend: str | None = None
    train_seconds: float | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [feature.name for feature in self.features]

    @property
    def dtypes(self) -> dict[str, str]:
        return {feature.name: feature.dtype for feature in self.features}

    @property
    def is_classifier(self) -> bool:
        return self.problem_type != "regression"

    @classmethod
    def from_dict(cls, document: dict[str, Any], source: str = FILENAME) -> ModelMetadata:
        """Validate a parsed ``metadata.json``.

        :param document: the parsed JSON.
        :param source: where it came from (named in errors).
        :raises MetadataError: not an object, a missing required field, or a newer schema version.
        """
        if not isinstance(document, dict):
            raise MetadataError(f"{source}: must be a JSON object, got {type(document).__name__}")
        version = document.get("schema_version", 1)
        if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
            raise MetadataError(
                f"{source}: schema_version {version!r} is not supported (this Conveyor reads "
                f"1 to {SCHEMA_VERSION}); upgrade Conveyor to read this model"
            )
        missing = [name for name in ("trainer", "problem_type", "label", "features") if name not in document]
        if missing:
            raise MetadataError(f"{source}: required field(s) {', '.join(missing)} missing")
        try:
            features = tuple(Feature(str(f["name"]), str(f["dtype"])) for f in document["features"])
        except (TypeError, KeyError) as exc:
            raise MetadataError(f"{source}: field 'features' must be a list of {{name, dtype}}: {exc}") from None
        known = {f.name for f in fields(cls)} - {"extra", "features"}
        values = {k: v for k, v in document.items() if k in known}
        extra = {k: v for k, v in document.items() if k not in known and k not in ("features", "extra")}
        return cls(features=features, extra=extra, **values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``extra`` keys merged back in, ``schema_version`` set, unset fields left out)."""
        document = {k: v for k, v in asdict(self).items() if v is not None}  # absent means None
        extra = document.pop("extra")
        document["features"] = [{"name": f.name, "dtype": f.dtype} for f in self.features]
        return {**extra, **document}

    def with_run(self, **values: Any) -> ModelMetadata:
        """A copy with more fields set (what the train task adds); unknown names go to ``extra``."""
        known = {f.name for f in fields(self)}
        document = {**self.to_dict(), **values}
        unknown = {k: document.pop(k) for k in list(document) if k not in known and k not in self.extra}
        return ModelMetadata.from_dict({**document, **unknown})

    def dumps(self) -> str:
        """Strict JSON (no NaN); nested key order kept (features and top values are ordered)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=str)


def read(path: str | Path) -> ModelMetadata:
    """Read and validate a ``metadata.json`` file.

    :param path: the file (or the model folder holding it).
    """
    file = Path(path)
    if file.is_dir():
        file = file / FILENAME
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MetadataError(f"{file}: not a readable JSON file: {exc}") from None
    return ModelMetadata.from_dict(document, str(file))


def write(metadata: ModelMetadata, path: str | Path) -> Path:
    """Write ``metadata.json`` atomically (a reader never sees half a file).

    :param metadata: the metadata.
    :param path: the file (or the model folder to write it into).
    """
    file = Path(path)
    if file.is_dir():
        file = file / FILENAME
    temp = file.with_name(f".{file.name}.tmp")
    temp.write_text(metadata.dumps(), encoding="utf-8")
    temp.replace(file)
    return file


def write_fields(metadata: ModelMetadata, path: str | Path, names: Any) -> Path:
    """Write ``metadata.json`` like :func:`write`, holding only the named fields (and ``schema_version``).

    What a trainer writes: the fields it sets, in its order, and none of the others as ``null`` (a
    reader's :meth:`ModelMetadata.from_dict` gives them their defaults). Keys are not sorted: the order
    of nested dicts is meaningful (features in model order, top values most frequent first).

    :param metadata: the metadata.
    :param path: the file (or the model folder to write it into).
    :param names: the fields to write (an iterable of names, e.g. the keys of the trainer's dict).
    """
    full = {**metadata.extra, **asdict(metadata), "features": metadata.to_dict()["features"]}
    document = {name: full[name] for name in [*names, "schema_version", *metadata.extra] if name in full}
    file = Path(path)
    if file.is_dir():
        file = file / FILENAME
    temp = file.with_name(f".{file.name}.tmp")
    temp.write_text(json.dumps(document, indent=2, allow_nan=False, default=str), encoding="utf-8")
    temp.replace(file)
    return file
