"""``ModelMetadata``: the typed, versioned ``metadata.json`` of every model (see ``contract``).

The definition lives in ``conveyor/model/contract/conveyor_metadata.py``, the module shipped beside
the training and inference scripts; this module is how Conveyor's own code imports it, plus the
lake-side reader of the ``metadata.json`` sidecar kept beside every ``model.tar.gz``.
"""

from __future__ import annotations

from typing import Any

from conveyor.model.contract.conveyor_metadata import (
    FILENAME,
    HISTOGRAM_BINS,
    IMAGE_CHANNELS,
    OTHER,
    PIXEL_BINS,
    QUANTILES,
    SCHEMA_VERSION,
    TOP_VALUES,
    Baseline,
    Feature,
    MetadataError,
    ModelMetadata,
    numeric_summary,
    read,
    write,
)

__all__ = [
    "FILENAME",
    "HISTOGRAM_BINS",
    "IMAGE_CHANNELS",
    "OTHER",
    "PIXEL_BINS",
    "QUANTILES",
    "SCHEMA_VERSION",
    "TOP_VALUES",
    "Baseline",
    "Feature",
    "MetadataError",
    "ModelMetadata",
    "numeric_summary",
    "read",
    "write",
    "sidecar_uri",
    "read_sidecar",
]


def sidecar_uri(model_uri: str) -> str:
    """The ``metadata.json`` kept beside a ``model.tar.gz`` (same folder).

    :param model_uri: the archive's URI.
    """
    return model_uri.rsplit("/", 1)[0] + "/" + FILENAME


def read_sidecar(model_uri: str, conn_id: str | None = None) -> ModelMetadata:
    """A model's metadata without downloading the model: the sidecar, else the archive's first member.

    :param model_uri: the ``model.tar.gz`` URI (``file://``, ``s3://`` or a local path).
    :param conn_id: the lake's connection, for object stores.
    """
    from airflow.sdk import ObjectStoragePath

    def path(uri: str) -> Any:
        if "://" not in uri:
            return ObjectStoragePath(f"file://{uri}")
        return ObjectStoragePath(uri, conn_id=None if uri.startswith("file://") else conn_id)

    from conveyor.lake import read_json

    side = path(sidecar_uri(model_uri))
    try:
        return ModelMetadata.from_dict(read_json(side), str(side))  # one GET on an object store
    except FileNotFoundError:
        pass
    with path(model_uri).open("rb") as raw:
        found = packed(raw, model_uri)
    if found is None:
        raise MetadataError(f"{model_uri}: no {FILENAME} beside it or inside it")
    return found


def packed(raw: Any, source: str) -> ModelMetadata | None:
    """The ``metadata.json`` inside a ``model.tar.gz`` stream (packed first: only its first blocks are read),
    or None when it has none.

    :param raw: the archive's bytes, as a binary stream.
    :param source: the archive's URI (named in errors).
    """
    import gzip
    import json
    import tarfile
    import zlib

    try:
        with tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == FILENAME:
                    handle = tar.extractfile(member)
                    if handle is None:
                        return None
                    document = json.loads(handle.read())
                    break
            else:
                return None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, ValueError) as exc:  # not gzip, cut, not JSON
        raise MetadataError(f"{source}: not a model.tar.gz with a readable {FILENAME} ({exc})") from exc
    return ModelMetadata.from_dict(document, f"{source}!{FILENAME}")
