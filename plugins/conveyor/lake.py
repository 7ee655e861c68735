"""The lake: one root URI (``file://`` or ``s3://``) and the zones below it.

Every path is an Airflow ``ObjectStoragePath`` so one code path serves a local folder, S3 and
MinIO. The root and its connection come from ``conveyor.settings``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

from conveyor import settings
from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

PROCESSED_MARKER = "_PROCESSED"
# Sub-folders of landing/<pipeline>/ that are not training drops.
RESERVED_DROPS = frozenset({"feedback", "inference"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# A dataset version as ingest names it (``conveyor.data.datasets.version_of``): ``v-`` and a hex digest.
DATASET_VERSION = re.compile(r"v-[0-9a-f]{8,64}")
_LOCAL = ("file", "local", "")


class LocationRefused(ConveyorError):
    """An input location or dataset version broke a rule (names the input and the rule); not retried."""


def safe_name(value: str) -> str:
    """A run id or drop name made safe for a file or object key (deterministic).

    :param value: the name; one made only of dots (``.``, ``..``) would name a folder above it, so it is refused.
    :raises ConveyorError: naming the value, when it is only dots (deterministic: not retried).
    """
    from conveyor.errors import ConveyorError

    name = _UNSAFE.sub("_", value).strip("_") or "_"
    if not name.strip("."):
        raise ConveyorError(f"{value!r}: rule 'a name, not . or ..': it would name the folder or its parent")
    return name


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

    def inside(self, location: str, what: str) -> str:
        """The URI of a file or folder inside the lake, for a location a person or an event gave.

        Accepted: a URI on the lake's own scheme and bucket below its root (``file:///…`` on a local
        lake, ``s3://<the lake's bucket>/<prefix>/…`` on S3), an absolute local path below the root
        (local lake), or a path relative to the root (``landing/churn/inference/d1``). Refused: any
        other scheme (``http://``, ``ftp://``…), host or bucket, a query or fragment, control
        characters, the root itself, and a path that leaves the root once normalised (``..``, and on
        a local lake a symlink pointing out of it).

        :param location: the location as given.
        :param what: the input it came from, for the error (e.g. ``Param 'input'``).
        :return: the location as a URI below :attr:`root` (normalised).
        :raises LocationRefused: the location broke one of the rules above (named in the message).
        """
        root = urlsplit(self.root if "://" in self.root else Path(self.root).resolve().as_uri())
        scheme = "file" if root.scheme in _LOCAL else root.scheme
        base = posixpath.normpath(unquote(root.path) or "/")

        def refuse(rule: str) -> LocationRefused:
            return LocationRefused(f"{what}: {location!r} is refused: {rule} (the lake is {self.root})")

        text = location.strip()
        if not text:
            raise refuse("it is empty")
        if any(ord(char) < 32 for char in text):
            raise refuse("it holds control characters")
        given = urlsplit(text) if "://" in text else None
        if given is not None:
            given_scheme = "file" if given.scheme.lower() in _LOCAL else given.scheme.lower()
            if given_scheme != scheme:
                raise refuse(f"only locations inside the lake are read, and {given.scheme}:// is not the lake's scheme")
            if given.query or given.fragment:
                raise refuse("a location has no query or fragment")
            if given.netloc.lower() not in self._hosts(root.netloc, scheme):
                raise refuse(f"host or bucket {given.netloc!r} is not the lake's")
            path = unquote(given.path)
        elif text.startswith("/"):
            if scheme != "file":
                raise refuse("a local path, and the lake is not on this machine's disk")
            path = text
        else:
            path = posixpath.join(base, text)
        normal = posixpath.normpath(path)
        if scheme == "file":  # a symlink below the root may point anywhere: compare where it leads
            base, normal = os.path.realpath(base), os.path.realpath(normal)
        prefix = base.rstrip("/") + "/"
        if not normal.startswith(prefix):
            raise refuse("once normalised it is not below the lake's root (only what is below the root is read)")
        return self.uri(*normal[len(prefix) :].split("/"))

    def _hosts(self, netloc: str, scheme: str) -> set[str]:
        """The hosts a lake URI may name: none on a local lake; the bucket, bare or with the lake's
        connection (``str(ObjectStoragePath)`` writes ``s3://<conn_id>@<bucket>/…``), on an object store.

        :param netloc: the root's host part.
        :param scheme: the root's scheme.
        """
        if scheme == "file":
            return {"", "localhost"}
        user, _, host = netloc.lower().rpartition("@")
        return {host, *(f"{name.lower()}@{host}" for name in (user, self.conn_id) if name)}


def read_bytes(path: ObjectStoragePath) -> bytes:
    """A whole (small) file's bytes: one GET on an object store, with no HEAD before it.

    (Opening a file on s3fs sends a HEAD for its size, then ranged GETs.)

    :param path: the file.
    :raises FileNotFoundError: there is no such file.
    """
    if path.protocol in _LOCAL:
        return Path(path.path).read_bytes()
    fs = path.fs
    if hasattr(fs, "max_concurrency"):  # s3fs: else it asks the size first (a HEAD) to split large reads
        return bytes(fs.cat_file(path.path, max_concurrency=1))
    return bytes(fs.cat_file(path.path))


def open_sized(path: ObjectStoragePath, size: int | None) -> Any:
    """Open a lake file for reading whose size is known (a manifest's ``bytes``): on s3fs no HEAD asks it
    first, the reads are ranged GETs. Only for immutable files (a dataset version's copy): a size that is
    wrong would cut or overrun the reads.

    :param path: the file.
    :param size: its size in bytes (None: asked, as ``path.open`` does).
    """
    if size is None or path.protocol in _LOCAL or not hasattr(path.fs, "max_concurrency"):
        return path.open("rb")
    handle = path.open("rb", size=int(size))
    raw = getattr(handle, "_obj", handle)  # s3fs's file under Airflow's lineage wrapper
    if getattr(raw, "_details", "") is None:  # its reads ask the details (a HEAD) for an ETag to compare: none
        raw.details = {"name": path.path, "size": int(size), "type": "file"}
    return handle


def read_json(path: ObjectStoragePath) -> Any:
    """Read a JSON document from the lake (one GET on an object store).

    :param path: the document.
    :raises FileNotFoundError: there is no such document.
    """
    return json.loads(read_bytes(path).decode("utf-8"))


def read_json_if_exists(path: ObjectStoragePath) -> Any | None:
    """Read a JSON document from the lake, or None when there is none (one GET: no existence check first).

    :param path: the document.
    """
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def write_json(path: ObjectStoragePath, document: Any) -> None:
    """Write a JSON document to the lake at once (:func:`write_atomic`: a reader sees the old or the new one).

    :param path: the document's place (parents created).
    :param document: what to write (JSON; other values as text).
    """
    write_atomic(path, json.dumps(document, indent=2, sort_keys=True, default=str).encode("utf-8"))


def write_atomic(path: ObjectStoragePath, payload: bytes) -> None:
    """Write a file so a reader sees the old content or the new, never part of it, and a failure keeps the old.

    On a local lake the bytes go to a hidden temporary name in the same folder (``.<name>.<hex>.tmp``:
    folder listings pass dot-names by), are flushed to disk, and replace the file in one
    ``os.replace``; the temporary file is removed when anything fails. On an object store one PUT
    of the whole object is already atomic, so the bytes are written in one object.

    :param path: the file (parents created).
    :param payload: its new content.
    """
    with replacing(path) as handle:
        handle.write(payload)


@contextlib.contextmanager
def replacing(path: ObjectStoragePath, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary handle whose bytes replace the file at once when the block ends (:func:`write_atomic`'s rule).

    Nothing changes at ``path`` when the block raises: the local temporary file is removed; on an
    object store the handle is discarded before its one PUT.

    :param path: the file (parents created).
    :param durable: flush the local file to disk before the rename (pointers and records); bulk
        copies whose completion a later document records may skip it.
    """
    make_folder(path.parent)
    if path.protocol not in _LOCAL:
        handle = path.open("wb")
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(Exception):
                raw = getattr(handle, "_obj", handle)  # inside Airflow's lineage-tracking wrapper
                raw.discard()  # fsspec's buffered file: drop the buffer (and any multipart upload)
                raw.closed = True  # so it is never flushed
            raise
        handle.close()
        return
    target = Path(path.path)
    temporary = target.with_name(f".{target.name[:200]}.{uuid.uuid4().hex[:12]}.tmp")  # within NAME_MAX
    try:
        with temporary.open("xb") as local:
            yield local
            if durable:
                local.flush()
                os.fsync(local.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


# errno values of failures that may pass on a retry: I/O and network errors, a busy or slow store
# (s3fs maps S3's 5xx and SlowDown to EIO/EREMOTEIO/EBUSY).
_TRANSIENT_ERRNO = frozenset(
    getattr(errno, name)
    for name in "EIO EREMOTEIO EBUSY EAGAIN ETIMEDOUT ECONNRESET ECONNREFUSED ECONNABORTED EHOSTUNREACH "
    "ENETUNREACH ENETDOWN ENETRESET EPIPE ESTALE".split()
    if hasattr(errno, name)
)
# AWS error codes of a store or service that is busy, throttling or failing on its side.
_TRANSIENT_CODES = frozenset(
    "InternalError InternalFailure ServiceUnavailable ServiceUnavailableException SlowDown RequestTimeout "
    "RequestTimeoutException Throttling ThrottlingException ThrottledException RequestThrottled "
    "RequestLimitExceeded TooManyRequestsException BandwidthLimitExceeded ProvisionedThroughputExceededException "
    "EC2ThrottledException".split()
)


def is_transient(error: BaseException | None) -> bool:
    """Whether an error may pass on a retry: storage 5xx or throttling, a timeout, a lost connection.

    Conveyor's own errors say it themselves (``retryable``); botocore's ``ClientError`` by its HTTP
    status (5xx, 429) or error code (``SlowDown``, ``ServiceUnavailable``…); botocore's, aiohttp's and
    requests' connection and timeout errors are transient, so are Python's ``TimeoutError`` and
    ``ConnectionError`` and an ``OSError`` whose errno is an I/O or network failure (s3fs turns S3's
    5xx into such OSErrors). An explicit cause (``raise … from``) is followed. Anything else (a file
    missing, access denied, bad content) is not.

    :param error: the error (None: not transient).
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConveyorError):
            return error.retryable
        if _transient_one(error):
            return True
        error = error.__cause__
    return False


def _transient_one(error: BaseException) -> bool:
    """:func:`is_transient` for one error, its cause not followed.

    :param error: the error.
    """
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    names = {f"{cls.__module__.split('.')[0]}.{cls.__name__}" for cls in type(error).__mro__}
    if names & {
        "botocore.ConnectionError",
        "botocore.HTTPClientError",
        "botocore.IncompleteReadError",
        "aiohttp.ClientConnectionError",
        "aiohttp.ClientPayloadError",
        "requests.ConnectionError",
        "requests.Timeout",
        "urllib3.TimeoutError",
        "urllib3.ProtocolError",
    }:
        return True
    response = getattr(error, "response", None)
    if "botocore.ClientError" in names and isinstance(response, dict):
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        code = str((response.get("Error") or {}).get("Code") or "")
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    if "requests.HTTPError" in names:
        status = int(getattr(response, "status_code", 0) or 0)
        return status >= 500 or status == 429
    return isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNO


def check_dataset_version(value: str, what: str) -> str:
    """A dataset version as ingest names it (``v-`` and a hex digest), or a clear refusal.

    :param value: the version as given.
    :param what: the input it came from, for the error (e.g. ``Param 'dataset_version'``).
    :raises LocationRefused: the value is not a dataset version's name.
    """
    if not DATASET_VERSION.fullmatch(value):
        raise LocationRefused(
            f"{what}: {value!r} is refused: a dataset version is 'v-' followed by the hex digest ingest "
            "gave it (like v-0123456789abcdef0123; see the dataset Asset's events or raw/<pipeline>/)"
        )
    return value


def copy_verified(src: ObjectStoragePath, dst: ObjectStoragePath, chunk_bytes: int) -> tuple[str, int]:
    """Stream a file to another place, hashing what was written; the copy appears whole or not at all.

    (:func:`replacing`: a copy that fails half-way, e.g. the source's store failing, leaves ``dst``
    as it was, never a truncated file or object.)

    :param src: the file to copy.
    :param dst: where to write it (parents created).
    :param chunk_bytes: bytes per read, so memory stays bounded.
    :return: the sha256 and size of the bytes copied.
    """
    if src.protocol not in _LOCAL and dst.protocol in _LOCAL:
        return _download_verified(src, Path(dst.path), chunk_bytes)
    if src.protocol in _LOCAL and dst.protocol not in _LOCAL:
        found = file_sha256(Path(src.path), chunk_bytes)
        dst.fs.put_file(src.path, dst.path)  # one PUT (multipart only past s3fs's chunk size): whole or nothing
        return found
    digest = hashlib.sha256()
    size = 0
    with src.open("rb") as reader, replacing(dst, durable=False) as writer:
        while chunk := reader.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
            writer.write(chunk)
    return digest.hexdigest(), size


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """The sha256 and size of a local file, read in chunks.

    :param path: the file.
    :param chunk_bytes: bytes per read.
    """
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as reader:
        while chunk := reader.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_of(path: ObjectStoragePath, chunk_bytes: int = 1 << 20) -> tuple[str, int]:
    """The sha256 and size of a file in the lake; on an object store from one streamed GET (no HEAD first).

    :param path: the file.
    :param chunk_bytes: bytes per read.
    :raises FileNotFoundError: there is no such file.
    """
    if path.protocol in _LOCAL:
        return file_sha256(Path(path.path), chunk_bytes)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="conveyor-sha256-") as folder:
        return _download_verified(path, Path(folder) / "object", chunk_bytes)


def _download_verified(src: ObjectStoragePath, target: Path, chunk_bytes: int) -> tuple[str, int]:
    """:func:`copy_verified` from an object store to a local file: one streamed GET (no HEAD first), written
    under a hidden temporary name and renamed into place once whole.

    :param src: the object.
    :param target: the local file (parents created).
    :param chunk_bytes: bytes per read while hashing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name[:200]}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        src.fs.get_file(src.path, str(temporary))
        found = file_sha256(temporary, chunk_bytes)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return found


def make_folder(path: ObjectStoragePath) -> None:
    """Create a folder and its parents on a local lake; nothing on an object store.

    An object store has no folders (a key's prefix exists once an object is under it), and
    ``mkdir`` there costs requests for nothing (s3fs: a HeadBucket and more per call).

    :param path: the folder.
    """
    if path.protocol in _LOCAL:
        path.mkdir(parents=True, exist_ok=True)


def remove_tree(path: ObjectStoragePath) -> None:
    """Delete a folder (or prefix) and everything below it, if it exists.

    On an object store one listing finds what to delete (no existence check first); nothing there is
    not an error.
    """
    if path.protocol in _LOCAL:
        if path.exists():
            path.fs.rm(path.path, recursive=True)
        return
    found = keys_below(path)
    if found:
        path.fs.rm(found)  # one bulk delete per thousand keys


def keys_below(path: ObjectStoragePath, recursive: bool = True) -> list[str]:
    """The objects below a prefix on an object store, from one listing (nothing there: an empty list).

    s3fs's ``find`` and ``ls`` follow an empty listing with a HEAD and more listings to tell a
    missing folder from an empty one; its ``_lsdir`` is the one listing alone.

    :param path: the prefix.
    :param recursive: every object below it; else its direct entries (objects and sub-prefixes).
    :return: the entries' paths as the filesystem names them (``bucket/key``).
    """
    fs = path.fs
    if not hasattr(fs, "_lsdir"):
        try:
            return list(fs.find(path.path) if recursive else fs.ls(path.path, detail=False))
        except FileNotFoundError:
            return []
    from fsspec.asyn import sync

    entries = sync(fs.loop, fs._lsdir, path.path.rstrip("/"), delimiter="" if recursive else "/")
    return [entry["name"] for entry in entries if not recursive or entry.get("type") != "directory"]


_UPLOADED: set[str] = set()  # what upload_tree wrote in this process (a task's own reports), see uploaded_here
_UPLOADED_MAX = 4096


def uploaded_here(path: ObjectStoragePath) -> bool:
    """Whether :func:`upload_tree` wrote this file in this process (known to exist without asking the store)."""
    return str(path) in _UPLOADED


def upload_tree(local_dir: Path, target: ObjectStoragePath) -> list[str]:
    """Copy a local folder (e.g. rendered HTML reports) into the lake; returns the relative names.

    Each file appears whole or not at all. On an object store each file is one upload (a PUT, or a
    multipart upload for a large one): no folder creation or existence checks. The files are
    remembered for :func:`uploaded_here` (a task's report links then ask the store nothing).

    :param local_dir: the folder to copy.
    :param target: where its content goes.
    """
    names = []
    for path in sorted(local_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(local_dir).as_posix()
        if target.protocol not in _LOCAL:
            (target / rel).fs.put_file(str(path), (target / rel).path)
        else:
            with path.open("rb") as reader, replacing(target / rel, durable=False) as writer:  # never half a page
                while chunk := reader.read(1 << 20):
                    writer.write(chunk)
        names.append(rel)
        if len(_UPLOADED) > _UPLOADED_MAX:
            _UPLOADED.clear()
        _UPLOADED.add(str(target / rel))  # as each file is up (a try failing half-way still links its page)
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
