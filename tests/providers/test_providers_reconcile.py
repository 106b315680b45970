"""reconcile over each pack: replay (Salesforce updated/deleted, HubSpot search), once, and
Salesforce's 30-day window refused with the --resync pointer."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine
from tests.sync.conftest import HostTable

from idis.integrations.config import AuthSettings, Settings
from idis.integrations.exceptions import ReplayWindowExceeded
from idis.integrations.reconciliation import reconcile
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator(seed=11) as running:
        yield running


def _settings(sim: RunningSimulator, url: str, api: str, retention: timedelta) -> Settings:
    return simulator_settings(
        sim.url,
        providers=(P,),
        database_url=url,
        auth=AuthSettings(),
        api=api,
        replay_retention=retention,
    )


@pytest.mark.parametrize("api", ["hubspot", "salesforce", "gdrive"])
def test_reconcile_applies_the_missed_changes_once(
    sim: RunningSimulator, sqlite_engine: Engine, api: str
) -> None:
    host = HostTable(sqlite_engine)
    settings = _settings(sim, str(sqlite_engine.url), api, timedelta(days=30))
    sim.control.emit(P, 12, record_ids=[f"deal_{i}" for i in range(12)], webhook=False)

    first = reconcile(
        P, "1 hour ago", settings=settings, handlers=host.registry(), engine=sqlite_engine
    )
    second = reconcile(
        P, "1 hour ago", settings=settings, handlers=host.registry(), engine=sqlite_engine
    )

    assert (12, 12, 0) == (first.fetched, first.applied, first.failed)
    assert (0, 12) == (second.applied, second.already_applied)
    assert sorted(f"deal_{i}" for i in range(12)) == sorted(r[1] for r in host.rows())


def test_salesforce_refuses_a_window_beyond_thirty_days_and_names_resync(
    sim: RunningSimulator, sqlite_engine: Engine
) -> None:
    """Even with a longer REPLAY_RETENTION configured, the API's own window holds."""
    host = HostTable(sqlite_engine)
    settings = _settings(sim, str(sqlite_engine.url), "salesforce", timedelta(days=60))
    requests_before = sum(sim.control.stats(P)["requests"].values())

    with pytest.raises(ReplayWindowExceeded) as caught:
        reconcile(
            P, "31 days ago", settings=settings, handlers=host.registry(), engine=sqlite_engine
        )

    assert "--resync" in str(caught.value)
    assert timedelta(days=30) == caught.value.retention
    assert requests_before == sum(sim.control.stats(P)["requests"].values())
