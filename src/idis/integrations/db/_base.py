"""Declarative base, naming convention and column types shared by every table."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, TypeDecorator
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

__all__ = ["Base", "BigIntPK", "JSONType", "UTCDateTime", "dialect_insert", "metadata"]

#: Constraint names are fixed so that alembic migrations are reproducible across databases.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def dialect_insert(table: Any, dialect: str) -> postgresql.Insert | sqlite.Insert:
    """``INSERT`` into ``table`` in ``dialect``'s own form, which has ``ON CONFLICT``
    (``on_conflict_do_nothing`` / ``on_conflict_do_update``).

    Raises:
        ValueError: a dialect other than the two the library supports.
    """
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported database dialect {dialect!r}: expected postgresql or sqlite")


#: 64-bit primary keys on PostgreSQL; SQLite's INTEGER PRIMARY KEY is the rowid.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")

#: JSONB on PostgreSQL, JSON text elsewhere.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend.

    PostgreSQL stores ``timestamptz`` (so RB-09's ``NOW() - INTERVAL '4 hours'``
    compares correctly); SQLite stores ISO text without an offset, so values
    are normalised to UTC on the way in and made aware on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            # Fixed-width text keeps lexical order equal to time order.
            return dialect.type_descriptor(
                sqlite.DATETIME(  # type: ignore[no-untyped-call]  # untyped in SQLAlchemy
                    storage_format=(
                        "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:"
                        "%(second)02d.%(microsecond)06d"
                    )
                )
            )
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the library stores aware UTC times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Base class of every library table."""

    metadata = metadata
