"""docker/check_secrets.py: weak or example secrets are refused, naming the variable; generated ones pass.

The compose stack runs it before every service (the ``secrets-check`` one-shot service every other
service waits for, and the image's entrypoint); here it runs as a function, as the command line the
``secrets-check`` service runs (with that service's environment from the compose file), and through
``docker/entrypoint.sh``.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_compose import CHECK_SECRETS, COMPOSE, ENV_EXAMPLE, PROJECT, checker, environment, interpolate, load

check_secrets = checker()
SECRETS = {secret.name: secret for secret in check_secrets.SECRETS}


@pytest.fixture(scope="module")
def examples() -> dict[str, str]:
    return check_secrets.read_env_file(ENV_EXAMPLE)


@pytest.fixture
def strong(examples) -> dict[str, str]:
    """A .env as ``--write`` makes it."""
    return check_secrets.read_env_file_text(check_secrets.generated_env(ENV_EXAMPLE.read_text()))


def refusals(env: dict[str, str], **kwargs) -> dict[str, str]:
    """The refusals of :func:`check`, by the variable each names first."""
    return {line.split(":")[0].split(" ")[0]: line for line in check_secrets.check(env, **kwargs)}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The script as a command line (the way the compose services run it), with only ``env`` and PATH."""
    base = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, str(CHECK_SECRETS), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_secret_of_env_example_is_known_to_the_check(examples):
    from test_compose import SECRET_NAME

    secret_like = {name for name in examples if SECRET_NAME.search(name) and name != "CONVEYOR_S3_ACCESS_KEY"}
    assert secret_like == set(SECRETS), "a secret of .env.example the check does not know (or one it invents)"


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_each_example_value_is_refused_naming_the_variable(name, examples, strong):
    env = {**strong, name: examples[name]}
    with_file = refusals(env, examples=examples)
    assert list(with_file) == [name]
    assert with_file[name].startswith(f"{name}: is the example value from .env.example")
    # Inside a container (no .env.example there) the same value is refused as a placeholder.
    without_file = refusals(env)
    assert list(without_file) == [name] and "placeholder" in without_file[name]


def test_generated_values_are_accepted_and_fresh(examples, strong):
    assert check_secrets.check(strong, examples=examples) == []
    again = check_secrets.read_env_file_text(check_secrets.generated_env(ENV_EXAMPLE.read_text()))
    assert all(again[name] != strong[name] for name in SECRETS)
    # Everything that is not a secret is .env.example's setting, unchanged.
    assert {k: v for k, v in strong.items() if k not in SECRETS} == {
        k: v for k, v in examples.items() if k not in SECRETS
    }


def test_the_generated_fernet_key_is_one_airflow_can_use(strong):
    from cryptography.fernet import Fernet

    token = Fernet(strong["AIRFLOW_FERNET_KEY"].encode()).encrypt(b"connection password")
    assert Fernet(strong["AIRFLOW_FERNET_KEY"].encode()).decrypt(token) == b"connection password"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "is empty"),
        ("not base64 at all!", "is not url-safe base64"),
        (base64.urlsafe_b64encode(b"x" * 16).decode(), "decodes to 16 bytes"),
        (base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("="), "is not url-safe base64"),  # padding cut
    ],
)
def test_an_invalid_fernet_key_is_refused(value, reason, strong):
    found = refusals({**strong, "AIRFLOW_FERNET_KEY": value})
    assert list(found) == ["AIRFLOW_FERNET_KEY"] and reason in found["AIRFLOW_FERNET_KEY"]


def test_a_fernet_key_from_cryptography_is_accepted(strong):
    from cryptography.fernet import Fernet

    assert refusals({**strong, "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode()}) == {}


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("POSTGRES_PASSWORD", "password", "well-known default"),
        ("AIRFLOW_ADMIN_PASSWORD", "admin", "well-known default"),
        ("POSTGRES_PASSWORD", "airflow", "well-known default"),
        ("MINIO_ROOT_PASSWORD", "minioadmin", "well-known default"),
        ("AIRFLOW_JWT_SECRET", "secret", "well-known default"),
        ("REDIS_PASSWORD", "Password123", "well-known default"),
        ("REDIS_PASSWORD", "changeme", "placeholder"),
        ("MLFLOW_DB_PASSWORD", "Kq3-x9_Lm2", "is 10 characters long, at least 16 are required"),
        ("AIRFLOW_API_SECRET_KEY", "Kq3x9Lm2Vb7Nc4Zt8Wp1Rs6Yd0Fh5Jg", "at least 32"),  # 32 for signing keys, not 31
        ("WAREHOUSE_DB_PASSWORD", "abababababababababab", "fewer than 6 distinct characters"),
        ("CONVEYOR_S3_SECRET_KEY", "Kq3x9Lm2Vb7Nc4Zt@8Wp1", "other than letters, digits"),
    ],
)
def test_weak_values_are_refused_naming_the_variable_and_the_rule(name, value, reason, strong):
    found = refusals({**strong, name: value})
    assert list(found) == [name], found
    assert reason in found[name]


def test_the_api_key_minimum_is_32_characters(strong):
    key = "Kq3x9Lm2Vb7Nc4Zt8Wp1Rs6Yd0Fh5Jg"
    assert len(key) == 31 and "AIRFLOW_API_SECRET_KEY" in refusals({**strong, "AIRFLOW_API_SECRET_KEY": key})
    assert refusals({**strong, "AIRFLOW_API_SECRET_KEY": key + "Q"}) == {}


def test_one_value_for_two_secrets_is_refused(strong):
    found = refusals({**strong, "AIRFLOW_JWT_SECRET": strong["AIRFLOW_API_SECRET_KEY"]})
    assert (
        list(found) == ["AIRFLOW_JWT_SECRET"] and "same value as AIRFLOW_API_SECRET_KEY" in found["AIRFLOW_JWT_SECRET"]
    )


def test_missing_secrets_are_refused_unless_only_present_ones_are_checked(strong):
    partial = {k: v for k, v in strong.items() if k != "REDIS_PASSWORD"}
    assert "is not set" in refusals(partial)["REDIS_PASSWORD"]
    assert refusals(partial, require_all=False) == {}


def test_a_container_name_is_checked_and_both_names_are_given():
    container = {"AIRFLOW__API_AUTH__JWT_SECRET": "change-me-jwt-secret", "AIRFLOW__CORE__FERNET_KEY": ""}
    found = check_secrets.check(container, require_all=False)
    assert found == [
        "AIRFLOW_FERNET_KEY (as AIRFLOW__CORE__FERNET_KEY): is empty",
        "AIRFLOW_JWT_SECRET (as AIRFLOW__API_AUTH__JWT_SECRET): is a placeholder (contains 'change-me'): "
        "generate a real value",
    ]


# --- the command lines the stack runs --------------------------------------------------------------------


def secrets_check_env(env_file: dict[str, str]) -> dict[str, str]:
    """The environment of the compose file's ``secrets-check`` service for a given ``.env``."""
    return environment(load(interpolate(COMPOSE.read_text(), env_file))["services"]["secrets-check"])


def test_the_secrets_check_service_refuses_the_example_env_naming_every_secret(examples):
    result = run("--all", env=secrets_check_env(examples))
    assert result.returncode == 1
    named = [line.split(":")[0].strip(" -") for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert named == list(SECRETS)
    for value in (examples[name] for name in SECRETS):
        assert value not in result.stderr  # a refusal never prints the secret itself


def test_the_secrets_check_service_passes_a_generated_env(strong):
    result = run("--all", env=secrets_check_env(strong))
    assert (result.returncode, result.stderr) == (0, "")


def test_the_image_entrypoint_stops_before_airflow_on_a_weak_secret(strong):
    """docker/entrypoint.sh checks, then execs the Airflow image's /entrypoint (absent here: exit 127)."""
    script = PROJECT / "docker" / "entrypoint.sh"
    assert os.access(script, os.X_OK) and os.access(CHECK_SECRETS, os.X_OK)
    container = {"PATH": os.environ["PATH"], "AIRFLOW__API_AUTH__JWT_SECRET": "change-me-jwt-secret"}
    weak = subprocess.run([str(script), "scheduler"], env=container, capture_output=True, text=True, timeout=60)
    assert weak.returncode == 1 and "AIRFLOW_JWT_SECRET (as AIRFLOW__API_AUTH__JWT_SECRET)" in weak.stderr
    assert "/entrypoint" not in weak.stderr  # never reached
    container["AIRFLOW__API_AUTH__JWT_SECRET"] = strong["AIRFLOW_JWT_SECRET"]
    good = subprocess.run([str(script), "scheduler"], env=container, capture_output=True, text=True, timeout=60)
    assert good.returncode == 127 and "/entrypoint" in good.stderr  # past the check, handing over


def test_the_dockerfile_installs_the_check_as_the_entrypoint():
    text = (PROJECT / "docker" / "Dockerfile").read_text()
    assert "COPY docker/check_secrets.py docker/entrypoint.sh /opt/conveyor/" in text
    assert text.rstrip().splitlines()[-1] == 'ENTRYPOINT ["/usr/bin/dumb-init", "--", "/opt/conveyor/entrypoint.sh"]'
    steps = [
        line for line in (PROJECT / "docker" / "entrypoint.sh").read_text().splitlines() if line and line[0] != "#"
    ]
    assert steps == [
        "set -euo pipefail",
        'python "$(dirname "$(readlink -f "$0")")/check_secrets.py" --present',
        'exec /entrypoint "$@"',
    ]


def test_write_makes_a_private_env_and_never_replaces_one(tmp_path):
    target = tmp_path / ".env"
    assert run("--write", str(target)).returncode == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    first = target.read_text()
    assert run("--env-file", str(target)).returncode == 0
    again = run("--write", str(target))
    assert again.returncode == 2 and "exists; not replaced" in again.stderr and target.read_text() == first
    assert run("--write", str(target), "--force").returncode == 0 and target.read_text() != first


def test_env_file_mode_refuses_a_copied_example(tmp_path):
    copied = tmp_path / ".env"
    copied.write_text(ENV_EXAMPLE.read_text())
    result = run("--env-file", str(copied))
    assert result.returncode == 1 and "AIRFLOW_FERNET_KEY: is the example value from .env.example" in result.stderr


def test_generate_prints_a_complete_env(examples):
    result = run("--generate")
    assert result.returncode == 0
    generated = check_secrets.read_env_file_text(result.stdout)
    assert generated.keys() == examples.keys() and check_secrets.check(generated, examples=examples) == []


def test_the_check_needs_nothing_but_the_standard_library():
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import runpy; runpy.run_path({str(CHECK_SECRETS)!r})"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr  # -S: no site-packages; it must import with the stdlib alone
    assert Path(CHECK_SECRETS).read_text().startswith('"""Refuse weak or example secrets')
