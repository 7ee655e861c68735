"""A deferrable sensor on a pipeline's landing zone: done when a complete drop is there."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout, AirflowSkipException

from conveyor.lake import Lake
from conveyor.operators.base import translate_errors
from conveyor.triggers.drop import DropTrigger

# The trigger gives up at the sensor's timeout and names the incomplete drops; Airflow's own
# deferral timeout, this much later, is only the backstop.
_BACKSTOP_SECONDS = 60.0


class DropSensor(BaseSensorOperator):
    """Wait for the oldest complete, unprocessed drop in ``landing/<pipeline>/``.

    Returns (XCom) ``{"drop": name, "pending": count, "incomplete": [...]}``, where ``incomplete``
    names the drops that wait without their marker (or with one of the wrong case, ``_success``
    for ``_SUCCESS``) unchanged for longer than the sensor's timeout. When the wait times out, the
    same list is logged, pushed as the XCom ``incomplete`` and named in the timeout's message.
    Deferrable by default: the wait runs in the triggerer and holds no worker slot. It takes the
    pipeline's name and marker, not its spec: that is all it (and its trigger, which the triggerer
    rebuilds from plain values) needs.

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

    def _incomplete(self) -> list[dict[str, Any]]:
        from conveyor.data.drops import find_incomplete_drops

        return find_incomplete_drops(self._landing(), self.marker, self.timeout)

    @translate_errors
    def poke(self, context: Any) -> PokeReturnValue:
        from conveyor.data.drops import find_complete_drops

        landing = self._landing()
        drops = find_complete_drops(landing, self.marker)
        self.log.info("Looking in %s: %s complete drop(s) waiting", landing, len(drops))
        if not drops:
            return PokeReturnValue(is_done=False)
        incomplete = self._incomplete()
        self._warn(incomplete)
        return PokeReturnValue(
            is_done=True, xcom_value={"drop": drops[0], "pending": len(drops), "incomplete": incomplete}
        )

    def execute(self, context: Any) -> Any:
        if not self.deferrable:
            try:
                return super().execute(context)
            except (AirflowSensorTimeout, AirflowSkipException) as exc:
                if not isinstance(exc, AirflowSensorTimeout) and "timed out" not in str(exc):
                    raise
                raise self._timed_out(context, self._incomplete(), str(exc)) from exc
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
                deadline=time.time() + self.timeout,
                older_than=self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout + _BACKSTOP_SECONDS),
        )

    @translate_errors
    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("status") == "timeout":
            raise self._timed_out(context, event.get("incomplete", []), f"no complete drop within {self.timeout}s")
        if event.get("status") != "success":
            raise AirflowException(f"Watching the landing zone failed: {event.get('message')}")
        incomplete = event.get("incomplete", [])
        self._warn(incomplete)
        self.log.info("Complete drop found: %s (%s waiting)", event["drop"], event["pending"])
        return {"drop": event["drop"], "pending": event["pending"], "incomplete": incomplete}

    def _warn(self, incomplete: list[dict[str, Any]]) -> None:
        from conveyor.data.drops import describe_incomplete

        if incomplete:
            self.log.warning(
                "%s drop(s) in %s wait without their marker %r: %s",
                len(incomplete),
                self.pipeline,
                self.marker,
                describe_incomplete(incomplete),
            )

    def _timed_out(self, context: Any, incomplete: list[dict[str, Any]], why: str) -> AirflowException:
        """Log and push the drops that wait without their marker; the exception that ends the wait."""
        from conveyor.data.drops import describe_incomplete

        self._warn(incomplete)
        ti = context.get("ti") if hasattr(context, "get") else None
        if ti is not None:
            ti.xcom_push(key="incomplete", value=incomplete)
        names = describe_incomplete(incomplete) if incomplete else "none"
        message = f"{why}; drops waiting without their marker {self.marker!r}: {names}"
        self.log.warning("Landing zone of %s: %s", self.pipeline, message)
        return AirflowSkipException(message) if self.soft_fail else AirflowSensorTimeout(message)
