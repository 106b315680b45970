"""CRM pushes through the real outbox keep the host's crm_sync_status current, so RB-09 Triage 5
finds exactly the deals whose push failed."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import MetaData, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idis.integrations.enrichment import (
    AsyncSyncStatusDelivery,
    CrmSyncStatusMixin,
    impact,
    mark_sync_pending,
)
from idis.integrations.outbox import AsyncGatewayDelivery, AsyncOutboxWorker, NewMessage, enqueue

CRM = "crm_provider"


class _Host(DeclarativeBase):
    metadata = MetaData()


class SyncDeal(_Host, CrmSyncStatusMixin):
    """The host's deals table."""

    __tablename__ = "deals"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))


@pytest.fixture
def deals(env_db: Any) -> Any:
    """The test environment (SQLite and PostgreSQL) with the host's deals table beside ours."""
    _Host.metadata.create_all(env_db.engine)
    return env_db


@pytest.fixture
def deals_sqlite(env: Any) -> Any:
    """The same on SQLite only."""
    _Host.metadata.create_all(env.engine)
    return env


def _push(env: Any, deal_id: int, tenant: str, *, max_retries: int | None = None) -> None:
    """Change a deal, mark it PENDING and enqueue its CRM push in one transaction."""
    with Session(env.engine) as session, session.begin():
        if session.get(SyncDeal, deal_id) is None:
            session.add(SyncDeal(id=deal_id, tenant_id=tenant))
            session.flush()
        mark_sync_pending(session, SyncDeal, [deal_id])
        enqueue(
            session,
            NewMessage.request(
                CRM,
                "record",
                method="PUT",
                path_params={"id": f"deal-{deal_id}"},
                json={"tenant_id": tenant, "data": {"deal": deal_id}},
                idempotency_key=f"deal-{deal_id}-{env.clock.time()}",
                ordering_key=str(deal_id),
                tenant_id=tenant,
                max_retries=max_retries,
            ),
        )


def _statuses(env: Any) -> dict[int, str]:
    with Session(env.engine) as session:
        return {d.id: d.crm_sync_status for d in session.scalars(select(SyncDeal))}


def test_outbox_pushes_mark_deals_synced_or_failed(deals: Any) -> None:
    """Delivered pushes mark SYNCED, failed ones FAILED; impact counts the failures per tenant."""
    env = deals
    settings = env.settings()
    gateway = env.async_gateway(settings)
    deliver = AsyncSyncStatusDelivery(AsyncGatewayDelivery(gateway), env.async_engine, SyncDeal)
    worker = AsyncOutboxWorker(
        env.async_engine,
        settings,
        deliver=deliver,
        availability=gateway.available,
        providers=[CRM],
    )
    _push(env, 1, "t1")
    _push(env, 2, "t1")
    pending = _statuses(env)
    env.run(worker.run(until_idle=True))
    synced = _statuses(env)

    env.outage(CRM)
    _push(env, 3, "t1", max_retries=0)
    _push(env, 4, "t2", max_retries=0)
    env.run(worker.run(until_idle=True))
    after_outage = _statuses(env)
    result = impact(CRM, "1 hour ago", deals_table=SyncDeal, settings=settings, engine=env.engine)

    assert {1: "PENDING", 2: "PENDING"} == pending
    assert {1: "SYNCED", 2: "SYNCED"} == synced
    assert {1: "SYNCED", 2: "SYNCED", 3: "FAILED", 4: "FAILED"} == after_outage
    assert [("t1", 1), ("t2", 1)] == [(r.tenant_id, r.failed_to_sync) for r in result]
    if env.db_url.startswith("postgresql"):
        with env.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT tenant_id, COUNT(*) as affected_deals FROM deals "
                    "WHERE crm_sync_status = 'FAILED' "
                    "AND updated_at > NOW() - INTERVAL '1 hour' GROUP BY tenant_id;"
                )
            ).all()
        assert [("t1", 1), ("t2", 1)] == sorted(tuple(r) for r in rows)


def test_a_failed_status_write_never_fails_the_delivery(deals_sqlite: Any) -> None:
    """If the status cannot be written the delivery still counts as delivered."""
    env = deals_sqlite
    delivered: list[Any] = []

    async def send(message: Any) -> None:
        delivered.append(message)

    broken = AsyncSyncStatusDelivery(send, env.async_engine, SyncDeal.__table__)
    with env.engine.begin() as conn:
        conn.execute(text("DROP TABLE deals"))

    class Message:
        kind = "request"
        ordering_key = "7"

    env.run(broken(Message()))

    assert 1 == len(delivered)


def test_messages_of_other_kinds_leave_rows_alone(deals_sqlite: Any) -> None:
    """With kinds=, messages of other kinds (webhooks) do not touch the host table."""
    env = deals_sqlite
    with Session(env.engine) as session, session.begin():
        session.add(SyncDeal(id=5, tenant_id="t"))

    async def send(_message: Any) -> None:
        return None

    wrapped = AsyncSyncStatusDelivery(send, env.async_engine, SyncDeal, kinds=["request"])

    class Webhook:
        kind = "webhook"
        ordering_key = "5"

    env.run(wrapped(Webhook()))

    with Session(env.engine) as session:
        assert "PENDING" == session.scalar(select(SyncDeal.crm_sync_status))
        assert 1 == session.scalar(select(func.count()).select_from(SyncDeal))
