"""The landing-zone sensor and its trigger: poke, deferral, serialisation, and the wait itself."""

from __future__ import annotations

import asyncio
import importlib
import os
import time

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout, AirflowSkipException, TaskDeferred

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
    assert result.is_done and result.xcom_value == {"drop": "2024-01", "pending": 2, "incomplete": []}


def test_execute_returns_at_once_when_a_drop_is_waiting(lake):
    write_drop(lake, "d1", {"a.csv": b"x"})
    assert sensor().execute({}) == {"drop": "d1", "pending": 1, "incomplete": []}


def test_execute_defers_to_a_serialisable_trigger(lake):
    with pytest.raises(TaskDeferred) as deferred:
        sensor().execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, DropTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout.total_seconds() == 30 + 60  # the trigger's own deadline comes first
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    deadline = kwargs.pop("deadline")
    assert abs(deadline - (time.time() + 30)) < 5
    assert kwargs == {
        "landing_uri": lake.uri("landing", "churn"),
        "conn_id": None,
        "marker": "_SUCCESS",
        "poke_interval": 0.05,
        "older_than": 30,
    }
    assert rebuilt.serialize() == trigger.serialize() and rebuilt.deadline == deadline


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
    assert event.payload == {"status": "success", "drop": "late", "pending": 1, "incomplete": []}


def test_execute_complete_checks_the_event():
    event = {"status": "success", "drop": "d", "pending": 3}
    assert sensor().execute_complete({}, event) == {"drop": "d", "pending": 3, "incomplete": []}
    with pytest.raises(AirflowException, match="boom"):
        sensor().execute_complete({}, {"status": "error", "message": "boom"})


def test_non_deferrable_mode_pokes_in_the_worker(lake):
    write_drop(lake, "d1", {"a.csv": b"x"})
    assert sensor(deferrable=False).execute({"ti": None}) == {"drop": "d1", "pending": 1, "incomplete": []}


# --- drops that wait without their marker are named when the wait ends (issue 17 item 17) -------------


def age(lake, drop: str, seconds: float) -> None:
    """Make every file of a drop look unchanged for ``seconds``."""
    folder = lake.landing("churn", drop)
    past = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path.path, (past, past))


class FakeTI:
    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def test_drops_without_their_marker_past_the_timeout_are_named_in_the_result(lake):
    write_drop(lake, "no-marker", {"a.csv": b"x"}, marker=False)
    write_drop(lake, "wrong-case", {"a.csv": b"x", "_success": b""}, marker=False)
    write_drop(lake, "fresh", {"a.csv": b"x"}, marker=False)  # still being written: not reported
    write_drop(lake, "ready", {"a.csv": b"x"})
    age(lake, "no-marker", 120)
    age(lake, "wrong-case", 120)
    result = sensor().execute({})
    assert result["drop"] == "ready"
    assert [item["drop"] for item in result["incomplete"]] == ["no-marker", "wrong-case"]
    no_marker, wrong_case = result["incomplete"]
    assert no_marker["reason"] == "has no '_SUCCESS' marker" and no_marker["age_seconds"] >= 119
    assert "holds '_success', not its marker '_SUCCESS'" in wrong_case["reason"]


def test_the_trigger_names_the_incomplete_drops_at_its_deadline(lake):
    write_drop(lake, "no-marker", {"a.csv": b"x"}, marker=False)
    age(lake, "no-marker", 120)
    trigger = DropTrigger(
        lake.uri("landing", "churn"), None, "_SUCCESS", 0.05, deadline=time.time() + 0.3, older_than=60
    )
    event = asyncio.run(asyncio.wait_for(trigger.run().__anext__(), 10))
    assert event.payload["status"] == "timeout"
    assert [item["drop"] for item in event.payload["incomplete"]] == ["no-marker"]


@pytest.mark.parametrize("soft_fail", [True, False])
def test_a_timed_out_wait_names_the_incomplete_drops(lake, soft_fail, capsys):
    incomplete = [{"drop": "2026-11-02", "reason": "holds '_success', not its marker '_SUCCESS'", "age_seconds": 4000}]
    ti = FakeTI()
    expected = AirflowSkipException if soft_fail else AirflowSensorTimeout
    with pytest.raises(expected, match=r"2026-11-02 \(holds '_success'"):
        sensor(soft_fail=soft_fail).execute_complete({"ti": ti}, {"status": "timeout", "incomplete": incomplete})
    assert ti.pushed == {"incomplete": incomplete}
    assert "wait without their marker '_SUCCESS': 2026-11-02" in capsys.readouterr().out  # the task log


def test_non_deferrable_timeout_names_the_incomplete_drops(lake):
    write_drop(lake, "stuck", {"a.csv": b"x", "_Success": b""}, marker=False)
    age(lake, "stuck", 120)
    waiting = DropSensor(
        task_id="wait_for_drop", pipeline="churn", poke_interval=0.05, timeout=0.2, soft_fail=True, deferrable=False
    )
    with pytest.raises(AirflowSkipException, match=r"stuck \(holds '_Success', not its marker '_SUCCESS'"):
        waiting.execute({"ti": None})
