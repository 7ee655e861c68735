"""A deferrable sensor on a pipeline's landing zone: done when a complete drop is there."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException

from conveyor.lake import Lake
from conveyor.operators.base import translate_errors
from conveyor.triggers.drop import DropTrigger


class DropSensor(BaseSensorOperator):
    """Wait for the oldest complete, unprocessed drop in ``landing/<pipeline>/``.

    Returns (XCom) ``{"drop": name, "pending": count}``. Deferrable by default: the wait runs in
    the triggerer and holds no worker slot. It takes the pipeline's name and marker, not its spec:
    that is all it (and its trigger, which the triggerer rebuilds from plain values) needs.

    :param pipeline: the pipeline whose landing zone is watched (``spec.name``).
    :param marker: the file that says a drop is complete (``spec.data.marker``).
    :param deferrable: wait in the triggerer rather than in a worker.
    """

    template_fields = ("pipeline", "marker")
    ui_color = "#e8f4fd"

    def __init__(self, *, pipeline: str, marker: str = "_SUCCESS", deferrable: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.marker = marker
        self.deferrable = deferrable

    def _landing(self) -> Any:
        return Lake.from_env().landing(self.pipeline)

    @translate_errors
    def poke(self, context: Any) -> PokeReturnValue:
        from conveyor.data.drops import find_complete_drops

        landing = self._landing()
        drops = find_complete_drops(landing, self.marker)
        self.log.info("Looking in %s: %s complete drop(s) waiting", landing, len(drops))
        if not drops:
            return PokeReturnValue(is_done=False)
        return PokeReturnValue(is_done=True, xcom_value={"drop": drops[0], "pending": len(drops)})

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            return super().execute(context)
        first = self.poke(context)
        if first.is_done:
            return first.xcom_value
        lake = Lake.from_env()
        self.defer(
            trigger=DropTrigger(
                landing_uri=lake.uri("landing", self.pipeline),
                conn_id=lake.conn_id,
                marker=self.marker,
                poke_interval=self.poke_interval,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout),
        )

    @translate_errors
    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") != "success":
            raise AirflowException(f"Watching the landing zone failed: {event.get('message')}")
        self.log.info("Complete drop found: %s (%s waiting)", event["drop"], event["pending"])
        return {"drop": event["drop"], "pending": event["pending"]}
