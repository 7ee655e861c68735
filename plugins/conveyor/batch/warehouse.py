"""The predictions warehouse: where batch rows go for analysts, and the one-transaction table write.

:func:`warehouse_url` says which database: ``CONVEYOR_WAREHOUSE_URL`` (``conveyor.settings``), else
the Airflow connection ``conveyor_warehouse``, else SQLite in the state folder
(``settings.default_warehouse_url()``). :func:`write_table` replaces a run's rows in a table with
the rows of its Parquet parts; columns map to SQL types as :func:`sql_type` says.

Rows are keyed by pipeline and run: the table has a ``pipeline`` column beside ``run_id`` (the parts
do not carry it; every row written gets the pipeline's name), so two pipelines sharing one table, whose
scheduled runs have the same run ids, never replace each other's rows. A table created before this
column existed is migrated on the next write, in the same transaction: ``pipeline`` is added, its
existing rows get their ``model_name`` (Conveyor registers each pipeline's model under the
pipeline's name), and an index on ``(pipeline, run_id)`` is created.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.batch.readers import lake_path, opened
from conveyor.errors import ConveyorError

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

WAREHOUSE_CONN_ID = "conveyor_warehouse"
PIPELINE = "pipeline"
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,52}")


class WarehouseError(ConveyorError, ValueError):
    """Rows that cannot go to the table as asked (names the table or file and the rule); a retry will not help."""


def warehouse_url() -> str:
    """The predictions warehouse: ``CONVEYOR_WAREHOUSE_URL``, the Airflow connection
    ``conveyor_warehouse``, or SQLite in the state folder."""
    from airflow.sdk import BaseHook

    from conveyor import settings

    override = settings.warehouse_url_override()
    if override:
        return override
    try:
        uri = BaseHook.get_connection(WAREHOUSE_CONN_ID).get_uri()
    except Exception as exc:  # Airflow's "connection not found" (its exception type is Airflow's own)
        if type(exc).__name__ != "AirflowNotFoundException":
            raise
        return settings.default_warehouse_url()
    # Airflow writes Postgres connections as postgres://; SQLAlchemy 2.1 reads postgresql:// as psycopg 3,
    # while the installed driver is psycopg2.
    return uri.replace("postgres://", "postgresql+psycopg2://", 1)


def write_table(
    engine_or_url: Engine | str | None,
    table: str,
    parts: Sequence[str | Path | ObjectStoragePath],
    run_id: str,
    *,
    pipeline: str,
    batch_rows: int = 10_000,
    conn_id: str | None = None,
) -> int:
    """Replace a pipeline run's rows in a SQL table with the rows of its part files, in one transaction.

    The table is created when missing (columns from the first part and ``pipeline``, indexes on
    ``run_id`` and ``(pipeline, run_id)``); an existing table must have every column of the parts and
    is migrated when it lacks ``pipeline`` (module docstring). ``DELETE … WHERE pipeline AND run_id``
    and the inserts commit together, so a re-run replaces its own rows, never another pipeline's
    rows of the same run id, and a failure leaves the old rows as they were.

    :param engine_or_url: a SQLAlchemy engine or URL; None for ``settings.default_warehouse_url()``.
    :param table: the table name (letters, digits, underscores).
    :param parts: the run's Parquet part files (``parts.completed_parts`` or ``BatchResult.parts``).
    :param run_id: the run whose rows are replaced; every row of the parts must carry it.
    :param pipeline: the pipeline the run belongs to (written on every row, part of the key).
    :param batch_rows: rows per ``executemany``.
    :param conn_id: the Airflow connection for non-local parts.
    :return: the rows written.
    :raises WarehouseError: an unsafe table name, no parts, parts without ``run_id`` or holding
        another run's rows, or a table lacking their columns (deterministic: not retried).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import sqlalchemy as sa

    if not _TABLE_NAME.fullmatch(table):
        raise WarehouseError(f"table name {table!r} is not allowed: use letters, digits and underscores (53 at most)")
    if not parts:
        raise WarehouseError(f"no part files to write to table {table!r}")
    files = [lake_path(part, conn_id) for part in parts]
    with opened(files[0]) as source:
        schema = pq.read_schema(source)
    if "run_id" not in schema.names:
        raise WarehouseError(f"{files[0]}: has no run_id column")
    if PIPELINE in schema.names:
        raise WarehouseError(f"{files[0]}: has a column {PIPELINE!r}, which the table keeps for the pipeline's name")
    if engine_or_url is None:
        from conveyor import settings

        settings.state_dir().mkdir(parents=True, exist_ok=True)
        engine_or_url = settings.default_warehouse_url()
    engine = sa.create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    rows = 0
    try:
        with engine.begin() as conn:
            target = _ensure_table(conn, table, schema)
            conn.execute(sa.delete(target).where(target.c[PIPELINE] == pipeline, target.c.run_id == run_id))
            for file in files:
                with opened(file) as source:
                    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=schema.names):
                        if not pc.all(pc.equal(batch.column("run_id"), run_id)).as_py():  # type: ignore[attr-defined]
                            raise WarehouseError(
                                f"{file}: holds rows of another run than {run_id!r}; nothing was written"
                            )
                        conn.execute(target.insert(), [{**row, PIPELINE: pipeline} for row in batch.to_pylist()])
                        rows += batch.num_rows
    finally:
        if engine is not engine_or_url:
            engine.dispose()
    log.info("replaced the rows of pipeline %s run %s in table %s: %s rows", pipeline, run_id, table, rows)
    return rows


def _ensure_table(conn: Connection, name: str, schema: pa.Schema) -> Any:
    """The table, created from the parts' schema when missing; checked (and migrated) when it exists.

    :param conn: the open transaction.
    :param name: the table name.
    :param schema: the parts' Arrow schema.
    """
    import sqlalchemy as sa

    metadata = sa.MetaData()
    if sa.inspect(conn).has_table(name):
        existing = sa.Table(name, metadata, autoload_with=conn)
        missing = [column for column in schema.names if column not in existing.c]
        if missing:
            raise WarehouseError(
                f"table {name!r} lacks the columns {', '.join(missing)} of these parts: "
                "write a model with another output to another table"
            )
        if PIPELINE not in existing.c:
            _add_pipeline_column(conn, existing)
            existing = sa.Table(name, sa.MetaData(), autoload_with=conn)
        return existing
    created = sa.Table(
        name,
        metadata,
        *(sa.Column(f.name, sql_type(f.name, f.type)) for f in schema),
        sa.Column(PIPELINE, sa.Text()),
        sa.Index(f"ix_{name}_run_id", "run_id"),
        sa.Index(f"ix_{name}_key", PIPELINE, "run_id"),
    )
    created.create(conn, checkfirst=True)
    return created


def _add_pipeline_column(conn: Connection, table: Any) -> None:
    """Migrate a table written before rows were keyed by pipeline: add ``pipeline``, fill it, index it.

    Existing rows get their ``model_name``: Conveyor registers a pipeline's model under the
    pipeline's name, so that is the pipeline that wrote them. Runs in the caller's transaction.

    :param conn: the open transaction.
    :param table: the reflected table.
    """
    import sqlalchemy as sa

    quoted = conn.dialect.identifier_preparer.quote
    exists = "IF NOT EXISTS " if conn.dialect.name == "postgresql" else ""  # two first writers at once
    conn.execute(sa.text(f"ALTER TABLE {quoted(table.name)} ADD COLUMN {exists}{PIPELINE} TEXT"))
    if "model_name" in table.c:
        conn.execute(sa.text(f"UPDATE {quoted(table.name)} SET {PIPELINE} = model_name WHERE {PIPELINE} IS NULL"))
    conn.execute(
        sa.text(
            f"CREATE INDEX IF NOT EXISTS {quoted(f'ix_{table.name}_key')} ON {quoted(table.name)} ({PIPELINE}, run_id)"
        )
    )
    log.warning(
        "table %s had no %s column (written before rows were keyed by pipeline): added it, its rows "
        "took their model_name, and an index on (%s, run_id) was created",
        table.name,
        PIPELINE,
        PIPELINE,
    )


def sql_type(name: str, arrow_type: pa.DataType) -> Any:
    """The SQL type of a part column: text, double, big integer, boolean, timestamp or date.

    :param name: the column, for messages.
    :param arrow_type: its Arrow type.
    """
    import pyarrow.types as t
    import sqlalchemy as sa

    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return sa.Text()
    if t.is_floating(arrow_type):
        return sa.Double()
    if t.is_integer(arrow_type):
        return sa.BigInteger()
    if t.is_boolean(arrow_type):
        return sa.Boolean()
    if t.is_timestamp(arrow_type):
        return sa.DateTime(timezone=arrow_type.tz is not None)
    if t.is_date(arrow_type):
        return sa.Date()
    raise WarehouseError(f"column {name!r} has Arrow type {arrow_type}, which has no SQL column type here")
