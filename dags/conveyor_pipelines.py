"""Conveyor's Airflow DAGs: one family per pipeline file in ``include/pipelines/``.

Adding a use case means adding a YAML file and an expectation suite; nothing here changes.
This file never fails: a pipeline that does not build is left out, and its error is the import
error of ``conveyor_pipeline_errors.py`` (Airflow would hide every DAG of a file that fails).
"""

from conveyor.factory import build_all

globals().update(build_all())
