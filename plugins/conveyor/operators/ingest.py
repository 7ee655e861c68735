"""Ingest: copy a complete drop into an immutable, content-addressed dataset version."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from conveyor.lake import Lake
from conveyor.operators.base import pipeline_spec, translate_errors


class IngestDropOperator(BaseOperator):
    """Profile, hash and copy one drop from ``landing/`` to ``raw/<pipeline>/<version>/``.

    The same bytes always give the same version: a drop that was ingested before is not copied
    again. A drop that cannot be read as the spec says goes to quarantine with a report, and the
    task fails without retries (``AirflowFailException`` caused by ``DropRejected``). A storage
    failure (S3 5xx, timeouts, lost connections) propagates unchanged so the task's retries apply,
    and the drop is never blamed for it; any other error counts as one try of the drop
    (``_ATTEMPTS.json`` in its folder), and the ``CONVEYOR_INGEST_MAX_ATTEMPTS``-th try quarantines
    it, so no drop blocks the ones after it. Files left out of the version (names starting with
    ``_`` or ``.``, ``.crc``, ``Thumbs.db``, empty part files) are listed under ``skipped`` in the
    manifest. Returns ``{"drop", "version", "manifest_uri", "rows", "bytes", "already_validated",
    "skipped"}`` (``skipped``: how many files were left out).

    :param spec: the validated pipeline spec (its JSON dict, as the DAG factory passes it).
    :param drop: the drop's folder name in ``landing/<pipeline>/`` (templated).
    """

    template_fields = ("spec", "drop")
    template_fields_renderers = {"spec": "json"}
    ui_color = "#fdf1e8"

    def __init__(self, *, spec: Any, drop: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.drop = drop

    @translate_errors
    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.data.datasets import ingest_drop

        spec = pipeline_spec(self.spec)
        return ingest_drop(Lake.from_env(), spec, self.drop, context["run_id"])
