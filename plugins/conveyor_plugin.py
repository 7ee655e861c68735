"""The ``conveyor`` Airflow plugin: the report viewer, mounted in the API server at ``/conveyor``.

Airflow imports every ``.py`` file of the plugins folder looking for plugins; ``.airflowignore``
keeps it out of the ``conveyor`` package (imported normally, as ``conveyor.*``), so this file is
the one entry point. The tasks' report links are defined on the operators (``conveyor.links``).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from conveyor.links import VIEWER_PREFIX


class ConveyorPlugin(AirflowPlugin):
    name = "conveyor"

    @property
    def fastapi_apps(self) -> list[dict]:  # type: ignore[override]
        from conveyor.reports.viewer import app

        return [{"app": app, "url_prefix": VIEWER_PREFIX, "name": "Conveyor reports"}]
