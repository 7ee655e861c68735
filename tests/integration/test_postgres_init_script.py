"""docker/postgres/init-databases.sh on a real PostgreSQL: the MLflow and warehouse databases, each
reachable by its own owner only. The compose file's postgres service runs the same script once."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SCRIPT = PROJECT / "docker" / "postgres" / "init-databases.sh"
SERVICES = PROJECT / "scripts" / "services.sh"
HOST, PORT = os.environ.get("PGHOST", "127.0.0.1"), os.environ.get("PGPORT", "5432")
ADMIN = os.environ.get("PGUSER", "postgres")


@pytest.fixture(scope="module")
def postgres() -> dict[str, str]:
    """The local PostgreSQL, started by the project's script when it is not running."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed (the postgres image has it)")
    if SERVICES.exists():
        started = subprocess.run(["bash", str(SERVICES), "up"], capture_output=True, text=True, timeout=120)
        if started.returncode == 3:
            pytest.skip(f"PostgreSQL cannot be started here: {started.stderr.strip()}")
        assert started.returncode == 0, started.stderr
    return {"PGHOST": HOST, "PGPORT": PORT}


def admin(sql: str) -> None:
    """Run one statement as the admin user on the postgres database.

    :param sql: the statement.
    """
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=PORT, user=ADMIN, dbname="postgres")
    conn.autocommit = True
    try:
        conn.cursor().execute(sql)
    finally:
        conn.close()


def test_creates_each_database_for_its_own_owner(postgres):
    import psycopg2

    tag = uuid.uuid4().hex[:10]
    names = {
        "MLFLOW_DB_USER": f"t_mlflow_{tag}",
        "MLFLOW_DB_NAME": f"t_mlflow_db_{tag}",
        "MLFLOW_DB_PASSWORD": 'it\'s a "quoted" pass; DROP ROLE x',  # quoted by psql, never pasted into SQL
        "WAREHOUSE_DB_USER": f"t_wh_{tag}",
        "WAREHOUSE_DB_NAME": f"t_wh_db_{tag}",
        "WAREHOUSE_DB_PASSWORD": f"pw-{tag}",
    }
    env = {**os.environ, **postgres, **names, "POSTGRES_USER": ADMIN, "POSTGRES_DB": "postgres"}
    try:
        result = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        for prefix in ("MLFLOW", "WAREHOUSE"):
            user, password, database = (names[f"{prefix}_DB_{part}"] for part in ("USER", "PASSWORD", "NAME"))
            with psycopg2.connect(host=HOST, port=PORT, user=user, password=password, dbname=database) as conn:
                with conn.cursor() as cursor:
                    cursor.execute("CREATE TABLE owned_here (id int)")  # the owner can create its tables
                    cursor.execute("SELECT current_user, current_database()")
                    assert cursor.fetchone() == (user, database)
            conn.close()
        # One service's login does not open the other's database.
        with pytest.raises(psycopg2.OperationalError, match="CONNECT privilege|permission denied"):
            psycopg2.connect(
                host=HOST,
                port=PORT,
                user=names["WAREHOUSE_DB_USER"],
                password=names["WAREHOUSE_DB_PASSWORD"],
                dbname=names["MLFLOW_DB_NAME"],
            ).close()
        # A second run (the volume was kept) refuses to overwrite: it fails loudly, nothing is dropped.
        again = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "already exists" in again.stderr
    finally:
        for prefix in ("MLFLOW", "WAREHOUSE"):
            admin(f'DROP DATABASE IF EXISTS "{names[f"{prefix}_DB_NAME"]}" WITH (FORCE)')
            admin(f'DROP ROLE IF EXISTS "{names[f"{prefix}_DB_USER"]}"')


def test_missing_password_is_refused_before_anything_is_created(postgres):
    env = {
        **os.environ,
        **postgres,
        "POSTGRES_USER": ADMIN,
        "POSTGRES_DB": "postgres",
        "MLFLOW_DB_USER": "t_never",
        "MLFLOW_DB_NAME": "t_never_db",
        "MLFLOW_DB_PASSWORD": "",
        "WAREHOUSE_DB_USER": "t_never_wh",
        "WAREHOUSE_DB_NAME": "t_never_wh_db",
        "WAREHOUSE_DB_PASSWORD": "x",
    }
    result = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "MLFLOW_DB_PASSWORD" in result.stderr
    import psycopg2

    with psycopg2.connect(host=HOST, port=PORT, user=ADMIN, dbname="postgres") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 't\\_never%'")
        assert cursor.fetchone() == (0,)
    conn.close()
