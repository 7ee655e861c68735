"""Run a local endpoint as a detached background process: start, status, stop, ensure.

The server is ``python -m conveyor.serving.supervisor conveyor.serving.app:create_app --workers N
--http conveyor.serving.protocol:LimitedHttpToolsProtocol`` (uvicorn with a cap on request heads,
each worker on its own ``SO_REUSEPORT`` socket so connections spread evenly over the workers, see
:mod:`conveyor.serving.supervisor`) in a new session (its own process group), logging to
``<endpoint folder>/server.log``;
``server.json`` records its pid, host, port, workers and URL. With ``workers >= 2`` uvicorn's
supervisor (0.54) starts a new worker when one dies (checked every 0.5 s, at worst after the
health-check timeout, see ``HEALTHCHECK_TIMEOUT_S``); the new worker loads the live model before it
takes connections, while the others keep serving. With one worker nothing
restarts a crashed server until :func:`ensure_endpoint` runs again.

Policies: :func:`start_endpoint` refuses an endpoint that already runs; :func:`ensure_endpoint`
leaves a running server alone when it listens where asked and refuses one started with another
port, host or worker count (stop it first); :func:`stop_endpoint` of a stopped endpoint is a no-op.
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
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from conveyor import settings
from conveyor.serving.auth import endpoint_credentials
from conveyor.serving.endpoint_state import EndpointError, endpoint_dir, pid_alive, worker_states, write_json_atomic

APP = "conveyor.serving.app:create_app"
SUPERVISOR = "conveyor.serving.supervisor"  # uvicorn's supervisor, one SO_REUSEPORT socket per worker
PROTOCOL = "conveyor.serving.protocol:LimitedHttpToolsProtocol"  # httptools with a cap on request heads
# uvicorn's supervisor pings each worker every 0.5 s and kills one that does not answer within this
# time (a busy worker answers from a thread, well under a second even while loading a model). It
# is also how late a dead worker may be replaced: a worker killed while still exiting can be pinged
# once more, and that ping only gives up after this timeout (observed with uvicorn 0.54).
HEALTHCHECK_TIMEOUT_S = 10
LOG_TAIL_CHARS = 3000


def server_file(name: str) -> Path:
    """The endpoint's ``server.json``.

    :param name: the endpoint name.
    """
    return endpoint_dir(name) / "server.json"


def log_file(name: str) -> Path:
    """The endpoint's ``server.log``.

    :param name: the endpoint name.
    """
    return endpoint_dir(name) / "server.log"


def _read_server(name: str) -> dict[str, Any] | None:
    """``server.json`` or None.

    :param name: the endpoint name.
    """
    try:
        return json.loads(server_file(name).read_text())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    """Collect the exit status of a server this process started (so it is not left a zombie).

    :param pid: the server's pid.
    """
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_server(pid: int) -> bool:
    """Whether ``pid`` runs and is an endpoint server (guards against a reused pid).

    :param pid: the recorded server pid.
    """
    _reap(pid)
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return APP.encode() in cmdline


def _log_tail(name: str) -> str:
    """The end of ``server.log``, for error messages.

    :param name: the endpoint name.
    """
    try:
        text = log_file(name).read_text(errors="replace")
    except OSError:
        return "(no server.log)"
    return text[-LOG_TAIL_CHARS:]


def _ping(url: str, timeout: float = 2.0) -> int | None:
    """The status of ``GET <url>/ping``; None when nothing answers.

    :param url: the server's base URL.
    :param timeout: seconds to wait for the answer.
    """
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def start_endpoint(
    name: str, port: int, workers: int, host: str = "127.0.0.1", env: Mapping[str, str] | None = None
) -> int:
    """Start the endpoint's server in the background; its pid (the uvicorn supervisor).

    Returns once the process is started, not when it serves (see :func:`ensure_endpoint`).

    :param name: the endpoint name.
    :param port: the TCP port to listen on.
    :param workers: the number of worker processes.
    :param host: the address to listen on.
    :param env: extra environment variables for the server (e.g. ``CONVEYOR_CAPTURE_DIR``).
    """
    if workers < 1:
        raise ValueError(f"endpoint {name}: workers must be at least 1, got {workers}")
    if not 0 < port < 65536:
        raise ValueError(f"endpoint {name}: port {port} is not a TCP port")
    running = _read_server(name)
    if running and _is_server(int(running["pid"])):
        raise EndpointError(f"endpoint {name} already runs (pid {running['pid']}, {running['url']}); stop it first")
    folder = endpoint_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    with _environment(env):
        endpoint_credentials()  # refuses weak secrets here, and generates the local default's once, not per worker
    plugins = str(settings.PROJECT_ROOT / "plugins")
    # The workers share the cores: one math-library thread pool each, sized so they don't fight.
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    defaults = {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    child_env = {
        **defaults,
        **os.environ,
        **(env or {}),
        "CONVEYOR_ENDPOINT": name,
        "CONVEYOR_STATE_DIR": str(settings.state_dir()),
    }
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [plugins, child_env.get("PYTHONPATH")]))
    command = _command(host, port, workers)
    with open(log_file(name), "ab") as log:
        log.write(f"--- starting endpoint {name} on {host}:{port} with {workers} worker(s)\n".encode())
        log.flush()
        process = subprocess.Popen(
            command,
            env=child_env,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    url_host = f"[{host}]" if ":" in host else host
    write_json_atomic(
        server_file(name),
        {
            "name": name,
            "pid": process.pid,
            "host": host,
            "port": port,
            "workers": workers,
            "url": f"http://{url_host}:{port}",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return process.pid


def _command(host: str, port: int, workers: int) -> list[str]:
    """The server's command line: the supervisor with the app factory and the head-limited protocol.

    :param host: the address to listen on.
    :param port: the TCP port.
    :param workers: the number of worker processes.
    """
    return [
        sys.executable,
        "-m",
        SUPERVISOR,
        APP,
        "--workers",
        str(workers),
        "--host",
        host,
        "--port",
        str(port),
        "--http",
        PROTOCOL,
        "--timeout-worker-healthcheck",
        str(HEALTHCHECK_TIMEOUT_S),
    ]


@contextlib.contextmanager
def _environment(env: Mapping[str, str] | None) -> Iterator[None]:
    """``os.environ`` with ``env`` added for the duration (what the server will see), restored after.

    :param env: the extra variables.
    """
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def endpoint_status(name: str) -> dict[str, Any]:
    """Whether the endpoint's server runs, where, what ``/ping`` says and what each worker has loaded.

    ``server.json``'s fields (``pid``, ``host``, ``port``, ``workers``, ``url``, ``started_at``)
    plus ``running``, ``ping`` (the status of ``GET /ping``, None when nothing answers) and
    ``worker_states`` (the running workers' heartbeats).

    :param name: the endpoint name.
    """
    server = _read_server(name)
    if server is None:
        return {"name": name, "running": False, "pid": None, "url": None, "ping": None, "worker_states": []}
    running = _is_server(int(server["pid"]))
    return {
        **server,
        "running": running,
        "ping": _ping(server["url"]) if running else None,
        "worker_states": worker_states(name) if running else [],
    }


def stop_endpoint(name: str, timeout: float = 20.0) -> bool:
    """Stop the endpoint's server: SIGTERM to its process group, then SIGKILL after ``timeout``; whether one ran.

    :param name: the endpoint name.
    :param timeout: seconds to wait for a graceful exit (in-flight requests finish).
    """
    server = _read_server(name)
    if server is None:
        return False
    pid = int(server["pid"])
    ran = _is_server(pid)
    if ran:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.1)
        if _group_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _group_alive(pid):
                time.sleep(0.05)
    with contextlib.suppress(OSError):
        server_file(name).unlink()
    return ran


def _group_alive(pgid: int) -> bool:
    """Whether any process of the server's group still runs (its leader reaped if it is our child).

    :param pgid: the process group (the server's pid).
    """
    _reap(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        members = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return True
    for pid in members:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and stat[0] not in ("Z", "X"):
            return True
    return False


def ensure_endpoint(
    name: str,
    port: int,
    workers: int,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Start the endpoint unless it runs (idempotent); wait until a worker answers; its status.

    :param name: the endpoint name.
    :param port: the TCP port.
    :param workers: the number of worker processes.
    :param host: the address to listen on.
    :param timeout: seconds to wait for the server to answer ``/ping`` (200 or 503).
    :param env: extra environment variables for a server this call starts.
    """
    server = _read_server(name)
    if server and _is_server(int(server["pid"])):
        if (server["port"], server["host"], server["workers"]) != (port, host, workers):
            raise EndpointError(
                f"endpoint {name} already runs on {server['host']}:{server['port']} "
                f"with {server['workers']} worker(s), "
                f"not {host}:{port} with {workers}; stop it first"
            )
        pid = int(server["pid"])
    else:
        pid = start_endpoint(name, port, workers, host, env)
        server = _read_server(name)
        if server is None:
            raise EndpointError(f"endpoint {name}: the server started but {server_file(name)} cannot be read")
    deadline = time.monotonic() + timeout
    while True:
        if not _is_server(pid):
            raise EndpointError(
                f"endpoint {name}: the server (pid {pid}) exited while starting; server.log ends:\n{_log_tail(name)}"
            )
        if _accepts(host, port) and _ping(server["url"]) is not None:
            return endpoint_status(name)
        if time.monotonic() >= deadline:
            raise EndpointError(
                f"endpoint {name}: not answering on {server['url']} after {timeout:g}s; "
                f"server.log ends:\n{_log_tail(name)}"
            )
        time.sleep(0.2)


def _accepts(host: str, port: int) -> bool:
    """Whether the port accepts a TCP connection.

    :param host: the address.
    :param port: the port.
    """
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
