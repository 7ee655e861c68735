"""Checking a source: its rows kept as observations, and its drift against the baseline of the model that scored it.

A source is a finished batch run, a slice of captured endpoint traffic (one check per model version
that answered in it), or an input a person named (checked against the champion). Each function
here returns the check's ``rows``, ``report`` (:func:`conveyor.monitoring.drift.drift_report` or
:func:`~conveyor.monitoring.drift.image_drift`) and ``model_version``; a source that cannot be
checked raises (:class:`~conveyor.monitoring.drift.DriftInputError`,
:class:`~conveyor.monitoring.records.SourceError`, or the registry's lookup error) and the
caller records the error.

This module imports pandas at the top: import it inside a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.lake import Lake
from conveyor.monitoring import records
from conveyor.monitoring.drift import drift_report, image_drift

if TYPE_CHECKING:
    from conveyor.model.artifacts import LoadedModel
    from conveyor.model.metadata import ModelMetadata
    from conveyor.registry.base import RegistryHook
    from conveyor.spec import MonitorSpec, PipelineSpec


class ModelCache:
    """Model versions looked up once per task: metadata (the sidecar, no download) for baselines, and
    loaded models (fetched and unpacked) for parsing captured requests.

    :param registry: the pipeline's registry hook.
    :param pipeline: the pipeline (the registered model's name).
    :param lake: the lake (its connection reads the artifacts).
    :param scratch: a folder for the extracted archives.
    """

    def __init__(self, registry: RegistryHook, pipeline: str, lake: Lake, scratch: Path):
        self.registry, self.pipeline, self.lake, self.scratch = registry, pipeline, lake, scratch
        self._sources: dict[str, str] = {}
        self._entries: dict[str, Any] = {}
        self._metadata: dict[str, ModelMetadata] = {}
        self._loaded: dict[str, LoadedModel] = {}

    def source(self, version: str) -> str:
        """The ``model.tar.gz`` URI of a registered version.

        :param version: the version.
        """
        if version not in self._sources:
            self._entries[version] = self.registry.version(self.pipeline, version)
            self._sources[version] = str(self._entries[version].source)
        return self._sources[version]

    def metadata(self, version: str) -> ModelMetadata:
        """A version's metadata, read from the sidecar beside its archive.

        :param version: the version.
        """
        from conveyor.model.metadata import read_sidecar

        if version not in self._metadata:
            self._metadata[version] = read_sidecar(self.source(version), self.lake.conn_id)
        return self._metadata[version]

    def loaded(self, version: str) -> LoadedModel:
        """A version's model, loaded (its inference handlers parse the captured requests).

        :param version: the version.
        """
        from conveyor.model.artifacts import LoadedModel, RegisteredArchive, fetch

        if version not in self._loaded:
            source = self.source(version)
            registered = RegisteredArchive.of(self._entries[version])  # its sha256 checked before loading
            folder = fetch(source, self.scratch / f"v{version}", self.lake.conn_id, registered=registered)
            self._loaded[version] = LoadedModel(folder)
        return self._loaded[version]


def thresholds(monitor: MonitorSpec) -> dict[str, float]:
    """The drift thresholds the pipeline sets (the rest keep the drift module's defaults).

    :param monitor: the pipeline's monitor settings.
    """
    return {"psi": monitor.psi_threshold, "ks_pvalue": monitor.ks_pvalue, "missing_rate": monitor.missing_rate}


def check_batch(lake: Lake, pipeline: str, run: str, models: ModelCache, limits: dict[str, float]) -> dict[str, Any]:
    """Check a finished batch run against the baseline of the version that scored it; keep its rows.

    :param lake: the lake.
    :param pipeline: the pipeline.
    :param run: the run's folder under ``predictions/<pipeline>/``.
    :param models: the task's model cache.
    :param limits: the drift thresholds.
    """
    inputs, predictions, manifest = records.batch_rows(lake, pipeline, run)
    version = str(manifest["version"])
    metadata = models.metadata(version)
    report = drift_report(metadata, inputs, predictions["prediction"], limits)
    id_column = metadata.id_column
    ids = predictions[id_column].astype(str) if id_column and id_column in predictions else None
    observed = records.observations(
        inputs[metadata.feature_names],
        predictions,
        ids=ids,
        model_version=version,
        scored_at=str(manifest["scored_at"]),
        source="batch",
        source_id=run,
    )
    records.save_observations(lake, pipeline, "batch", run, observed)
    return {"rows": len(inputs), "report": report, "model_version": version}


def capture_groups(slices: list[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """The captured records of each slice per answering model version: ``(slice, version, records)``.

    :param slices: what :func:`conveyor.monitoring.records.capture_slices` returned.
    """
    groups = []
    for ident, lines in slices:
        by_version: dict[str, list[dict[str, Any]]] = {}
        for record in lines:
            by_version.setdefault(str(record["version"]), []).append(record)
        groups += [(ident, version, group) for version, group in sorted(by_version.items())]
    return groups


def check_capture(
    lake: Lake,
    spec: PipelineSpec,
    ident: str,
    version: str,
    lines: list[dict[str, Any]],
    models: ModelCache,
    limits: dict[str, float],
) -> dict[str, Any]:
    """Check the traffic one version answered in a capture slice against its baseline; keep its rows.

    :param lake: the lake.
    :param spec: the pipeline (images or tables).
    :param ident: the capture slice.
    :param version: the version that answered.
    :param lines: its captured records.
    :param models: the task's model cache.
    :param limits: the drift thresholds.
    """
    metadata = models.metadata(version)
    images = spec.data.format == "images"
    features, predictions, ids, versions, times = records.capture_rows(
        lines, models.loaded, metadata.id_column, images=images
    )
    answers = predictions["prediction"] if len(predictions) else None
    if images:
        names = list(features.columns)
        report = image_drift(metadata, features, answers, limits)
    else:
        names = metadata.feature_names
        report = drift_report(metadata, features, answers, limits)
    observed = records.observations(
        features[names],
        predictions,
        ids=ids,
        model_version=versions,
        scored_at=times,
        source="capture",
        source_id=f"{ident}/v{version}",
    )
    records.save_observations(lake, spec.name, "capture", f"{ident}-v{version}", observed)
    return {"rows": len(features), "report": report, "model_version": version}


def check_input(
    lake: Lake, spec: PipelineSpec, uri: str, models: ModelCache, limits: dict[str, float]
) -> dict[str, Any]:
    """Check a file or folder a person named against the champion's baseline (nothing is kept).

    :param lake: the lake.
    :param spec: the pipeline.
    :param uri: a CSV/Parquet file or folder (a plain path is local).
    :param models: the task's model cache.
    :param limits: the drift thresholds.
    :raises SourceError: no champion, or nothing to read there.
    """
    from airflow.sdk import ObjectStoragePath

    champion = models.registry.champion(spec.name)
    if champion is None:
        raise records.SourceError(f"{spec.name} has no champion model to compare {uri} with")
    metadata = models.metadata(str(champion.version))
    location = uri if "://" in uri else f"file://{uri}"
    frame = records.read_frame(ObjectStoragePath(location, conn_id=lake.conn_id))
    return {
        "rows": len(frame),
        "report": drift_report(metadata, frame, None, limits),
        "model_version": str(champion.version),
    }
