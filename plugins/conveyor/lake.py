"""The lake: one root URI (``file://`` or ``s3://``) and the zones below it.

Every path is an Airflow ``ObjectStoragePath`` so one code path serves a local folder, S3 and
MinIO. The root and its connection come from ``conveyor.settings``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor import settings

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

PROCESSED_MARKER = "_PROCESSED"
# Sub-folders of landing/<pipeline>/ that are not training drops.
RESERVED_DROPS = frozenset({"feedback", "inference"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(value: str) -> str:
    """A run id or drop name made safe for a file or object key (deterministic)."""
    return _UNSAFE.sub("_", value).strip("_") or "_"


@dataclass(frozen=True)
class Lake:
    """The zones of the lake under one root.

    :param root: the root URI, ``file:///…`` or ``s3://bucket/prefix``.
    :param conn_id: the Airflow connection for an object store, or None for local files.
    """

    root: str
    conn_id: str | None = None

    @classmethod
    def from_env(cls) -> Lake:
        """The lake configured by the environment (the embedded default when nothing is set)."""
        return cls(root=settings.lake_uri().rstrip("/"), conn_id=settings.lake_conn_id())

    def path(self, *parts: str) -> ObjectStoragePath:
        """A path below the root."""
        from airflow.sdk import ObjectStoragePath

        base = ObjectStoragePath(self.root, conn_id=self.conn_id)
        return base.joinpath(*parts) if parts else base

    def uri(self, *parts: str) -> str:
        """The URI of a path below the root, as text (for XCom, logs and reports)."""
        return "/".join([self.root, *parts])

    def landing(self, pipeline: str, *parts: str) -> ObjectStoragePath:
        """``landing/<pipeline>/…``: a drop (``landing(p, drop)``) or an inference drop
        (``landing(p, "inference", drop)``)."""
        return self.path("landing", pipeline, *parts)

    def raw(self, pipeline: str, version: str | None = None) -> ObjectStoragePath:
        return self.path("raw", pipeline, *([version] if version else []))

    def quarantine(self, pipeline: str, drop: str) -> ObjectStoragePath:
        return self.path("quarantine", pipeline, drop)

    def reports(self, pipeline: str, run_id: str) -> ObjectStoragePath:
        return self.path("reports", pipeline, safe_name(run_id))

    def models(self, pipeline: str, run_id: str) -> ObjectStoragePath:
        return self.path("models", pipeline, safe_name(run_id))

    def predictions(self, pipeline: str, run_id: str) -> ObjectStoragePath:
        return self.path("predictions", pipeline, safe_name(run_id))

    def capture(self, pipeline: str) -> ObjectStoragePath:
        return self.path("capture", pipeline)

    def monitor(self, pipeline: str, *parts: str) -> ObjectStoragePath:
        """``monitor/<pipeline>/…``: the monitor's records (observations, labels, history, triggers)."""
        return self.path("monitor", pipeline, *parts)


def read_json(path: ObjectStoragePath) -> Any:
    """Read a JSON document from the lake."""
    with path.open("r", encoding="utf-8") as handle:
        return json.load(handle)


def write_json(path: ObjectStoragePath, document: Any) -> None:
    """Write a JSON document to the lake (parents created; a whole object on object stores)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(document, indent=2, sort_keys=True, default=str).encode("utf-8")
    with path.open("wb") as handle:
        handle.write(payload)


def copy_verified(src: ObjectStoragePath, dst: ObjectStoragePath, chunk_bytes: int) -> tuple[str, int]:
    """Stream a file to another place, hashing what was written.

    :param src: the file to copy.
    :param dst: where to write it (parents created).
    :param chunk_bytes: bytes per read, so memory stays bounded.
    :return: the sha256 and size of the bytes copied.
    """
    digest = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as reader, dst.open("wb") as writer:
        while chunk := reader.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
            writer.write(chunk)
    return digest.hexdigest(), size


def remove_tree(path: ObjectStoragePath) -> None:
    """Delete a folder (or prefix) and everything below it, if it exists."""
    if path.exists():
        path.fs.rm(path.path, recursive=True)


def upload_tree(local_dir: Path, target: ObjectStoragePath) -> list[str]:
    """Copy a local folder (e.g. rendered HTML reports) into the lake; returns the relative names."""
    names = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_dir).as_posix()
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as reader, dest.open("wb") as writer:
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
            names.append(rel)
    return names


def as_local_folder(path: ObjectStoragePath, scratch: Path) -> Path:
    """A local folder with what a lake folder holds: the folder itself on a local lake, else a copy."""
    if path.protocol in ("file", "local", ""):
        return Path(path.path)
    from airflow.sdk import ObjectStoragePath

    target = scratch / path.name
    base = path.path.rstrip("/")
    for item in path.rglob("*"):
        if item.is_file():
            copy_verified(item, ObjectStoragePath((target / item.path[len(base) + 1 :]).as_uri()), 1 << 20)
    return target
