"""Implicit checks every tabular drop passes, whatever its expectation suite says.

They run as part of validation (:mod:`conveyor.data.validation`), so a failure is an ordinary
rejection: the drop is quarantined with the report and each failure names the column and the rule.

* ``size caps``: the version's bytes and rows are within ``validation.max_bytes`` / ``max_rows``
  (checked on the manifest, before anything is loaded; image versions: rows only);
* ``spec columns``: the spec's label, id column and features are columns of the data;
* ``no raw bytes`` and ``no nested columns``: tabular pipelines hold scalar columns (a binary,
  list, struct or map column is refused by name);
* ``finite numbers``: no ``inf``/``-inf`` in a numeric column unless ``validation.allow_non_finite``
  (NaN is a missing value: the suite's null expectations judge it);
* ``binary label``: a ``binary`` problem has at most two label values;
* ``schema drift``: every column keeps the type family (number, text, boolean, time, ...) it had
  in the last validated version, no column disappears or appears; drift rejects unless
  ``validation.allow_schema_drift`` (then it is reported as a warning).

This module imports nothing heavy at the top; the functions that take frames use pandas/numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.spec import PipelineSpec

# Arrow type names (as the manifest records them) of columns a tabular pipeline cannot hold.
NESTED = (
    "list",
    "large_list",
    "fixed_size_list",
    "list_view",
    "large_list_view",
    "struct",
    "map",
    "dense_union",
    "sparse_union",
)
BYTES = ("binary", "large_binary", "fixed_size_binary", "binary_view")
_FAMILIES = (
    (("int", "uint", "float", "double", "halffloat", "decimal"), "number"),
    (("string", "large_string", "string_view", "utf8", "large_utf8"), "text"),
    (("bool",), "boolean"),
    (("timestamp", "date", "time", "duration", "interval"), "time"),
    (("dictionary",), "category"),
)


@dataclass
class CheckReport:
    """What the implicit checks found: failures reject the drop; warnings are reported only."""

    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema_drift: list[str] = field(default_factory=list)
    # Columns GX cannot be given (raw bytes, nested values): left out of the suite's run.
    unusable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _base(arrow_type: str) -> str:
    """The type's name without parameters: ``list<item: int64>`` -> ``list``, ``timestamp[us]`` -> ``timestamp``."""
    for stop in ("<", "[", "("):
        arrow_type = arrow_type.split(stop, 1)[0]
    return arrow_type.strip()


def type_family(arrow_type: str) -> str | None:
    """The family a column type belongs to for schema drift (None: an all-null column, any family).

    :param arrow_type: the Arrow type as text (``int64``, ``double``, ``string``, ``timestamp[us]``...).
    """
    base = _base(arrow_type)
    if base in ("null", "na"):
        return None
    for prefixes, family in _FAMILIES:
        if base.startswith(prefixes):
            return family
    return base


def check_caps(manifest: dict[str, Any], spec: PipelineSpec) -> list[str]:
    """Rule ``size caps``: the version is small enough to load for validation (no data is read).

    An image version's bytes are its images, which validation does not load (it reads the image
    table, one row per image): only ``max_rows`` applies to it.

    :param manifest: the version's manifest (``bytes``, ``rows``).
    :param spec: the pipeline (``validation.max_bytes``, ``validation.max_rows``).
    """
    caps = spec.validation
    problems = []
    if spec.data.format != "images" and int(manifest.get("bytes") or 0) > caps.max_bytes:
        problems.append(
            f"rule 'size caps': the drop holds {manifest['bytes']} bytes, more than validation.max_bytes "
            f"{caps.max_bytes}: split it into smaller drops or raise the cap in the pipeline file"
        )
    if int(manifest.get("rows") or 0) > caps.max_rows:
        problems.append(
            f"rule 'size caps': the drop holds {manifest['rows']} rows, more than validation.max_rows "
            f"{caps.max_rows}: split it into smaller drops or raise the cap in the pipeline file"
        )
    return problems


def check_schema(
    schema: dict[str, str],
    spec: PipelineSpec,
    previous: dict[str, str] | None = None,
    previous_version: str | None = None,
) -> CheckReport:
    """The checks a table's schema answers alone: spec columns, no raw bytes or nested columns, drift.

    :param schema: column -> Arrow type as text (the manifest's ``schema``).
    :param spec: the pipeline (label, id column, features, validation settings).
    :param previous: the schema of the last validated version, or None for the first version.
    :param previous_version: that version's name, for messages.
    """
    report = CheckReport()
    data = spec.data
    wanted = [("label", data.label)] + ([("id_column", data.id_column)] if data.id_column else [])
    wanted += [("features", name) for name in data.features or []]
    for where, name in wanted:
        if name not in schema:
            report.failures.append(
                f"rule 'spec columns': data.{where} names column {name!r}, which the data lacks "
                f"(columns: {sorted(schema)})"
            )
    for name, kind in schema.items():
        base = _base(kind)
        if base in BYTES:
            report.unusable.append(name)
            report.failures.append(
                f"rule 'no raw bytes': column {name!r} is {kind} (raw bytes, not text); a tabular pipeline "
                "validates and trains on text, numbers, booleans and times: store it as UTF-8 text or drop it"
            )
        elif base in NESTED:
            report.unusable.append(name)
            report.failures.append(
                f"rule 'no nested columns': column {name!r} is {kind}; a tabular pipeline holds one scalar "
                "value per cell: flatten it into columns or drop it"
            )
    if previous is not None:
        report.schema_drift = schema_drift(schema, previous, previous_version or "the last validated version")
        if report.schema_drift and not spec.validation.allow_schema_drift:
            report.failures += [
                f"{line} (set validation.allow_schema_drift: true to accept)" for line in report.schema_drift
            ]
        else:
            report.warnings += report.schema_drift
    return report


def schema_drift(schema: dict[str, str], previous: dict[str, str], previous_version: str) -> list[str]:
    """Rule ``schema drift``: columns that changed type family, disappeared or appeared since a version.

    :param schema: this version's column -> Arrow type.
    :param previous: the earlier version's column -> Arrow type.
    :param previous_version: the earlier version's name, for messages.
    """
    lines = []
    for name, kind in schema.items():
        if name not in previous:
            lines.append(f"rule 'schema drift': column {name!r} ({kind}) is new since {previous_version}")
            continue
        now, before = type_family(kind), type_family(previous[name])
        if now is not None and before is not None and now != before:
            lines.append(f"rule 'schema drift': column {name!r} was {previous[name]} in {previous_version}, now {kind}")
    for name in previous:
        if name not in schema:
            lines.append(f"rule 'schema drift': column {name!r} ({previous[name]}) of {previous_version} is missing")
    return lines


def check_values(frame: Any, spec: PipelineSpec) -> list[str]:
    """The checks that read values: finite numbers and a binary label with at most two values.

    :param frame: the table as a pandas DataFrame.
    :param spec: the pipeline (label, problem type, ``validation.allow_non_finite``).
    """
    problems = []
    for name, count in non_finite_counts(frame).items():
        if not spec.validation.allow_non_finite:
            problems.append(
                f"rule 'finite numbers': column {name!r} holds {count} infinite value(s) (inf/-inf); "
                "set validation.allow_non_finite: true to accept them"
            )
    label = spec.data.label
    if spec.data.problem_type == "binary" and label in frame.columns:
        values = frame[label].dropna().unique()
        if len(values) > 2:
            shown = sorted(map(str, values))[:10]
            problems.append(
                f"rule 'binary label': problem_type binary needs at most 2 values of {label!r}, "
                f"found {len(values)}: {shown}"
            )
    return problems


def non_finite_counts(frame: Any) -> dict[str, int]:
    """Numeric columns holding ``inf``/``-inf`` and how many such cells each has.

    :param frame: a pandas DataFrame.
    """
    import numpy as np
    import pandas as pd

    counts = {}
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_float_dtype(column.dtype):
            count = int(np.isinf(column.to_numpy(dtype="float64", na_value=np.nan)).sum())
            if count:
                counts[str(name)] = count
    return counts


def row_problems(rows: Any, spec: PipelineSpec, labels: set[Any] | None = None) -> Any:
    """Per row, the first implicit rule it breaks (None when it breaks none): for rows added to a dataset.

    :param rows: the rows as a pandas DataFrame.
    :param spec: the pipeline (label, problem type, ``validation.allow_non_finite``).
    :param labels: the label values a binary dataset has (a row with another value breaks 'binary label').
    :return: a pandas Series of reasons (or None), aligned with ``rows``.
    """
    import numpy as np
    import pandas as pd

    reasons = pd.Series([None] * len(rows), index=rows.index, dtype=object)
    if not spec.validation.allow_non_finite:
        for name in non_finite_counts(rows):
            bad = np.isinf(rows[name].to_numpy(dtype="float64", na_value=np.nan)) & reasons.isna().to_numpy()
            reasons[bad] = f"rule 'finite numbers': column {name!r} is infinite"
    label = spec.data.label
    if spec.data.problem_type == "binary" and labels is not None and len(labels) == 2 and label in rows.columns:
        bad = rows[label].notna() & ~rows[label].isin(labels) & reasons.isna()
        reasons[bad] = f"rule 'binary label': {label!r} must be one of {sorted(map(str, labels))}"
    return reasons


def frame_schema(frame: Any) -> dict[str, str]:
    """Column -> Arrow type as text of a pandas DataFrame (``binary`` for a column of bytes).

    :param frame: a pandas DataFrame.
    """
    import pyarrow as pa

    schema = {}
    for name in frame.columns:
        try:
            schema[str(name)] = str(pa.array(frame[name], from_pandas=True).type)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            schema[str(name)] = "mixed"
    return schema
