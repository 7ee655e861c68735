"""Airflow's distributed set-up on this machine: real components on PostgreSQL and Redis.

``AirflowStack`` brings PostgreSQL and Redis up (``scripts/services.sh``), creates fresh databases
for the run (Airflow metadata, MLflow store, predictions warehouse), migrates the metadata DB and
starts ``airflow api-server``, ``scheduler``, ``dag-processor``, ``triggerer`` and
``celery worker`` (CeleryExecutor, Redis broker, results in PostgreSQL) as child processes, each in
its own process group and logging to ``<root>/logs/<component>-<n>.log``. The project's ``dags/``
and ``plugins/`` are used as they are; the pipeline files come from the caller (a private
``include/`` copy), and the lake, state folder and endpoint ports are private to the stack.

``AirflowApi`` talks to the REST API v2 as a person in the UI does: a JWT from ``POST /auth/token``
with the simple auth manager's generated admin password, then unpause, trigger with Params, watch
runs and task instances, and answer human-in-the-loop requests.

``FaultyProxy`` sits between the warehouse connection and PostgreSQL and can drop every connection
(and refuse new ones for a while) the moment it sees a given statement go through.

Used by ``tests/distributed/`` and ``bench/scheduling.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[2]
SERVICES = PROJECT / "scripts" / "services.sh"
BIN = Path(sys.executable).parent
PG_HOST = os.environ.get("PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGPORT", "5432"))
PG_USER = os.environ.get("PGUSER", "postgres")
REDIS_HOST = os.environ.get("CONVEYOR_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CONVEYOR_REDIS_PORT", "6379"))
TERMINAL = {"success", "failed"}
LOG_TAIL_LINES = 60


class ServicesUnavailable(RuntimeError):
    """PostgreSQL or Redis is down and this machine cannot start it (``services.sh`` exit 3)."""


class StackError(AssertionError):
    """A wait ran out or a run ended badly; the message carries the components' log tails."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def services(*args: str) -> None:
    """Run ``scripts/services.sh`` (``up``, ``fresh-db NAME…``, ``drop-db NAME…``).

    :param args: the sub-command and its arguments.
    :raises ServicesUnavailable: a service is down and cannot be started here.
    """
    done = subprocess.run([str(SERVICES), *args], capture_output=True, text=True, timeout=180)
    if done.returncode == 3:
        raise ServicesUnavailable(done.stderr.strip())
    if done.returncode != 0:
        raise RuntimeError(f"scripts/services.sh {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def pg_url(database: str, port: int = PG_PORT, driver: str = "postgresql+psycopg2") -> str:
    """A SQLAlchemy URL of a database on the PostgreSQL server (trust auth, no password).

    :param database: the database name.
    :param port: the port (a proxy's, to go through it).
    :param driver: the URL scheme.
    """
    return f"{driver}://{PG_USER}@{PG_HOST}:{port}/{database}"


def utc(value: str | None) -> datetime | None:
    """An ISO timestamp of the REST API as an aware datetime (None stays None)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def now_utc() -> datetime:
    return datetime.now(UTC)


def process_tree(pid: int) -> list[int]:
    """The pid and every live descendant of it (any process group or session)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def small_pipeline(
    name: str,
    *,
    port: int,
    time_limit: int = 10,
    approval: str = "auto",
    batch: bool = True,
    retry_delay: float = 2.0,
    retries: int = 2,
    gbm_only: bool = True,
) -> dict[str, Any]:
    """The demo churn pipeline made small and quick, as a pipeline file's content (a dict).

    No schedules (only the assets and people start runs), a trainer budget of ``time_limit``
    seconds (gradient boosting only, unless told), a gate any retrain passes, one endpoint worker.

    :param name: the pipeline's name (also its endpoint's and registered model's).
    :param port: the endpoint's port.
    :param time_limit: the trainer's default budget in seconds (the train form's default).
    :param approval: ``auto`` or ``manual``.
    :param batch: whether it has a batch_predict DAG.
    :param retry_delay: seconds before a failed task's first retry.
    :param retries: retries of every task.
    :param gbm_only: train LightGBM only (fast) instead of the demo's model types.
    """
    spec = yaml.safe_load((PROJECT / "include" / "pipelines" / "churn.yaml").read_text())
    spec.update(name=name, expectations="churn", retries=retries, retry_delay=retry_delay, approval=approval)
    spec["ingest"] = {"schedule": None, "poke_interval": 2, "timeout": 900}
    spec["trainer"]["time_limit"] = time_limit
    if gbm_only:
        spec["trainer"]["hyperparameters"] = {"GBM": {}}
    spec["retrain"] = {"schedule": None, "on_new_data": True}
    spec["gate"].update(thresholds={"roc_auc": 0.6}, min_improvement=-1.0)
    spec["deploy"] = {
        "endpoint": {"enabled": True, "name": name, "workers": 1, "port": port, "capture_share": 0.0},
        "batch": {"enabled": batch, "schedule": None, "table": f"{name}_predictions", "workers": 1, "chunk_rows": 5000},
    }
    spec["monitor"] = {**spec.get("monitor", {}), "schedule": None}
    return spec


class FaultyProxy:
    """A TCP proxy to a server that can cut every connection when a pattern goes through it.

    ``arm(pattern, outage_s)``: the next time a client sends bytes containing ``pattern``, every
    open connection is closed at once and new ones are reset for ``outage_s`` seconds; then it
    forwards normally again. ``trips`` counts how often that happened.

    :param target: (host, port) of the server.
    """

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self.trips = 0
        self._pattern: bytes | None = None
        self._outage_s = 0.0
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stopped = threading.Event()

    def start(self) -> FaultyProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.5)
        self._listener, self.port = listener, listener.getsockname()[1]
        threading.Thread(target=self._accept, name="faulty-proxy", daemon=True).start()
        return self

    def arm(self, pattern: bytes, outage_s: float) -> None:
        """Cut everything the next time ``pattern`` goes from a client to the server.

        :param pattern: bytes to look for in what clients send (e.g. an SQL statement's start).
        :param outage_s: seconds new connections are refused afterwards.
        """
        with self._lock:
            self._pattern, self._outage_s = pattern, outage_s

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            doomed, self._sockets = list(self._sockets), set()
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if time.monotonic() < self._down_until:  # the server is "unreachable": reset at once
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if from_client and self._pattern is not None:
                    seen = tail + chunk
                    if self._pattern in seen:
                        with self._lock:
                            self._pattern, self.trips = None, self.trips + 1
                            self._down_until = time.monotonic() + self._outage_s
                        self._cut_all()
                        return
                    tail = seen[-len(self._pattern) :]
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)


class AirflowApi:
    """Airflow's REST API v2 as a person in the UI uses it (simple auth manager, JWT).

    :param base_url: the api-server's URL.
    :param username: the user.
    :param password_file: the simple auth manager's generated passwords file (JSON).
    :param diagnose: returns the components' log tails for error messages.
    """

    def __init__(self, base_url: str, username: str, password_file: Path, diagnose: Callable[[], str] = lambda: ""):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password_file = password_file
        self.diagnose = diagnose
        self.http = httpx.Client(base_url=self.base_url, timeout=60)
        self._token: str | None = None

    def login(self) -> str:
        """A JWT from ``POST /auth/token`` with the generated admin password."""
        password = json.loads(self.password_file.read_text())[self.username]
        answer = self.http.post("/auth/token", json={"username": self.username, "password": password})
        if answer.status_code != 201:
            raise StackError(f"POST /auth/token answered {answer.status_code}: {answer.text[:300]}")
        self._token = answer.json()["access_token"]
        return self._token

    def call(self, method: str, path: str, expect: Iterable[int] = (200,), **kwargs: Any) -> Any:
        """One authenticated call; its JSON answer. A 401 logs in again once.

        :param method: the HTTP method.
        :param path: below ``/api/v2``.
        :param expect: the statuses that count as success.
        """
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self._token or self.login()}"}
            answer = self.http.request(method, f"/api/v2{path}", headers=headers, **kwargs)
            if answer.status_code == 401 and attempt == 0:
                self._token = None
                continue
            break
        if answer.status_code not in set(expect):
            raise StackError(f"{method} /api/v2{path} answered {answer.status_code}: {answer.text[:500]}")
        return answer.json() if answer.content else None

    def health(self) -> dict[str, Any]:
        return self.http.get("/api/v2/monitor/health").json()

    def dag_ids(self, tag: str | None = None) -> list[str]:
        params: dict[str, Any] = {"limit": 100}
        if tag:
            params["tags"] = tag
        return sorted(d["dag_id"] for d in self.call("GET", "/dags", params=params)["dags"])

    def unpause(self, dag_id: str) -> None:
        self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> dict[str, Any]:
        """Trigger a run with the form's values (Params), as the UI's Trigger button does."""
        return self.call("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def hitl_details(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/hitlDetails")["hitl_details"]

    def answer(self, dag_id: str, run_id: str, task_id: str, options: list[str], expect: Iterable[int] = (200,)) -> Any:
        """Answer a human-in-the-loop request (Browse → Required Actions in the UI)."""
        return self.call(
            "PATCH",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails",
            json={"chosen_options": options, "params_input": {}},
            expect=expect,
        )

    def wait(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
        """Poll ``check`` until it returns something truthy; fail with the logs after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = check()
            except StackError:
                raise
            except Exception as exc:  # the API restarting, a connection reset: try again
                last_error, result = exc, None
            if result:
                return result
            time.sleep(interval)
        raise StackError(
            f"timed out after {timeout:.0f}s waiting for {what}"
            + (f" (last error: {last_error!r})" if last_error else "")
            + "\n"
            + self.diagnose()
        )

    def wait_run(self, dag_id: str, run_id: str, timeout: float, state: str = "success") -> dict[str, Any]:
        """Wait for a run to end; fail (with task states and logs) unless it ends in ``state``."""
        run = self.wait(
            f"{dag_id} run {run_id} to end", lambda: (r := self.run(dag_id, run_id))["state"] in TERMINAL and r, timeout
        )
        if run["state"] != state:
            raise StackError(
                f"{dag_id} run {run_id} ended {run['state']}, not {state}: "
                f"{self.task_states(dag_id, run_id)}\n{self.diagnose()}"
            )
        return run

    def wait_new_run(self, dag_id: str, known: set[str], timeout: float) -> dict[str, Any]:
        """Wait for a run of ``dag_id`` whose id is not in ``known`` (one an Asset or a schedule started)."""
        return self.wait(
            f"a new run of {dag_id}",
            lambda: next((r for r in self.runs(dag_id) if r["dag_run_id"] not in known), None),
            timeout,
        )


class AirflowStack:
    """Airflow 3's components on CeleryExecutor, PostgreSQL and Redis, for one test module or benchmark.

    :param root: an empty folder for everything of this stack (Airflow home, lake, state, logs).
    :param pipelines: pipeline files by name (the content as a dict, see :func:`small_pipeline`).
    :param worker_concurrency: Celery worker slots.
    :param warehouse_proxy: put a :class:`FaultyProxy` between the warehouse connection and PostgreSQL.
    :param heartbeat_timeout: seconds without a task heartbeat before the scheduler fails the task.
    """

    COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer", "worker")

    def __init__(
        self,
        root: Path,
        pipelines: dict[str, dict[str, Any]],
        *,
        worker_concurrency: int = 2,
        warehouse_proxy: bool = False,
        heartbeat_timeout: int = 30,
    ):
        self.root = root
        self.pipelines = pipelines
        self.worker_concurrency = worker_concurrency
        self.heartbeat_timeout = heartbeat_timeout
        token = uuid.uuid4().hex[:10]
        self.databases = {kind: f"conveyor_{kind}_{token}" for kind in ("airflow", "mlflow", "warehouse")}
        self.queue = f"conveyor_{token}"
        self.api_port = free_port()
        self.redis_db: int | None = None
        self.redis_claim = f"conveyor-stack:{token}"
        self.proxy = FaultyProxy((PG_HOST, PG_PORT)) if warehouse_proxy else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}
        self.logs: list[Path] = []
        self.env: dict[str, str] = {}
        self.api: AirflowApi | None = None

    # -- paths and URLs ----------------------------------------------------------------------

    @property
    def airflow_home(self) -> Path:
        return self.root / "airflow"

    @property
    def lake_root(self) -> Path:
        return self.root / "lake"

    @property
    def tracking_uri(self) -> str:
        return pg_url(self.databases["mlflow"])

    @property
    def warehouse_url(self) -> str:
        """The warehouse as the test reads it (directly, not through the proxy)."""
        return pg_url(self.databases["warehouse"])

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def endpoint_url(self, pipeline: str) -> str:
        return f"http://127.0.0.1:{self.pipelines[pipeline]['deploy']['endpoint']['port']}"

    # -- start and stop ----------------------------------------------------------------------

    def start(self, timeout: float = 300) -> AirflowStack:
        """Services up, fresh databases, ``airflow db migrate``, every component started and healthy."""
        started = time.monotonic()
        services("up")
        services("fresh-db", *self.databases.values())
        self._claim_redis_db()
        if self.proxy is not None:
            self.proxy.start()
        self._write_include()
        self.env = self._environment()
        for folder in (self.airflow_home, self.lake_root, self.root / "state", self.root / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
        self._migrate()
        for name in self.COMPONENTS:
            self.start_component(name)
        self.api = AirflowApi(self.api_url, "admin", self.airflow_home / "passwords.json", self.diagnose)
        remaining = max(30.0, timeout - (time.monotonic() - started))
        self.api.wait(
            "the api-server and the generated admin password",
            lambda: self._alive() and (self.airflow_home / "passwords.json").exists() and self.api.login(),
            remaining,
        )
        self.api.wait("scheduler, triggerer and dag-processor to report healthy", self._healthy, remaining)
        expected = {
            f"{name}__{kind}"
            for name, spec in self.pipelines.items()
            for kind in (
                "ingest",
                "train",
                "deploy",
                *(["batch_predict"] if spec["deploy"]["batch"]["enabled"] else []),
            )
        }
        self.api.wait(
            f"the DAGs {sorted(expected)} to be parsed",
            lambda: self._alive() and expected <= set(self.api.dag_ids()),
            remaining,
        )
        return self

    def stop(self) -> None:
        """Stop the components and the endpoints, drop the databases, free the Redis database."""
        for name in reversed(self.COMPONENTS):
            self.stop_component(name)
        if self.env:
            with contextlib.suppress(Exception):
                subprocess.run(
                    [str(BIN / "python"), "-m", "conveyor.cli", "stop"],
                    env=self.env,
                    cwd=self.root,
                    capture_output=True,
                    timeout=120,
                )
        if self.proxy is not None:
            self.proxy.stop()
        self._release_redis_db()
        with contextlib.suppress(Exception):
            services("drop-db", *self.databases.values())

    def __enter__(self) -> AirflowStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _claim_redis_db(self) -> None:
        """An empty Redis database (1-15) for the broker, claimed with a key so no other stack takes it."""
        import redis

        for number in range(1, 16):
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
            if client.dbsize() == 0 and client.set(self.redis_claim, "1", nx=True, ex=6 * 3600):
                if client.dbsize() == 1:
                    self.redis_db = number
                    return
                client.delete(self.redis_claim)
        raise RuntimeError(f"no empty Redis database (1-15) on {REDIS_HOST}:{REDIS_PORT} for the Celery broker")

    def _release_redis_db(self) -> None:
        import redis

        if self.redis_db is None:
            return
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db)
        with contextlib.suppress(Exception):
            if client.get(self.redis_claim) is not None:
                client.flushdb()
        self.redis_db = None

    def _write_include(self) -> None:
        """A private ``include/`` holding the project's code and suites and only the given pipelines."""
        include = self.root / "include"
        shutil.copytree(PROJECT / "include", include, ignore=shutil.ignore_patterns("pipelines", "__pycache__"))
        (include / "pipelines").mkdir()
        for name, spec in self.pipelines.items():
            (include / "pipelines" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))

    def _environment(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "CONVEYOR_", "MLFLOW_", "PYTEST_", "COV_"))
        }
        warehouse_port = self.proxy.port if self.proxy is not None else PG_PORT
        warehouse = f"postgresql://{PG_USER}@{PG_HOST}:{warehouse_port}/{self.databases['warehouse']}?sslmode=disable"
        metadata = pg_url(self.databases["airflow"])
        return {
            **keep,
            "PATH": os.pathsep.join([str(BIN), keep.get("PATH", "")]),
            "PYTHONPATH": str(PROJECT / "plugins"),
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.airflow_home / "passwords.json"),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + metadata,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": self.queue,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "30",
            "AIRFLOW_CONN_CONVEYOR_WAREHOUSE": warehouse,
            "CONVEYOR_STATE_DIR": str(self.root / "state"),
            "CONVEYOR_LAKE_URI": self.lake_root.as_uri(),
            "CONVEYOR_INCLUDE_DIR": str(self.root / "include"),
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "GX_ANALYTICS_ENABLED": "False",
        }

    def _migrate(self) -> None:
        """``airflow db migrate`` on the fresh metadata DB; MLflow's schema on its own DB."""
        import importlib.util

        wanted = ["celery", "redis", "psycopg2"]
        if self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql"):
            wanted.append("asyncpg")  # Airflow's async engine on PostgreSQL
        missing = [name for name in wanted if importlib.util.find_spec(name) is None]
        if missing:
            raise StackError(
                f"Airflow on PostgreSQL with Celery needs {', '.join(missing)} in {sys.prefix}: "
                "install requirements.txt"
            )
        log = self.root / "logs" / "db-migrate.log"
        self.logs.append(log)
        with log.open("w") as out:
            migrate = subprocess.Popen(
                [str(BIN / "airflow"), "db", "migrate"],
                env=self.env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            mlflow = subprocess.run(
                [
                    str(BIN / "python"),
                    "-c",
                    "import sys; from mlflow.tracking import MlflowClient; "
                    "MlflowClient(tracking_uri=sys.argv[1]).search_experiments()",
                    self.tracking_uri,
                ],
                env=self.env,
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=300,
            )
            code = migrate.wait(timeout=600)
        if code != 0:
            raise StackError(f"airflow db migrate failed ({code}):\n{self._tail(log)}")
        if mlflow.returncode != 0:
            raise StackError(f"creating the MLflow store failed:\n{mlflow.stderr[-3000:]}")

    # -- components --------------------------------------------------------------------------

    def command(self, name: str) -> list[str]:
        """The command line of a component."""
        airflow = str(BIN / "airflow")
        if name == "api-server":
            return [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]
        if name == "worker":
            number = self.starts.get(name, 0)
            return [
                airflow,
                "celery",
                "worker",
                "--queues",
                self.queue,
                "--concurrency",
                str(self.worker_concurrency),
                "--celery-hostname",
                f"{self.queue}-{number}@%h",
                "--without-mingle",
                "--without-gossip",
            ]
        return [airflow, name]

    def start_component(self, name: str) -> subprocess.Popen:
        """Start one component in its own process group, logging to ``logs/<name>-<n>.log``."""
        number = self.starts.get(name, 0) + 1
        log = self.root / "logs" / f"{name}-{number}.log"
        self.logs.append(log)
        command = self.command(name)
        self.starts[name] = number
        with log.open("w") as out:
            proc = subprocess.Popen(
                command,
                env=self.env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def kill_component(self, name: str) -> list[int]:
        """SIGKILL a component's process group and every process it started in other groups.

        What a node or container loss does: nothing of it gets to clean up. Returns the pids killed.
        """
        proc = self.procs[name]
        doomed = process_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return doomed

    def stop_component(self, name: str, grace: float = 20) -> None:
        """SIGTERM a component's process group, then SIGKILL what is left after ``grace`` seconds."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        tree = process_tree(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in tree:  # what the component started in other groups (task processes, training children)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def _alive(self) -> bool:
        dead = {name: proc.returncode for name, proc in self.procs.items() if proc.poll() is not None}
        if dead:
            raise StackError(f"component(s) exited: {dead}\n{self.diagnose()}")
        return True

    def _healthy(self) -> bool:
        self._alive()
        health = self.api.health() if self.api else {}
        return all(
            (health.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
        )

    # -- data and diagnostics ----------------------------------------------------------------

    def write_drop(self, pipeline: str, drop: str, frame: Any, *parts: str, fmt: str = "csv") -> Path:
        """A complete drop in the stack's lake: the data file, then the ``_SUCCESS`` marker.

        :param pipeline: the pipeline whose landing zone receives it.
        :param drop: the drop's folder name.
        :param frame: a pandas DataFrame.
        :param parts: folders between the pipeline and the drop (``"inference"`` for batch input).
        :param fmt: ``csv`` or ``parquet``.
        """
        target = self.lake_root.joinpath("landing", pipeline, *parts, drop)
        target.mkdir(parents=True, exist_ok=True)
        if fmt == "csv":
            frame.to_csv(target / "customers.csv", index=False)
        else:
            frame.to_parquet(target / "customers.parquet", index=False)
        (target / "_SUCCESS").write_bytes(b"")
        return target

    @staticmethod
    def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def task_logs(self, limit: int = 4) -> list[Path]:
        """The most recently written task log files."""
        found = sorted((self.airflow_home / "logs").glob("dag_id=*/**/*.log"), key=lambda p: p.stat().st_mtime)
        return found[-limit:]

    def diagnose(self) -> str:
        """The tail of every component's log and of the latest task logs."""
        parts = [f"===== {log.name} (last {LOG_TAIL_LINES} lines) =====\n{self._tail(log)}" for log in self.logs]
        parts += [
            f"===== task log {log.relative_to(self.airflow_home / 'logs')} =====\n{self._tail(log)}"
            for log in self.task_logs()
        ]
        return "\n".join(parts)
