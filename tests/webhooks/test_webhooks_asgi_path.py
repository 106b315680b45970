"""The sync receiver's ASGI path: its batch threads, headers read once, answers counted.

``WebhookReceiver.asgi_app`` verifies on the event loop and hands each group-committed
batch to threads of its own (not anyio's worker threads): at most the committer's
parallel batches at once, never the loop's thread, a batch's error raised to the
loop, and no thread left behind by an idle receiver.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import Engine
from tests.sync.conftest import HostTable

from idis.integrations._clock import ManualClock
from idis.integrations._http import httpx
from idis.integrations.observability._metrics import Metrics
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.webhooks import _receiver
from idis.integrations.webhooks._receiver import WebhookReceiver, _BatchThreads

from ..conftest import sample
from .conftest import NOW, P, event_body, settings_for, signed


async def _post(
    app: Any, body: bytes, headers: list[tuple[bytes, bytes]], path: str = f"/{P}"
) -> tuple[int, bytes]:
    """One POST through ``app`` (ASGI, in process): its status and body."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as client:
        response = await client.post(path, content=body, headers=headers)
    return response.status_code, response.content


def _asgi_headers(body: bytes, n: int, **extra: bytes) -> list[tuple[bytes, bytes]]:
    pairs = [(k.encode(), v.encode()) for k, v in signed(body, msg=f"m{n}").items()]
    return pairs + [(k.replace("_", "-").encode(), v) for k, v in extra.items()]


def test_batches_run_in_the_receivers_own_thread_never_the_loops(
    sqlite_url: str, sqlite_engine: Engine, host: HostTable
) -> None:
    """30 concurrent deliveries: all applied once, in one thread (SQLite: one batch at a
    time) that is neither the loop's nor one of anyio's worker threads."""
    threads: set[str] = set()

    def handler(session: Any, event: Any) -> None:
        threads.add(threading.current_thread().name)
        host.handler(session, event)

    registry = HandlerRegistry()
    registry.register("record.updated", handler)
    receiver = WebhookReceiver(
        settings_for(sqlite_url), sqlite_engine, registry=registry, clock=ManualClock(NOW)
    )
    app = receiver.asgi_app()

    async def all_at_once() -> tuple[str, list[tuple[int, bytes]]]:
        bodies = [event_body(n) for n in range(30)]
        answers = await asyncio.gather(
            *(_post(app, b, _asgi_headers(b, n)) for n, b in enumerate(bodies))
        )
        return threading.current_thread().name, list(answers)

    loop_thread, answers = asyncio.run(all_at_once())

    assert {200} == {status for status, _ in answers}
    assert sorted(f"evt_{n}" for n in range(30)) == sorted(row[0] for row in host.rows())
    assert {"idis-webhook-batches"} == threads
    assert loop_thread not in threads


def test_a_batch_error_reaches_the_loop_and_an_idle_thread_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's exception is raised where the loop awaited it; the thread then ends."""
    monkeypatch.setattr(_receiver, "_IDLE_THREAD", 0.05)
    threads = _BatchThreads(limit=2)
    ran_in: list[threading.Thread] = []

    def fails(jobs: list[Any]) -> None:
        ran_in.append(threading.current_thread())
        raise LookupError("this batch fails on purpose")

    def works(jobs: list[Any]) -> None:
        jobs.append("applied")

    async def both() -> list[Any]:
        with pytest.raises(LookupError, match="on purpose"):
            await threads.run(fails, [])
        jobs: list[Any] = []
        await threads.run(works, jobs)
        return jobs

    assert ["applied"] == asyncio.run(both())
    assert ["idis-webhook-batches"] == [thread.name for thread in ran_in]
    ran_in[0].join(timeout=30)
    assert not ran_in[0].is_alive()
    assert 0 == threads._threads


def test_batch_threads_stay_within_their_limit_and_end_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six batches at once with a limit of two: two threads run them all, then both end."""
    monkeypatch.setattr(_receiver, "_IDLE_THREAD", 0.05)
    threads = _BatchThreads(limit=2)
    started = threading.Barrier(2, timeout=30)
    used: dict[int, threading.Thread] = {}
    ran: list[Any] = []

    def batch(jobs: list[Any]) -> None:
        used[threading.get_ident()] = threading.current_thread()
        ran.extend(jobs)
        if len(ran) <= 2:
            started.wait()  # the first two overlap: two threads exist

    async def six() -> None:
        batches: list[list[Any]] = [[n] for n in range(6)]
        await asyncio.gather(*(threads.run(batch, jobs) for jobs in batches))

    asyncio.run(six())

    assert list(range(6)) == sorted(ran)
    assert 2 == len(used)
    for thread in used.values():
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert (0, 0, 0) == (threads._threads, threads._waiting, threads._pending)


def test_a_non_ascii_digit_content_length_is_no_internal_error(
    sqlite_url: str, sqlite_engine: Engine, host: HostTable
) -> None:
    """A Latin-1 superscript digit in Content-Length (``²``) is not a size: the body is read."""
    receiver = WebhookReceiver(
        settings_for(sqlite_url), sqlite_engine, registry=host.registry(), clock=ManualClock(NOW)
    )
    body = event_body(1)

    status, answer = asyncio.run(
        _post(receiver.asgi_app(), body, _asgi_headers(body, 1, content_length=b"\xb2"))
    )

    assert (200, b'{"status": "accepted", "event_id": "evt_1"}') == (status, answer)


def test_answers_count_in_the_current_default_metrics(
    sqlite_url: str, sqlite_engine: Engine, host: HostTable, metrics: Metrics
) -> None:
    """A receiver without ``metrics=`` counts in whatever registry is the default now."""
    from prometheus_client import CollectorRegistry

    from idis.integrations.observability._metrics import set_default_metrics

    receiver = WebhookReceiver(
        settings_for(sqlite_url), sqlite_engine, registry=host.registry(), clock=ManualClock(NOW)
    )
    first, second = event_body(1), event_body(2)
    receiver.handle(P, signed(first), first)
    later = Metrics(CollectorRegistry())
    previous = set_default_metrics(later)
    try:
        receiver.handle(P, signed(second, msg="m2"), second)
        receiver.handle(P, signed(second, msg="m2"), second)
    finally:
        set_default_metrics(previous)

    received = "integration_webhooks_received_total"
    assert 1.0 == sample(metrics, received, provider=P, outcome="accepted")
    assert 0.0 == sample(metrics, received, provider=P, outcome="duplicate")
    assert 1.0 == sample(later, received, provider=P, outcome="accepted")
    assert 1.0 == sample(later, received, provider=P, outcome="duplicate")
