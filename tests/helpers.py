"""Helpers shared by the tests: writing drops, running the ingest steps outside a DAG run, the project's DAGs,
a private copy of include/, free ports and bounded waits.

Trained models for tests are in ``models.py``, the SageMaker emulators in ``sagemaker_emulator.py``.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any


def write_drop(lake: Any, name: str, files: dict[str, bytes], pipeline: str = "churn", marker: bool = True) -> None:
    """Write files (and, unless told not to, the ``_SUCCESS`` marker) as a drop in landing."""
    target = lake.landing(pipeline, name)
    target.mkdir(parents=True, exist_ok=True)
    for rel, payload in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(payload)
    if marker:
        (target / "_SUCCESS").write_bytes(b"")


def churn_csv(rows: int = 300, seed: int = 7, **changes: Any) -> bytes:
    """The demo churn table as CSV bytes, with optional column changes (name=values or None to drop)."""
    from conveyor.demo import churn_frame

    frame = churn_frame(rows, seed)
    for column, values in changes.items():
        if values is None:
            frame = frame.drop(columns=[column])
        else:
            frame[column] = values
    return frame.to_csv(index=False).encode()


def context(run_id: str = "manual__test") -> dict[str, Any]:
    """The parts of a task context Conveyor's operators read."""
    return {"run_id": run_id, "outlet_events": defaultdict(lambda: SimpleNamespace(extra=None))}


def ingest_and_validate(
    drop: str, run_id: str = "manual__test", pipeline: str = "churn", spec: dict[str, Any] | None = None
) -> tuple[dict, dict | None]:
    """Run the ingest and validate operators on a drop, as the ingest DAG does.

    :param drop: the drop's folder name in ``landing/<pipeline>/``.
    :param run_id: the run both tasks belong to.
    :param pipeline: the pipeline whose file gives the spec (read now, as the DAG factory would).
    :param spec: the spec the operators get, instead of ``pipeline_spec_dict(pipeline)``.
    """
    from conveyor.operators.ingest import IngestDropOperator
    from conveyor.operators.validate import ValidateDatasetOperator

    spec = spec if spec is not None else pipeline_spec_dict(pipeline)
    ctx = context(run_id)
    ingested = IngestDropOperator(task_id="ingest", spec=spec, drop=drop).execute(ctx)
    validated = ValidateDatasetOperator(task_id="validate", spec=spec, drop=drop, version=ingested["version"]).execute(
        ctx
    )
    return ingested, validated


def dags() -> dict[str, Any]:
    """Every DAG of the project's dags/ folder (as the DAG processor builds them), with no import error."""
    from airflow.dag_processing.dagbag import DagBag

    from conveyor import settings

    bag = DagBag(dag_folder=str(settings.PROJECT_ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags


def states(run: Any) -> dict[str, str]:
    """Task id -> state of a finished ``dag.test()`` run."""
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def private_churn(tmp_path: Any, monkeypatch: Any, replace: dict[str, str] | None = None) -> int:
    """A private copy of include/ whose churn endpoint listens on a free port, with its own MLflow
    store, state folder and warehouse; returns the port.

    :param replace: text replacements in churn.yaml (old text -> new text).
    """
    import shutil

    from conveyor import settings

    port = free_port()
    include = tmp_path / "include"
    shutil.copytree(settings.include_dir(), include)
    spec = include / "pipelines" / "churn.yaml"
    text = spec.read_text().replace("port: 8090", f"port: {port}")
    for old, new in (replace or {}).items():
        assert old in text, f"churn.yaml no longer holds {old!r}"
        text = text.replace(old, new)
    spec.write_text(text)
    monkeypatch.setenv("CONVEYOR_INCLUDE_DIR", str(include))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CONVEYOR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("CONVEYOR_WAREHOUSE_URL", f"sqlite:///{tmp_path}/warehouse.db")
    return port


def pipeline_spec_dict(name: str = "churn", **sections: Any) -> dict[str, Any]:
    """The validated spec of include/pipelines/<name>.yaml as operators receive it (a JSON dict).

    :param name: the pipeline file's name.
    :param sections: top-level sections to replace (e.g. ``trainer={...}``), revalidated by the operator.
    """
    from conveyor import settings
    from conveyor.spec import load_spec

    spec = load_spec(settings.pipelines_dir() / f"{name}.yaml").model_dump(mode="json")
    return {**spec, **sections}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition", interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy, and return that; fail the test after ``timeout`` seconds.

    :param check: called without arguments.
    :param timeout: seconds before the test fails.
    :param what: what is awaited (named in the failure).
    :param interval: seconds between calls.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
