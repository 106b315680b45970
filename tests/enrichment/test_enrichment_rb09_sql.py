"""RB-09's SQL, verbatim, against the library's defects table and a host deals table on the mixin;
and ``impact`` / the ``mark_sync_*`` helpers that keep that table current."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, String, Table, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import create_db_engine, session_scope
from idis.integrations.enrichment import (
    RECOVERY_RESOLUTION,
    CrmSyncStatusMixin,
    TenantImpact,
    _store,
    impact,
    list_defects,
    mark_sync_failed,
    mark_sync_pending,
    mark_sync_succeeded,
)
from idis.integrations.enrichment._decisions import SubjectKey
from idis.integrations.enrichment._models import Defect
from idis.integrations.exceptions import ConfigError, UsageError
from idis.integrations.testing import simulator_settings

TRIAGE_5 = """
SELECT tenant_id, COUNT(*) as affected_deals
FROM deals
WHERE crm_sync_status = 'FAILED'
AND updated_at > NOW() - INTERVAL '1 hour'
GROUP BY tenant_id;
"""

RECOVERY_4 = """
UPDATE defects
SET status = 'RESOLVED',
    resolution = 'Data refreshed after provider recovery'
WHERE defect_type = 'STALE_ENRICHMENT'
AND provider = 'crm_provider'
AND created_at > NOW() - INTERVAL '4 hours';
"""


class HostBase(DeclarativeBase):
    """The host service's own declarative base: a MetaData that is not the library's."""

    metadata = MetaData()


class Deal(HostBase, CrmSyncStatusMixin):
    """A host table on the mixin, as the example service defines it."""

    __tablename__ = "deals"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(100))


class BareDeal(HostBase):
    """A host table without the mixin."""

    __tablename__ = "bare_deals"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128))


def _host(url: str) -> Iterator[Engine]:
    engine = create_db_engine(url)
    HostBase.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def host(sqlite_url: str) -> Iterator[Engine]:
    """A SQLite test database with the host's deals table beside the library's tables."""
    yield from _host(sqlite_url)


@pytest.fixture
def host_db(db_url: str) -> Iterator[Engine]:
    """The same on SQLite and on PostgreSQL (the test runs twice)."""
    yield from _host(db_url)


def _settings(**overrides: Any) -> Any:
    """Providers for the calls below; every call passes its engine, so no database URL."""
    return simulator_settings(
        "http://127.0.0.1:9",
        providers=("crm_provider", "enrichment_provider"),
        **overrides,
    )


def _seed_deals(engine: Engine, now: datetime) -> None:
    """Tenant a: 3 failed recently, 1 failed 2 h ago; b: 1 failed recently; c: synced/pending."""
    with Session(engine) as session, session.begin():
        for i in range(1, 11):
            tenant = "a" if i <= 6 else ("b" if i <= 8 else "c")
            session.add(Deal(id=i, tenant_id=tenant, name=f"deal {i}"))
        session.flush()
        mark_sync_failed(session, Deal, [1, 2, 3], now=now - timedelta(minutes=10))
        mark_sync_failed(session, Deal, [4], now=now - timedelta(hours=2))
        mark_sync_succeeded(session, Deal, [5, 6], now=now - timedelta(minutes=5))
        mark_sync_failed(session, Deal, [7], now=now - timedelta(minutes=30))
        mark_sync_pending(session, Deal, [8, 9, 10], now=now - timedelta(minutes=1))


def _defer(engine: Engine, provider: str, subject: str, tenant: str, at: datetime) -> None:
    with session_scope(engine) as session:
        _store.defer(
            session,
            SubjectKey(provider, tenant, "claim", subject),
            chain=[provider],
            now=at,
            error=f"{provider}:server_error",
            origin="deferred",
            actor="test",
        )


@pytest.mark.postgres
def test_triage_5_runs_verbatim_on_postgres(pg_url: str) -> None:
    """RB-09's impact SELECT returns exactly the tenants and counts of recently failed deals."""
    engine = create_db_engine(pg_url)
    HostBase.metadata.create_all(engine)
    _seed_deals(engine, utcnow())

    with engine.connect() as conn:
        rows = sorted(tuple(row) for row in conn.execute(text(TRIAGE_5)))
        column_type = conn.execute(
            text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'deals' AND column_name = 'updated_at'"
            )
        ).scalar()
    engine.dispose()

    assert [("a", 3), ("b", 1)] == rows
    assert "timestamp with time zone" == column_type


@pytest.mark.postgres
def test_recovery_4_runs_verbatim_on_postgres(pg_url: str) -> None:
    """RB-09's UPDATE resolves exactly crm_provider's stale defects of the last 4 hours."""
    engine = create_db_engine(pg_url)
    now = utcnow()
    for i in range(3):
        _defer(engine, "crm_provider", f"recent-{i}", "a", now - timedelta(hours=1))
    _defer(engine, "crm_provider", "old", "a", now - timedelta(hours=5))
    _defer(engine, "enrichment_provider", "other-provider", "b", now - timedelta(minutes=5))
    with session_scope(engine) as session:
        session.add(
            Defect(
                defect_type="SCHEMA_DRIFT",
                provider="crm_provider",
                tenant_id="a",
                subject_type="claim",
                subject_id="other-type",
                created_at=now,
            )
        )

    with engine.begin() as conn:
        changed = conn.execute(text(RECOVERY_4)).rowcount
    with session_scope(engine) as session:
        state = {
            d.subject_id: (d.status, d.resolution)
            for d in session.query(Defect).order_by(Defect.id)
        }
    column_type = None
    with engine.connect() as conn:
        column_type = conn.execute(
            text(
                "SELECT data_type FROM information_schema.columns "
                "WHERE table_name = 'defects' AND column_name = 'created_at'"
            )
        ).scalar()
    settings = _settings()
    still_open = list_defects(status="OPEN", settings=settings, engine=engine)
    engine.dispose()

    assert 3 == changed
    assert {
        "recent-0": ("RESOLVED", RECOVERY_RESOLUTION),
        "recent-1": ("RESOLVED", RECOVERY_RESOLUTION),
        "recent-2": ("RESOLVED", RECOVERY_RESOLUTION),
        "old": ("OPEN", None),
        "other-provider": ("OPEN", None),
        "other-type": ("OPEN", None),
    } == state
    assert "timestamp with time zone" == column_type
    assert ["old", "other-provider"] == [d.subject_id for d in still_open]


@pytest.mark.postgres
def test_defect_resolved_by_hand_written_sql_lets_a_new_one_open(pg_url: str) -> None:
    """Status is the source of truth: after RB-09's UPDATE, a new outage opens a fresh defect."""
    engine = create_db_engine(pg_url)
    now = utcnow()
    _defer(engine, "crm_provider", "s1", "a", now - timedelta(minutes=30))
    with engine.begin() as conn:
        conn.execute(text(RECOVERY_4))
    _defer(engine, "crm_provider", "s1", "a", now)
    with session_scope(engine) as session:
        rows = [
            (d.status, d.resolved_at is None) for d in session.query(Defect).order_by(Defect.id)
        ]
    engine.dispose()

    assert [("RESOLVED", True), ("OPEN", True)] == rows


def test_impact_counts_per_tenant(host_db: Engine) -> None:
    """impact() lists each affected tenant with failed deals, deferred enrichments, open defects."""
    host = host_db
    now = utcnow()
    _seed_deals(host, now)
    _defer(host, "crm_provider", "c1", "a", now - timedelta(minutes=20))
    _defer(host, "crm_provider", "c2", "c", now - timedelta(minutes=20))
    _defer(host, "crm_provider", "c3", "c", now - timedelta(minutes=20))
    _defer(host, "crm_provider", "old", "d", now - timedelta(hours=3))
    _defer(host, "enrichment_provider", "e1", "e", now - timedelta(minutes=5))
    settings = _settings()

    result = impact("crm_provider", "1 hour ago", deals_table=Deal, settings=settings, engine=host)

    assert [
        TenantImpact(tenant_id="a", failed_to_sync=3, enrichment_deferred=1, open_defects=1),
        TenantImpact(tenant_id="c", failed_to_sync=0, enrichment_deferred=2, open_defects=2),
        TenantImpact(tenant_id="b", failed_to_sync=1, enrichment_deferred=0, open_defects=0),
    ] == result


def test_impact_reflects_the_configured_deals_table(host_db: Engine) -> None:
    """IDIS_IMPACT_DEALS_TABLE names a host table the library reflects and counts."""
    host = host_db
    _seed_deals(host, utcnow())
    settings = _settings()
    settings = replace(
        settings, enrichment=replace(settings.enrichment, impact_deals_table="deals")
    )

    result = impact("crm_provider", "1 hour ago", settings=settings, engine=host)
    without_crm = impact("enrichment_provider", "1 hour ago", settings=settings, engine=host)

    assert [("a", 3), ("b", 1)] == [(r.tenant_id, r.failed_to_sync) for r in result]
    assert [] == without_crm


@pytest.mark.parametrize(
    ("table", "message"),
    [("no_such_deals", "no such table"), ("bare_deals", "has no column crm_sync_status")],
)
def test_impact_names_a_bad_deals_table(host: Engine, table: str, message: str) -> None:
    """A missing table, or one without the mixin's columns, fails naming the table."""
    with pytest.raises(ConfigError, match=f"'{table}'.*{message}"):
        impact("crm_provider", "1 hour ago", deals_table=table, settings=_settings(), engine=host)


def test_mark_sync_helpers_move_status_and_timestamps(host_db: Engine) -> None:
    """SYNCED stamps crm_synced_at; every change moves updated_at, which Triage 5 reads."""
    host = host_db
    t0 = utcnow() - timedelta(days=7)
    t1 = utcnow()
    with Session(host) as session, session.begin():
        session.add(Deal(id=1, tenant_id="a", name="x", updated_at=t0))
        session.flush()
        assert 1 == mark_sync_succeeded(session, Deal, [1], now=t0)
        assert 1 == mark_sync_failed(session, Deal.__table__, [1, 99], now=t1)
        assert 0 == mark_sync_failed(session, Deal, [], now=t1)
    with Session(host) as session:
        deal = session.get(Deal, 1)
        assert deal is not None

        assert ("FAILED", t0, t1) == (deal.crm_sync_status, deal.crm_synced_at, deal.updated_at)


def test_mark_sync_rejects_tables_without_the_mixin(host: Engine) -> None:
    """The helpers refuse a table lacking the sync-status columns, naming it."""
    with Session(host) as session, pytest.raises(UsageError, match="'bare_deals'"):
        mark_sync_failed(session, BareDeal, [1])


def test_mixin_declares_its_index_and_check() -> None:
    """The deals table gets the (crm_sync_status, updated_at) index and a status check."""
    table = Deal.__table__
    assert isinstance(table, Table)

    assert {"ix_deals_crm_sync_status_updated_at"} == {i.name for i in table.indexes}
    assert "ck_deals_crm_sync_status" in {c.name for c in table.constraints}
