"""``/status`` and ``/healthz`` of the example service."""

from __future__ import annotations

import sqlite3

import pytest
from examples.integrations_service import app as service_app
from tests.examples.conftest import CRM, ENRICH, RunningService, wait_for


def test_status_reports_each_provider_with_its_sync_and_outbox_facts(
    service: RunningService,
) -> None:
    """/status lists the configured providers, probes them, and adds sync and outbox facts."""
    # The sync service's first tick writes the mode row; until then status says "not started".
    answer = wait_for(
        lambda: (
            (got := service.get("/status")).status_code == 200
            and "not started" not in str(got.json())
            and got
        ),
        "the sync service's first tick",
    )

    assert 200 == answer.status_code
    providers = {p["provider"]: p for p in answer.json()["providers"]}
    assert {CRM, ENRICH} == set(providers)
    assert (True, "webhook (default)", 0) == (
        providers[CRM]["probe_ok"],
        providers[CRM]["sync_mode"],
        providers[CRM]["outbox_pending"],
    )


def test_status_answers_504_in_bounded_time_while_the_database_is_locked(
    service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-locked database makes /status answer 504 instead of hanging; then 200 again."""
    monkeypatch.setattr(service_app, "STATUS_TIMEOUT", 0.5)
    path = service.database_url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        locked = service.get("/status", params={"probe": "false"})
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    released = service.get("/status", params={"probe": "false"})

    assert 504 == locked.status_code
    assert "status took longer than 0.5s" in locked.json()["error"]
    assert 200 == released.status_code
