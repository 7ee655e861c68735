"""The predictions table is keyed by pipeline and run (issue 17 item 9): two pipelines sharing a table,
whose scheduled runs have equal run ids, keep each other's rows; a table of the old layout (no
``pipeline`` column) is migrated on the next write; bad input is a deterministic Conveyor error while a
database that cannot be reached is not. On SQLite and on the local PostgreSQL test server."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from airflow.sdk.exceptions import AirflowFailException

from conveyor.batch.warehouse import WarehouseError, write_table
from conveyor.errors import ConveyorError
from conveyor.operators.base import airflow_errors

RUN = "scheduled__2026-03-01T06:00:00+00:00"  # what both pipelines' schedules call the run


def parts(folder: Path, model: str, run_id: str, ids: list[str], prediction: str = "yes") -> list[Path]:
    """One part file as a batch run of ``model`` writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        {
            "customer_id": ids,
            "prediction": prediction,
            "proba_no": 0.25,
            "proba_yes": 0.75,
            "model_name": model,
            "model_version": "1",
            "run_id": run_id,
            "scored_at": pd.Timestamp(datetime(2026, 3, 1, 6, tzinfo=UTC)),
        }
    )
    path = folder / "part-00000.parquet"
    frame.to_parquet(path, index=False)
    return [path]


def rows(url: str, table: str) -> list[tuple]:
    """``(pipeline, run_id, customer_id, prediction)`` of every row, sorted."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = f"SELECT pipeline, run_id, customer_id, prediction FROM {table}"
            return sorted(tuple(row) for row in conn.execute(sa.text(query)))
    finally:
        engine.dispose()


def postgres_url() -> str:
    """The local PostgreSQL test server (trust auth; ``CONVEYOR_TEST_POSTGRES_URL`` overrides it), or skip."""
    url = "postgresql+psycopg2://" + os.environ.get("CONVEYOR_TEST_POSTGRES_URL", "postgres@127.0.0.1:5432/test")
    engine = sa.create_engine(url)
    try:
        with engine.connect():
            pass
    except (sa.exc.OperationalError, ModuleNotFoundError) as error:
        pytest.skip(f"PostgreSQL at {url} is not reachable: {error}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def warehouse(request, tmp_path):
    """A database URL and a table of its own (dropped afterwards on Postgres)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'warehouse.db'}", "shared_predictions"
        return
    url, table = postgres_url(), f"keys_test_{uuid.uuid4().hex[:12]}"
    yield url, table
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
    engine.dispose()


def test_two_pipelines_sharing_a_table_keep_their_rows_of_the_same_run_id(warehouse, tmp_path):
    url, table = warehouse
    churn = parts(tmp_path / "churn", "churn", RUN, ["C1", "C2"])
    upsell = parts(tmp_path / "upsell", "upsell", RUN, ["C1", "C3", "C4"])
    assert write_table(url, table, churn, RUN, pipeline="churn") == 2
    assert write_table(url, table, upsell, RUN, pipeline="upsell") == 3
    assert rows(url, table) == [
        ("churn", RUN, "C1", "yes"),
        ("churn", RUN, "C2", "yes"),
        ("upsell", RUN, "C1", "yes"),
        ("upsell", RUN, "C3", "yes"),
        ("upsell", RUN, "C4", "yes"),
    ]

    # A re-run of churn replaces churn's rows of that run, and only those.
    again = parts(tmp_path / "churn2", "churn", RUN, ["C1"], prediction="no")
    assert write_table(url, table, again, RUN, pipeline="churn") == 1
    assert rows(url, table) == [
        ("churn", RUN, "C1", "no"),
        ("upsell", RUN, "C1", "yes"),
        ("upsell", RUN, "C3", "yes"),
        ("upsell", RUN, "C4", "yes"),
    ]
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        indexes = {tuple(index["column_names"]) for index in sa.inspect(conn).get_indexes(table)}
    engine.dispose()
    assert ("pipeline", "run_id") in indexes and ("run_id",) in indexes


def test_a_table_of_the_old_layout_is_migrated_on_the_next_write(warehouse, tmp_path):
    url, table = warehouse
    old = pd.concat(
        [
            pd.read_parquet(parts(tmp_path / "a", "churn", RUN, ["C1", "C2"])[0]),
            pd.read_parquet(parts(tmp_path / "b", "upsell", RUN, ["C9"])[0]),
        ]
    )
    engine = sa.create_engine(url)
    old.to_sql(table, engine, index=False)  # as the code before issue 17 wrote it: no pipeline column
    engine.dispose()

    assert write_table(url, table, parts(tmp_path / "c", "churn", RUN, ["C5"], "no"), RUN, pipeline="churn") == 1
    assert rows(url, table) == [("churn", RUN, "C5", "no"), ("upsell", RUN, "C9", "yes")]
    assert write_table(url, table, parts(tmp_path / "d", "upsell", RUN, ["C8"]), RUN, pipeline="upsell") == 1
    assert rows(url, table) == [("churn", RUN, "C5", "no"), ("upsell", RUN, "C8", "yes")]


def test_bad_table_input_fails_the_task_and_an_unreachable_database_is_retried(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    write_table(url, "t", parts(tmp_path / "a", "churn", "r1", ["C1"]), "r1", pipeline="churn")
    wider = pd.read_parquet(parts(tmp_path / "b", "churn", "r2", ["C2"])[0]).assign(proba_maybe=0.0)
    wider.to_parquet(tmp_path / "wider.parquet", index=False)
    cases = [
        (lambda: write_table(url, "t", [tmp_path / "wider.parquet"], "r2", pipeline="churn"), "lacks the columns"),
        (
            lambda: write_table(url, "t; DROP TABLE t", [tmp_path / "wider.parquet"], "r2", pipeline="churn"),
            "not allowed",
        ),
        (lambda: write_table(url, "t", [], "r2", pipeline="churn"), "no part files"),
        (
            lambda: write_table(url, "t", parts(tmp_path / "c", "churn", "r3", ["C3"]), "r4", pipeline="churn"),
            "another run",
        ),
    ]
    for call, message in cases:
        with pytest.raises(AirflowFailException, match=message) as caught, airflow_errors():
            call()
        assert isinstance(caught.value.__cause__, WarehouseError) and isinstance(caught.value.__cause__, ConveyorError)

    unreachable = "postgresql+psycopg2://postgres@127.0.0.1:1/none"  # nothing listens on port 1
    with pytest.raises(sa.exc.OperationalError), airflow_errors():
        write_table(unreachable, "t", parts(tmp_path / "d", "churn", "r5", ["C5"]), "r5", pipeline="churn")
