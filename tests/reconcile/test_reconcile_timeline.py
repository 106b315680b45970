"""The sync timeline read from the coverage the channels record: gaps, pending, the gauge."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from idis.integrations._clock import ManualClock
from idis.integrations.config import ProviderSettings, Settings
from idis.integrations.reconciliation import gaps, timeline
from idis.integrations.sync._timeline import record_coverage

from ..conftest import sample
from .conftest import PROVIDER, T0


def _settings(url: str) -> Settings:
    provider = ProviderSettings(name=PROVIDER, kind="crm", base_url="http://127.0.0.1:9")
    return Settings(database_url=url, providers={PROVIDER: provider})


def _at(seconds: float) -> Any:
    return T0 + timedelta(seconds=seconds)


def _cover(engine: Engine, *spans: tuple[str, float, float]) -> None:
    with sessionmaker(engine).begin() as session:
        for source, start, end in spans:
            record_coverage(session, PROVIDER, source, _at(start), _at(end))


def test_gaps_between_channels_and_the_gauge(engine: Engine, db_url: str, metrics: Any) -> None:
    """Webhook, poll and replay coverage leave two holes; the gauge holds their total."""
    _cover(engine, ("webhook", 0, 100), ("poll", 90, 200), ("replay", 260, 400))
    settings = _settings(db_url)

    report = timeline(
        PROVIDER, _at(0), _at(500), settings=settings, engine=engine, clock=ManualClock(_at(9000))
    )

    assert [(_at(200), _at(260)), (_at(400), _at(500))] == [(g.start, g.end) for g in report.gaps]
    assert ["webhook", "poll", "replay"] == [i.source for i in report.intervals]
    assert 160.0 == sample(metrics, "integration_sync_timeline_gap_seconds", provider=PROVIDER)
    assert "2 gap(s)" in report.statement()
    assert f'--since "{_at(200).isoformat()}"' in report.statement()


def test_a_fresh_trailing_stretch_is_pending_but_an_old_one_is_a_gap(
    engine: Engine, db_url: str
) -> None:
    """The not-yet-confirmed last minutes are 'pending'; the same stretch hours later is a gap."""
    _cover(engine, ("webhook", 0, 100))
    settings = _settings(db_url)  # settle = 1 min sentinel + 2 min lag threshold

    fresh = timeline(
        PROVIDER, _at(0), _at(160), settings=settings, engine=engine, clock=ManualClock(_at(160))
    )
    stale = gaps(
        PROVIDER, _at(0), _at(160), settings=settings, engine=engine, clock=ManualClock(_at(3600))
    )

    assert fresh.no_gaps
    assert fresh.pending is not None
    assert 60.0 == fresh.pending.seconds
    assert "not confirmed yet" in fresh.statement()
    assert [(_at(100), _at(160))] == [(g.start, g.end) for g in stale]


def test_a_window_reaching_before_the_first_coverage_starts_there(
    engine: Engine, db_url: str
) -> None:
    """Issue 15: `timeline --since "4 hours ago"` on a service two hours old reported a gap
    from before the service existed and told the operator to reconcile it. Nothing was synced
    then, so nothing can be missing: the window starts at the first recorded coverage."""
    _cover(engine, ("webhook", 4 * 3600 - 7200, 4 * 3600))
    settings = _settings(db_url)

    report = timeline(
        PROVIDER,
        _at(0),
        _at(4 * 3600),
        settings=settings,
        engine=engine,
        clock=ManualClock(_at(4 * 3600)),
    )

    assert report.no_gaps, report.statement()
    assert (_at(4 * 3600 - 7200), _at(0)) == (report.since, report.requested_since)
    assert report.clipped
    assert "nothing was synced before that first recorded coverage" in report.statement()
    assert "reconcile" not in report.statement()
    assert _at(0).isoformat() == report.as_dict()["requested_since"]


def test_a_gap_after_the_first_coverage_is_still_a_gap(engine: Engine, db_url: str) -> None:
    """Clipping the start never hides a real hole after the service started syncing."""
    _cover(engine, ("webhook", 1000, 2000), ("poll", 2500, 4000))
    settings = _settings(db_url)

    found = gaps(
        PROVIDER, _at(0), _at(4000), settings=settings, engine=engine, clock=ManualClock(_at(9000))
    )

    assert [(_at(2000), _at(2500))] == [(g.start, g.end) for g in found]
