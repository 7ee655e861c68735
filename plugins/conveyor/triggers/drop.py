"""A trigger that waits, in the triggerer, for a complete drop in a landing zone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class DropTrigger(BaseTrigger):
    """Fires once a drop in ``landing_uri`` holds its marker and is not processed yet.

    :param landing_uri: ``landing/<pipeline>/`` as a URI (``file://`` or ``s3://``).
    :param conn_id: the Airflow connection of the object store, or None for local files.
    :param marker: the completion marker's file name.
    :param poke_interval: seconds between two looks.
    """

    def __init__(self, landing_uri: str, conn_id: str | None, marker: str, poke_interval: float):
        super().__init__()
        self.landing_uri = landing_uri
        self.conn_id = conn_id
        self.marker = marker
        self.poke_interval = poke_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "landing_uri": self.landing_uri,
                "conn_id": self.conn_id,
                "marker": self.marker,
                "poke_interval": self.poke_interval,
            },
        )

    def _look(self) -> list[str]:
        from airflow.sdk import ObjectStoragePath

        from conveyor.data.drops import find_complete_drops

        return find_complete_drops(ObjectStoragePath(self.landing_uri, conn_id=self.conn_id), self.marker)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                drops = await asyncio.to_thread(self._look)
            except Exception as exc:  # the sensor decides; the triggerer must not die on it
                yield TriggerEvent({"status": "error", "message": f"{self.landing_uri}: {exc}"})
                return
            if drops:
                yield TriggerEvent({"status": "success", "drop": drops[0], "pending": len(drops)})
                return
            self.log.info("No complete drop in %s yet; next look in %ss", self.landing_uri, self.poke_interval)
            await asyncio.sleep(self.poke_interval)
