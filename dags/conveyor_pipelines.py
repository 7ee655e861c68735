"""Conveyor's Airflow DAGs: one family per pipeline file in ``include/pipelines/``.

Adding a use case means adding a YAML file and an expectation suite; nothing here changes.
"""

from conveyor.factory import build_all

globals().update(build_all())
