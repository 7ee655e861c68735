"""Refuse weak or example secrets before the compose stack starts; generate fresh ones.

Standard library only: it runs on the host (``python3 docker/check_secrets.py ...``) and in every
container of the stack (copied into the image as ``/opt/conveyor/check_secrets.py``).

    python3 docker/check_secrets.py --write .env      # a new .env: .env.example with fresh secrets (0600)
    python3 docker/check_secrets.py --env-file .env   # check a .env before `docker compose up`
    python3 docker/check_secrets.py --all             # (secrets-check service) every secret set and strong
    python3 docker/check_secrets.py --present         # (image entrypoint) the secrets this container has

A value is refused when it is empty, is the value ``.env.example`` gives it, holds a placeholder
(``change-me``), is a well-known default (``password``, ``admin``, ``airflow``, ``minioadmin``...),
is shorter than its minimum (16 characters for passwords, 32 for signing keys), has fewer than 6
distinct characters, has characters that break the connection URLs it is put in, or is the value
of another secret; ``AIRFLOW_FERNET_KEY`` must be a valid Fernet key (32 url-safe base64 bytes).
Every refusal names the variable (and the name it has inside the container) and the rule. Exit
status: 0 all good, 1 refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
EXAMPLE = PROJECT / ".env.example"
DENIED = frozenset(
    {
        "admin",
        "administrator",
        "airflow",
        "changeit",
        "changeme",
        "conveyor",
        "default",
        "letmein",
        "minio",
        "minio123",
        "minioadmin",
        "mlflow",
        "pass",
        "passw0rd",
        "password",
        "postgres",
        "qwerty",
        "redis",
        "root",
        "secret",
        "test",
        "warehouse",
    }
)
PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "your-secret", "example")
URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")
MIN_DISTINCT = 6


@dataclass(frozen=True)
class Secret:
    """One secret of ``.env``.

    :param name: its name in ``.env``.
    :param kind: ``password`` (16+ characters, url-safe), ``key`` (32+ characters, url-safe) or ``fernet``.
    :param aliases: the names the compose file gives it inside containers.
    """

    name: str
    kind: str
    aliases: tuple[str, ...] = ()

    @property
    def min_length(self) -> int:
        return {"password": 16, "key": 32, "fernet": 44}[self.kind]


SECRETS = (
    Secret("AIRFLOW_ADMIN_PASSWORD", "password", ("_AIRFLOW_WWW_USER_PASSWORD",)),
    Secret("AIRFLOW_FERNET_KEY", "fernet", ("AIRFLOW__CORE__FERNET_KEY",)),
    Secret("AIRFLOW_API_SECRET_KEY", "key", ("AIRFLOW__API__SECRET_KEY",)),
    Secret("AIRFLOW_JWT_SECRET", "key", ("AIRFLOW__API_AUTH__JWT_SECRET",)),
    Secret("POSTGRES_PASSWORD", "password"),
    Secret("MLFLOW_DB_PASSWORD", "password"),
    Secret("WAREHOUSE_DB_PASSWORD", "password"),
    Secret("REDIS_PASSWORD", "password", ("REDISCLI_AUTH",)),
    Secret("MINIO_ROOT_PASSWORD", "password"),
    Secret("CONVEYOR_S3_SECRET_KEY", "password", ("AWS_SECRET_ACCESS_KEY",)),
)


def fernet_problem(value: str) -> str | None:
    """Why a value is not a Fernet key (32 bytes, url-safe base64), or None when it is one.

    :param value: the candidate key.
    """
    try:
        raw = base64.urlsafe_b64decode(value.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return "is not url-safe base64"
    if len(raw) != 32 or base64.urlsafe_b64encode(raw).decode() != value:
        return f"decodes to {len(raw)} bytes, a Fernet key is 32 url-safe base64 bytes (44 characters)"
    return None


def problem(secret: Secret, value: str, example: str | None = None) -> str | None:
    """Why a secret's value is refused, or None when it is accepted.

    :param secret: the secret.
    :param value: its value.
    :param example: the value ``.env.example`` gives it, when known.
    """
    lowered = value.strip().lower()
    if not value.strip():
        return "is empty"
    if example and value == example:
        return "is the example value from .env.example"
    if any(marker in lowered for marker in PLACEHOLDERS):
        return "is a placeholder (contains 'change-me'): generate a real value"
    if lowered in DENIED or re.sub(r"[\W_\d]+$", "", lowered) in DENIED:
        return "is a well-known default (password, admin, airflow, minioadmin...)"
    if secret.kind == "fernet":
        return fernet_problem(value)
    if len(value) < secret.min_length:
        return f"is {len(value)} characters long, at least {secret.min_length} are required"
    if len(set(value)) < MIN_DISTINCT:
        return f"has fewer than {MIN_DISTINCT} distinct characters"
    if not URL_SAFE.fullmatch(value):
        return "has characters other than letters, digits, '-' and '_' (it goes into connection URLs)"
    return None


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file (comments and blank lines skipped, quotes removed).

    :param path: the file.
    """
    return read_env_file_text(path.read_text(encoding="utf-8"))


def read_env_file_text(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv text (comments and blank lines skipped, quotes removed).

    :param text: the text.
    """
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def check(env: Mapping[str, str], require_all: bool = True, examples: Mapping[str, str] | None = None) -> list[str]:
    """Every refusal of the secrets in ``env``, each naming the variable and the rule it broke.

    :param env: the variables (a container's environment or a ``.env`` file).
    :param require_all: a secret that is not set at all is refused too (else only those set are checked).
    :param examples: the values of ``.env.example`` (exact copies are refused).
    """
    examples = examples or {}
    problems, seen = [], {}
    for secret in SECRETS:
        found = [name for name in (secret.name, *secret.aliases) if name in env]
        if not found:
            if require_all:
                problems.append(
                    f"{secret.name}: is not set (generate one: python3 docker/check_secrets.py --write .env)"
                )
            continue
        name = found[0]
        label = secret.name if name == secret.name else f"{secret.name} (as {name})"
        value = env[name]
        reason = problem(secret, value, examples.get(secret.name))
        if reason:
            problems.append(f"{label}: {reason}")
        elif value in seen:
            problems.append(f"{label}: has the same value as {seen[value]}; every secret needs its own")
        else:
            seen[value] = secret.name
    return problems


def generate(secret: Secret) -> str:
    """A fresh value for a secret: a Fernet key, or url-safe random text (43 or 86 characters).

    :param secret: the secret.
    """
    if secret.kind == "fernet":
        return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return secrets.token_urlsafe(64 if secret.kind == "key" else 32)


def generated_env(example_text: str) -> str:
    """``.env.example`` with a fresh value for every secret (comments and other settings kept).

    :param example_text: the text of ``.env.example``.
    """
    by_name = {secret.name: secret for secret in SECRETS}
    lines = []
    for line in example_text.splitlines():
        key, sep, _ = line.partition("=")
        if sep and not line.lstrip().startswith("#") and key.strip() in by_name:
            line = f"{key.strip()}={generate(by_name[key.strip()])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_env(target: Path, example: Path, force: bool = False) -> None:
    """Write a new ``.env`` (mode 0600) from ``.env.example`` with fresh secrets.

    :param target: the file to write.
    :param example: the ``.env.example`` to start from.
    :param force: replace an existing file (its old secrets are lost).
    :raises FileExistsError: ``target`` exists and ``force`` is off.
    """
    text = generated_env(example.read_text(encoding="utf-8"))
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="check the environment: every secret set and strong")
    mode.add_argument("--present", action="store_true", help="check the secrets this environment has")
    mode.add_argument("--env-file", type=Path, help="check a .env file (and refuse .env.example's values)")
    mode.add_argument("--write", type=Path, metavar="ENV_FILE", help="write a new .env with fresh secrets")
    mode.add_argument("--generate", action="store_true", help="print .env.example with fresh secrets")
    parser.add_argument("--example", type=Path, default=EXAMPLE, help="the .env.example (default: the project's)")
    parser.add_argument("--force", action="store_true", help="with --write: replace an existing file")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    """The command line (see the module's docstring); the exit status.

    :param argv: the arguments (``sys.argv[1:]`` when None).
    """
    args = parse_args(argv)
    examples = read_env_file(args.example) if args.example.is_file() else {}
    if args.generate or args.write:
        if not args.example.is_file():
            print(f"conveyor: {args.example} not found: cannot generate a .env from it", file=sys.stderr)
            return 2
        if args.generate:
            sys.stdout.write(generated_env(args.example.read_text(encoding="utf-8")))
            return 0
        try:
            write_env(args.write, args.example, args.force)
        except FileExistsError:
            print(f"conveyor: {args.write} exists; not replaced (--force replaces it and its secrets)", file=sys.stderr)
            return 2
        print(f"conveyor: wrote {args.write} with fresh secrets (mode 0600); keep it out of git")
        return 0
    if args.env_file:
        if not args.env_file.is_file():
            print(f"conveyor: {args.env_file} not found", file=sys.stderr)
            return 2
        env: Mapping[str, str] = read_env_file(args.env_file)
    else:
        env = os.environ
    problems = check(env, require_all=not args.present, examples=examples)
    if problems:
        print("conveyor: refusing to start with weak or example secrets:", file=sys.stderr)
        for line in problems:
            print(f"  - {line}", file=sys.stderr)
        print(
            "Fresh values: python3 docker/check_secrets.py --generate (or --write .env on a new clone)", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
