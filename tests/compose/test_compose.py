"""docker-compose.yaml: valid against the Compose Specification's schema and true to the project's rules.

No ``docker compose`` plugin and no network at test time: the file is interpolated here with the
values of ``.env.example`` the way Compose does it, validated with ``jsonschema`` against the vendored
schema (``tests/data/compose-spec.json``, see ``tests/data/README.md``), then checked for what the
schema cannot know: health checks, credentials, mounts, the GPU worker, the commands each service runs
(parsed by Airflow's, MLflow's and uvicorn's own command-line parsers) and the settings Conveyor reads.
Every rule is also run on a broken copy of the file, to show it refuses it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[2]
COMPOSE = PROJECT / "docker-compose.yaml"
ENV_EXAMPLE = PROJECT / ".env.example"
SCHEMA = PROJECT / "tests" / "data" / "compose-spec.json"
DOCKERFILE = PROJECT / "docker" / "Dockerfile"
INIT_DB_SCRIPT = PROJECT / "docker" / "postgres" / "init-databases.sh"
CHECK_SECRETS = PROJECT / "docker" / "check_secrets.py"
SECRETS_CHECK = "secrets-check"
BIND = "${CONVEYOR_BIND_ADDRESS:-127.0.0.1}:"

AIRFLOW_COMPONENTS = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker"],
    "airflow-worker-gpu": ["celery", "worker"],
}
GPU_WORKER = "airflow-worker-gpu"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|PRIVATE|ACCESS_KEY|_AUTH$|^AUTH|_KEY$", re.IGNORECASE)
ONLY_REFERENCES = re.compile(r"(\$\{[^}]+\})*")
REFERENCE = re.compile(r"\$\{[^}]*\}")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME; "$$" is a literal "$".
VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# ------------------------------------------------------------------------------------- reading


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file (comments and blank lines skipped).

    :param path: the file.
    """
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip().strip("'\"")
    return values


def variables_used(text: str) -> set[str]:
    """The names of the variables a compose file interpolates.

    :param text: the file's text.
    """
    return {m.group("braced") or m.group("bare") for m in VARIABLE.finditer(text) if m.group(0) != "$$"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """The file as Compose interpolates it with ``env`` (a missing required variable raises).

    :param text: the file's text.
    :param env: the variables (the values of ``.env``).
    """

    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg")
        current = env.get(name)
        if op in (":-", "-"):
            use_default = current is None or (op == ":-" and current == "")
            return arg if use_default else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise KeyError(f"required variable {name} is not set: {arg}")
            return current
        return current or ""

    return VARIABLE.sub(value, text)


def load(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)  # PyYAML resolves the anchors and '<<' merge keys as Compose does


@pytest.fixture(scope="module")
def raw_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def raw(raw_text) -> dict[str, Any]:
    """The file as written (``${...}`` references kept)."""
    return load(raw_text)


@pytest.fixture(scope="module")
def resolved(raw_text, env_example) -> dict[str, Any]:
    """The file as ``docker compose`` runs it with ``.env`` copied from ``.env.example``."""
    return load(interpolate(raw_text, env_example))


# ------------------------------------------------------------------------------------- schema


def schema_errors(document: dict[str, Any]) -> list[str]:
    """What the Compose Specification's JSON schema refuses in a compose document.

    :param document: the loaded (interpolated) file.
    """
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return sorted(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(document)
    )


# ------------------------------------------------------------------------------------- rules


def as_argv(command: Any) -> list[str]:
    """A compose ``command``/``entrypoint`` as an argument list (strings are split like a shell).

    :param command: a string or a list.
    """
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def is_one_shot(service: dict[str, Any]) -> bool:
    """An init job: runs once (``restart: "no"``) and publishes nothing."""
    return service.get("restart") == "no" and not service.get("ports")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def queues(service: dict[str, Any]) -> set[str]:
    """The Celery queues an ``airflow celery worker`` command serves (empty: Airflow's default queue)."""
    argv = as_argv(service.get("command"))
    for flag in ("--queues", "-q"):
        if flag in argv[:-1]:
            return set(argv[argv.index(flag) + 1].split(","))
    return set()


def health_rule(doc: dict[str, Any]) -> list[str]:
    """Every long-running service has a health check; dependencies wait on health or completion."""
    services = doc["services"]
    problems = []
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        if is_one_shot(service):
            continue
        if not check.get("test") or check.get("disable"):
            problems.append(f'{name}: no health check (and not a one-shot init job with restart: "no")')
        elif service.get("restart") not in ("always", "unless-stopped"):
            problems.append(f"{name}: a long-running service should restart (restart: always)")
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for target, rule in depends.items() if isinstance(depends, dict) else ((t, {}) for t in depends):
            condition = (rule or {}).get("condition", "service_started")
            if target not in services:
                problems.append(f"{name}: depends on unknown service {target}")
            elif condition == "service_healthy" and not (services[target].get("healthcheck") or {}).get("test"):
                problems.append(f"{name}: waits for {target} to be healthy, but {target} has no health check")
            elif condition == "service_completed_successfully" and not is_one_shot(services[target]):
                problems.append(f"{name}: waits for {target} to complete, but {target} is not a one-shot job")
            elif condition == "service_started" and not is_one_shot(services[target]):
                problems.append(f"{name}: depends on {target} without waiting for its health check")
    return problems


def secret_rule(doc: dict[str, Any], secret_values: set[str]) -> list[str]:
    """No credential is written in the file: secrets are ``${...}`` references to ``.env``.

    :param doc: the file as written (not interpolated).
    :param secret_values: the placeholder values of the secrets in ``.env.example``.
    """
    problems = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, (str, int, float)) and SECRET_NAME.search(str(key)):
                    if not ONLY_REFERENCES.fullmatch(str(value)):
                        problems.append(f"{where}/{key}: a literal secret value, use ${{VARIABLE}} from .env")
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                previous = node[index - 1] if index else None
                if isinstance(previous, str) and re.fullmatch(
                    r"--?[\w-]*(pass|secret|token|key)[\w-]*", previous, re.I
                ):
                    if not ONLY_REFERENCES.fullmatch(str(value)):
                        problems.append(f"{where}[{index}]: a literal secret after {previous}")
                walk(value, f"{where}[{index}]")
        elif isinstance(node, str):
            masked = REFERENCE.sub("\0", node)  # a reference to .env stands for one opaque value
            for match in re.finditer(r"://([^:/@\s'\"]*):([^@/\s'\"]*)@", masked):
                if not re.fullmatch("\0+", match.group(2)):
                    problems.append(f"{where}: a URL with a literal password ({match.group(1)}:…@)")
            for match in re.finditer(
                r'"(password|secret[^"]*|token|aws_secret_access_key)"\s*:\s*"([^"]*)"', masked, re.I
            ):
                if not re.fullmatch("\0+", match.group(2)):
                    problems.append(f"{where}: a JSON connection with a literal {match.group(1)}")
            for secret in secret_values:
                if secret in node:
                    problems.append(f"{where}: holds the .env.example value {secret!r}")

    walk(doc, "")
    return problems


def mount_rule(doc: dict[str, Any]) -> list[str]:
    """Bind mounts name project folders that exist; named volumes are declared; the code is mounted."""
    problems = []
    declared = set((doc.get("volumes") or {}).keys())
    for name, service in doc["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("/"):
                problems.append(f"{name}: mounts the absolute path {source} (not portable: use a project folder)")
            elif source.startswith("."):
                if not (PROJECT / source).exists():
                    problems.append(f"{name}: mounts {source}, which does not exist in the project")
            elif source not in declared:
                problems.append(f"{name}: uses the volume {source!r}, not declared under top-level volumes")
    for name in [*AIRFLOW_COMPONENTS, "airflow-init"]:
        service = doc["services"].get(name)
        if service is None:
            problems.append(f"{name}: missing")
            continue
        targets = {v.split(":")[1] for v in service.get("volumes") or [] if isinstance(v, str) and ":" in v}
        for folder in ("dags", "plugins", "include"):
            if f"/opt/airflow/{folder}" not in targets:
                problems.append(f"{name}: does not mount ./{folder} at /opt/airflow/{folder}")
    return problems


def gpu_rule(doc: dict[str, Any], gpu_queue: str) -> list[str]:
    """The GPU worker reserves an NVIDIA GPU, serves the GPU queue, and only starts with the gpu profile.

    :param doc: the interpolated file.
    :param gpu_queue: the queue Conveyor sends GPU training to.
    """
    services = doc["services"]
    worker = services.get(GPU_WORKER)
    if worker is None:
        return [f"{GPU_WORKER}: missing"]
    problems = []
    devices = (((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if not any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or []) for d in devices):
        problems.append(f"{GPU_WORKER}: reserves no nvidia device with the gpu capability")
    if as_argv(worker.get("command"))[:2] != ["celery", "worker"]:
        problems.append(f"{GPU_WORKER}: does not run 'celery worker'")
    if gpu_queue not in queues(worker):
        problems.append(
            f"{GPU_WORKER}: does not serve the {gpu_queue!r} queue (serves {sorted(queues(worker)) or 'default'})"
        )
    if "gpu" not in (worker.get("profiles") or []):
        problems.append(f"{GPU_WORKER}: not in the 'gpu' profile, so `docker compose up` needs a GPU")
    if "utility" not in environment(worker).get("NVIDIA_DRIVER_CAPABILITIES", "compute,utility"):
        problems.append(f"{GPU_WORKER}: without the utility capability nvidia-smi is missing and Conveyor sees no GPU")
    default = services.get("airflow-worker", {})
    if default.get("profiles"):
        problems.append("airflow-worker: in a profile, so `docker compose up` has no default worker")
    if gpu_queue in queues(default):
        problems.append(f"airflow-worker: serves the {gpu_queue!r} queue on a machine that may have no GPU")
    return problems


def port_rule(doc: dict[str, Any]) -> list[str]:
    """A server's ``--port`` is the port its health check probes and the container port it publishes."""
    problems = []
    for name, service in doc["services"].items():
        argv = as_argv(service.get("command"))
        if "--port" not in argv[:-1]:
            continue
        port = argv[argv.index("--port") + 1]
        probe = " ".join(as_argv((service.get("healthcheck") or {}).get("test")))
        if f":{port}/" not in probe:
            problems.append(f"{name}: listens on {port}, its health check probes {probe!r}")
        published = [str(p).rsplit(":", 1)[-1] for p in service.get("ports") or []]
        if published and port not in published:
            problems.append(f"{name}: listens on {port}, publishes container port(s) {published}")
    return problems


def bind_rule(raw_doc: dict[str, Any], resolved_doc: dict[str, Any]) -> list[str]:
    """Every published port binds to ``${CONVEYOR_BIND_ADDRESS:-127.0.0.1}``: localhost unless the user says otherwise.

    :param raw_doc: the file as written.
    :param resolved_doc: the file interpolated with ``.env.example`` (which keeps 127.0.0.1).
    """
    problems = []
    for name, service in raw_doc["services"].items():
        for port in service.get("ports") or []:
            if not isinstance(port, str) or not port.startswith(BIND):
                problems.append(f"{name}: publishes {port!r}, not on {BIND} (beyond localhost by default)")
    for name, service in resolved_doc["services"].items():
        for port in service.get("ports") or []:
            host = str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else ""
            if host != "127.0.0.1":
                problems.append(f"{name}: publishes {port!r} beyond localhost with the example settings")
    return problems


def checker() -> Any:
    """``docker/check_secrets.py``, imported by path (it is a standalone script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_secrets", CHECK_SECRETS)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_secrets", module)
    spec.loader.exec_module(module)
    return module


def secrets_check_rule(doc: dict[str, Any]) -> list[str]:
    """The secrets check runs before everything: a one-shot ``secrets-check`` service given every secret,
    that every other service waits for; services of the image that replace its entrypoint run the check first.

    :param doc: the interpolated file.
    """
    services = doc["services"]
    check = services.get(SECRETS_CHECK)
    if check is None:
        return [f"{SECRETS_CHECK}: missing"]
    problems = []
    if not is_one_shot(check):
        problems.append(f'{SECRETS_CHECK}: not a one-shot job (restart: "no", no ports)')
    if as_argv(check.get("entrypoint")) != ["python", "/opt/conveyor/check_secrets.py", "--all"]:
        problems.append(f"{SECRETS_CHECK}: does not run check_secrets.py --all (runs {check.get('entrypoint')!r})")
    given = environment(check)
    for secret in checker().SECRETS:
        if not given.get(secret.name):
            problems.append(f"{SECRETS_CHECK}: is not given {secret.name}")
    for name, service in services.items():
        if name == SECRETS_CHECK:
            continue
        depends = service.get("depends_on") or {}
        rule = depends.get(SECRETS_CHECK) if isinstance(depends, dict) else None
        if (rule or {}).get("condition") != "service_completed_successfully":
            problems.append(f"{name}: starts without waiting for {SECRETS_CHECK} to complete successfully")
        if service.get("image") == doc["x-airflow-common"]["image"] and service.get("entrypoint"):
            script = [line.strip() for line in "\n".join(as_argv(service.get("command"))).splitlines()]
            steps = [line for line in script if line and not line.startswith(("#", "set ", "-c"))]
            if not steps or not steps[0].startswith("python /opt/conveyor/check_secrets.py"):
                problems.append(f"{name}: replaces the image's entrypoint without running the secrets check first")
    return problems


def all_problems(raw_doc: dict[str, Any], resolved_doc: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Every rule's complaints about a compose file.

    :param raw_doc: the file as written.
    :param resolved_doc: the file interpolated with ``env``.
    :param env: the values of ``.env.example``.
    """
    secrets = {v for k, v in env.items() if SECRET_NAME.search(k) and v and "change-me" in v}
    return [
        *schema_errors(resolved_doc),
        *health_rule(resolved_doc),
        *secret_rule(raw_doc, secrets),
        *mount_rule(resolved_doc),
        *gpu_rule(resolved_doc, env.get("CONVEYOR_GPU_QUEUE") or "gpu"),
        *port_rule(resolved_doc),
        *bind_rule(raw_doc, resolved_doc),
        *secrets_check_rule(resolved_doc),
    ]


# ------------------------------------------------------------------------------------- commands

CHECK_COMMANDS = r"""
import json, sys
import click
checks = json.load(sys.stdin)
import importlib, io, contextlib
results, parser = [], None
for kind, argv in checks:
    error = None
    try:
        if kind == "airflow":
            if parser is None:
                from airflow.cli.cli_parser import get_parser
                parser = get_parser()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    parser.parse_args(argv)
                except SystemExit:
                    said = err.getvalue().strip().splitlines() or ["refused"]
                    error = "airflow " + " ".join(argv) + ": " + said[-1]
        elif kind == "mlflow":
            from mlflow.cli import cli as mlflow_cli
            group = mlflow_cli.commands.get(argv[0])
            if group is None:
                error = "mlflow has no command " + argv[0]
            else:
                group.make_context(argv[0], list(argv[1:]))
        elif kind == "uvicorn":
            from uvicorn.main import main as uvicorn_main
            ctx = uvicorn_main.make_context("uvicorn", list(argv))
            module, _, attr = ctx.params["app"].partition(":")
            if not hasattr(importlib.import_module(module), attr):
                error = "uvicorn app " + ctx.params["app"] + " does not exist"
        elif kind == "supervisor":
            from conveyor.serving.supervisor import get_args_parser
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    args = get_args_parser().parse_args(argv)
                except SystemExit:
                    args = None
                    said = err.getvalue().strip().splitlines() or ["refused"]
                    error = "supervisor " + " ".join(argv) + ": " + said[-1]
            if args is not None:
                module, _, attr = args.app.partition(":")
                if not hasattr(importlib.import_module(module), attr):
                    error = "supervisor app " + args.app + " does not exist"
        elif kind == "celery-app":
            module, _, attr = argv[0].rpartition(".")
            if not hasattr(importlib.import_module(module), attr):
                error = "no Celery app " + argv[0]
        else:
            error = "unknown program " + kind
    except click.ClickException as exc:
        error = kind + " " + " ".join(argv) + ": " + exc.format_message()
    except Exception as exc:
        error = kind + " " + " ".join(argv) + ": " + type(exc).__name__ + ": " + str(exc)
    results.append(error)
print(json.dumps(results))
"""


def service_commands(doc: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """``(where, program, argv)`` of what every service and health check runs, as the images run it.

    The Airflow image's entrypoint runs ``python …`` and ``bash …`` as they are and anything else as
    ``airflow …``. The init job's script hands ``airflow …`` to the entrypoint.

    :param doc: the interpolated file.
    """
    image = doc["x-airflow-common"]["image"]
    found = []
    for name, service in doc["services"].items():
        if service.get("image") == image:
            argv = as_argv(service.get("command"))
            if service.get("entrypoint"):
                script = "\n".join(argv)
                found += [
                    (name, "airflow", shlex.split(m)) for m in re.findall(r"/entrypoint airflow ([^\n;&|]+)", script)
                ]
            elif argv[:3] == ["python", "-m", "mlflow"]:
                found.append((name, "mlflow", argv[3:]))
            elif argv[:3] == ["python", "-m", "uvicorn"]:
                found.append((name, "uvicorn", argv[3:]))
            elif argv[:3] == ["python", "-m", "conveyor.serving.supervisor"]:
                found.append((name, "supervisor", argv[3:]))
            elif argv[:1] in (["python"], ["bash"]):
                if name != "airflow-cli":
                    found.append((name, f"unexpected {argv[0]} program", argv))
            else:
                found.append((name, "airflow", argv[1:] if argv[:1] == ["airflow"] else argv))
        test = as_argv((service.get("healthcheck") or {}).get("test"))
        shell = test[1] if test[:1] == ["CMD-SHELL"] and len(test) > 1 else ""
        if shell.startswith("airflow "):
            found.append((f"{name} health check", "airflow", shlex.split(shell)[1:]))
        elif shell.startswith("celery --app "):
            found.append((f"{name} health check", "celery-app", [shlex.split(shell)[2]]))
    return found


def command_errors(checks: list[tuple[str, str, list[str]]], tmp_path: Path) -> list[str]:
    """Run every command line through its program's own parser (Airflow 3 with the CeleryExecutor,
    MLflow, uvicorn), in a fresh interpreter; the ones they refuse.

    :param checks: ``(where, program, argv)`` triples.
    :param tmp_path: an empty folder for a throw-away AIRFLOW_HOME.
    """
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(PROJECT / "plugins"),
    }
    payload = json.dumps([[program, argv] for _, program, argv in checks])
    result = subprocess.run(
        [sys.executable, "-c", CHECK_COMMANDS], input=payload, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    return [f"{where}: {error}" for (where, _, _), error in zip(checks, answers, strict=True) if error]


# ------------------------------------------------------------------------------------- the file


def test_compose_file_matches_the_compose_specification(raw, resolved):
    assert schema_errors(resolved) == []
    assert schema_errors(raw) == []  # also before interpolation (what an editor's schema check sees)


def test_compose_file_keeps_the_project_rules(raw, resolved, env_example):
    assert all_problems(raw, resolved, env_example) == []


def test_every_variable_is_defined_in_env_example(raw_text, env_example):
    missing = sorted(variables_used(raw_text) - env_example.keys())
    assert missing == [], f"used in docker-compose.yaml, missing from .env.example: {missing}"
    interpolate(raw_text, env_example)  # every required variable has a value


def test_real_env_file_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=PROJECT, capture_output=True)
    if result.returncode == 128:  # not a git work tree (e.g. an exported copy): read .gitignore itself
        assert ".env" in (PROJECT / ".gitignore").read_text().split()
    else:
        assert result.returncode == 0, ".env must be git-ignored"
    assert subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=PROJECT).returncode != 0


WRONG_COMMANDS = [
    ("airflow 2 webserver", "airflow", ["webserver"]),
    ("misspelt worker", "airflow", ["celery", "wroker"]),
    ("unknown worker option", "airflow", ["celery", "worker", "--queue-name", "gpu"]),
    ("unknown job type", "airflow", ["jobs", "check", "--job-type", "TriggerJob"]),
    ("mlflow option", "mlflow", ["server", "--serve-artefacts"]),
    ("uvicorn app", "uvicorn", ["conveyor.serving.app:make_app", "--factory"]),
    ("supervisor app", "supervisor", ["conveyor.serving.app:make_app", "--port", "8090"]),
    ("supervisor option", "supervisor", ["conveyor.serving.app:create_app", "--port", "8090", "--factory"]),
    ("celery app", "celery-app", ["airflow.executors.celery_executor.app"]),
]


@pytest.fixture(scope="module")
def command_results(resolved, tmp_path_factory) -> dict[str, list[str]]:
    """The parsers' verdicts on the file's commands and on known-wrong ones, in one interpreter."""
    real = service_commands(resolved)
    errors = command_errors([*real, *WRONG_COMMANDS], tmp_path_factory.mktemp("cli"))
    wrong = {where for where, _, _ in WRONG_COMMANDS}
    return {
        "real": [e for e in errors if e.split(":")[0] not in wrong],
        "wrong": [e for e in errors if e.split(":")[0] in wrong],
    }


@pytest.mark.slow
def test_services_run_real_airflow_3_mlflow_and_uvicorn_commands(resolved, command_results):
    checks = service_commands(resolved)
    airflow_argv = {where: argv for where, program, argv in checks if program == "airflow"}
    for name, command in AIRFLOW_COMPONENTS.items():
        assert airflow_argv.get(name, [])[: len(command)] == command, (name, airflow_argv.get(name))
    assert airflow_argv["airflow-init"] == ["version"]
    programs = {(where, program) for where, program, _ in checks}
    assert {("mlflow", "mlflow"), ("model-endpoint", "supervisor")} <= programs
    assert ("airflow-worker health check", "celery-app") in programs
    assert command_results["real"] == []


@pytest.mark.slow
def test_wrong_commands_are_refused(command_results):
    assert [e.split(":")[0] for e in command_results["wrong"]] == [where for where, _, _ in WRONG_COMMANDS]


def test_airflow_services_are_wired_for_the_celery_executor(resolved):
    services = resolved["services"]
    common = resolved["x-airflow-common"]["environment"]
    assert common["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert common["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert "8080" in " ".join(services["airflow-apiserver"]["ports"])
    assert (
        common["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
        and "@redis:6379/" in common["AIRFLOW__CELERY__BROKER_URL"]
    )
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        assert "@postgres:5432/" in common[key], key
    # One JWT secret for the components that sign (scheduler) and check (api-server) task tokens.
    assert common["AIRFLOW__API_AUTH__JWT_SECRET"]
    for name in AIRFLOW_COMPONENTS:
        assert environment(services[name])["AIRFLOW__API_AUTH__JWT_SECRET"] == common["AIRFLOW__API_AUTH__JWT_SECRET"]
    init = services["airflow-init"]
    assert (
        environment(init)["_AIRFLOW_DB_MIGRATE"] == "true" and environment(init)["_AIRFLOW_WWW_USER_CREATE"] == "true"
    )


def test_conveyor_settings_reach_minio_mlflow_and_the_warehouse(resolved, monkeypatch):
    from airflow.models.connection import Connection
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper
    from sqlalchemy.engine import make_url

    from conveyor import settings
    from conveyor.batch.warehouse import warehouse_url

    env = resolved["x-airflow-common"]["environment"]
    services = resolved["services"]
    for key, value in env.items():
        if key.startswith(("CONVEYOR_", "MLFLOW_", "AIRFLOW_CONN_")):
            monkeypatch.setenv(key, str(value))
    # The lake: an s3:// root on the connection Conveyor is told to use, which points at MinIO.
    assert settings.lake_uri().startswith("s3://")
    conn_id = settings.lake_conn_id()
    conn = Connection.from_json(env[f"AIRFLOW_CONN_{conn_id.upper()}"], conn_id=conn_id)
    assert conn.conn_type == "aws"
    wrapper = AwsConnectionWrapper(conn)
    assert wrapper.get_service_endpoint_url("s3") == "http://minio:9000"
    assert "9000" in " ".join(services["minio"]["ports"])
    bucket = settings.lake_uri().removeprefix("s3://").split("/")[0]
    init = environment(services["minio-init"])
    assert init["CONVEYOR_LAKE_BUCKET"] == bucket
    assert (wrapper.aws_access_key_id, wrapper.aws_secret_access_key) == (
        init["CONVEYOR_S3_ACCESS_KEY"],
        init["CONVEYOR_S3_SECRET_KEY"],
    )
    # MLflow: the server's store is the init script's database; its artifacts go to minio-init's bucket.
    from conveyor.settings import mlflow_tracking_uri

    tracking = urlsplit(mlflow_tracking_uri())
    mlflow_argv = as_argv(services["mlflow"]["command"])
    assert (tracking.scheme, tracking.hostname, tracking.port) == (
        "http",
        "mlflow",
        int(mlflow_argv[mlflow_argv.index("--port") + 1]),
    )
    mlflow = environment(services["mlflow"])
    postgres = environment(services["postgres"])
    store = make_url(mlflow["MLFLOW_BACKEND_STORE_URI"])
    assert (store.host, store.username, store.password, store.database) == (
        "postgres",
        postgres["MLFLOW_DB_USER"],
        postgres["MLFLOW_DB_PASSWORD"],
        postgres["MLFLOW_DB_NAME"],
    )
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{init['MLFLOW_BUCKET']}"
    assert "mlflow" in mlflow["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # The warehouse: what batch predictions write to, the init script's other database.
    warehouse = make_url(warehouse_url())
    assert warehouse.get_backend_name() == "postgresql"
    assert (warehouse.host, warehouse.username, warehouse.password, warehouse.database) == (
        "postgres",
        postgres["WAREHOUSE_DB_USER"],
        postgres["WAREHOUSE_DB_PASSWORD"],
        postgres["WAREHOUSE_DB_NAME"],
    )


def test_postgres_init_script_is_mounted_and_given_what_it_reads(resolved):
    postgres = resolved["services"]["postgres"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in postgres["volumes"]}
    target = mounts.get("./docker/postgres/init-databases.sh", "")
    assert target.startswith("/docker-entrypoint-initdb.d/") and target.endswith(".sh")
    assert os.access(INIT_DB_SCRIPT, os.X_OK)
    required = set(re.findall(r'"\$\{(\w+):\?\}"', INIT_DB_SCRIPT.read_text()))
    assert {"MLFLOW_DB_PASSWORD", "WAREHOUSE_DB_PASSWORD"} <= required
    given = environment(postgres)
    assert {name for name in required if not given.get(name)} == set()


def test_gpu_worker_serves_the_queue_conveyor_routes_gpu_training_to(resolved, env_example, monkeypatch):
    from conveyor import settings

    worker = resolved["services"][GPU_WORKER]
    monkeypatch.setenv("CONVEYOR_GPU_QUEUE", resolved["x-airflow-common"]["environment"]["CONVEYOR_GPU_QUEUE"])
    assert queues(worker) == {settings.gpu_queue()} == {"gpu"}
    assert environment(worker)["CONVEYOR_GPU_QUEUE"] == settings.gpu_queue()  # the DAG processor's value too
    assert env_example["CONVEYOR_GPU_QUEUE"] == settings.GPU_QUEUE_DEFAULT


def test_model_endpoint_serves_a_shipped_pipeline_endpoint(resolved):
    from conveyor.spec import EndpointSpec, load_spec

    service = resolved["services"]["model-endpoint"]
    env = environment(service)
    endpoints = {
        spec.deploy.endpoint.name or spec.name
        for spec in map(load_spec, sorted((PROJECT / "include" / "pipelines").glob("*.yaml")))
        if spec.deploy.endpoint.enabled
    }
    assert env["CONVEYOR_ENDPOINT"] in endpoints
    assert env["CONVEYOR_STATE_DIR"] == resolved["x-airflow-common"]["environment"]["CONVEYOR_STATE_DIR"]
    state_volume = {v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == env["CONVEYOR_STATE_DIR"]}
    worker_state = {
        v.split(":")[0]
        for v in resolved["services"]["airflow-worker"]["volumes"]
        if v.split(":")[1] == env["CONVEYOR_STATE_DIR"]
    }
    assert state_volume and state_volume == worker_state  # deployments write control.json where it reads it
    argv = as_argv(service["command"])
    assert argv[argv.index("--port") + 1] == str(EndpointSpec().port)
    assert any(port.endswith(f":{EndpointSpec().port}") for port in service["ports"])


def test_published_ports_do_not_clash(resolved):
    published = [p.rsplit(":", 1)[0] for s in resolved["services"].values() for p in s.get("ports") or []]
    assert len(published) == len(set(published)), published


def test_dockerfile_builds_the_pinned_airflow_with_the_project_requirements(resolved):
    build = resolved["x-airflow-common"]["build"]
    assert (PROJECT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    # The base is a build argument (the compose test builds the recipe on a stand-in); its default is the official one.
    assert base == "${AIRFLOW_BASE_IMAGE}", base
    base = re.search(r"^ARG AIRFLOW_BASE_IMAGE=(\S+)", text, re.M).group(1)
    pinned = re.search(r"^apache-airflow==(\S+)", (PROJECT / "requirements.txt").read_text(), re.M).group(1)
    assert base == f"apache/airflow:{pinned}-python3.11", base
    assert re.search(r"pip install [^\n]*\\?\s*-r \S*requirements\.txt -c \S*constraints\.txt", text)
    # The build context holds only what the Dockerfile copies (not .venv/ or .state/).
    ignore = [
        line.strip()
        for line in (PROJECT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ignore[0] == "*", ignore
    copied = {name for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.M) for name in line.split()[:-1]}
    assert copied and {f"!{name}" for name in copied} <= set(ignore), (copied, ignore)
    assert all((PROJECT / name).is_file() for name in copied)


# ------------------------------------------------------------------------------------- broken files


def _set(doc: dict, path: str, value: Any) -> None:
    """Replace (or delete) what a ``a/b/0/c`` path names in a loaded compose file."""
    *parents, last = path.split("/")
    for part in parents:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    key = int(last) if isinstance(doc, list) else last
    if value is _DELETE:
        del doc[key]
    else:
        doc[key] = value


_DELETE = object()
BROKEN = {
    "unknown service key": ("services/redis/helthcheck", {"test": ["CMD", "true"]}, "'helthcheck' does not match"),
    "unknown depends_on condition": (
        "services/airflow-scheduler/depends_on/redis/condition",
        "service_healty",
        "service_healty",
    ),
    "capabilities not a list": (
        "services/airflow-worker-gpu/deploy/resources/reservations/devices/0/capabilities",
        "gpu",
        "capabilities",
    ),
    "port as a mapping of the wrong shape": ("services/minio/ports", {"9000": 9000}, "ports"),
    "no health check": ("services/redis/healthcheck", _DELETE, "redis: no health check"),
    "waits on a service without health check": ("services/minio/healthcheck", _DELETE, "waits for minio to be healthy"),
    "literal password": (
        "services/postgres/environment/POSTGRES_PASSWORD",
        "hunter2",
        "POSTGRES_PASSWORD: a literal secret",
    ),
    "literal password in a URL": (
        "services/mlflow/environment/MLFLOW_BACKEND_STORE_URI",
        "postgresql+psycopg2://mlflow:hunter2@postgres:5432/mlflow",
        "URL with a literal password",
    ),
    "literal password on a command line": (
        "services/redis/command",
        ["redis-server", "--requirepass", "hunter2"],
        "literal secret after --requirepass",
    ),
    "missing mounted folder": (
        "services/airflow-scheduler/volumes/0",
        "./dag:/opt/airflow/dags:ro",
        "mounts ./dag, which does not exist",
    ),
    "undeclared volume": ("services/airflow-worker/volumes/4", "conveyor-stat:/opt/airflow/state", "not declared"),
    "code not mounted": (
        "services/airflow-triggerer/volumes",
        ["./dags:/opt/airflow/dags:ro"],
        "does not mount ./plugins",
    ),
    "gpu worker without a device": ("services/airflow-worker-gpu/deploy", _DELETE, "reserves no nvidia device"),
    "gpu worker on another driver": (
        "services/airflow-worker-gpu/deploy/resources/reservations/devices/0/driver",
        "amd",
        "reserves no nvidia device",
    ),
    "gpu worker on the default queue": (
        "services/airflow-worker-gpu/command",
        "celery worker",
        "does not serve the 'gpu' queue",
    ),
    "gpu worker always started": ("services/airflow-worker-gpu/profiles", _DELETE, "not in the 'gpu' profile"),
    "default worker takes gpu work": (
        "services/airflow-worker/command",
        "celery worker --queues default,gpu",
        "airflow-worker: serves the 'gpu' queue",
    ),
    "mlflow on every interface": ("services/mlflow/ports/0", "5000:5000", "mlflow: publishes '5000:5000'"),
    "console on a fixed public address": (
        "services/minio/ports/1",
        "0.0.0.0:9001:9001",
        "minio: publishes '0.0.0.0:9001:9001'",
    ),
    "no secrets check": ("services/secrets-check", _DELETE, "secrets-check: missing"),
    "a service that does not wait for the check": (
        "services/redis/depends_on",
        _DELETE,
        "redis: starts without waiting for secrets-check",
    ),
    "the check only started, not awaited": (
        "services/mlflow/depends_on/secrets-check/condition",
        "service_started",
        "mlflow: starts without waiting for secrets-check",
    ),
    "the check not given a secret": (
        "services/secrets-check/environment/AIRFLOW_JWT_SECRET",
        _DELETE,
        "secrets-check: is not given AIRFLOW_JWT_SECRET",
    ),
    "the check checking nothing": (
        "services/secrets-check/entrypoint",
        ["true"],
        "secrets-check: does not run check_secrets.py --all",
    ),
    "init skips the check": (
        "services/airflow-init/command/1",
        "set -euo pipefail\n/entrypoint airflow version\n",
        "airflow-init: replaces the image's entrypoint without running the secrets check",
    ),
    "server moved off its probed port": (
        "services/model-endpoint/command/7",
        "8091",
        "listens on 8091, its health check",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_compose_file_is_refused(case, raw, resolved, env_example):
    path, value, expected = BROKEN[case]
    raw_doc, resolved_doc = copy.deepcopy(raw), copy.deepcopy(resolved)
    _set(raw_doc, path, value)
    _set(resolved_doc, path, value)
    problems = all_problems(raw_doc, resolved_doc, env_example)
    assert any(expected in problem for problem in problems), problems


def test_undefined_variable_and_written_secret_are_refused(raw_text, env_example):
    broken = raw_text.replace("${REDIS_PASSWORD}", "${REDIS_PASSWRD}", 1)
    assert "REDIS_PASSWRD" in variables_used(broken) - env_example.keys()
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(raw_text, {k: v for k, v in env_example.items() if k != "POSTGRES_PASSWORD"})
    leaked = raw_text.replace("${MINIO_ROOT_PASSWORD}", env_example["MINIO_ROOT_PASSWORD"])
    secrets = {v for k, v in env_example.items() if SECRET_NAME.search(k) and "change-me" in v}
    assert any("MINIO_ROOT_PASSWORD" in p for p in secret_rule(load(leaked), secrets))
