"""The demo's run watcher (``conveyor.demo_airflow.RunWatcher``) on a fake clock and a fake REST API.

It follows a DAG's next run task by task, and stops with the DAG, the task and the task's log path
when a run fails, never appears, or shows no progress for its bound: the demo never hangs.
"""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.demo_airflow import DemoError, Limits, RunWatcher, task_log_path


class FakeClock:
    """Monotonic seconds that advance only when the watcher sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeApi:
    """A DAG's runs and task instances as the REST API returns them, scripted against the fake clock.

    :param clock: the fake clock.
    :param script: ``(at_seconds, run_state, {task_id: state})`` snapshots; the latest one not after now applies.
    :param appears_at: when the run is created (None: never).
    """

    def __init__(self, clock: FakeClock, script: list[tuple[float, str, dict[str, str]]], appears_at: float | None = 0):
        self.clock, self.script, self.appears_at = clock, script, appears_at
        self.triggered = 0

    def _now(self) -> tuple[str, dict[str, str]]:
        current = [s for s in self.script if s[0] <= self.clock.now]
        return (current[-1][1], current[-1][2]) if current else ("queued", {})

    def runs(self, dag_id: str, limit: int = 10) -> list[dict[str, Any]]:
        old = {"dag_run_id": "scheduled__old", "state": "success", "run_after": "2026-01-01", "run_type": "scheduled"}
        if self.appears_at is None or self.clock.now < self.appears_at:
            return [old]
        state, _ = self._now()
        new = {
            "dag_run_id": "asset_triggered__new",
            "state": state,
            "run_after": "2026-02-01",
            "run_type": "asset_triggered",
        }
        return [new, old]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        _, tasks = self._now()
        return [
            {"task_id": t, "state": s, "try_number": 1, "duration": 2.0, "dag_id": dag_id, "dag_run_id": run_id}
            for t, s in tasks.items()
        ]


def watcher(api: FakeApi, clock: FakeClock, lines: list[str]) -> RunWatcher:
    return RunWatcher(api, lines.append, clock=clock, sleep=clock.sleep, poll_s=1.0, heartbeat_s=10.0)


def test_it_follows_the_new_run_and_shows_each_task_as_it_runs_and_ends():
    clock, lines = FakeClock(), []
    api = FakeApi(
        clock,
        [
            (0, "running", {"split": "running", "train": "none"}),
            (3, "running", {"split": "success", "train": "running"}),
            (40, "success", {"split": "success", "train": "success"}),
        ],
    )
    w = watcher(api, clock, lines)
    result = w.wait("churn__train", w.finished_runs("churn__train"), Limits(task_s=60))
    assert result.run_id == "asset_triggered__new"  # the finished old run does not count
    assert result.state == "success" and result.run_type == "asset_triggered"
    assert result.tasks == {"split": ("success", 2.0), "train": ("success", 2.0)}
    text = "\n".join(lines)
    assert "churn__train: run asset_triggered__new (asset_triggered)" in text
    assert "split            running" in text and "split            success in 2.0s" in text
    assert "… train running" in text  # a heartbeat while training runs, without a state change
    assert text.rstrip().endswith("churn__train: success in 40s")


def test_a_task_without_progress_past_its_bound_stops_the_demo_with_its_log_path(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    clock, lines = FakeClock(), []
    api = FakeApi(clock, [(0, "running", {"wait_for_drop": "deferred", "ingest": "none"})])
    w = watcher(api, clock, lines)
    with pytest.raises(DemoError) as caught:
        w.wait("churn__ingest", {"scheduled__old"}, Limits(task_s=60))
    message = str(caught.value)
    assert "churn__ingest run asset_triggered__new stalled: task wait_for_drop deferred" in message
    log = tmp_path / "logs/dag_id=churn__ingest/run_id=asset_triggered__new/task_id=wait_for_drop/attempt=1.log"
    assert f"log: {log}" in message
    assert 60 < clock.now <= 62  # stopped at the bound, not later


def test_a_longer_bound_for_training_lets_a_long_task_run():
    clock, lines = FakeClock(), []
    api = FakeApi(clock, [(0, "running", {"train": "running"}), (200, "success", {"train": "success"})])
    w = watcher(api, clock, lines)
    assert w.wait("churn__train", {"scheduled__old"}, Limits(task_s=60, per_task={"train": 300})).state == "success"


def test_a_failed_run_names_the_failed_task_and_its_log():
    clock, lines = FakeClock(), []
    api = FakeApi(
        clock, [(0, "running", {"gate": "running"}), (5, "failed", {"gate": "failed", "register": "upstream_failed"})]
    )
    w = watcher(api, clock, lines)
    with pytest.raises(
        DemoError,
        match=r"churn__train run asset_triggered__new failed: task gate failed; log: .*task_id=gate/attempt=1.log",
    ):
        w.wait("churn__train", {"scheduled__old"}, Limits())


def test_a_run_that_never_starts_is_nudged_once_then_stops_the_demo():
    clock, lines = FakeClock(), []
    api = FakeApi(clock, [], appears_at=None)
    nudged: list[float] = []
    w = watcher(api, clock, lines)
    with pytest.raises(DemoError, match="churn__monitor: no run started within 50s"):
        w.wait(
            "churn__monitor", {"scheduled__old"}, Limits(start_s=50, nudge_s=20), nudge=lambda: nudged.append(clock.now)
        )
    assert len(nudged) == 1 and 20 < nudged[0] <= 22


def test_a_nudge_that_starts_the_run_lets_the_step_go_on():
    clock, lines = FakeClock(), []
    api = FakeApi(clock, [(0, "success", {"score": "success"})], appears_at=None)

    def nudge() -> None:
        api.appears_at = clock.now

    w = watcher(api, clock, lines)
    limits = Limits(start_s=50, nudge_s=5)
    assert w.wait("churn__batch_predict", {"scheduled__old"}, limits, nudge=nudge).state == "success"


def test_services_that_died_stop_the_demo_at_once():
    clock, lines = FakeClock(), []
    api = FakeApi(clock, [(0, "running", {"train": "running"})])
    w = RunWatcher(api, lines.append, clock=clock, sleep=clock.sleep, alive=lambda: "Airflow's services stopped")
    with pytest.raises(DemoError, match="Airflow's services stopped"):
        w.wait("churn__train", {"scheduled__old"}, Limits())
    assert clock.now == 0


def test_the_log_path_follows_airflows_default_template(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    ti = {"dag_id": "d", "dag_run_id": "r", "task_id": "t", "try_number": 2, "map_index": -1}
    assert task_log_path(ti) == tmp_path / "logs/dag_id=d/run_id=r/task_id=t/attempt=2.log"
    assert (
        task_log_path({**ti, "map_index": 0}) == tmp_path / "logs/dag_id=d/run_id=r/task_id=t/map_index=0/attempt=2.log"
    )


def test_a_stale_pid_file_is_not_taken_for_running_services(monkeypatch, tmp_path):
    import os

    from conveyor.demo_airflow import pid_file, running_pid

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    pid_file().write_text(str(os.getpid()))  # alive, but pytest, not airflow standalone
    assert running_pid() is None


def test_stop_ends_the_whole_process_group_it_started(monkeypatch, tmp_path):
    import subprocess

    from conveyor.demo_airflow import pid_file, running_pid, stop_airflow

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    # A stand-in for `airflow standalone` and a child of it, in their own session as the demo starts them.
    process = subprocess.Popen(["bash", "-c", "exec -a standalone bash -c 'sleep 60 & wait'"], start_new_session=True)
    pid_file().write_text(str(process.pid))
    deadline = 50
    while running_pid() is None and deadline:  # until exec -a has renamed it
        deadline -= 1
        subprocess.run(["sleep", "0.1"], check=True)
    assert running_pid() == process.pid
    assert stop_airflow(grace_s=5) is True
    assert process.poll() is not None and running_pid() is None and not pid_file().exists()
    assert stop_airflow() is False  # nothing left to stop


def test_services_that_cannot_bind_their_port_stop_the_start_at_once(monkeypatch, tmp_path):
    from conveyor.demo_airflow import log_file, wait_healthy

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    log_file().write_text(
        "old run | Uvicorn running on http://0.0.0.0:8080 (Press CTRL+C to quit)\n"
        "api-server | [error] [Errno 98] error while attempting to bind on address ('0.0.0.0', 8080)\n"
    )
    with pytest.raises(DemoError, match="could not listen on its port"):
        wait_healthy("http://localhost:1", timeout_s=60, log_from=0)
