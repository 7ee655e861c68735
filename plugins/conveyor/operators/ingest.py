"""Ingest: copy a complete drop into an immutable, content-addressed dataset version."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from conveyor.errors import DropRejected
from conveyor.lake import Lake


class IngestDropOperator(BaseOperator):
    """Profile, hash and copy one drop from ``landing/`` to ``raw/<pipeline>/<version>/``.

    The same bytes always give the same version: a drop that was ingested before is not copied
    again. A drop that cannot be read as the spec says goes to quarantine with a report, and the
    task fails without retries. Returns ``{"drop", "version", "manifest_uri", "rows", "bytes",
    "already_validated"}``.

    :param pipeline: the pipeline's name.
    :param drop: the drop's folder name in ``landing/<pipeline>/`` (templated).
    """

    template_fields = ("pipeline", "drop")
    ui_color = "#fdf1e8"

    def __init__(self, *, pipeline: str, drop: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.drop = drop

    def execute(self, context: Any) -> dict[str, Any]:
        from conveyor.data.datasets import copy_drop, is_validated, load_manifest, profile_drop, version_of
        from conveyor.data.drops import drop_files, quarantine_drop
        from conveyor.spec import get_spec

        spec = get_spec(self.pipeline)
        lake = Lake.from_env()
        run_id = context["run_id"]
        source = lake.landing(self.pipeline, self.drop)
        self.log.info("Ingesting drop %s", source)
        try:
            files = drop_files(source, spec.data.marker)
            if not files:
                raise DropRejected(f"{source}: rule 'data files': the drop holds nothing but its marker")
            extra = None
            if spec.data.format == "images":
                from conveyor.data.images import TABLE, profile_image_drop, table_bytes

                entries, table = profile_image_drop(files, spec, source)
                extra = {TABLE: table_bytes(table)}
            else:
                entries = profile_drop(files, spec, spec.ingest.chunk_bytes)
        except DropRejected as exc:
            where = quarantine_drop(
                lake, self.pipeline, self.drop, run_id,
                {"stage": "ingest", "drop": self.drop, "error": str(exc)}, spec.ingest.chunk_bytes,
            )
            raise DropRejected(f"drop {self.drop!r} rejected: {exc}; kept in quarantine at {where}") from None
        version = version_of(entries)
        manifest = load_manifest(lake, self.pipeline, version)
        if manifest is None:
            self.log.info("Copying %s file(s) to dataset version %s", len(files), version)
            manifest = copy_drop(lake, spec, self.drop, files, entries, version, run_id, extra)
        else:
            self.log.info("Version %s already holds these bytes (from drop %s): not copied again", version, manifest["drop"])
        self.log.info("Dataset version %s: %s rows, %s bytes", version, manifest["rows"], manifest["bytes"])
        return {
            "drop": self.drop,
            "version": version,
            "manifest_uri": lake.uri("raw", self.pipeline, version, "manifest.json"),
            "rows": manifest["rows"],
            "bytes": manifest["bytes"],
            "already_validated": is_validated(lake, self.pipeline, version),
        }
