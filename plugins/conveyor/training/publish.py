"""What a train task makes of a trained model folder, on every backend.

The trainer writes ``metadata.json`` with what it knows; :func:`run_metadata` adds the run's
(pipeline, run, dataset and code versions, backend, time) through ``ModelMetadata.with_run``;
:func:`publish` packs ``model.tar.gz`` (``metadata.json`` first) into the run's model folder and
writes the same ``metadata.json`` beside it (the sidecar readers use instead of the archive);
:func:`train_result` is the task's small XCom result. The local and the SageMaker train tasks both
go through these, so their models and results are alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from conveyor.model.metadata import ModelMetadata
    from conveyor.spec import PipelineSpec


class TrainedModelInvalid(ConveyorError):
    """The trainer's output breaks the model contract (no or a bad ``metadata.json``); not retried."""


def trained_metadata(model_dir: Path, source: str) -> ModelMetadata:
    """The metadata the trainer wrote into its model folder, validated.

    :param model_dir: what the training script wrote to ``SM_MODEL_DIR``.
    :param source: what made it (named in the error), e.g. the script or the training job.
    :raises TrainedModelInvalid: ``metadata.json`` is missing or breaks the contract.
    """
    from conveyor.model.metadata import FILENAME, MetadataError, read

    if not (model_dir / FILENAME).exists():
        raise TrainedModelInvalid(f"{source}: wrote no {FILENAME} (not a Conveyor trainer?)")
    try:
        return read(model_dir)
    except MetadataError as exc:
        raise TrainedModelInvalid(f"{source}: {exc}") from exc


def run_metadata(
    trained: ModelMetadata,
    spec: PipelineSpec,
    run_id: str,
    split: dict[str, Any],
    backend: str,
    train_seconds: float,
    code_version: str | None = None,
    **job: Any,
) -> ModelMetadata:
    """The model's full metadata: the trainer's, plus what the train task knows of the run.

    :param trained: what the trainer wrote (:func:`trained_metadata`).
    :param spec: the pipeline.
    :param run_id: the Airflow run.
    :param split: the split task's result (``dataset_version``, ``parts``, optionally ``labelled``).
    :param backend: ``local`` or ``sagemaker``.
    :param train_seconds: how long the training took.
    :param code_version: the code that trained it (default: this deployment's code of the trainer).
    :param job: backend facts kept in the metadata (e.g. ``training_job``, ``instance_type``).
    """
    from conveyor import __version__
    from conveyor.model import artifacts

    return trained.with_run(
        pipeline=spec.name,
        run_id=run_id,
        dataset_version=split["dataset_version"],
        labelled=split.get("labelled"),
        split=split["parts"],
        code_version=code_version or artifacts.code_version(spec.trainer.kind),
        conveyor_version=__version__,
        backend=backend,
        train_seconds=train_seconds,
        **job,
    )


def publish(
    model_dir: Path, metadata: ModelMetadata, kind: str, run_dir: ObjectStoragePath, scratch: Path
) -> tuple[ObjectStoragePath, int, str]:
    """Pack the model and put it in the lake: ``<run_dir>/model.tar.gz`` and its ``metadata.json`` sidecar.

    :param model_dir: the trained model folder.
    :param metadata: the full metadata (:func:`run_metadata`).
    :param kind: the trainer (picks the inference code packed as ``code/``).
    :param run_dir: the run's model folder in the lake (``models/<pipeline>/<run>``).
    :param scratch: a local scratch folder (the archive is built there).
    :returns: the archive in the lake, its size in bytes and its sha256 (what the register task records).
    """
    from airflow.sdk import ObjectStoragePath

    from conveyor import lake
    from conveyor.model import artifacts
    from conveyor.model.metadata import FILENAME

    archive = artifacts.pack(model_dir, artifacts.inference_code(kind), metadata, scratch / "model.tar.gz")
    target = run_dir / "model.tar.gz"
    sha256, size = lake.copy_verified(ObjectStoragePath(archive.as_uri()), target, 1 << 20)
    # The sidecar (``conveyor.model.metadata.sidecar_uri``) last: it never names an archive not yet there.
    (target.parent / FILENAME).write_text(metadata.dumps())
    return target, size, sha256


def train_result(model_uri: str, metadata: ModelMetadata, sha256: str) -> dict[str, Any]:
    """The train task's XCom result (the same on every backend).

    :param model_uri: the ``model.tar.gz`` in the lake.
    :param metadata: its full metadata.
    :param sha256: the archive's sha256 as :func:`publish` wrote it (the register task records it
        without reading the archive again).
    """
    return {
        "model_uri": model_uri,
        "sha256": sha256,
        "code_version": metadata.code_version,
        "dataset_version": metadata.dataset_version,
        "best_model": metadata.best_model,
        "validation_score": metadata.validation_score,
        "train_seconds": metadata.train_seconds,
    }
