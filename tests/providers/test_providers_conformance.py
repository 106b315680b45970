"""The adapter conformance kit over every pack the library ships, and over a broken adapter."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from idis.integrations.config import Secret
from idis.integrations.providers import OrderKey, async_client_for
from idis.integrations.providers._pack import pack_auth
from idis.integrations.providers._pdl import PDL_ENRICH
from idis.integrations.resilience import AsyncGateway
from idis.integrations.testing import (
    AdapterHarness,
    RunningSimulator,
    check_adapter,
    run_simulator,
    simulator_harness,
)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    with run_simulator(seed=21) as running:
        yield running


class _Blocking:
    """An async client whose coroutines run to completion on one runner (the kit is sync)."""

    def __init__(self, client: Any, runner: asyncio.Runner) -> None:
        self._client = client
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return lambda *args, **kwargs: self._runner.run(attr(*args, **kwargs))


@contextlib.contextmanager
def _through_async_clients(harness: AdapterHarness) -> Iterator[AdapterHarness]:
    """The harness, its clients the pack's async clients over an ``AsyncGateway`` each."""
    made = harness.client()
    gateways: list[AsyncGateway] = []

    def client() -> Any:
        gateway = AsyncGateway(made.gateway.settings, clock=made.gateway.clock, auth=pack_auth())
        gateways.append(gateway)
        return _Blocking(async_client_for(gateway, made.name), runner)

    with asyncio.Runner() as runner:
        try:
            yield replace(harness, client=client)
        finally:
            for gateway in gateways:
                runner.run(gateway.aclose())


@contextlib.contextmanager
def _face(harness: AdapterHarness, face: str) -> Iterator[AdapterHarness]:
    if face == "sync":
        yield harness
    else:
        with _through_async_clients(harness) as through:
            yield through


@pytest.fixture(params=["sync", "async"])
def face(request: pytest.FixtureRequest) -> str:
    """Run the kit over the pack's sync client, then over its async client."""
    return str(request.param)


@pytest.mark.parametrize("api", ["generic", "hubspot", "salesforce", "gdrive"])
def test_every_polling_pack_passes_the_kit(sim: RunningSimulator, api: str, face: str) -> None:
    with simulator_harness(sim, api) as harness, _face(harness, face) as through:
        report = check_adapter(through)

    report.assert_conformant()
    assert "passed" == report.outcome("cursors_survive_restarts")
    assert "passed" == report.outcome("order_holds")
    assert "passed" == report.outcome("errors_classified")
    assert "passed" == report.outcome("rate_limits_read")


@pytest.mark.parametrize("api", ["generic", "hubspot", "salesforce", "gdrive"])
def test_get_record_of_a_missing_record_is_an_answer_not_a_warning(
    sim: RunningSimulator, api: str, face: str
) -> None:
    """get_record's 404 means "no such record" (None): the gateway logs it at debug, so
    verify-sync over deleted records logs no warning per record; a 404 elsewhere still warns."""
    with simulator_harness(sim, api) as harness, _face(harness, face) as through:
        client = through.client()
        with capture_logs() as logs:
            missing = client.get_record(f"gone-{api}-{face}")

    assert missing is None
    assert [] == [line for line in logs if line["log_level"] in ("warning", "error")]
    assert [404] == [line["status"] for line in logs if line["event"] == "idis.gateway.call_failed"]


async def _async_replay_pages(harness: AdapterHarness, since: datetime) -> list[Any]:
    made = harness.client()
    async with AsyncGateway(made.gateway.settings, clock=made.gateway.clock) as gateway:
        client = async_client_for(gateway, made.name)
        return [page async for page in client.iter_replay(since, limit=1)]


@pytest.mark.parametrize("api", ["generic", "salesforce"])
def test_iter_replay_yields_every_page_through_each_face(
    sim: RunningSimulator, api: str, face: str
) -> None:
    with simulator_harness(sim, api) as harness:
        since = harness.now() - timedelta(seconds=1)
        harness.change([f"iter-{api}-{face}-1", f"iter-{api}-{face}-2"])
        if face == "sync":
            pages = list(harness.client().iter_replay(since, limit=1))
        else:
            pages = asyncio.run(_async_replay_pages(harness, since))

    ids = {event.record_id for page in pages for event in page.events}
    assert {f"iter-{api}-{face}-1", f"iter-{api}-{face}-2"} <= ids
    assert pages[-1].next_cursor is None
    assert len(pages) >= (2 if api == "generic" else 1)  # generic: one event a page


def test_the_enrichment_pack_passes_the_kit(sim: RunningSimulator, face: str) -> None:
    with (
        simulator_harness(
            sim,
            "pdl",
            provider="enrichment_provider",
            api_token=Secret("pdl-conformance-key"),
            endpoints={"enrich": PDL_ENRICH},
        ) as harness,
        _face(harness, face) as through,
    ):
        report = check_adapter(through)

    report.assert_conformant()
    assert "skipped" == report.outcome("cursors_survive_restarts")
    assert "passed" == report.outcome("enrichment_answers")


class _Forgetful:
    """An adapter whose cursor does not survive a restart and whose keys go backwards."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def changes(self, *, after: Any = None, since: Any = None, limit: int = 100) -> Any:
        page = self._inner.changes(after=None, since=since, limit=limit)
        events = [replace(e, order=OrderKey(-e.version)) for e in page.events]
        return replace(page, events=events)


def test_a_broken_adapter_fails_the_kit_with_reasons(sim: RunningSimulator) -> None:
    with simulator_harness(sim, "generic") as harness:
        real = harness.client
        harness.client = lambda: _Forgetful(real())
        report = check_adapter(harness)

    with pytest.raises(AssertionError) as caught:
        report.assert_conformant()
    assert "failed" == report.outcome("cursors_survive_restarts")
    assert "failed" == report.outcome("order_holds")
    assert "order key" in str(caught.value)
