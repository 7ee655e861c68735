"""``model.tar.gz``: the one artifact every backend trains into and every server loads.

Layout (the SageMaker hosting contract): ``metadata.json`` first (``ModelMetadata``: feature
schema, class labels, metrics, dataset version, code version, training baseline statistics), the
trainer's model files at the top, and ``code/`` with ``inference.py`` (the handlers ``model_fn``,
``input_fn``, ``predict_fn``, ``output_fn``) and the contract modules shipped beside it
(``conveyor.model.contract``: ``import conveyor_metadata`` works there). The train tasks also
write the same ``metadata.json`` beside every ``model.tar.gz`` in the lake.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor import settings
from conveyor.errors import ConveyorError, IntegrityError
from conveyor.registry.base import SHA256_TAG

if TYPE_CHECKING:
    from conveyor.model.metadata import ModelMetadata

TRAINER_DIRS = {"autogluon": "autogluon_tabular", "resnet": "resnet_image"}
SHA256 = re.compile(r"[0-9a-f]{64}")
logger = logging.getLogger(__name__)


class ArchiveMissing(ConveyorError, FileNotFoundError):
    """No model archive at the URI a registration or a load names."""


def trainer_dir(kind: str) -> str:
    """The folder name of a trainer in ``include/training`` and ``include/inference``."""
    return TRAINER_DIRS[kind]


def training_script(kind: str) -> Path:
    return settings.include_dir() / "training" / trainer_dir(kind) / "train.py"


def inference_code(kind: str) -> Path:
    return settings.include_dir() / "inference" / trainer_dir(kind)


def code_version(kind: str) -> str:
    """A hash of the trainer's training and inference code and the shipped contract: which code made a model.

    :param kind: the trainer (``autogluon`` or ``resnet``).
    """
    from conveyor.model.contract import shipped_files

    digest = hashlib.sha256()
    for folder in (training_script(kind).parent, inference_code(kind)):
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for path in shipped_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "c-" + digest.hexdigest()[:12]


def pack(model_dir: Path, code_dir: Path, metadata: ModelMetadata | dict[str, Any], target: Path) -> Path:
    """Write ``model.tar.gz`` from a trained model folder, the inference code and the metadata.

    Members, in order: ``metadata.json`` (first, so a reader streams only the archive's first
    blocks), the trainer's model files, ``code/`` (the inference code, then the shipped contract
    modules beside ``inference.py`` unless the code folder has its own).

    :param model_dir: what the training script wrote to ``SM_MODEL_DIR``.
    :param code_dir: the folder holding ``inference.py`` (packed as ``code/``).
    :param metadata: the full metadata (replaces the trainer's ``metadata.json``); a dict is validated.
    :param target: the archive to write.
    :raises MetadataError: a metadata dict breaks the contract.
    """
    from conveyor.model.contract import shipped_files
    from conveyor.model.metadata import FILENAME, ModelMetadata

    if not isinstance(metadata, ModelMetadata):
        metadata = ModelMetadata.from_dict(metadata, f"metadata packed into {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = metadata.dumps().encode()
    # Level 6, not tarfile's 9: forests pack ~15x faster for ~4% more bytes.
    with tarfile.open(target, "w:gz", compresslevel=6) as tar:
        info = tarfile.TarInfo(FILENAME)
        info.size, info.mtime = len(payload), int(time.time())
        tar.addfile(info, io.BytesIO(payload))
        for path in sorted(model_dir.iterdir()):
            if path.name not in {FILENAME, "code"}:
                tar.add(path, arcname=path.name)
        code = [path for path in sorted(code_dir.rglob("*")) if path.is_file() and "__pycache__" not in path.parts]
        for path in code:
            tar.add(path, arcname=f"code/{path.relative_to(code_dir).as_posix()}")
        own = {path.relative_to(code_dir).as_posix() for path in code}
        for path in shipped_files():
            if path.name not in own:
                tar.add(path, arcname=f"code/{path.name}")
    return target


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a ``model.tar.gz`` safely (no absolute paths, no links out) into ``dest``.

    The archive is extracted beside ``dest`` and renamed into place, so ``dest`` is either absent or
    complete (a crash half-way never leaves a folder a cache would take for an extracted model).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(partial, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dest


def _object_path(model_uri: str, conn_id: str | None) -> Any:
    from airflow.sdk import ObjectStoragePath

    if model_uri.startswith("file://") or "://" not in model_uri:
        return ObjectStoragePath(model_uri if "://" in model_uri else Path(model_uri).as_uri())
    return ObjectStoragePath(model_uri, conn_id=conn_id)


def archive_sha256(model_uri: str, conn_id: str | None = None) -> str:
    """The sha256 of an archive's bytes, streamed (1 MiB at a time) from the lake or any URI.

    :param model_uri: the ``model.tar.gz`` URI (``file://``, ``s3://`` or a local path).
    :param conn_id: the Airflow connection of its object store.
    :raises ArchiveMissing: there is no file at that URI.
    """
    from conveyor.lake import sha256_of

    try:
        return sha256_of(_object_path(model_uri, conn_id))[0]  # one GET on an object store
    except FileNotFoundError:
        raise ArchiveMissing(f"no model archive at {model_uri}") from None


def verified_metadata(model_uri: str, registered: RegisteredArchive, conn_id: str | None = None) -> ModelMetadata:
    """The metadata of an archive whose bytes are the registered ones, from one read of it: its sha256 is
    checked against the registry's record, then its own ``metadata.json`` is read (no sidecar GET, and
    the metadata is the verified archive's).

    :param model_uri: the ``model.tar.gz`` URI (``file://``, ``s3://`` or a local path).
    :param registered: what the registry recorded of it.
    :param conn_id: the Airflow connection of its object store.
    :raises ArchiveMissing: there is no file at that URI.
    :raises IntegrityError: its sha256 is not the recorded one.
    :raises MetadataError: it holds no valid ``metadata.json``.
    """
    import tempfile

    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified
    from conveyor.model.metadata import FILENAME, MetadataError, packed

    with tempfile.TemporaryDirectory(prefix="conveyor-archive-") as folder:
        local = Path(folder) / "model.tar.gz"
        try:
            digest, _ = copy_verified(_object_path(model_uri, conn_id), ObjectStoragePath(local.as_uri()), 1 << 20)
        except FileNotFoundError:
            raise ArchiveMissing(f"no model archive at {model_uri}") from None
        registered.verify(digest, model_uri)
        with local.open("rb") as raw:
            found = packed(raw, model_uri)
    if found is None:
        raise MetadataError(f"{model_uri}: no {FILENAME} inside it")
    return found


def checked_sha256(value: str, what: str) -> str:
    """A sha256 as 64 lower-case hex digits.

    :param value: the hash.
    :param what: what it is the hash of (named in the error).
    :raises ConveyorError: it is not a sha256.
    """
    text = str(value).strip().lower()
    if not SHA256.fullmatch(text):
        raise ConveyorError(f"{what}: {value!r} is not a sha256 (64 hexadecimal digits)")
    return text


@dataclass(frozen=True)
class RegisteredArchive:
    """What the registry recorded of a version's archive: the sha256 its bytes must have.

    :param model: the registered model.
    :param version: the version.
    :param sha256: the recorded sha256; None for a version registered before hashes were recorded.
    """

    model: str
    version: str
    sha256: str | None

    @classmethod
    def of(cls, entry: Any) -> RegisteredArchive:
        """From a registry version (``.name``, ``.version``, ``.tags``) or a resolve task's result
        (``model_name``, ``version``, ``sha256``).

        :param entry: the version or the result.
        """
        if isinstance(entry, dict):
            return cls(str(entry.get("model_name", "")), str(entry.get("version", "")), entry.get("sha256") or None)
        tags = getattr(entry, "tags", None) or {}
        return cls(str(getattr(entry, "name", "")), str(getattr(entry, "version", "")), tags.get(SHA256_TAG) or None)

    def verify(self, actual: str, source: str) -> None:
        """Refuse bytes whose sha256 is not the recorded one (or, unless allowed, when none was recorded).

        :param actual: the sha256 of the bytes read.
        :param source: the archive's URI (named in the error).
        :raises IntegrityError: the hashes differ, or none was recorded and legacy versions are not allowed.
        """
        if self.sha256 is None:
            hint = (
                f". Re-run the {self.model}__train DAG to register a new version, or, if you trust this archive,"
                f" record {actual} as the version's {SHA256_TAG!r} tag (MLflow) or metadata property (SageMaker);"
                " CONVEYOR_ALLOW_UNHASHED_MODELS=true loads such versions with a warning"
            )
            if not settings.allow_unhashed_models():
                raise IntegrityError(self.model, self.version, source, None, actual, hint)
            logger.warning(
                "%s version %s: loading %s with no recorded sha256 (CONVEYOR_ALLOW_UNHASHED_MODELS); its sha256 is %s",
                self.model,
                self.version,
                source,
                actual,
            )
            return
        if actual != self.sha256.lower():
            raise IntegrityError(self.model, self.version, source, self.sha256, actual)


def fetch(model_uri: str, dest: Path, conn_id: str | None = None, registered: RegisteredArchive | None = None) -> Path:
    """Copy a ``model.tar.gz`` from the lake (or any ObjectStoragePath URI) and extract it.

    With ``registered``, the copy's sha256 is checked against the registry's record before anything
    is extracted (so no code of a swapped archive is ever written out, let alone imported); a
    mismatch removes the copy and raises.

    :param model_uri: the archive's URI.
    :param dest: the folder to extract into (replaced when it exists).
    :param conn_id: the Airflow connection of its object store.
    :param registered: what the registry recorded of the archive (None: the caller trusts it, e.g. a
        model this run trained and has not registered yet).
    :raises IntegrityError: the archive is not the one the registry recorded.
    """
    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified

    local = dest.parent / f"{dest.name}.tar.gz"
    try:
        digest, _ = copy_verified(_object_path(model_uri, conn_id), ObjectStoragePath(local.as_uri()), 1 << 20)
        if registered is not None:
            registered.verify(digest, model_uri)
    except BaseException:
        local.unlink(missing_ok=True)
        raise
    return unpack(local, dest)


@contextlib.contextmanager
def importable(code_dir: Path) -> Iterator[None]:
    """``code_dir`` first on ``sys.path`` inside the block, its modules imported from there.

    Modules of the same names imported from anywhere else before (another model's ``code/``, the
    shipped contract folder) are dropped from ``sys.modules`` first, so this model's code imports
    the copies packed beside it.

    :param code_dir: a model's ``code/`` folder.
    """
    own = {path.stem for path in code_dir.glob("*.py")} | {path.parent.name for path in code_dir.glob("*/__init__.py")}
    for name in own & set(sys.modules):
        if _other_model_code(sys.modules[name], code_dir):
            for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[module]
    sys.path.insert(0, str(code_dir))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(code_dir))


def _other_model_code(module: Any, code_dir: Path) -> bool:
    """Whether a module of one of this model's names was imported from anywhere but its ``code/`` folder
    (another model's, the shipped contract folder, a training source folder since removed)."""
    file = getattr(module, "__file__", None)
    if not file:
        return False
    folder = Path(file).parent
    if Path(file).name == "__init__.py":
        folder = folder.parent
    return folder.resolve() != Path(code_dir).resolve()


class LoadedModel:
    """A model loaded from an extracted ``model.tar.gz`` through its own ``code/inference.py``.

    As in SageMaker's serving container, ``code/`` is importable while the handlers are imported
    and the model is loaded (``inference.py`` imports ``conveyor_metadata`` from beside it).

    :param model_dir: the extracted archive.
    """

    def __init__(self, model_dir: Path):
        from conveyor.model.metadata import read

        self.model_dir = Path(model_dir)
        self.metadata = read(self.model_dir)
        code = self.model_dir / "code"
        name = f"conveyor_inference_{hashlib.sha1(str(self.model_dir).encode()).hexdigest()[:10]}"
        spec = importlib.util.spec_from_file_location(name, code / "inference.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"{code / 'inference.py'}: not a Python module")
        self.handlers = importlib.util.module_from_spec(spec)
        with importable(code):
            spec.loader.exec_module(self.handlers)
            self.model = self.handlers.model_fn(str(self.model_dir))

    @property
    def feature_names(self) -> list[str]:
        return self.metadata.feature_names

    def predict_frame(self, frame: Any) -> Any:
        """Predictions for a pandas DataFrame holding (at least) the feature columns."""
        return self.handlers.predict_fn(frame, self.model)

    def invoke(self, body: bytes | str, content_type: str, accept: str = "application/json") -> Any:
        """The full request path a server takes: input_fn, predict_fn, output_fn."""
        data = self.handlers.input_fn(body, content_type)
        return self.handlers.output_fn(self.handlers.predict_fn(data, self.model), accept)
