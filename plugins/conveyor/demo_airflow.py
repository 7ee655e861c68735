"""Airflow for the demo and ``make ui``: its services in the background, its REST API, a run watcher.

``start_airflow`` runs ``airflow standalone`` (scheduler, triggerer, DAG processor and api-server on
the embedded SQLite default, LocalExecutor) in its own process group, detached from the terminal,
with its log and pid in ``$AIRFLOW_HOME``; ``stop_airflow`` stops that group. ``AirflowApi`` talks to
the api-server's REST API as the admin user the simple auth manager generated. ``RunWatcher``
follows a DAG's next run task by task, prints progress, and stops with the DAG, the task and its
log path when the run fails or nothing moves for a bounded time: the demo never hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.errors import ConveyorError

TERMINAL = {"success", "failed", "skipped", "upstream_failed", "removed"}
RUN_TERMINAL = {"success", "failed"}
START_TIMEOUT_S = 300.0


class DemoError(ConveyorError):
    """A demo step failed or stalled: the message names the DAG, the task and its log."""


def airflow_home() -> Path:
    """``$AIRFLOW_HOME`` (the Makefile sets it to ``.state/airflow``)."""
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def api_port() -> int:
    """The api-server's port: ``AIRFLOW__API__PORT``, else Airflow's default 8080."""
    return int(os.environ.get("AIRFLOW__API__PORT") or 8080)


def api_url() -> str:
    """Where the api-server answers on this machine."""
    return f"http://localhost:{api_port()}"


def pid_file() -> Path:
    return airflow_home() / "standalone.pid"


def log_file() -> Path:
    return airflow_home() / "standalone.log"


def password_file() -> Path:
    """The simple auth manager's generated password file (``airflow standalone`` writes it)."""
    configured = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else airflow_home() / "simple_auth_manager_passwords.json.generated"


def login() -> tuple[str, str]:
    """The admin user and password the simple auth manager generated (``DemoError`` when absent)."""
    path = password_file()
    try:
        users = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"no Airflow login in {path} ({exc}): has Airflow started?") from None
    user = "admin" if "admin" in users else next(iter(users))
    return user, users[user]


def recorded_pid() -> int | None:
    """The pid in this AIRFLOW_HOME's pid file if that process exists (whatever it runs)."""
    try:
        pid = int(pid_file().read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def running_pid() -> int | None:
    """The pid of the ``airflow standalone`` this AIRFLOW_HOME started, if it still runs."""
    pid = recorded_pid()
    cmdline = Path(f"/proc/{pid}/cmdline")
    if pid is not None and cmdline.exists() and b"standalone" not in cmdline.read_bytes():
        return None  # a stale pid file (after a reboot): that pid is another program now
    return pid


def port_in_use(port: int) -> bool:
    """Whether something on this machine listens on the port.

    :param port: a TCP port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def healthy(url: str) -> bool:
    """Whether every component the api-server reports (scheduler, triggerer, DAG processor, DB) is healthy.

    :param url: the api-server.
    """
    import httpx

    try:
        health = httpx.get(f"{url}/api/v2/monitor/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool(health) and all(part.get("status") == "healthy" for part in health.values() if isinstance(part, dict))


def start_airflow(show: Callable[[str], None], timeout_s: float = START_TIMEOUT_S) -> tuple[str, bool]:
    """Start ``airflow standalone`` in the background, unless this AIRFLOW_HOME's already runs; wait until healthy.

    :param show: prints a line of progress.
    :param timeout_s: how long the services may take to become healthy.
    :return: the api-server's address and whether this call started the services.
    """
    url, log_from = api_url(), None
    if running_pid() is None:
        if port_in_use(api_port()):
            raise DemoError(
                f"port {api_port()} is in use by another program: stop it, or set AIRFLOW__API__PORT to a free port"
            )
        home = airflow_home()
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "4"),
            "AIRFLOW__API__BASE_URL": os.environ.get("AIRFLOW__API__BASE_URL", url),  # tasks reach the execution API
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        }
        log_from = log_file().stat().st_size if log_file().exists() else 0
        with log_file().open("ab") as sink:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "airflow"), "standalone"],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: make stop ends all of it, Ctrl-C none of it
            )
        pid_file().write_text(str(process.pid))
        show(f"    services log    : {log_file()}")
    wait_healthy(url, timeout_s, log_from)
    import httpx

    with contextlib.suppress(httpx.HTTPError):  # the api-server builds its execution API on the first call
        httpx.get(f"{url}/execution/health", timeout=120)
    return url, log_from is not None


def wait_healthy(url: str, timeout_s: float, log_from: int | None = None) -> None:
    """Wait until the api-server reports every component healthy; ``DemoError`` when it dies or times out.

    :param url: the api-server.
    :param timeout_s: the bound.
    :param log_from: for services just started, where their output begins in the log: healthy then
        also means our api-server said it is serving (another Airflow on the port is not ours).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        output = read_from(log_file(), log_from) if log_from is not None else ""
        if "error while attempting to bind" in output:
            raise DemoError(
                f"an Airflow service could not listen on its port (in use; api-server {api_port()}, log servers "
                "8793/8794 by default): stop what holds it, or set AIRFLOW__API__PORT, "
                f"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT, AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT; see {log_file()}"
            )
        ours = log_from is None or f":{api_port()} (Press CTRL+C" in output
        if ours and healthy(url):
            return
        if recorded_pid() is None:  # not running_pid: just started, it may not have exec'd airflow yet
            raise DemoError(f"airflow standalone exited: see {log_file()}\n{tail(log_file())}")
        if time.monotonic() > deadline:
            raise DemoError(f"Airflow was not healthy after {timeout_s:.0f}s: see {log_file()}\n{tail(log_file())}")
        time.sleep(1)


def read_from(path: Path, offset: int) -> str:
    """A file's text from a byte offset (empty when it cannot be read).

    :param path: the file.
    :param offset: where to start.
    """
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a file (empty when it cannot be read).

    :param path: the file.
    :param lines: how many.
    """
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_airflow(grace_s: float = 20.0) -> bool:
    """Stop the ``airflow standalone`` this AIRFLOW_HOME started and its process group; False when none ran.

    :param grace_s: how long the services get to stop after SIGTERM before SIGKILL.
    """
    pid = running_pid()
    if pid is None:
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            except ChildProcessError:
                pass
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                pid_file().unlink(missing_ok=True)
                return True
            time.sleep(0.5)
    pid_file().unlink(missing_ok=True)
    return True


class AirflowApi:
    """The api-server's REST API (``/api/v2``) as the generated admin user.

    :param url: the api-server.
    :param credentials: user and password (:func:`login` when None).
    :param client: an ``httpx.Client`` (a new one when None).
    """

    def __init__(self, url: str, credentials: tuple[str, str] | None = None, client: Any = None):
        import httpx

        self.url = url
        self.credentials = credentials
        self.client = client or httpx.Client(base_url=url, timeout=30)
        self._token: str | None = None

    def _headers(self, renew: bool = False) -> dict[str, str]:
        if self._token is None or renew:
            user, password = self.credentials or login()
            answer = self.client.post("/auth/token", json={"username": user, "password": password})
            answer.raise_for_status()
            self._token = answer.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request (the token renewed once on 401); the JSON answer.

        :param method: GET, POST, PATCH.
        :param path: under the api-server, e.g. ``/api/v2/dags``.
        :param kwargs: for ``httpx.Client.request`` (``json``, ``params``).
        """
        answer = self.client.request(method, path, headers=self._headers(), **kwargs)
        if answer.status_code == 401:
            answer = self.client.request(method, path, headers=self._headers(renew=True), **kwargs)
        answer.raise_for_status()
        return answer.json() if answer.content else None

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """The DAG, or None while the DAG processor has not stored it yet.

        :param dag_id: the DAG.
        """
        import httpx

        try:
            return self.call("GET", f"/api/v2/dags/{dag_id}")
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    def unpause(self, dag_id: str) -> bool:
        """Unpause a DAG; whether it was paused.

        :param dag_id: the DAG.
        """
        was = (self.dag(dag_id) or {}).get("is_paused", True)
        self.call("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        return bool(was)

    def runs(self, dag_id: str, limit: int = 10) -> list[dict[str, Any]]:
        """The DAG's latest runs, newest first.

        :param dag_id: the DAG.
        :param limit: how many.
        """
        params = {"order_by": "-run_after", "limit": limit}
        return self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns", params=params)["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The run's task instances.

        :param dag_id: the DAG.
        :param run_id: the run.
        """
        found = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return found["task_instances"]

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a run by hand; its run id.

        :param dag_id: the DAG.
        :param conf: its configuration.
        """
        body = {"logical_date": None, "conf": conf or {}}
        return self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def asset_event(self, name: str, extra: dict[str, Any]) -> None:
        """Update an Asset as a producer does (the DAGs scheduled on it start).

        :param name: the Asset's name, e.g. ``churn.inference``.
        :param extra: the event's extra.
        """
        assets = self.call("GET", "/api/v2/assets", params={"name_pattern": name, "limit": 50})["assets"]
        found = [a for a in assets if a["name"] == name]
        if not found:
            raise DemoError(f"Airflow knows no Asset named {name!r}: has the DAG processor parsed the DAGs?")
        self.call("POST", "/api/v2/assets/events", json={"asset_id": found[0]["id"], "extra": extra})


def task_log_path(ti: dict[str, Any]) -> Path:
    """Where Airflow's default log template writes a task instance's log under ``$AIRFLOW_HOME/logs``.

    :param ti: a task instance as the REST API returns it.
    """
    folder = (
        airflow_home() / "logs" / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}" / f"task_id={ti['task_id']}"
    )
    if int(ti.get("map_index", -1) if ti.get("map_index") is not None else -1) >= 0:
        folder = folder / f"map_index={ti['map_index']}"
    return folder / f"attempt={max(int(ti.get('try_number') or 1), 1)}.log"


@dataclass
class RunResult:
    """A finished run: its id, how it started, its state, its wall time and each task's (state, seconds)."""

    dag_id: str
    run_id: str
    run_type: str
    state: str
    seconds: float
    tasks: dict[str, tuple[str, float]] = field(default_factory=dict)


@dataclass
class Limits:
    """How long a step may show no progress before the demo stops.

    :param start_s: for the run to appear.
    :param task_s: for any one task to change state (running, deferred, queued...).
    :param per_task: a longer bound for named tasks (training).
    :param nudge_s: after this long without a run, ``nudge`` is called once (a schedule not due yet).
    """

    start_s: float = 120.0
    task_s: float = 300.0
    per_task: dict[str, float] = field(default_factory=dict)
    nudge_s: float | None = None


class RunWatcher:
    """Follow a DAG's next run to its end with live progress; stop it when it fails or stalls.

    :param api: an ``AirflowApi`` (or anything with ``runs`` and ``task_instances``).
    :param show: prints a line.
    :param clock: monotonic seconds.
    :param sleep: waits.
    :param poll_s: seconds between polls.
    :param alive: returns why the services are gone, or None while they run.
    :param heartbeat_s: how often a task still running is shown again.
    """

    def __init__(
        self,
        api: Any,
        show: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 1.5,
        alive: Callable[[], str | None] = lambda: None,
        heartbeat_s: float = 30.0,
    ):
        self.api, self.show, self.clock, self.sleep = api, show, clock, sleep
        self.poll_s, self.alive, self.heartbeat_s = poll_s, alive, heartbeat_s

    def finished_runs(self, dag_id: str) -> set[str]:
        """The ids of the DAG's runs that have ended (a step waits for any other run).

        :param dag_id: the DAG.
        """
        return {r["dag_run_id"] for r in self.api.runs(dag_id, limit=50) if r["state"] in RUN_TERMINAL}

    def poll(self, what: Callable[[], Any]) -> Any:
        """One API call; None when it failed for a moment (the step's bound still applies)."""
        import httpx

        if reason := self.alive():
            raise DemoError(reason)
        try:
            return what()
        except (httpx.TransportError, httpx.HTTPStatusError):
            return None

    def next_run(self, dag_id: str, before: set[str], limits: Limits, nudge: Callable[[], None] | None) -> dict:
        """The first run of the DAG not in ``before`` (waiting for it to appear, within ``limits.start_s``).

        :param dag_id: the DAG.
        :param before: runs that do not count.
        :param limits: the bounds.
        :param nudge: called once after ``limits.nudge_s`` without a run.
        """
        started = self.clock()
        while True:
            runs = self.poll(lambda: self.api.runs(dag_id)) or []
            new = sorted((r for r in runs if r["dag_run_id"] not in before), key=lambda r: r.get("run_after") or "")
            if new:
                return new[0]
            waited = self.clock() - started
            if nudge is not None and limits.nudge_s is not None and waited > limits.nudge_s:
                nudge()
                nudge = None
            if waited > limits.start_s:
                raise DemoError(f"{dag_id}: no run started within {limits.start_s:.0f}s (is the DAG paused?)")
            self.sleep(self.poll_s)

    def wait(
        self, dag_id: str, before: set[str], limits: Limits | None = None, nudge: Callable[[], None] | None = None
    ) -> RunResult:
        """Follow the DAG's next run (not in ``before``) to its end, printing each task as it runs and ends.

        :param dag_id: the DAG.
        :param before: runs that do not count (:meth:`finished_runs`, taken before the step).
        :param limits: the bounds (defaults of :class:`Limits` when None).
        :param nudge: called once when no run appears within ``limits.nudge_s``.
        :return: the run's result; ``DemoError`` when it failed or stalled.
        """
        limits = limits or Limits()
        run = self.next_run(dag_id, before, limits, nudge)
        run_id, started = run["dag_run_id"], self.clock()
        self.show(f"    {dag_id}: run {run_id} ({run.get('run_type', '?')})")
        states: dict[str, tuple[str, int]] = {}
        changed = shown = started
        while True:
            tis = self.poll(lambda: self.api.task_instances(dag_id, run_id))
            now = self.clock()
            for ti in tis or []:
                key = (ti.get("state") or "none", int(ti.get("try_number") or 0))
                if states.get(ti["task_id"]) != key:
                    states[ti["task_id"]] = key
                    changed = shown = now
                    self._show_task(ti)
            if tis is not None and (state := self._run_state(dag_id, run_id)) in RUN_TERMINAL:
                return self._finish(dag_id, run, state, tis, now - started)
            active = [ti for ti in tis or [] if (ti.get("state") or "none") not in TERMINAL]
            bound = max([limits.per_task.get(ti["task_id"], limits.task_s) for ti in active] or [limits.task_s])
            if now - changed > bound:
                self._stalled(dag_id, run_id, active, now - changed)
            if active and now - shown >= self.heartbeat_s:
                shown = now
                busy = [ti for ti in active if ti.get("state") not in (None, "none", "scheduled")]
                names = ", ".join(f"{ti['task_id']} {ti['state']}" for ti in busy) or "waiting for the scheduler"
                self.show(f"      … {names} ({now - changed:.0f}s)")
            self.sleep(self.poll_s)

    def _run_state(self, dag_id: str, run_id: str) -> str | None:
        runs = self.poll(lambda: self.api.runs(dag_id)) or []
        return next((r["state"] for r in runs if r["dag_run_id"] == run_id), None)

    def _show_task(self, ti: dict[str, Any]) -> None:
        state = ti.get("state") or "none"
        if state in TERMINAL:
            seconds = ti.get("duration")
            took = f" in {seconds:.1f}s" if isinstance(seconds, int | float) else ""
            self.show(f"      {ti['task_id']:<16} {state}{took}")
        elif state in ("running", "deferred", "up_for_retry"):
            self.show(
                f"      {ti['task_id']:<16} {state}" + (" (waiting in the triggerer)" if state == "deferred" else "")
            )

    def _finish(self, dag_id: str, run: dict, state: str, tis: list[dict[str, Any]], seconds: float) -> RunResult:
        tasks = {ti["task_id"]: (ti.get("state") or "none", float(ti.get("duration") or 0.0)) for ti in tis}
        if state != "success":
            failed = [ti for ti in tis if ti.get("state") in ("failed", "upstream_failed")] or tis
            first = failed[0] if failed else {"task_id": "?", "dag_id": dag_id, "dag_run_id": run["dag_run_id"]}
            raise DemoError(
                f"{dag_id} run {run['dag_run_id']} {state}: task {first['task_id']} {first.get('state')}; "
                f"log: {task_log_path({**first, 'dag_id': dag_id, 'dag_run_id': run['dag_run_id']})}"
            )
        self.show(f"    {dag_id}: {state} in {seconds:.0f}s")
        return RunResult(dag_id, run["dag_run_id"], run.get("run_type", "?"), state, seconds, tasks)

    def _stalled(self, dag_id: str, run_id: str, active: list[dict[str, Any]], seconds: float) -> None:
        if not active:
            raise DemoError(f"{dag_id} run {run_id}: no task started for {seconds:.0f}s (is the scheduler running?)")
        ti = active[0]
        raise DemoError(
            f"{dag_id} run {run_id} stalled: task {ti['task_id']} {ti.get('state') or 'none'} for {seconds:.0f}s "
            f"with no progress; log: {task_log_path({**ti, 'dag_id': dag_id, 'dag_run_id': run_id})}"
        )
