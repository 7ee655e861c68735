"""Test set-up: a private state folder (Airflow home, SQLite DB, lake) for the whole session.

Environment variables are set before Airflow is imported, so Airflow's configuration reads them.
Each test that touches the lake gets its own empty lake root through the ``lake`` fixture.

Markers (registered in pyproject.toml): every test outside ``tests/unit`` and ``tests/compose`` is marked by its
folder (``e2e``, ``integration``, ``distributed``) and ``slow``; so is every test that uses a fixture with a real
model (``churn_model``, the SageMaker emulators). Any other test that trains a model, runs a training script or
serves a model says ``slow`` itself. ``make test-fast`` runs ``-m "not slow"`` on tests/unit and tests/compose.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Folder -> the markers its tests get (``slow`` keeps them out of ``make test-fast``).
FOLDER_MARKERS = {
    "e2e": ("e2e", "slow"),
    "integration": ("integration", "slow"),
    "distributed": ("distributed", "slow"),
    "compose": ("compose",),
}
# Fixtures that train or run a real model: a test that uses one (directly or through another fixture) is ``slow``.
SLOW_FIXTURES = {"churn_model", "training_emulator", "transform_emulator"}
# Fixtures shared by several folders (the SageMaker emulators on moto), found without importing them by name.
pytest_plugins = ["sagemaker_emulator"]
_SESSION_STATE = Path(tempfile.mkdtemp(prefix="conveyor-test-"))

os.environ.update(
    {
        "AIRFLOW_HOME": str(_SESSION_STATE / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "CONVEYOR_STATE_DIR": str(_SESSION_STATE),
        "GX_ANALYTICS_ENABLED": "False",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT / "plugins"), os.environ.get("PYTHONPATH")])),
    }
)
os.environ.pop("CONVEYOR_LAKE_URI", None)
os.environ.pop("CONVEYOR_LAKE_CONN_ID", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test its folder's markers (FOLDER_MARKERS), and ``slow`` if it needs a real model (SLOW_FIXTURES)."""
    for item in items:
        try:
            folder = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            folder = ""
        for name in FOLDER_MARKERS.get(folder, ()):
            item.add_marker(name)
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker("slow")


@pytest.fixture(autouse=True)
def _fresh_object_stores():
    """Each test attaches its own object stores: Airflow caches one per connection id for the process, so a
    store made under one test's connection (``lake_s3`` on moto, or with no connection at all) would serve the next."""
    yield
    store = sys.modules.get("airflow.sdk.io.store")
    if store is not None:
        store._STORE_CACHE.clear()
    gc.unfreeze()  # an in-process model server froze what was alive at its load (serving/app.py): not the next test's


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) for tests that run DAGs."""
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / "airflow.db").exists():
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
            check=True,
            capture_output=True,
            env=os.environ.copy(),
        )
    return home / "airflow.db"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite database to copy per test (MLflow's first initialisation takes seconds)."""
    from conveyor.registry.mlflow import MlflowRegistryHook

    root = tmp_path_factory.mktemp("mlflow-template")
    MlflowRegistryHook(f"sqlite:///{root}/mlflow.db").client.search_experiments()
    return root / "mlflow.db"


@pytest.fixture
def lake(tmp_path, monkeypatch):
    """An empty local lake for one test; returns the ``Lake``."""
    from conveyor.lake import Lake

    root = tmp_path / "lake"
    root.mkdir()
    monkeypatch.setenv("CONVEYOR_LAKE_URI", root.as_uri())
    monkeypatch.delenv("CONVEYOR_LAKE_CONN_ID", raising=False)
    return Lake.from_env()


@pytest.fixture(scope="session")
def churn_model(tmp_path_factory) -> dict:
    """A real churn model (AutoGluon, a few seconds of training) packed as ``model.tar.gz``.

    Returns ``{"archive": Path, "dir": Path (extracted), "test": DataFrame (held-out rows with labels)}``.
    Trained once per test session; tests must not modify it.
    """
    from conveyor.demo import churn_frame
    from conveyor.model import artifacts
    from models import quick_churn_model

    root = tmp_path_factory.mktemp("churn-model")
    archive = quick_churn_model(root)
    test = churn_frame(1500, seed=3).iloc[1200:]
    return {
        "archive": archive,
        "dir": artifacts.unpack(archive, root / "extracted"),
        "test": test.reset_index(drop=True),
    }


# S3 on moto's server, shared by the integration tests and the batch tests.


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3/SageMaker server on 127.0.0.1 (an ephemeral port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_lake(moto_server, monkeypatch):
    """A fresh bucket on moto as the lake root, reached through an Airflow AWS connection."""
    import boto3

    from conveyor.lake import Lake

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"lake-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LAKE_S3", json.dumps(connection))
    monkeypatch.setenv("CONVEYOR_LAKE_URI", f"s3://{bucket}/conveyor")
    monkeypatch.setenv("CONVEYOR_LAKE_CONN_ID", "lake_s3")
    return Lake.from_env()
