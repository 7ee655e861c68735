"""A copy of the project's ``include/`` whose churn pipeline runs in ``sagemaker`` mode, for tests."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

ROLE = "arn:aws:iam::123456789012:role/conveyor-sagemaker"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/conveyor-autogluon-inference:test"


class Matches(str):
    """Equal to any string the regular expression matches in full (for names that carry a content hash)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(str(self), other) is not None

    __hash__ = str.__hash__


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested mappings merged key by key.

    :param base: the original mapping.
    :param changes: the values to set.
    """
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def sagemaker_include(target: Path, monkeypatch: Any, changes: dict[str, Any] | None = None) -> Path:
    """Copy ``include/`` to ``target``, switch churn to SageMaker (compute, registry, role, image),
    point Conveyor at it.

    :param target: an empty folder.
    :param monkeypatch: pytest's monkeypatch (sets ``CONVEYOR_INCLUDE_DIR``).
    :param changes: more changes to ``churn.yaml`` (nested mappings merged).
    """
    from conveyor import settings

    shutil.copytree(settings.PROJECT_ROOT / "include", target)
    path = target / "pipelines" / "churn.yaml"
    spec = yaml.safe_load(path.read_text())
    spec = merge(
        spec,
        {
            "compute": "sagemaker",
            "registry": "sagemaker",
            "sagemaker": {"role_arn": ROLE, "inference_image_uri": IMAGE, "aws_conn_id": "aws_default"},
        },
    )
    path.write_text(yaml.safe_dump(merge(spec, changes or {}), sort_keys=False))
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(target))
    return target
