"""The SageMaker batch transform's files in the lake: its input, its output, and the rows for analysts.

A transform job sends the container lines of its input files (``SplitType: Line``, mini-batches
of at most ``MaxPayloadInMB``), each mini-batch through ``code/inference.py``'s ``input_fn`` →
``predict_fn`` → ``output_fn``, and writes each input file's answers to ``<file>.out``, in order
(``AssembleWith: Line``). A drop cannot go to it as it is: its header would reach only the first
mini-batch, and it carries the label and other columns. So, under
``predictions/<pipeline>/<run>/_transform/`` (the ``_`` keeps it out of readers of the run's
Parquet folder, like ``_SUCCESS.json``):

- ``input/part-NNNNN.csv`` — the model's features only, in ``metadata.json`` order, no header, one
  file per ``chunk_rows`` rows (SageMaker spreads files over instances); missing values are empty;
- ``ids/part-NNNNN.parquet`` — each file's id column (when the model has one), and
  ``ids/_manifest.json`` with every file's row count;
- ``output/part-NNNNN.csv.out`` — written by SageMaker: ``application/json`` answers,
  ``{"predictions": [{"prediction": …, "probabilities": {class: p}}, …]}``, one per mini-batch and line.

Loading pairs line ``i`` of a file's answers with row ``i`` of its input; a count that differs is an
error, never a guess. The rows then get the local transform's columns (``batch.scoring.output_table``)
and layout (``batch.parts.write_parts``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from conveyor.batch.readers import BatchInputError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath

    from conveyor.model.metadata import ModelMetadata

WORK = "_transform"
INPUT, IDS, OUTPUT = "input", "ids", "output"
MANIFEST = "_manifest.json"
CONTENT_TYPE = "text/csv"
ACCEPT = "application/json"


def prepare_input(
    source: str,
    metadata: ModelMetadata,
    work: ObjectStoragePath,
    chunk_rows: int,
    conn_id: str | None,
    extra: dict[str, Any] | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Write the transform's input files and id files for a source; replaces an earlier attempt's.

    :param source: the input file or folder (CSV or Parquet, as the local transform reads).
    :param metadata: the model's metadata.
    :param work: the run's ``_transform`` folder.
    :param chunk_rows: rows per input file.
    :param conn_id: the Airflow connection of the lake.
    :param extra: more for the manifest (e.g. the drop), read back by a retry.
    :param fresh: no earlier attempt can have written here (the task's first try): nothing is listed to
        clear (a job reads every file under ``input/``, so a retry clears an earlier attempt's first).
    :return: the manifest: ``{"parts": [{"name", "rows"}], "rows", "source", "model"}`` and ``extra``;
        ``model`` holds what loading needs of ``metadata.json`` (problem type, id column, classes).
    :raises BatchInputError: the source broke a rule (unreadable, missing columns, no rows, line breaks).
    """
    import pyarrow.parquet as pq

    from conveyor.batch.readers import read_chunks
    from conveyor.lake import make_folder, remove_tree, write_json

    features = metadata.feature_names
    id_column = metadata.id_column
    if not fresh:
        remove_tree(work)
    for folder in (INPUT, IDS):
        make_folder(work / folder)
    parts: list[dict[str, Any]] = []
    for index, chunk in enumerate(read_chunks(source, metadata, chunk_rows, conn_id)):
        name = f"part-{index:05d}"
        frame = chunk.select(features).to_pandas()
        _refuse_line_breaks(frame, source, sum(part["rows"] for part in parts))
        with (work / INPUT / f"{name}.csv").open("wb") as handle:
            handle.write(frame.to_csv(header=False, index=False, lineterminator="\n").encode("utf-8"))
        if id_column:
            with (work / IDS / f"{name}.parquet").open("wb") as handle:
                pq.write_table(chunk.select([id_column]), handle)
        parts.append({"name": name, "rows": chunk.num_rows})
    rows = sum(part["rows"] for part in parts)
    if rows == 0:
        raise BatchInputError(f"{source}: no rows to score (every input file is empty)")
    model = {
        "problem_type": metadata.problem_type,
        "id_column": metadata.id_column,
        "class_labels": metadata.class_labels,
    }
    manifest = {**(extra or {}), "parts": parts, "rows": rows, "source": source, "model": model}
    write_json(work / IDS / MANIFEST, manifest)
    return manifest


def _refuse_line_breaks(frame: pd.DataFrame, source: str, first_row: int) -> None:
    """Refuse text values with a line break: SageMaker splits the input at every line end.

    :param frame: the chunk's features.
    :param source: the input, for the message.
    :param first_row: the 0-based input position of the chunk's first row.
    """
    for column in frame.columns:
        if frame[column].dtype == object:
            broken = frame[column].astype("string").str.contains(r"[\r\n]", regex=True, na=False)
            if broken.any():
                row = first_row + int(broken.to_numpy().argmax()) + 1
                raise BatchInputError(
                    f"{source}: row {row}, column '{column}' holds a line break, which a "
                    "SageMaker transform (SplitType Line) cannot carry"
                )


def read_answers(path: ObjectStoragePath, class_labels: list[Any] | None) -> pd.DataFrame:
    """The answers of one ``.out`` file: ``prediction`` and ``proba_<class>`` columns, in input order.

    :param path: the output file.
    :param class_labels: the model's classes (``proba_`` columns in this order); None for a regression.
    """
    import pandas as pd

    from conveyor.batch.scoring import PROBA_PREFIX
    from conveyor.lake import read_bytes

    records: list[dict[str, Any]] = []
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()  # one GET
    except FileNotFoundError:
        raise BatchInputError(f"{path}: the transform job wrote no output for this input file") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue  # AssembleWith Line ends every mini-batch's answer with a line break
        try:
            records.extend(json.loads(line)["predictions"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BatchInputError(
                f"{path}: line {number} is not an application/json answer of code/inference.py ({exc!r})"
            ) from None
    out = pd.DataFrame({"prediction": [record.get("prediction") for record in records]})
    for label in class_labels or []:
        out[f"{PROBA_PREFIX}{label}"] = [
            float((record.get("probabilities") or {}).get(str(label), "nan")) for record in records
        ]
    return out


def load_output(
    work: ObjectStoragePath, context: dict[str, Any], manifest: dict[str, Any] | None = None
) -> Iterator[pa.Table]:
    """The output rows of a completed transform job, one table per input file, in input order.

    :param work: the run's ``_transform`` folder (its manifest says the parts and the model's columns).
    :param context: the run's constant columns for ``batch.scoring.output_table`` (model_name,
        model_version, run_id, scored_at); ``id_column`` is set here.
    :param manifest: the manifest :func:`prepare_input` returned, when known (else read from ``work``).
    :raises BatchInputError: an output file is missing, unreadable, or has another row count than its input.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conveyor.batch.scoring import output_table
    from conveyor.lake import read_bytes, read_json

    manifest = manifest or read_json(work / IDS / MANIFEST)
    model = manifest["model"]
    id_column = model["id_column"]
    labels = model["class_labels"] if model["problem_type"] in ("binary", "multiclass") else None
    start = 0
    for part in manifest["parts"]:
        answers = read_answers(work / OUTPUT / f"{part['name']}.csv.out", labels)
        if len(answers) != part["rows"]:
            raise BatchInputError(
                f"{work / OUTPUT / (part['name'] + '.csv.out')}: {len(answers)} answers for "
                f"{part['rows']} input rows: the output cannot be matched to the input"
            )
        if id_column:
            frame = pq.read_table(pa.BufferReader(read_bytes(work / IDS / f"{part['name']}.parquet"))).to_pandas()
        else:
            frame = answers.iloc[:, :0]
        yield output_table(frame, answers, start, {**context, "id_column": id_column})
        start += part["rows"]
