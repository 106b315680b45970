"""Defects: one OPEN per subject, idempotent creation (also under concurrency), windows, audit."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from tests.conftest import sample

from idis.integrations._audit import AuditEvent
from idis.integrations._timeparse import utcnow
from idis.integrations.db._engine import create_db_engine, session_scope
from idis.integrations.enrichment import (
    RECOVERY_RESOLUTION,
    _store,
    clear_stale_defects,
    create_stale_defects,
)
from idis.integrations.enrichment._decisions import SubjectKey
from idis.integrations.enrichment._models import Defect, EnrichmentCacheEntry, EnrichmentRequest
from idis.integrations.exceptions import ConfigError, UnknownProviderError
from idis.integrations.testing import simulator_settings

P = "crm_provider"


@pytest.fixture
def engine(sqlite_url: str) -> Any:
    """An engine on a SQLite test database."""
    eng = create_db_engine(sqlite_url)
    yield eng
    eng.dispose()


@pytest.fixture
def engine_db(db_url: str) -> Any:
    """An engine on SQLite and on PostgreSQL (the test runs twice)."""
    eng = create_db_engine(db_url)
    yield eng
    eng.dispose()


def _settings() -> Any:
    """Providers for the calls below; every call passes its engine, so no database URL."""
    return simulator_settings("http://127.0.0.1:9", providers=(P, "enrichment_provider"))


def _key(subject: str, tenant: str = "t1", provider: str = P) -> SubjectKey:
    return SubjectKey(provider, tenant, "claim", subject)


def _fail(engine: Engine, key: SubjectKey, minutes_ago: float) -> None:
    with session_scope(engine) as session:
        _store.record_failure(
            session, key, error="x:server_error", now=utcnow() - timedelta(minutes=minutes_ago)
        )


def _snapshot(engine: Engine) -> list[tuple[Any, ...]]:
    with session_scope(engine) as session:
        return [
            (d.id, d.tenant_id, d.subject_id, d.status, d.created_at)
            for d in session.scalars(select(Defect).order_by(Defect.id))
        ]


def test_create_stale_defects_is_idempotent(engine_db: Engine, metrics: Any) -> None:
    """A second run creates nothing and reports the same defects as already open."""
    engine = engine_db
    for i in range(4):
        _fail(engine, _key(f"s{i}", tenant=f"t{i % 2}"), minutes_ago=10)
    _fail(engine, _key("too-old"), minutes_ago=120)
    _fail(engine, _key("other", provider="enrichment_provider"), minutes_ago=5)
    settings = _settings()

    first = create_stale_defects(P, "1 hour ago", settings=settings, engine=engine)
    before = _snapshot(engine)
    second = create_stale_defects(P, "1 hour ago", settings=settings, engine=engine)

    assert (4, 4, 0, 4) == (
        first.subjects,
        first.created,
        first.already_open,
        first.requests_enqueued,
    )
    assert (4, 0, 4, 0) == (
        second.subjects,
        second.created,
        second.already_open,
        second.requests_enqueued,
    )
    assert first.defect_ids == second.defect_ids
    assert before == _snapshot(engine)
    assert {"s0", "s1", "s2", "s3"} == {row[2] for row in before}
    assert 4 == sample(
        metrics, "integration_defects_open", provider=P, defect_type="STALE_ENRICHMENT"
    )
    with session_scope(engine) as session:
        actions = [a.action for a in session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert ["defect.created"] * 4 + ["defects.create_stale"] * 2 == actions


def test_pending_deferrals_in_the_window_count_as_stale(engine: Engine) -> None:
    """A subject deferred in the window gets a defect even if its stale mark was refreshed away."""
    with session_scope(engine) as session:
        _store.ensure_requests(session, [(_key("d1"), [P])], now=utcnow() - timedelta(minutes=3))

    result = create_stale_defects(P, "1 hour ago", settings=_settings(), engine=engine)

    assert (1, 1, 0) == (result.subjects, result.created, result.requests_enqueued)


def test_refreshed_subjects_get_no_defect(engine: Engine) -> None:
    """A subject that failed in the window but has since been refreshed is not stale."""
    key = _key("back")
    _fail(engine, key, minutes_ago=10)
    with session_scope(engine) as session:
        now = utcnow()
        _store.record_success(
            session, key, served_by=P, data={"a": 1}, fetched_at=now, now=now, actor="t"
        )

    result = create_stale_defects(P, "1 hour ago", settings=_settings(), engine=engine)

    assert 0 == result.subjects


def test_clear_stale_defects_resolves_the_window_and_reports(engine: Engine) -> None:
    """Clearing resolves the provider's OPEN defects created after --since, with resolved_at."""
    now = utcnow()
    with session_scope(engine) as session:
        for name, hours in (("new1", 1), ("new2", 3), ("old", 5)):
            _store.open_defects(
                session, [(_key(name), {})], now=now - timedelta(hours=hours), actor="t"
            )
        _store.open_defects(
            session, [(_key("x", provider="enrichment_provider"), {})], now=now, actor="t"
        )
    settings = _settings()

    first = clear_stale_defects(P, "4 hours ago", settings=settings, engine=engine, now=now)
    again = clear_stale_defects(P, "4 hours ago", settings=settings, engine=engine, now=now)

    assert (2, 0) == (first.resolved, again.resolved)
    with session_scope(engine) as session:
        state = {
            d.subject_id: (d.status, d.resolution, d.resolved_at)
            for d in session.scalars(select(Defect))
        }
    assert ("RESOLVED", RECOVERY_RESOLUTION, now) == state["new1"]
    assert ("RESOLVED", RECOVERY_RESOLUTION, now) == state["new2"]
    assert ("OPEN", None, None) == state["old"]
    assert ("OPEN", None, None) == state["x"]


def test_bad_input_changes_nothing(engine: Engine) -> None:
    """An unknown provider or a bad --since fails naming the value before touching the database."""
    _fail(engine, _key("s"), minutes_ago=1)
    settings = _settings()

    with pytest.raises(UnknownProviderError, match="'nope'"):
        create_stale_defects("nope", "1 hour ago", settings=settings, engine=engine)
    with pytest.raises(ConfigError, match="since='an hour-ish'"):
        create_stale_defects(P, "an hour-ish", settings=settings, engine=engine)
    with pytest.raises(ConfigError, match="since='tomorrow'"):
        clear_stale_defects(P, "tomorrow", settings=settings, engine=engine)

    assert [] == _snapshot(engine)
    with session_scope(engine) as session:
        assert [] == list(session.scalars(select(AuditEvent)))
        assert [] == list(session.scalars(select(EnrichmentRequest)))


def test_partial_unique_index_allows_one_open_defect_per_subject(engine_db: Engine) -> None:
    """The database itself refuses a second OPEN defect for a subject, not a RESOLVED one."""
    engine = engine_db
    now = utcnow()

    def add(status: str) -> None:
        with session_scope(engine) as session:
            session.add(
                Defect(
                    defect_type="STALE_ENRICHMENT",
                    provider=P,
                    tenant_id="t",
                    subject_type="claim",
                    subject_id="s",
                    status=status,
                    created_at=now,
                )
            )

    add("OPEN")
    add("RESOLVED")
    add("RESOLVED")
    with pytest.raises(IntegrityError):
        add("OPEN")


def test_status_check_rejects_other_values(engine: Engine) -> None:
    """defects.status accepts only OPEN and RESOLVED."""
    with pytest.raises(IntegrityError), session_scope(engine) as session:
        session.add(
            Defect(
                defect_type="STALE_ENRICHMENT",
                provider=P,
                tenant_id="t",
                subject_type="claim",
                subject_id="s",
                status="CLOSED",
                created_at=utcnow(),
            )
        )


def test_stale_since_is_kept_across_failures(engine: Engine) -> None:
    """Repeated failures move last_failure_at but keep the time the subject first went stale."""
    key = _key("s")
    first, later = utcnow() - timedelta(minutes=30), utcnow() - timedelta(minutes=2)
    for moment in (first, later):
        with session_scope(engine) as session:
            _store.record_failure(session, key, error="x:timeout", now=moment)
    with session_scope(engine) as session:
        row = session.scalars(select(EnrichmentCacheEntry)).one()

        assert (True, first, later) == (row.stale, row.stale_since, row.last_failure_at)


@pytest.mark.postgres
def test_concurrent_deferrals_of_one_subject_open_one_defect(pg_url: str) -> None:
    """Eight callers deferring the same subject at once leave one OPEN defect and one request."""
    engine = create_db_engine(pg_url, pool_size=8)
    barrier = threading.Barrier(8)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def defer() -> None:
        try:
            barrier.wait()
            with session_scope(engine) as session:
                results.append(
                    _store.defer(
                        session,
                        _key("same"),
                        chain=[P],
                        now=utcnow(),
                        error="x",
                        origin="deferred",
                        actor="t",
                    )
                )
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=defer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with session_scope(engine) as session:
        defects = list(session.scalars(select(Defect)))
        requests = list(session.scalars(select(EnrichmentRequest)))
    engine.dispose()

    assert [] == errors
    assert 1 == len(defects)
    assert 1 == len(requests)
    assert {(requests[0].id, defects[0].id)} == set(results)
