"""Version-aware sync status: a row is not SYNCED while a newer edit of it is still queued.

The library's ``AsyncSyncStatusDelivery`` with ``revision=``:
a delivered push marks its row SYNCED only if the row is still at the revision
the push carried; ``on_delivered`` runs for every delivered push. Real SQLite and
PostgreSQL; the wrapped delivery strategy is the host's plug point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, Integer, MetaData, String, Update, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.enrichment import (
    AsyncSyncStatusDelivery,
    CrmSyncStatusMixin,
    mark_sync_pending,
)
from idis.integrations.exceptions import UsageError


class _Host(DeclarativeBase):
    metadata = MetaData()


class VersionedDeal(_Host, CrmSyncStatusMixin):
    """A host table whose rows carry the revision each push sends."""

    __tablename__ = "versioned_deals"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    pushes_seen: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class Push:
    """The parts of an outbox message the status hook reads."""

    ordering_key: str
    revision: int
    kind: str = "request"


@pytest.fixture
def deals(engine: Engine) -> Iterator[Engine]:
    _Host.metadata.create_all(engine)
    try:
        yield engine
    finally:
        _Host.metadata.drop_all(engine)


def _edit(engine: Engine, deal_id: str, revision: int) -> None:
    with Session(engine) as session, session.begin():
        deal = session.get(VersionedDeal, deal_id)
        if deal is None:
            session.add(VersionedDeal(id=deal_id, tenant_id="t1", revision=revision))
            session.flush()
        else:
            deal.revision = revision
        mark_sync_pending(session, VersionedDeal, [deal_id])


def _row(engine: Engine, deal_id: str) -> tuple[str, int]:
    with Session(engine) as session:
        deal = session.scalars(select(VersionedDeal).where(VersionedDeal.id == deal_id)).one()
        return deal.crm_sync_status, deal.pushes_seen


def _seen(message: Any, result: Any) -> Update:
    assert result == f"answer to r{message.revision}"  # the provider's answer reaches the hook
    return (
        update(VersionedDeal)
        .where(VersionedDeal.id == message.ordering_key)
        .values(pushes_seen=VersionedDeal.pushes_seen + 1)
    )


def _options() -> dict[str, Any]:
    return {"revision": lambda m: m.revision, "on_delivered": _seen}


def test_an_older_push_leaves_a_newer_edit_pending(deals: Engine) -> None:
    """Edited twice: r1's delivery keeps it PENDING, r2's makes it SYNCED; the hook sees both."""
    _edit(deals, "d1", 1)
    _edit(deals, "d1", 2)
    states = []
    async_engine = create_async_db_engine(deals.url.render_as_string(hide_password=False))

    async def send(message: Any) -> str:
        return f"answer to r{message.revision}"

    async def scenario() -> None:
        deliver = AsyncSyncStatusDelivery(send, async_engine, VersionedDeal, **_options())
        for revision in (1, 2):
            await deliver(Push("d1", revision))
            states.append(await asyncio.to_thread(_row, deals, "d1"))
        await async_engine.dispose()

    asyncio.run(scenario())

    assert [("PENDING", 1), ("SYNCED", 2)] == states


async def _nothing(_message: Any) -> None:
    return None


def test_a_revision_column_the_table_lacks_is_refused(deals: Engine) -> None:
    """revision= on a table without the column: a UsageError naming it, at construction."""
    with pytest.raises(UsageError, match="'version'"):
        AsyncSyncStatusDelivery(
            _nothing,
            create_async_db_engine(deals.url.render_as_string(hide_password=False)),
            VersionedDeal,
            revision=lambda m: m.revision,
            revision_column="version",
        )
