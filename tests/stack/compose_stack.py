"""docker-compose.yaml started for real: the compose CLI, the containers' health, the lake on the S3 stand-in.

``ComposeStack`` runs ``docker compose`` (v2) or ``docker-compose`` (v1), whichever is installed, on the production
file plus ``docker-compose.test.yaml`` (the offline stand-in images) with a generated ``.env`` (fresh secrets from
``docker/check_secrets.py --write``) and a private ``include/`` with the churn pipeline made small (the same file the
Celery test uses), under one project name. It talks to the services on their published ports (127.0.0.1, inside
the network namespace ``scripts/compose-test.sh`` runs the test in): the REST API, MLflow, the S3 lake, the
warehouse and the model endpoint.

Used by ``tests/stack/`` and ``bench/compose.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT / "tests" / "distributed"))

from celery_stack import AirflowApi, StackError, small_pipeline  # noqa: E402

FILES = ("docker-compose.yaml", "docker-compose.test.yaml")
ONE_SHOTS = {"secrets-check", "minio-init", "airflow-init"}
LAKE_BUCKET = "conveyor-lake"


def compose_command() -> list[str]:
    """``docker compose`` when the v2 plugin is there, else ``docker-compose`` (v1); [] when neither."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else []


def engine_problem() -> str | None:
    """Why no compose stack can run here (None when the daemon answers and a compose CLI exists)."""
    if not os.environ.get("CONVEYOR_STACK_DAEMON"):
        return "the compose stack test runs under `make test-compose` (scripts/compose-test.sh starts its engine)"
    if not compose_command():
        return "neither `docker compose` nor `docker-compose` is installed"
    if subprocess.run(["docker", "version"], capture_output=True).returncode != 0:
        return f"no Docker daemon answers at {os.environ.get('DOCKER_HOST', 'the default socket')}"
    return None


class TokenApi(AirflowApi):
    """The REST API with the FAB auth manager's admin: a JWT from ``POST /auth/token`` with the .env's password."""

    def __init__(self, base_url: str, username: str, password: str, diagnose: Callable[[], str]):
        super().__init__(base_url, username, Path("/nonexistent"), diagnose)
        self.password = password

    def login(self) -> str:
        answer = self.http.post("/auth/token", json={"username": self.username, "password": self.password})
        if answer.status_code not in (200, 201):
            raise StackError(f"POST /auth/token answered {answer.status_code}: {answer.text[:300]}")
        self._token = answer.json()["access_token"]
        return self._token


class ComposeStack:
    """The stack of one test run: its ``.env``, its include folder, its project name.

    :param root: a private folder (the .env, the include copy, logs).
    :param project: the compose project name.
    :param time_limit: the churn trainer's budget in seconds.
    """

    def __init__(self, root: Path, project: str = "conveyor-stack-test", time_limit: int = 15):
        self.root = root
        self.project = project
        self.env_file = root / ".env"
        self.include = root / "include"
        self.time_limit = time_limit
        self.env: dict[str, str] = {}
        self._api: TokenApi | None = None

    # ---------------------------------------------------------------------------------- set-up

    def prepare(self) -> ComposeStack:
        """Fresh secrets in ``.env`` (the example's settings otherwise), the small churn pipeline in ``include/``."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.env_file.exists():
            subprocess.run(
                [sys.executable, str(PROJECT / "docker" / "check_secrets.py"), "--write", str(self.env_file)],
                check=True,
                capture_output=True,
            )
        self.env = read_env(self.env_file)
        # Written in place, never removed: running containers bind-mount this folder (a new one would not be theirs).
        shutil.copytree(
            PROJECT / "include", self.include, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True
        )
        for extra in (self.include / "pipelines").glob("*.yaml"):
            extra.unlink()
        spec = small_pipeline("churn", port=8090, time_limit=self.time_limit, retry_delay=5.0)
        (self.include / "pipelines" / "churn.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        os.chmod(self.include, 0o755)
        return self

    def environment(self) -> dict[str, str]:
        """The compose CLI's environment: the include override and the host's locally added CA certificates."""
        env = dict(os.environ, CONVEYOR_STACK_INCLUDE=str(self.include), COMPOSE_PROJECT_NAME=self.project)
        env["DOCKER_BUILDKIT"] = "0"
        env["COMPOSE_DOCKER_CLI_BUILD"] = "0"
        return env

    def compose(self, *args: str, check: bool = True, timeout: float = 1800, env_file: Path | None = None):
        """One compose command on the two files; its completed process (stdout and stderr captured).

        :param args: the command and its options.
        :param check: fail (with its output) on a non-zero status.
        :param timeout: seconds.
        :param env_file: another .env than the stack's (the refusal case).
        """
        argv = [*compose_command(), "--project-directory", str(PROJECT), "--env-file", str(env_file or self.env_file)]
        for name in FILES:
            argv += ["-f", str(PROJECT / name)]
        done = subprocess.run(
            [*argv, *args], cwd=PROJECT, env=self.environment(), capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise StackError(
                f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    # ---------------------------------------------------------------------------------- state

    def containers(self) -> dict[str, dict[str, Any]]:
        """``docker inspect`` of every container of the project, by service name (the latest one of each)."""
        ids = self.compose("ps", "-a", "-q").stdout.split()
        if not ids:
            return {}
        found = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in found}

    def not_ready(self) -> list[str]:
        """Services not yet healthy (one-shots: not yet exited 0), with their state."""
        waiting = []
        containers = self.containers()
        for name in self.services():
            state = containers.get(name, {}).get("State")
            if state is None:
                waiting.append(f"{name}: no container")
            elif name in ONE_SHOTS:
                if state["Status"] != "exited" or state["ExitCode"] != 0:
                    waiting.append(f"{name}: {state['Status']} (exit {state['ExitCode']})")
            elif (state.get("Health") or {}).get("Status") != "healthy":
                waiting.append(f"{name}: {state['Status']}, {(state.get('Health') or {}).get('Status')}")
        return waiting

    def services(self) -> list[str]:
        """The services ``up`` starts: those in no profile (v1's ``config --services`` lists every one)."""
        resolved = yaml.safe_load(self.compose("config").stdout)["services"]
        return sorted(name for name, service in resolved.items() if not service.get("profiles"))

    def wait_healthy(self, timeout: float) -> float:
        """Wait until every service is healthy and every one-shot done; the seconds it took.

        :param timeout: seconds.
        """
        started = time.monotonic()
        waiting: list[str] = []
        while time.monotonic() - started < timeout:
            waiting = self.not_ready()
            failed = [w for w in waiting if "exited (exit" in w and not w.endswith("(exit 0)")]
            if not waiting:
                return time.monotonic() - started
            if failed:
                break
            time.sleep(3)
        raise StackError(f"services not ready after {time.monotonic() - started:.0f}s: {waiting}\n{self.logs()}")

    def logs(self, *services: str, tail: int = 40) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout[-12000:]

    def container_id(self, service: str) -> str:
        return self.containers()[service]["Id"]

    def exec(self, service: str, *argv: str) -> str:
        """Run a command in a service's container (as its user); its stdout."""
        done = subprocess.run(["docker", "exec", self.container_id(service), *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"{service}: {' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    # ---------------------------------------------------------------------------------- clients

    @property
    def api(self) -> TokenApi:
        if self._api is None:
            port = self.env.get("AIRFLOW_PORT", "8080")
            self._api = TokenApi(
                f"http://127.0.0.1:{port}",
                self.env["AIRFLOW_ADMIN_USERNAME"],
                self.env["AIRFLOW_ADMIN_PASSWORD"],
                lambda: self.logs("airflow-worker", "airflow-scheduler", "model-endpoint"),
            )
        return self._api

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.env.get('MLFLOW_PORT', '5000')}"

    @property
    def warehouse_url(self) -> str:
        env = self.env
        return (
            f"postgresql+psycopg2://{env.get('WAREHOUSE_DB_USER', 'warehouse')}:{env['WAREHOUSE_DB_PASSWORD']}"
            f"@127.0.0.1:{env.get('POSTGRES_PORT', '15432')}/{env.get('WAREHOUSE_DB_NAME', 'warehouse')}"
        )

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.env.get('ENDPOINT_PORT', '8090')}"

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.env.get('MINIO_PORT', '9000')}",
            aws_access_key_id=self.env["CONVEYOR_S3_ACCESS_KEY"],
            aws_secret_access_key=self.env["CONVEYOR_S3_SECRET_KEY"],
            region_name="us-east-1",
        )

    def write_drop(self, drop: str, frame: Any, *parts: str, fmt: str = "csv") -> str:
        """A complete drop in the S3 lake's landing zone (the data file, then the ``_SUCCESS`` marker); its prefix.

        :param drop: the drop's folder name.
        :param frame: a pandas DataFrame.
        :param parts: folders between the pipeline and the drop (``"inference"`` for batch input).
        :param fmt: ``csv`` or ``parquet``.
        """
        import io

        prefix = "/".join(["landing", "churn", *parts, drop])
        body = io.BytesIO()
        if fmt == "csv":
            frame.to_csv(body, index=False)
        else:
            frame.to_parquet(body, index=False)
        s3 = self.s3()
        s3.put_object(Bucket=LAKE_BUCKET, Key=f"{prefix}/customers.{fmt}", Body=body.getvalue())
        s3.put_object(Bucket=LAKE_BUCKET, Key=f"{prefix}/_SUCCESS", Body=b"")
        return prefix

    def endpoint_credentials(self) -> dict[str, str]:
        """The model endpoint's generated credentials (the state volume's file, read inside the container)."""
        return json.loads(self.exec("model-endpoint", "cat", "/opt/airflow/state/endpoint-credentials.json"))

    def runtime(self):
        """A ``sagemaker-runtime`` client on the endpoint's published port, signing with its access key."""
        import boto3
        from botocore.config import Config

        creds = self.endpoint_credentials()
        return boto3.client(
            "sagemaker-runtime",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=creds["access_key_id"],
            aws_secret_access_key=creds["secret_access_key"],
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}),
        )


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip().strip("'\"")
    return found


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Poll ``check`` until truthy (an exception counts as not yet); StackError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as exc:  # a container restarting, a connection reset: try again
            last, result = exc, None
        if result:
            return result
        time.sleep(interval)
    raise StackError(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last!r})" if last else "")
    )
