"""ProviderClient and AsyncProviderClient over real HTTP against the simulator."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from idis.integrations.config import RetryPolicy
from idis.integrations.exceptions import MalformedResponse, ReplayWindowExceeded
from idis.integrations.providers import (
    AsyncProviderClient,
    ProviderClient,
    ProviderEvent,
    ProviderRecord,
)
from idis.integrations.resilience import system_clock
from idis.integrations.testing import simulator_settings

P = "crm_provider"


class Client:
    """A ProviderClient or AsyncProviderClient driven through the harness, one body for both."""

    def __init__(self, harness: Any) -> None:
        self.h = harness
        cls = ProviderClient if harness.runner is None else AsyncProviderClient
        self.client = cls(harness.gateway, P)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return self.h.runner.run(result)
            return result

        return call

    def iter_replay(self, *args: Any, **kwargs: Any) -> list[Any]:
        """All replay pages, collected."""
        pages: Any = self.client.iter_replay(*args, **kwargs)
        if self.h.runner is None:
            return list(pages)

        async def collect() -> list[Any]:
            return [page async for page in pages]

        return list(self.h.runner.run(collect()))


@pytest.fixture
def client(sim: Any, make_harness: Any) -> Client:
    """A provider client for crm_provider on the simulator, on the real clock (no waits)."""
    settings = simulator_settings(
        sim.url, providers=(P,), retry=RetryPolicy(max_attempts=3, budget_min_retries=100)
    )
    return Client(make_harness(settings, clock=system_clock, advance=False))


def test_get_record_returns_none_for_a_missing_record(client: Client) -> None:
    """A 404 is "no such record", not an error."""
    assert None is client.get_record("does-not-exist")


def test_put_then_get_record(client: Client, sim: Any) -> None:
    """put_record upserts with its idempotency key; a replay of the key applies nothing twice."""
    first = client.put_record("r-1", {"name": "Acme"}, tenant_id="t1", idempotency_key="k-1")
    again = client.put_record("r-1", {"name": "Acme"}, tenant_id="t1", idempotency_key="k-1")
    fetched = client.get_record("r-1")

    assert isinstance(first, ProviderRecord)
    assert ("r-1", "t1", {"name": "Acme"}) == (first.id, first.tenant_id, dict(first.data))
    assert first == again
    assert first == fetched
    assert {"k-1": 1} == sim.control.stats(P)["idempotency"]["applications"]


def test_list_records_pages_through_everything(client: Client, sim: Any) -> None:
    """Following next_cursor visits every record exactly once."""
    sim.control.emit(P, 5, webhook=False)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page = client.list_records(cursor=cursor, limit=2)
        seen += [r.id for r in page.items]
        pages += 1
        cursor = page.next_cursor
        if not cursor:
            break

    assert 3 == pages
    assert 5 == len(set(seen)) == len(seen)


def test_changes_feed_decodes_events(client: Client, sim: Any) -> None:
    """changes() returns typed events in sequence order, and nothing after the last one."""
    emitted = sim.control.emit(P, 3, tenant_ids=["t1"], webhook=False)

    page = client.changes()
    after = client.changes(after=page.next_after)

    assert [e["id"] for e in emitted] == [e.id for e in page.events]
    assert all(isinstance(e, ProviderEvent) for e in page.events)
    assert [1, 2, 3] == [e.seq for e in page.events]
    assert {"t1"} == {e.tenant_id for e in page.events}
    assert (False, []) == (page.has_more, after.events)


def test_iter_replay_returns_every_page(client: Client, sim: Any) -> None:
    """iter_replay follows cursors until the provider has no more events."""
    sim.control.emit(P, 7, webhook=False)
    since = system_clock.now() - timedelta(hours=1)

    pages = client.iter_replay(since, limit=3)

    assert [3, 3, 1] == [len(p.events) for p in pages]
    assert list(range(1, 8)) == [e.seq for p in pages for e in p.events]


def test_replay_older_than_configured_retention_is_refused_locally(
    client: Client, sim: Any
) -> None:
    """A since older than the configured retention fails with a fix, before any request."""
    since = system_clock.now() - timedelta(days=4)

    with pytest.raises(ReplayWindowExceeded, match=r"retains only 3d .* full resync"):
        client.replay(since)

    assert 0 == sim.control.stats(P)["requests"].get("replay", 0)


def test_replay_refused_by_the_provider_is_translated(client: Client, sim: Any) -> None:
    """The provider's 422 retention_exceeded becomes ReplayWindowExceeded, not retried."""
    sim.control.set_retention(P, 60)
    since = system_clock.now() - timedelta(hours=1)

    with pytest.raises(ReplayWindowExceeded, match="older than its retention window"):
        client.replay(since)

    assert 1 == sim.control.stats(P)["requests"]["replay"]


def test_enrich_and_health(client: Client, sim: Any) -> None:
    """enrich() returns the provider's object; health() follows the provider's outage."""
    enriched = client.enrich("subj-1")
    healthy = client.health()
    sim.control.outage(P)

    assert ("subj-1", P) == (enriched["subject_id"], enriched["provider"])
    assert True is healthy
    assert False is client.health()


def test_malformed_body_is_malformed_response(client: Client, sim: Any) -> None:
    """A truncated JSON body surfaces as MalformedResponse after the retries."""
    sim.control.set_fault(P, "malformed", endpoint="records")

    with pytest.raises(MalformedResponse):
        client.list_records()

    assert 3 == sim.control.stats(P)["requests"]["records"]
