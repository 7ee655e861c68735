"""The state folder of a local endpoint: what should be served (``control.json``) and what is.

``<CONVEYOR_STATE_DIR>/endpoints/<name>/`` holds:

- ``control.json``: ``{"live": {"version", "model_dir"} | null, "candidate": {...} | null,
  "serial": int}``, the desired state. Deployments change it (:func:`stage_candidate`,
  :func:`promote_candidate`, :func:`drop_candidate`); every write replaces the file atomically
  (temporary file + ``os.replace``) under a lock and increases ``serial``, so a worker polling it
  reads either the old or the new document, never half of one.
- ``workers/<pid>.json``: each server worker's heartbeat, what it has loaded:
  ``{"pid", "live", "candidate", "loaded_at", "error", "serial", "updated_at"}``.
- ``server.json`` and ``server.log``: written by :mod:`conveyor.serving.process`.

A rollout is: stage a candidate, :func:`wait_for_workers` (every worker loaded it beside the
live model, or one failed), smoke-test it, promote it; a rollback is :func:`drop_candidate`.
Nothing here imports Airflow: the server workers import this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conveyor import settings
from conveyor.errors import TransientError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9_])*$")
NAME_MAX = 63
EMPTY_CONTROL: dict[str, Any] = {"live": None, "candidate": None, "serial": 0}


class EndpointError(TransientError):
    """An endpoint operation failed (names the endpoint and what went wrong).

    Transient: a server that is starting, exiting or being replaced may be fine on the task's next try.
    """


class RolloutFailed(EndpointError):
    """Workers did not load a candidate: one failed (the errors are listed) or the wait timed out.

    :param message: what failed.
    :param errors: pid -> error message of each worker that failed.
    """

    def __init__(self, message: str, errors: dict[int, str] | None = None):
        super().__init__(message)
        self.errors = errors or {}


# ------------------------------------------------------------------------------------- folders


def endpoint_dir(name: str) -> Path:
    """The state folder of an endpoint (not created).

    :param name: the endpoint name: letters, digits, ``-`` and ``_``, at most 63 characters.
    """
    if not isinstance(name, str) or len(name) > NAME_MAX or not NAME_PATTERN.match(name):
        raise ValueError(
            f"endpoint name {name!r} is not valid: use 1 to {NAME_MAX} letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return settings.state_dir() / "endpoints" / name


def control_path(name: str) -> Path:
    """The endpoint's ``control.json``.

    :param name: the endpoint name.
    """
    return endpoint_dir(name) / "control.json"


def workers_dir(name: str) -> Path:
    """The folder of the workers' heartbeat files.

    :param name: the endpoint name.
    """
    return endpoint_dir(name) / "workers"


def write_json_atomic(path: Path, document: dict[str, Any], durable: bool = True) -> None:
    """Write a JSON document so readers see the old or the new file, never a partial one.

    :param path: the file to replace.
    :param document: what to write.
    :param durable: fsync before the rename (control documents; heartbeats skip it).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=2, sort_keys=True)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# ------------------------------------------------------------------------------------- control


def _model_ref(ref: Any, role: str) -> dict[str, str] | None:
    """Check one ``live``/``candidate`` entry of a control document.

    :param ref: the entry: null or ``{"version", "model_dir"}``.
    :param role: ``live`` or ``candidate``, for messages.
    """
    if ref is None:
        return None
    keys = ("version", "model_dir")
    valid = isinstance(ref, dict) and all(isinstance(ref.get(key), str) and ref[key] for key in keys)
    if not valid:
        raise ValueError(f'control.json: "{role}" must be null or {{"version": str, "model_dir": str}}, got {ref!r}')
    return {"version": ref["version"], "model_dir": ref["model_dir"]}


def _checked(control: Any) -> dict[str, Any]:
    """A control document with its fields checked and nothing else kept.

    :param control: the document.
    """
    if not isinstance(control, dict):
        raise ValueError(f"control.json must hold a JSON object, got {type(control).__name__}")
    serial = control.get("serial", 0)
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
        raise ValueError(f'control.json: "serial" must be a non-negative integer, got {serial!r}')
    return {
        "live": _model_ref(control.get("live"), "live"),
        "candidate": _model_ref(control.get("candidate"), "candidate"),
        "serial": serial,
    }


def read_control(name: str) -> dict[str, Any]:
    """The endpoint's control document; ``{"live": None, "candidate": None, "serial": 0}`` when absent.

    :param name: the endpoint name.
    """
    path = control_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return dict(EMPTY_CONTROL)
    try:
        return _checked(json.loads(text))
    except ValueError as error:
        raise EndpointError(f"endpoint {name}: {path} is not a valid control document: {error}") from None


def write_control(name: str, control: dict[str, Any]) -> dict[str, Any]:
    """Replace ``control.json`` atomically; returns the document written.

    :param name: the endpoint name.
    :param control: ``{"live", "candidate", "serial"}``; workers react to any change of the file.
    """
    checked = _checked(control)
    write_json_atomic(control_path(name), checked)
    return checked


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold the endpoint's lock while reading and changing ``control.json``.

    :param name: the endpoint name.
    """
    folder = endpoint_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".control.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_candidate(name: str, version: str, model_dir: str | Path) -> dict[str, Any]:
    """Ask every worker to load a model beside the live one (replaces a staged candidate).

    :param name: the endpoint name.
    :param version: the model version (what responses will name).
    :param model_dir: the extracted ``model.tar.gz`` (with ``code/inference.py`` and ``metadata.json``).
    """
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "code" / "inference.py").is_file():
        raise EndpointError(
            f"endpoint {name}: {model_dir} holds no code/inference.py; is it an extracted model.tar.gz?"
        )
    with _locked(name):
        control = read_control(name)
        control["candidate"] = {"version": version, "model_dir": str(model_dir)}
        control["serial"] += 1
        return write_control(name, control)


def promote_candidate(name: str) -> dict[str, Any]:
    """Make the staged candidate live (one atomic write); workers swap without dropping a request.

    :param name: the endpoint name.
    """
    with _locked(name):
        control = read_control(name)
        if control["candidate"] is None:
            raise EndpointError(f"endpoint {name}: there is no candidate to promote (stage one first)")
        control = {"live": control["candidate"], "candidate": None, "serial": control["serial"] + 1}
        return write_control(name, control)


def drop_candidate(name: str) -> dict[str, Any]:
    """Roll back: forget the candidate, workers unload it; the live model is untouched.

    Idempotent: with no candidate staged the document is left as it is.

    :param name: the endpoint name.
    """
    with _locked(name):
        control = read_control(name)
        if control["candidate"] is None:
            return control
        control["candidate"] = None
        control["serial"] += 1
        return write_control(name, control)


# ------------------------------------------------------------------------------------- workers


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not count).

    :param pid: the process id.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def heartbeat_path(name: str, pid: int) -> Path:
    """A worker's heartbeat file.

    :param name: the endpoint name.
    :param pid: the worker's process id.
    """
    return workers_dir(name) / f"{pid}.json"


HOST = socket.gethostname()
REMOTE_STALE_S = 15.0  # a heartbeat from another host (an endpoint container) older than this is dead


def _remote_alive(state: dict[str, Any]) -> bool:
    """Whether a heartbeat written on another host (whose pids we cannot see) is recent enough.

    :param state: the heartbeat.
    """
    from datetime import UTC, datetime

    try:
        updated = datetime.fromisoformat(str(state["updated_at"]))
    except (KeyError, ValueError):
        return False
    return (datetime.now(UTC) - updated).total_seconds() < REMOTE_STALE_S


def worker_states(name: str) -> list[dict[str, Any]]:
    """The heartbeats of the endpoint's running workers, by pid; files of dead workers are removed.

    A worker on this host is alive while its process is; one on another host (the endpoint
    service of docker compose, sharing the state folder) while its heartbeat is recent.

    :param name: the endpoint name.
    """
    states = []
    folder = workers_dir(name)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not path.stem.isdigit():
            continue
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # removed or replaced between listing and reading
        remote = state.get("host") not in (None, HOST)
        if not (_remote_alive(state) if remote else pid_alive(int(path.stem))):
            if not remote:
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        states.append(state)
    return states


def _expected_workers(name: str) -> int:
    """How many workers the endpoint's server runs: ``server.json`` when this host started it, else
    ``CONVEYOR_ENDPOINT_WORKERS`` (an endpoint run as its own service), else 1.

    :param name: the endpoint name.
    """
    try:
        return int(json.loads((endpoint_dir(name) / "server.json").read_text())["workers"])
    except (OSError, ValueError, KeyError, TypeError):
        return settings.endpoint_service_workers()


def wait_for_workers(
    name: str, version: str, timeout: float = 120.0, poll: float = 0.1, live: bool = False
) -> list[dict[str, Any]]:
    """Wait until every running worker has loaded ``version`` (as candidate or live); their states.

    Waits for as many workers as ``server.json`` says the server runs (a restarting worker is
    waited for). Raises :class:`RolloutFailed` as soon as a worker reports that loading
    ``version`` failed, or when ``timeout`` passes, naming every worker and its state.

    :param name: the endpoint name.
    :param version: the staged candidate's version.
    :param timeout: seconds to wait at most.
    :param poll: seconds between looks at the heartbeats.
    :param live: wait until every worker serves ``version`` as live (after a promotion).
    """
    deadline = time.monotonic() + timeout
    expected = _expected_workers(name)
    while True:
        states = worker_states(name)
        errors = {
            state["pid"]: state["error"]["message"]
            for state in states
            if (state.get("error") or {}).get("version") == version
        }
        if errors:
            shown = "; ".join(f"worker {pid}: {message}" for pid, message in sorted(errors.items()))
            raise RolloutFailed(
                f"endpoint {name}: version {version} failed to load on {len(errors)} of {len(states)} worker(s): "
                f"{shown}",
                errors,
            )
        roles = ("live",) if live else ("candidate", "live")
        ready = [state for state in states if version in {_version(state.get(role)) for role in roles}]
        if states and len(ready) == len(states) and len(states) >= expected:
            return states
        if time.monotonic() >= deadline:
            shown = (
                "; ".join(
                    f"worker {state['pid']}: live={_version(state.get('live'))} "
                    f"candidate={_version(state.get('candidate'))}"
                    for state in states
                )
                or "no worker reported"
            )
            raise RolloutFailed(
                f"endpoint {name}: version {version} not loaded by {expected} worker(s) within {timeout:g}s: {shown}"
            )
        time.sleep(poll)


def _version(ref: dict[str, Any] | None) -> str | None:
    """The version of a heartbeat's ``live``/``candidate`` entry.

    :param ref: the entry or None.
    """
    return ref.get("version") if isinstance(ref, dict) else None
