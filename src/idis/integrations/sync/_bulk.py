"""Multi-row INSERTs that stay fast on PostgreSQL: one statement, one array per column.

SQLAlchemy's executemany ("insertmanyvalues") renders a page of rows as one
INSERT with a placeholder per value. psycopg parses such a statement in
Python on every execution (statements that long are not cached), which cost
more than the database work itself: about 10,000 rows/s. Passing each column
as one array and ``unnest``-ing them server-side sends a short, cacheable
statement with a dozen parameters instead. SQLite keeps executemany, which
its driver runs natively.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, insert, text
from sqlalchemy.engine import Result
from sqlalchemy.orm import Session

__all__ = ["bulk_insert", "pg_unnest_insert"]


def pg_unnest_insert(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], *, suffix: str = ""
) -> Result[Any]:
    """``INSERT INTO table (...) SELECT ... FROM unnest(arrays) <suffix>`` on PostgreSQL.

    Args:
        session: A session bound to PostgreSQL.
        table: Target table; column types come from it.
        rows: Rows with the same keys (column names); values as the driver takes them.
        suffix: SQL appended verbatim (``ON CONFLICT ...``, ``RETURNING ...``).
    """
    dialect = session.get_bind().dialect
    columns = list(rows[0])
    arrays: list[str] = []
    selected: list[str] = []
    params: dict[str, Any] = {}
    for index, name in enumerate(columns):
        column = table.c[name]
        values = [row[name] for row in rows]
        if column.type.compile(dialect=dialect) in ("JSON", "JSONB"):
            # JSON travels as text and is parsed once per row by the server.
            params[f"p{index}"] = [None if v is None else json.dumps(v) for v in values]
            arrays.append(f"CAST(:p{index} AS TEXT[])")
            selected.append(f"CAST(u.c{index} AS JSONB)")
        else:
            params[f"p{index}"] = values
            arrays.append(f"CAST(:p{index} AS {column.type.compile(dialect=dialect)}[])")
            selected.append(f"u.c{index}")
    aliases = ", ".join(f"c{i}" for i in range(len(columns)))
    # Identifiers come from the table's metadata and the suffix from our own
    # constants; every value is a bound array parameter.
    sql = (
        f"INSERT INTO {table.name} ({', '.join(columns)}) "  # noqa: S608  # see above
        f"SELECT {', '.join(selected)} FROM unnest({', '.join(arrays)}) AS u({aliases}) "
        f"{suffix}"
    )
    return session.execute(text(sql), params)


def bulk_insert(session: Session, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` into ``table`` in as few statements as the backend allows."""
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        pg_unnest_insert(session, table, rows)
    else:
        session.execute(insert(table), list(rows))
