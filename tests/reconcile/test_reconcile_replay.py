"""reconcile() against the simulator's replay API over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from idis.integrations._audit import AuditEvent
from idis.integrations._timeparse import utcnow
from idis.integrations.exceptions import ConfigError, ReplayWindowExceeded
from idis.integrations.providers import parse_event
from idis.integrations.reconciliation import (
    ReconcileBusy,
    ReconcileInterrupted,
    timeline,
)
from idis.integrations.reconciliation._db import _lock_key
from idis.integrations.reconciliation._models import ReconcileCheckpoint
from idis.integrations.sync._inbox import HandlerRegistry, apply_event
from idis.integrations.sync._models import SyncCoverage, SyncInbox
from idis.integrations.testing import RunningSimulator

from ..conftest import sample
from .conftest import PROVIDER, Host, audit_rows, count_inbox, reconcile_host, settings_for


def _since() -> Any:
    return utcnow() - timedelta(seconds=1)


def _apply_by_webhook(engine: Engine, events: list[dict[str, Any]], registry: Any) -> None:
    factory = sessionmaker(engine)
    with factory.begin() as session:
        for raw in events:
            apply_event(session, PROVIDER, parse_event(raw, PROVIDER), "webhook", registry=registry)


def _rows(engine: Engine, model: Any) -> int:
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_reconcile_skips_what_webhooks_applied_and_applies_the_rest_once(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str, metrics: Any
) -> None:
    """Events webhooks delivered are skipped; the others are applied once and audited per event."""
    settings = settings_for(sim, db_url)
    since = _since()
    events = sim.control.emit(PROVIDER, 250, webhook=False)
    _apply_by_webhook(engine, events[::2], host.registry)

    first = reconcile_any(PROVIDER, since, settings=settings, handlers=host.registry, page_size=40)
    second = reconcile_any(PROVIDER, since, settings=settings, handlers=host.registry, page_size=40)

    missing = {e["id"] for e in events[1::2]}
    audited = audit_rows(engine, "reconcile.event_applied")
    assert (250, 125, 125, 0, 7) == (
        first.fetched,
        first.already_applied,
        first.applied,
        first.failed,
        first.pages,
    )
    assert first.ok
    assert (0, 250) == (second.applied, second.already_applied)
    assert missing == set(host.applied_ids()[125:])
    assert 250 == len(set(host.applied_ids())) == len(host.applied_ids())
    assert missing == {row.details["event_id"] for row in audited}
    assert {("replay", "record", "ok")} == {
        (row.source, row.subject_type, row.outcome) for row in audited
    }
    assert 125 == count_inbox(engine, source="replay", status="applied")
    assert 125 == sample(
        metrics, "integration_reconcile_events_total", provider=PROVIDER, outcome="applied"
    )
    assert 2 == len(audit_rows(engine, "reconcile.completed"))


def test_dry_run_counts_and_changes_nothing(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """--dry-run reports what it would apply and writes no inbox, audit, checkpoint, coverage."""
    settings = settings_for(sim, db_url)
    since = _since()
    events = sim.control.emit(PROVIDER, 120, webhook=False)
    _apply_by_webhook(engine, events[:20], host.registry)
    before = (_rows(engine, SyncInbox), _rows(engine, AuditEvent))

    summary = reconcile_any(
        PROVIDER, since, settings=settings, handlers=host.registry, dry_run=True, page_size=50
    )

    assert (120, 20, 100, True, None) == (
        summary.fetched,
        summary.already_applied,
        summary.applied,
        summary.dry_run,
        summary.run_id,
    )
    assert before == (_rows(engine, SyncInbox), _rows(engine, AuditEvent))
    assert 0 == _rows(engine, ReconcileCheckpoint)
    assert 0 == _rows(engine, SyncCoverage)
    assert 20 == len(host.applied())


def test_since_older_than_the_configured_retention_fails_before_any_call(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """A window older than replay_retention names the window and the fallback; nothing happens."""
    settings = settings_for(sim, db_url, replay_retention=timedelta(hours=1))
    sim.control.emit(PROVIDER, 10, webhook=False)

    with pytest.raises(ReplayWindowExceeded) as caught:
        reconcile_any(PROVIDER, "2 hours ago", settings=settings, handlers=host.registry)

    message = str(caught.value)
    assert "replay retention of 1h" in message
    assert "2h ago" in message
    assert "--resync" in message
    assert "Nothing was applied" in message
    assert 0 == sim.control.stats(PROVIDER)["requests"].get("replay", 0)
    assert (0, 0, 0) == (
        _rows(engine, SyncInbox),
        _rows(engine, AuditEvent),
        _rows(engine, ReconcileCheckpoint),
    )


def test_a_provider_refusing_the_window_gets_the_same_clear_error(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """The provider's own 422 retention_exceeded becomes an error naming window and fallback."""
    settings = settings_for(sim, db_url)  # believes 72 h
    sim.control.set_retention(PROVIDER, 60)  # the provider keeps one minute
    sim.control.emit(PROVIDER, 10, webhook=False)

    with pytest.raises(ReplayWindowExceeded) as caught:
        reconcile_any(PROVIDER, "10 minutes ago", settings=settings, handlers=host.registry)

    message = str(caught.value)
    assert "the provider refused it" in message
    assert "--resync" in message
    assert 422 == getattr(caught.value.__cause__, "status_code", None)
    # The retention the provider stated in its 422 is kept and reported.
    assert timedelta(seconds=60) == caught.value.retention
    assert "replay retention of 1m (as the provider states it; configured 3d)" in message
    assert (0, 0) == (_rows(engine, SyncInbox), _rows(engine, ReconcileCheckpoint))


def test_an_interrupted_run_resumes_after_its_last_committed_page(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """A provider outage mid-run keeps the checkpoint; the next run resumes, applying each once."""
    settings = settings_for(sim, db_url)
    since = _since()
    sim.control.emit(PROVIDER, 300, webhook=False)
    pages = []

    def outage_after_two_pages(fetched: int) -> None:
        pages.append(fetched)
        if len(pages) == 2:
            sim.control.outage(PROVIDER)

    with pytest.raises(ReconcileInterrupted) as caught:
        reconcile_any(
            PROVIDER,
            since,
            settings=settings,
            handlers=host.registry,
            page_size=50,
            progress=outage_after_two_pages,
        )
    stopped = caught.value.summary
    sim.control.clear_faults(PROVIDER)
    resumed = reconcile_any(
        PROVIDER, since, settings=settings, handlers=host.registry, page_size=50
    )

    assert caught.value.retryable
    assert "Run the same command again" in str(caught.value)
    assert (100, 100, False) == (stopped.fetched, stopped.applied, stopped.completed)
    assert (True, stopped.run_id, 200, 200) == (
        resumed.resumed,
        resumed.run_id,
        resumed.fetched,
        resumed.applied,
    )
    assert 300 == len(set(host.applied_ids())) == len(host.applied_ids())
    assert 300 == len(audit_rows(engine, "reconcile.event_applied"))


def test_a_failing_handler_loses_only_its_own_event_and_the_next_run_applies_it(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """One event's handler raising fails that event alone, audited; coverage stops before it."""
    settings = settings_for(sim, db_url)
    since = _since()
    events = sim.control.emit(PROVIDER, 60, webhook=False)
    broken = events[30]
    registry = HandlerRegistry()

    def picky(session: Session, event: Any) -> None:
        if event.id == broken["id"]:
            raise ValueError("cannot map stage 'zz'")
        reconcile_host.apply(session, event)

    registry.register("*", picky)

    first = reconcile_any(PROVIDER, since, settings=settings, handlers=registry, page_size=25)
    second = reconcile_any(PROVIDER, since, settings=settings, handlers=host.registry, page_size=25)

    failed = audit_rows(engine, "reconcile.event_failed")
    assert (59, 1, False) == (first.applied, first.failed, first.ok)
    assert broken["id"] == first.failures[0].event_id
    assert "cannot map stage" in first.failures[0].message
    assert [broken["id"]] == [row.details["event_id"] for row in failed]
    assert first.covered_until == parse_event(broken, PROVIDER).occurred_at
    assert (1, 59, True) == (second.applied, second.already_applied, second.ok)
    assert 60 == len(set(host.applied_ids())) == len(host.applied_ids())


def test_events_older_than_an_applied_version_are_superseded_not_applied(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """Replayed versions older than one a webhook applied are recorded, never applied over it."""
    settings = settings_for(sim, db_url)
    since = _since()
    events = sim.control.emit(PROVIDER, 3, record_ids=["deal_1"], webhook=False)
    _apply_by_webhook(engine, events[-1:], host.registry)

    summary = reconcile_any(PROVIDER, since, settings=settings, handlers=host.registry)

    assert (0, 2, 1) == (summary.applied, summary.superseded, summary.already_applied)
    assert [events[-1]["id"]] == host.applied_ids()
    assert 2 == count_inbox(engine, status="superseded", source="replay")


def test_without_any_handler_reconcile_refuses_and_changes_nothing(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, db_url: str
) -> None:
    """An empty registry would mark events handled without applying them: refused up front."""
    settings = settings_for(sim, db_url)
    sim.control.emit(PROVIDER, 5, webhook=False)

    with pytest.raises(ConfigError) as caught:
        reconcile_any(PROVIDER, _since(), settings=settings, handlers=HandlerRegistry())

    assert "IDIS_HANDLERS" in str(caught.value)
    assert 0 == sim.control.stats(PROVIDER)["requests"].get("replay", 0)
    assert 0 == _rows(engine, SyncInbox)


def test_bad_arguments_name_the_value(
    reconcile_any: Any, sim: RunningSimulator, host: Host, db_url: str
) -> None:
    """An unknown provider, a bad since or page size fail naming the value."""
    settings = settings_for(sim, db_url)

    with pytest.raises(ConfigError, match="nope"):
        reconcile_any("nope", _since(), settings=settings, handlers=host.registry)
    with pytest.raises(ConfigError, match="yesterday-ish"):
        reconcile_any(PROVIDER, "yesterday-ish", settings=settings, handlers=host.registry)
    with pytest.raises(ConfigError, match="page_size=0"):
        reconcile_any(PROVIDER, _since(), settings=settings, handlers=host.registry, page_size=0)


def test_replay_racing_delayed_webhooks_applies_each_event_once(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """Webhooks arriving for the very events a replay is applying: every event still lands once."""
    from idis.integrations.testing import serve_asgi
    from idis.integrations.webhooks import WebhookReceiver

    settings = settings_for(sim, db_url)
    since = _since()
    receiver = WebhookReceiver(settings, engine, registry=host.registry, providers=[PROVIDER])
    with serve_asgi(receiver.asgi_app()) as url:
        sim.control.set_webhook_target(PROVIDER, f"{url}/{PROVIDER}")
        sim.control.emit(PROVIDER, 300)
        sim.control.set_fault(PROVIDER, "latency", endpoint="replay", seconds=0.05)
        summary = reconcile_any(
            PROVIDER, since, settings=settings, handlers=host.registry, page_size=20
        )
        assert sim.control.flush_webhooks(PROVIDER, timeout=60)

    applied = host.applied_ids()
    assert (300, 0) == (summary.fetched, summary.failed)
    assert 300 == len(applied) == len(set(applied))
    assert 300 == count_inbox(engine)
    assert summary.applied == count_inbox(engine, source="replay")
    assert summary.applied == len(audit_rows(engine, "reconcile.event_applied"))


@pytest.mark.postgres
def test_an_event_a_webhook_holds_mid_page_makes_the_page_wait_then_skip_it(
    reconcile_any: Any, sim: RunningSimulator, pg_url: str
) -> None:
    """A webhook's uncommitted apply holds its record's ledger row: the page waits, then skips it.

    One lock order (ledger rows, then inbox rows) everywhere: the page queues
    behind the webhook instead of racing it, so it needs no retry.
    """
    import threading

    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(pg_url)
    host = Host(engine)
    settings = settings_for(sim, pg_url)
    since = _since()
    events = sim.control.emit(PROVIDER, 10, webhook=False)
    results: list[Any] = []
    try:
        webhook = Session(engine)
        webhook.begin()
        apply_event(
            webhook, PROVIDER, parse_event(events[4], PROVIDER), "webhook", registry=host.registry
        )
        with capture_logs() as logs:
            runner = threading.Thread(
                target=lambda: results.append(
                    reconcile_any(
                        PROVIDER, since, settings=settings, handlers=host.registry, engine=engine
                    )
                )
            )
            runner.start()
            runner.join(0.5)  # the page is now waiting on the webhook's ledger row lock
            webhook.commit()
            webhook.close()
            runner.join(30)
        applied = host.applied_ids()
    finally:
        engine.dispose()

    summary = results[0]
    assert (9, 1) == (summary.applied, summary.already_applied)
    assert 10 == len(applied) == len(set(applied))
    assert not any(e["event"] == "idis.reconcile.page_conflict" for e in logs)


@pytest.mark.postgres
def test_one_run_per_provider_at_a_time_on_postgres(
    reconcile_any: Any, sim: RunningSimulator, pg_url: str
) -> None:
    """While another run holds the provider's lock, reconcile refuses instead of racing it."""
    from idis.integrations.db._engine import create_db_engine

    engine = create_db_engine(pg_url)
    host = Host(engine)
    settings = settings_for(sim, pg_url)
    try:
        with engine.connect() as holder:  # another run's lock
            holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(PROVIDER)})
            holder.commit()
            with pytest.raises(ReconcileBusy, match="in progress"):
                reconcile_any(
                    PROVIDER,
                    _since(),
                    settings=settings,
                    handlers=host.registry,
                    engine=engine,
                    lock_wait=0,
                )
            holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _lock_key(PROVIDER)})
            holder.commit()
        summary = reconcile_any(
            PROVIDER, _since(), settings=settings, handlers=host.registry, engine=engine
        )
    finally:
        engine.dispose()

    assert summary.ok


def test_completed_run_closes_the_gap_in_the_timeline(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str, metrics: Any
) -> None:
    """Replay coverage of a completed run covers its window: no gaps inside it afterwards."""
    settings = settings_for(sim, db_url)
    since = _since()
    sim.control.emit(PROVIDER, 20, webhook=False)
    end = utcnow()
    before = timeline(PROVIDER, since, end, settings=settings, engine=engine, settle=timedelta(0))
    gauge_before = sample(metrics, "integration_sync_timeline_gap_seconds", provider=PROVIDER)

    summary = reconcile_any(PROVIDER, since, settings=settings, handlers=host.registry)
    after = timeline(PROVIDER, since, end, settings=settings, engine=engine, settle=timedelta(0))
    gauge_after = sample(metrics, "integration_sync_timeline_gap_seconds", provider=PROVIDER)

    assert [(since, end)] == [(g.start, g.end) for g in before.gaps]
    assert (end - since).total_seconds() == gauge_before
    assert after.no_gaps
    assert 0.0 == gauge_after
    assert summary.covered_until is not None
    assert summary.covered_until >= end
    assert [("replay", since, end)] == [(i.source, i.start, i.end) for i in after.intervals]


def test_a_stopped_run_that_cannot_stand_in_is_abandoned_not_resumed(
    reconcile_any: Any, sim: RunningSimulator, engine: Engine, host: Host, db_url: str
) -> None:
    """A stopped run whose window is beyond the retention, or starts later, is not resumed."""
    settings = settings_for(sim, db_url)
    since = _since()
    now = utcnow()
    with sessionmaker(engine).begin() as session:
        for run_id, start in (("rc_ancient", now - timedelta(days=4)), ("rc_later", now)):
            session.add(
                ReconcileCheckpoint(
                    run_id=run_id,
                    provider=PROVIDER,
                    status="running",
                    since=start,
                    cursor="e999999",
                    pages=1,
                    fetched=0,
                    already_applied=0,
                    applied=0,
                    superseded=0,
                    ignored=0,
                    failed=0,
                    started_at=start,
                    updated_at=start,
                )
            )
    sim.control.emit(PROVIDER, 7, webhook=False)

    summary = reconcile_any(PROVIDER, since, settings=settings, handlers=host.registry)

    with Session(engine) as session:
        statuses = dict(
            session.execute(select(ReconcileCheckpoint.run_id, ReconcileCheckpoint.status)).all()
        )
    assert (7, False) == (summary.applied, summary.resumed)
    assert {"rc_ancient": "abandoned", "rc_later": "abandoned"} == {
        k: v for k, v in statuses.items() if k.startswith("rc_") and k != summary.run_id
    }
    assert "completed" == statuses[summary.run_id]
