"""``model.tar.gz``: the one artifact every backend trains into and every server loads.

Layout (the SageMaker hosting contract): the trainer's model files at the top,
``code/inference.py`` with the handlers (``model_fn``, ``input_fn``, ``predict_fn``,
``output_fn``), and ``metadata.json`` (feature schema, class labels, metrics, dataset version,
code version, training baseline statistics).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tarfile
from pathlib import Path
from typing import Any

from conveyor import settings

TRAINER_DIRS = {"autogluon": "autogluon_tabular", "resnet": "resnet_image"}


def trainer_dir(kind: str) -> str:
    """The folder name of a trainer in ``include/training`` and ``include/inference``."""
    return TRAINER_DIRS[kind]


def training_script(kind: str) -> Path:
    return settings.include_dir() / "training" / trainer_dir(kind) / "train.py"


def inference_code(kind: str) -> Path:
    return settings.include_dir() / "inference" / trainer_dir(kind)


def code_version(kind: str) -> str:
    """A hash of the trainer's training and inference code: which code made a model."""
    digest = hashlib.sha256()
    for folder in (training_script(kind).parent, inference_code(kind)):
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "c-" + digest.hexdigest()[:12]


def pack(model_dir: Path, code_dir: Path, metadata: dict[str, Any], target: Path) -> Path:
    """Write ``model.tar.gz`` from a trained model folder, the inference code and the metadata.

    :param model_dir: what the training script wrote to ``SM_MODEL_DIR``.
    :param code_dir: the folder holding ``inference.py`` (packed as ``code/``).
    :param metadata: the full metadata (replaces the trainer's ``metadata.json``).
    :param target: the archive to write.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Level 6, not tarfile's 9: forests pack ~15x faster for ~4% more bytes.
    with tarfile.open(target, "w:gz", compresslevel=6) as tar:
        for path in sorted(model_dir.iterdir()):
            if path.name not in {"metadata.json", "code"}:
                tar.add(path, arcname=path.name)
        for path in sorted(code_dir.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                tar.add(path, arcname=f"code/{path.relative_to(code_dir).as_posix()}")
        payload = json.dumps(metadata, indent=2, sort_keys=True, default=str).encode()
        info = tarfile.TarInfo("metadata.json")
        info.size = len(payload)
        import io

        tar.addfile(info, io.BytesIO(payload))
    return target


def unpack(archive: Path, dest: Path) -> Path:
    """Extract a ``model.tar.gz`` safely (no absolute paths, no links out) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def fetch(model_uri: str, dest: Path, conn_id: str | None = None) -> Path:
    """Copy a ``model.tar.gz`` from the lake (or any ObjectStoragePath URI) and extract it."""
    from airflow.sdk import ObjectStoragePath

    from conveyor.lake import copy_verified

    local = dest.parent / f"{dest.name}.tar.gz"
    if model_uri.startswith("file://") or "://" not in model_uri:
        source = ObjectStoragePath(model_uri if "://" in model_uri else Path(model_uri).as_uri())
    else:
        source = ObjectStoragePath(model_uri, conn_id=conn_id)
    copy_verified(source, ObjectStoragePath(local.as_uri()), 1 << 20)
    return unpack(local, dest)


class LoadedModel:
    """A model loaded from an extracted ``model.tar.gz`` through its own ``code/inference.py``.

    :param model_dir: the extracted archive.
    """

    def __init__(self, model_dir: Path):
        from conveyor.model.metadata import read

        self.model_dir = Path(model_dir)
        self.metadata = read(self.model_dir)
        name = f"conveyor_inference_{hashlib.sha1(str(self.model_dir).encode()).hexdigest()[:10]}"
        spec = importlib.util.spec_from_file_location(name, self.model_dir / "code" / "inference.py")
        self.handlers = importlib.util.module_from_spec(spec)
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
