"""A trigger that waits, in the triggerer, for a complete drop in a landing zone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class DropTrigger(BaseTrigger):
    """Fires once a drop in ``landing_uri`` holds its marker and is not processed yet, or at its deadline.

    At the deadline it fires ``{"status": "timeout", "incomplete": [...]}``: the drops that wait
    without their marker (or with one of the wrong case), so the sensor can name them.

    :param landing_uri: ``landing/<pipeline>/`` as a URI (``file://`` or ``s3://``).
    :param conn_id: the Airflow connection of the object store, or None for local files.
    :param marker: the completion marker's file name.
    :param poke_interval: seconds between two looks.
    :param deadline: when to give up (seconds since the epoch, so a restarted triggerer keeps it); None: never.
    :param older_than: a drop without its marker unchanged for this many seconds is reported (None: every one).
    """

    def __init__(
        self,
        landing_uri: str,
        conn_id: str | None,
        marker: str,
        poke_interval: float,
        deadline: float | None = None,
        older_than: float | None = None,
    ):
        super().__init__()
        self.landing_uri = landing_uri
        self.conn_id = conn_id
        self.marker = marker
        self.poke_interval = poke_interval
        self.deadline = deadline
        self.older_than = older_than

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "landing_uri": self.landing_uri,
                "conn_id": self.conn_id,
                "marker": self.marker,
                "poke_interval": self.poke_interval,
                "deadline": self.deadline,
                "older_than": self.older_than,
            },
        )

    def _landing(self) -> Any:
        from airflow.sdk import ObjectStoragePath

        return ObjectStoragePath(self.landing_uri, conn_id=self.conn_id)

    def _look(self) -> list[str]:
        from conveyor.data.drops import find_complete_drops

        return find_complete_drops(self._landing(), self.marker)

    def _incomplete(self) -> list[dict[str, Any]]:
        from conveyor.data.drops import find_incomplete_drops

        return find_incomplete_drops(self._landing(), self.marker, self.older_than or 0.0)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                drops = await asyncio.to_thread(self._look)
                late = self.deadline is not None and time.time() >= self.deadline
                incomplete = await asyncio.to_thread(self._incomplete) if drops or late else []
            except Exception as exc:  # the sensor decides; the triggerer must not die on it
                yield TriggerEvent({"status": "error", "message": f"{self.landing_uri}: {exc}"})
                return
            if drops:
                yield TriggerEvent(
                    {"status": "success", "drop": drops[0], "pending": len(drops), "incomplete": incomplete}
                )
                return
            if late:
                yield TriggerEvent({"status": "timeout", "incomplete": incomplete})
                return
            self.log.info("No complete drop in %s yet; next look in %ss", self.landing_uri, self.poke_interval)
            wait = self.poke_interval
            if self.deadline is not None:
                wait = max(0.0, min(wait, self.deadline - time.time()))
            await asyncio.sleep(wait)
