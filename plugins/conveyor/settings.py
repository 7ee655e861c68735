"""Where Conveyor finds its files and services; every value can be set by an environment variable.

| variable | default |
|---|---|
| ``CONVEYOR_STATE_DIR`` | ``<project>/.state`` (AIRFLOW_HOME, SQLite stores, the local lake) |
| ``CONVEYOR_INCLUDE_DIR`` | ``<project>/include`` (pipelines, expectation suites, training code) |
| ``CONVEYOR_LAKE_URI`` | ``file://<state>/lake`` |
| ``CONVEYOR_LAKE_CONN_ID`` | none for local files, ``aws_default`` for ``s3://`` |
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """The project-local state folder."""
    return Path(os.environ.get("CONVEYOR_STATE_DIR", PROJECT_ROOT / ".state"))


def include_dir() -> Path:
    """The folder of pipelines, expectation suites, training and inference code."""
    return Path(os.environ.get("CONVEYOR_INCLUDE_DIR", PROJECT_ROOT / "include"))


def pipelines_dir() -> Path:
    return include_dir() / "pipelines"


def expectations_dir() -> Path:
    return include_dir() / "expectations"


def lake_uri() -> str:
    """The lake root URI."""
    return os.environ.get("CONVEYOR_LAKE_URI") or (state_dir() / "lake").as_uri()


def lake_conn_id() -> str | None:
    """The Airflow connection of the lake's object store, if it has one."""
    conn_id = os.environ.get("CONVEYOR_LAKE_CONN_ID")
    if conn_id is None and lake_uri().startswith("s3://"):
        return "aws_default"
    return conn_id or None
