"""Transactional enqueue: the message commits or rolls back with the caller's business change.

``enqueue(session, message)`` adds exactly one statement to the caller's open
transaction, ``INSERT ... ON CONFLICT (idempotency_key) DO NOTHING``, and
nothing else: no SELECT first, no flush of our own, no commit. The caller
commits (or rolls back) as it always does. Enqueueing a key that is already
there is a no-op, reported as ``False``.

The async twins take an ``AsyncSession`` and do the same; the statement and
the row values are built once, by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._timeparse import utcnow
from ..exceptions import ConfigError
from ._messages import NewMessage
from ._models import PENDING
from ._queries import insert_statement

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = ["enqueue", "enqueue_async", "enqueue_many", "enqueue_many_async", "row_values"]

#: Rows per multi-row INSERT in :func:`enqueue_many` (well under SQLite's 32,766 parameters).
_CHUNK = 500


def row_values(message: NewMessage, now: datetime) -> dict[str, Any]:
    """Column values for one new message (shared by every enqueue path)."""
    return {
        "provider": message.provider,
        "kind": message.kind,
        "tenant_id": message.tenant_id,
        "ordering_key": message.ordering_key,
        "idempotency_key": message.idempotency_key,
        "payload": dict(message.payload),
        "status": PENDING,
        "attempts": 0,
        "max_retries": message.max_retries,
        "next_attempt_at": message.not_before or now,
        "lease_owner": None,
        "lease_expires_at": None,
        "last_error": None,
        "last_attempt_at": None,
        "created_at": now,
        "updated_at": now,
        "delivered_at": None,
    }


def _check(message: object) -> NewMessage:
    if not isinstance(message, NewMessage):
        raise ConfigError(
            f"message of type {type(message).__name__} is invalid: expected NewMessage "
            "(NewMessage.request(...) or NewMessage.webhook(...))",
            variable="message",
        )
    return message


def _dialect(bind: Any) -> str:
    return str(bind.dialect.name)


def enqueue(session: Session, message: NewMessage, *, now: datetime | None = None) -> bool:
    """Add ``message`` to the outbox inside ``session``'s current transaction.

    Costs one INSERT and no other round trip. Nothing is committed here: the
    message becomes visible to workers when the caller commits, and vanishes
    if the caller rolls back.

    Args:
        session: The caller's session, in its own transaction.
        message: What to deliver.
        now: Enqueue time (defaults to the current time).

    Returns:
        True when the message was added, False when its idempotency key was already there.

    Raises:
        ConfigError: when ``message`` is not a :class:`NewMessage`.
    """
    values = row_values(_check(message), now or utcnow())
    # RETURNING tells whether a row went in (rowcount is -1 on psycopg once
    # SQLAlchemy adds its own RETURNING), still in the one INSERT round trip.
    stmt = insert_statement(_dialect(session.get_bind()), returning=True)
    return session.execute(stmt, values).first() is not None


async def enqueue_async(
    session: AsyncSession, message: NewMessage, *, now: datetime | None = None
) -> bool:
    """Async twin of :func:`enqueue` for an ``AsyncSession``: one INSERT, no other round trip."""
    values = row_values(_check(message), now or utcnow())
    stmt = insert_statement(_dialect(session.get_bind()), returning=True)
    return (await session.execute(stmt, values)).first() is not None


def _chunks(messages: Iterable[NewMessage], now: datetime) -> list[list[dict[str, Any]]]:
    rows = [row_values(_check(m), now) for m in messages]
    return [rows[i : i + _CHUNK] for i in range(0, len(rows), _CHUNK)]


def enqueue_many(
    session: Session,
    messages: Sequence[NewMessage] | Iterable[NewMessage],
    *,
    now: datetime | None = None,
) -> int:
    """Add many messages in the caller's transaction, one multi-row INSERT per 500.

    Returns:
        How many were added (keys already present are skipped).
    """
    stmt = insert_statement(_dialect(session.get_bind()), returning=True)
    added = 0
    for chunk in _chunks(messages, now or utcnow()):
        added += len(session.execute(stmt, chunk).all())
    return added


async def enqueue_many_async(
    session: AsyncSession,
    messages: Sequence[NewMessage] | Iterable[NewMessage],
    *,
    now: datetime | None = None,
) -> int:
    """Async twin of :func:`enqueue_many`."""
    stmt = insert_statement(_dialect(session.get_bind()), returning=True)
    added = 0
    for chunk in _chunks(messages, now or utcnow()):
        added += len((await session.execute(stmt, chunk)).all())
    return added
