"""Airflow import errors of the pipeline files that Conveyor refused; this file defines no DAG.

Each refused ``include/pipelines/*.yaml`` (or ``.yml``) is named with its field and rule. The DAGs
of every other pipeline come from ``conveyor_pipelines.py`` and stay active: Airflow marks every
DAG of a file with an import error stale, and this file has none to lose.
"""

from conveyor.factory import raise_pipeline_errors

raise_pipeline_errors()
