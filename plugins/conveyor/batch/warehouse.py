"""The predictions warehouse: where batch rows go for analysts, and the one-transaction table write.

:func:`warehouse_url` says which database: ``CONVEYOR_WAREHOUSE_URL`` (``conveyor.settings``), else
the Airflow connection ``conveyor_warehouse``, else SQLite in the state folder
(``settings.default_warehouse_url()``). :func:`write_table` replaces a run's rows in a table with
the rows of its Parquet parts; columns map to SQL types as :func:`sql_type` says.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.batch.readers import lake_path, opened

if TYPE_CHECKING:
    import pyarrow as pa
    from airflow.sdk import ObjectStoragePath
    from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

WAREHOUSE_CONN_ID = "conveyor_warehouse"
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,52}")


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
    batch_rows: int = 10_000,
    conn_id: str | None = None,
) -> int:
    """Replace a run's rows in a SQL table with the rows of its part files, in one transaction.

    The table is created when missing (columns from the first part, an index on ``run_id``); an
    existing table must have every column of the parts. ``DELETE … WHERE run_id`` and the inserts
    commit together, so a re-run replaces its own rows and a failure leaves the old rows as they were.

    :param engine_or_url: a SQLAlchemy engine or URL; None for ``settings.default_warehouse_url()``.
    :param table: the table name (letters, digits, underscores).
    :param parts: the run's Parquet part files (``parts.completed_parts`` or ``BatchResult.parts``).
    :param run_id: the run whose rows are replaced; every row of the parts must carry it.
    :param batch_rows: rows per ``executemany``.
    :param conn_id: the Airflow connection for non-local parts.
    :return: the rows written.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import sqlalchemy as sa

    if not _TABLE_NAME.fullmatch(table):
        raise ValueError(f"table name {table!r} is not allowed: use letters, digits and underscores (53 at most)")
    if not parts:
        raise ValueError(f"no part files to write to table {table!r}")
    files = [lake_path(part, conn_id) for part in parts]
    with opened(files[0]) as source:
        schema = pq.read_schema(source)
    if "run_id" not in schema.names:
        raise ValueError(f"{files[0]}: has no run_id column")
    if engine_or_url is None:
        from conveyor import settings

        settings.state_dir().mkdir(parents=True, exist_ok=True)
        engine_or_url = settings.default_warehouse_url()
    engine = sa.create_engine(engine_or_url) if isinstance(engine_or_url, str) else engine_or_url
    rows = 0
    try:
        with engine.begin() as conn:
            target = _ensure_table(conn, table, schema)
            conn.execute(sa.delete(target).where(target.c.run_id == run_id))
            for file in files:
                with opened(file) as source:
                    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=schema.names):
                        if not pc.all(pc.equal(batch.column("run_id"), run_id)).as_py():  # type: ignore[attr-defined]
                            raise ValueError(f"{file}: holds rows of another run than {run_id!r}; nothing was written")
                        conn.execute(target.insert(), batch.to_pylist())
                        rows += batch.num_rows
    finally:
        if engine is not engine_or_url:
            engine.dispose()
    log.info("replaced the rows of run %s in table %s: %s rows", run_id, table, rows)
    return rows


def _ensure_table(conn: Connection, name: str, schema: pa.Schema) -> Any:
    """The table, created from the parts' schema when missing; checked when it exists.

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
            raise ValueError(
                f"table {name!r} lacks the columns {', '.join(missing)} of these parts: "
                "write a model with another output to another table"
            )
        return existing
    created = sa.Table(
        name,
        metadata,
        *(sa.Column(f.name, sql_type(f.name, f.type)) for f in schema),
        sa.Index(f"ix_{name}_run_id", "run_id"),
    )
    created.create(conn, checkfirst=True)
    return created


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
    raise ValueError(f"column {name!r} has Arrow type {arrow_type}, which has no SQL column type here")
