"""What several benchmarks share: a private state folder, and a small real churn model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
TESTS = ROOT / "tests"


def isolate(tmp: Path, mlflow: bool = False) -> None:
    """Point Conveyor, Airflow (and MLflow) at a temporary folder before any of them is imported.

    :param tmp: the scratch folder; children inherit the environment.
    :param mlflow: also give MLflow a private tracking store.
    """
    os.environ.update(
        {
            "CONVEYOR_STATE_DIR": str(tmp / "state"),
            "CONVEYOR_LAKE_URI": (tmp / "lake").as_uri(),
            "AIRFLOW_HOME": str(tmp / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "GX_ANALYTICS_ENABLED": "False",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
        }
    )
    if mlflow:
        os.environ["MLFLOW_TRACKING_URI"] = (tmp / "mlruns").as_uri()
    os.environ.pop("CONVEYOR_LAKE_CONN_ID", None)
    (tmp / "lake").mkdir(parents=True, exist_ok=True)


def train_model(root: Path) -> Path:
    """The small churn model the tests use (``tests/models.py``), extracted; its folder.

    :param root: an empty scratch folder.
    """
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    from conveyor.model import artifacts
    from models import quick_churn_model

    return artifacts.unpack(quick_churn_model(root), root / "extracted")
