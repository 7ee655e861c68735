"""Conveyor: ML pipelines on Apache Airflow 3, from a data drop to production."""

__version__ = "0.1.0"
