"""The landing-zone sensor and its trigger: poke, deferral, serialisation, and the wait itself."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from airflow.sdk.exceptions import AirflowException, TaskDeferred

from conveyor.sensors.drop import DropSensor
from conveyor.triggers.drop import DropTrigger
from helpers import write_drop


def sensor(**kwargs) -> DropSensor:
    return DropSensor(task_id="wait_for_drop", pipeline="churn", poke_interval=0.05, timeout=30, **kwargs)


def test_poke_finds_the_oldest_complete_drop(lake):
    assert sensor().poke({}).is_done is False
    write_drop(lake, "2024-02", {"a.csv": b"x"})
    write_drop(lake, "2024-01", {"a.csv": b"x"})
    result = sensor().poke({})
    assert result.is_done and result.xcom_value == {"drop": "2024-01", "pending": 2}


def test_execute_returns_at_once_when_a_drop_is_waiting(lake):
    write_drop(lake, "d1", {"a.csv": b"x"})
    assert sensor().execute({}) == {"drop": "d1", "pending": 1}


def test_execute_defers_to_a_serialisable_trigger(lake):
    with pytest.raises(TaskDeferred) as deferred:
        sensor().execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, DropTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout.total_seconds() == 30
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert kwargs == {
        "landing_uri": lake.uri("landing", "churn"),
        "conn_id": None,
        "marker": "_SUCCESS",
        "poke_interval": 0.05,
    }
    assert rebuilt.serialize() == trigger.serialize()


def test_trigger_fires_when_the_marker_arrives(lake):
    write_drop(lake, "late", {"a.csv": b"x"}, marker=False)
    trigger = DropTrigger(lake.uri("landing", "churn"), None, "_SUCCESS", 0.05)

    async def scenario():
        waiting = asyncio.ensure_future(trigger.run().__anext__())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # data without its marker is not a drop yet
        (lake.landing("churn", "late") / "_SUCCESS").write_bytes(b"")
        return await asyncio.wait_for(waiting, 10)

    event = asyncio.run(scenario())
    assert event.payload == {"status": "success", "drop": "late", "pending": 1}


def test_execute_complete_checks_the_event():
    event = {"status": "success", "drop": "d", "pending": 3}
    assert sensor().execute_complete({}, event) == {"drop": "d", "pending": 3}
    with pytest.raises(AirflowException, match="boom"):
        sensor().execute_complete({}, {"status": "error", "message": "boom"})


def test_non_deferrable_mode_pokes_in_the_worker(lake):
    write_drop(lake, "d1", {"a.csv": b"x"})
    assert sensor(deferrable=False).execute({"ti": None}) == {"drop": "d1", "pending": 1}
