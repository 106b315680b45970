"""Group commit: concurrent deliveries share a transaction, and none pays for another's failure."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from tests.sync.conftest import HostTable

from idis.integrations._clock import ManualClock
from idis.integrations.observability._metrics import Metrics
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._models import SyncInbox

from ..conftest import sample
from .conftest import NOW, Face, P, event_body, failing_for, settings_for, signed


def _inbox_ids(engine: Engine) -> set[str]:
    with Session(engine) as session:
        return set(session.scalars(select(SyncInbox.event_id)))


def _wait_for_company(receiver: Any, face: Face, others: int) -> None:
    """Hold the first batch until ``others`` deliveries queue behind it (sync face only)."""
    if face.kind != "sync":
        return  # the async face queues every gathered delivery before its first batch runs
    deadline = time.monotonic() + 10
    while len(receiver._io.committer._queue) < others and time.monotonic() < deadline:
        time.sleep(0.001)


def test_concurrent_deliveries_are_each_applied_once(
    face: Face, sqlite_url: str, sqlite_engine: Engine, host: HostTable, metrics: Metrics
) -> None:
    """40 deliveries at once, then the same 40 again: 40 applied, 40 duplicates, nothing twice."""
    deliveries = [(signed(event_body(n), msg=f"m{n}"), event_body(n)) for n in range(40)]
    receiver = face.build(settings_for(sqlite_url), host.registry(), providers=[P])

    first = face.send_concurrently(receiver, deliveries)
    again = face.send_concurrently(receiver, deliveries)

    assert {(200, "accepted")} == {(r.status_code, r.outcome) for r in first}
    assert {(200, "duplicate")} == {(r.status_code, r.outcome) for r in again}
    assert sorted(f"evt_{n}" for n in range(40)) == sorted(row[0] for row in host.rows())
    assert 40.0 == sample(metrics, "integration_events_applied_total", provider=P, source="webhook")


def test_a_failing_handler_loses_only_its_own_delivery(
    face: Face, sqlite_url: str, sqlite_engine: Engine, host: HostTable
) -> None:
    """In a shared batch, a handler that raises fails its own event (500) and no other."""
    failing = {"evt_3", "evt_11"}
    handler = failing_for(failing, host)
    held = threading.Event()
    receiver: Any = None

    def first_waits(session: Any, event: Any) -> None:
        if not held.is_set():
            held.set()
            # 8 client threads: this one leads, up to 7 queue behind it.
            _wait_for_company(receiver, face, 5)
        handler(session, event)

    registry = HandlerRegistry()
    registry.register("record.updated", first_waits)
    receiver = face.build(settings_for(sqlite_url), registry, providers=[P])
    deliveries = [(signed(event_body(n), msg=f"m{n}"), event_body(n)) for n in range(16)]

    results = face.send_concurrently(receiver, deliveries)
    failing.clear()
    retried = [face.send(receiver, signed(event_body(n)), event_body(n)) for n in (3, 11)]

    by_event = {r.event_id: (r.status_code, r.outcome) for r in results}
    assert {"evt_3": (500, "handler_error"), "evt_11": (500, "handler_error")} == {
        k: v for k, v in by_event.items() if v[0] != 200
    }
    assert 14 == sum(1 for v in by_event.values() if v == (200, "accepted"))
    assert [(200, "accepted")] * 2 == [(r.status_code, r.outcome) for r in retried]
    assert {f"evt_{n}" for n in range(16)} == _inbox_ids(sqlite_engine)
    assert 16 == len(host.rows())


class _Broken:
    """A verification scheme with a bug: it raises what no scheme may raise."""

    name = "broken"

    def verify(self, request: Any, now: Any) -> str | None:
        raise KeyError("a bug in a host's scheme")


def test_an_unexpected_error_is_a_counted_500(
    face: Face, sqlite_url: str, host: HostTable, metrics: Metrics
) -> None:
    """A bug behind the receiver answers 500 internal_error, counted, and raises nothing."""
    receiver = face.build(settings_for(sqlite_url), host.registry(), schemes={P: _Broken()})
    body = event_body(1)

    result = face.send(receiver, signed(body), body)

    assert (500, "internal_error") == (result.status_code, result.outcome)
    assert 1.0 == sample(
        metrics, "integration_webhooks_received_total", provider=P, outcome="internal_error"
    )


def test_a_signature_spike_is_persisted_by_both_faces(
    face: Face, sqlite_url: str, sqlite_engine: Engine, host: HostTable
) -> None:
    """Crossing the signature-failure threshold is written for the mode controller."""
    from idis.integrations.sync._models import SyncProviderState

    receiver = face.build(settings_for(sqlite_url), host.registry(), providers=[P])
    body = event_body(1)
    forged = signed(body, secret="whsec_" + "Zm9yZ2VkLWtleS1mb3JnZWQta2V5LTEyMzQ=")
    for _ in range(10):
        face.send(receiver, forged, body)
    face.send(receiver, forged, body)  # the spike is saved on the next request

    with Session(sqlite_engine) as session:
        spike = session.scalar(select(SyncProviderState.signature_spike_at))
    assert spike is not None


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_parallel_batches_on_postgres_apply_each_delivery_once(
    kind: str, pg_url: str, pg_engine: Engine, metrics: Metrics
) -> None:
    """On PostgreSQL several batches run at once; every delivery is still applied once."""
    host = HostTable(pg_engine)
    pg_face = Face(kind, pg_engine, pg_url)
    try:
        receiver = pg_face.build(settings_for(pg_url), host.registry(), providers=[P])
        deliveries = [(signed(event_body(n), msg=f"m{n}"), event_body(n)) for n in range(60)]

        first = pg_face.send_concurrently(receiver, deliveries)
        again = pg_face.send_concurrently(receiver, deliveries[::-1])
    finally:
        pg_face.close()

    assert {(200, "accepted")} == {(r.status_code, r.outcome) for r in first}
    assert {(200, "duplicate")} == {(r.status_code, r.outcome) for r in again}
    assert sorted(f"evt_{n}" for n in range(60)) == sorted(row[0] for row in host.rows())
    assert 60.0 == sample(metrics, "integration_events_applied_total", provider=P, source="webhook")


def test_a_delivery_arriving_as_a_batch_ends_is_never_stranded(
    sqlite_url: str, host: HostTable
) -> None:
    """A delivery submitted the moment the previous batch ends is answered (not stranded).

    Awaited back to back, each delivery resumes its caller before the finished drain
    task's done callbacks run; a drain count kept by those callbacks strands the next one.
    """
    import asyncio

    from idis.integrations.db._engine import create_async_db_engine
    from idis.integrations.webhooks._receiver import AsyncWebhookReceiver

    async def back_to_back() -> list[Any]:
        engine = create_async_db_engine(sqlite_url)
        receiver = AsyncWebhookReceiver(
            settings_for(sqlite_url),
            engine,
            registry=host.registry(),
            providers=[P],
            clock=ManualClock(NOW),
        )

        async def in_turn() -> list[Any]:
            return [
                await receiver.handle(P, signed(event_body(n), msg=f"m{n}"), event_body(n))
                for n in range(20)
            ]

        try:
            # A stranded delivery would wait forever: bound the wait, fail instead of hanging.
            return await asyncio.wait_for(in_turn(), 60)
        finally:
            await engine.dispose()

    results = asyncio.run(back_to_back())

    assert {(200, "accepted")} == {(r.status_code, r.outcome) for r in results}


def test_a_shared_batch_costs_the_same_statements_as_a_single_delivery(
    face: Face, sqlite_url: str
) -> None:
    """A group-committed batch claims its events with one multi-row statement set (issue 16).

    Applying each delivery of the batch alone sent four statements per delivery
    (ledger read, inbox read, claim, version); the batch now sends them once, and
    on SQLite the two reads are one statement: three per transaction.
    """
    from sqlalchemy import event as sa_event

    transactions: list[list[str]] = []
    held = threading.Event()
    receiver: Any = None

    def counting(session: Any, event: Any) -> None:
        transactions[-1].append("(handler)")
        if not held.is_set():
            held.set()
            _wait_for_company(receiver, face, 5)

    registry = HandlerRegistry()
    registry.register("record.updated", counting)
    receiver = face.build(settings_for(sqlite_url), registry, providers=[P])
    engine = face.engine if face.kind == "sync" else face._async_engine.sync_engine

    def began(_conn: Any) -> None:
        transactions.append([])

    def executed(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if transactions and not statement.lstrip().upper().startswith(("BEGIN", "PRAGMA")):
            transactions[-1].append(statement)

    sa_event.listen(engine, "begin", began)
    sa_event.listen(engine, "before_cursor_execute", executed)
    try:
        deliveries = [(signed(event_body(n), msg=f"m{n}"), event_body(n)) for n in range(24)]
        results = face.send_concurrently(receiver, deliveries)
    finally:
        sa_event.remove(engine, "begin", began)
        sa_event.remove(engine, "before_cursor_execute", executed)

    shapes = [
        (tx.count("(handler)"), sum(1 for s in tx if s != "(handler)")) for tx in transactions
    ]
    assert {(200, "accepted")} == {(r.status_code, r.outcome) for r in results}
    assert 24 == sum(events for events, _ in shapes)
    assert max(events for events, _ in shapes) > 1, shapes  # some deliveries shared a batch
    assert {3} == {statements for events, statements in shapes if events}, shapes


# --------------------------------------------------------------------------- pacing and linger


def _job(number: int) -> Any:
    from idis.integrations.webhooks._receiver import _Job, _Verified

    return _Job(_Verified(P, (), f"m{number}", NOW))


class _Recorder:
    """A committer's ``run``: records batch sizes and how many batches ran at once."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.running = 0
        self.most = 0

    def held(self, started: Any, release: Any) -> Any:
        """An async ``run`` that records each batch, sets ``started``, waits for ``release``."""

        async def run(jobs: list[Any]) -> None:
            self.sizes.append(len(jobs))
            self.running += 1
            self.most = max(self.most, self.running)
            started.set()
            await release.wait()
            self.running -= 1

        return run


def test_the_loop_committer_lingers_while_busy_for_a_batch_as_large_as_the_last() -> None:
    """After a batch of 4, one waiting delivery lingers until 4 wait, then they go together.

    Without the linger the deliveries after the first batch would go as 1 and 3.
    The linger is a minute here: only the count, never the timer, ends it.
    """
    import asyncio

    from idis.integrations.webhooks._receiver import _LoopCommitter

    record = _Recorder()

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def run(jobs: list[Any]) -> None:
            record.sizes.append(len(jobs))
            started.set()
            await release.wait()

        committer = _LoopCommitter(run, parallel=1, linger=60.0)
        first = [asyncio.create_task(committer.submit(_job(n))) for n in range(4)]
        await started.wait()
        lone = asyncio.create_task(committer.submit(_job(4)))
        while len(committer._queue) < 1:
            await asyncio.sleep(0)
        release.set()
        while committer._gathering is None:
            await asyncio.sleep(0)
        assert [4] == record.sizes  # the lone delivery waits for company
        rest = [asyncio.create_task(committer.submit(_job(n))) for n in range(5, 8)]
        await asyncio.wait_for(asyncio.gather(*first, lone, *rest), 30)

    asyncio.run(scenario())

    assert [4, 4] == record.sizes


def test_an_idle_loop_committer_never_lingers() -> None:
    """One delivery at a time: each starts its transaction at once, alone (linger a minute)."""
    import asyncio

    from idis.integrations.webhooks._receiver import _LoopCommitter

    record = _Recorder()

    async def scenario() -> None:
        async def run(jobs: list[Any]) -> None:
            record.sizes.append(len(jobs))

        committer = _LoopCommitter(run, parallel=1, linger=60.0)
        for n in range(5):
            # A lingering drain would hold this for a minute: the guard fails it first.
            await asyncio.wait_for(committer.submit(_job(n)), 30)
        assert (5, 5) == (committer.pace.batches, committer.pace.deliveries)

    asyncio.run(scenario())

    assert [1] * 5 == record.sizes


def test_a_stream_of_single_deliveries_never_lingers() -> None:
    """Recent batches of one each: a delivery waiting as one ends goes next, without a wait."""
    import asyncio

    from idis.integrations.webhooks._receiver import _LoopCommitter

    record = _Recorder()

    async def scenario() -> None:
        committer: Any = None

        async def run(jobs: list[Any]) -> None:
            record.sizes.append(len(jobs))
            if len(record.sizes) < 4:
                # The next delivery arrives while this batch runs.
                asyncio.get_running_loop().create_task(committer.submit(_job(len(record.sizes))))
            await asyncio.sleep(0)
            assert committer._gathering is None

        committer = _LoopCommitter(run, parallel=1, linger=60.0)
        await asyncio.wait_for(committer.submit(_job(0)), 30)
        while committer.pace.batches < 4:
            await asyncio.wait_for(asyncio.sleep(0), 30)

    asyncio.run(scenario())

    assert [1, 1, 1, 1] == record.sizes


@pytest.mark.parametrize("waiting", [5, 32])
def test_the_loop_committer_runs_one_batch_at_a_time_until_a_full_batch_waits(
    waiting: int,
) -> None:
    """Up to four at once on PostgreSQL, but another batch starts only when 32 wait."""
    import asyncio

    from idis.integrations.webhooks._receiver import MAX_BATCH, _LoopCommitter

    record = _Recorder()

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()
        run = record.held(started, release)
        committer = _LoopCommitter(run, parallel=4, linger=0.0)
        first = asyncio.create_task(committer.submit(_job(0)))
        await started.wait()
        more = [asyncio.create_task(committer.submit(_job(n))) for n in range(1, waiting + 1)]
        for _ in range(10):
            await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *more), 30)

    asyncio.run(scenario())

    if waiting < MAX_BATCH:
        assert (1, [1, waiting]) == (record.most, record.sizes)
    else:
        # The 32nd waiting delivery starts a second batch beside the first.
        assert (2, [1, MAX_BATCH]) == (record.most, record.sizes)


def test_a_slow_batch_lets_another_start_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch running longer than SLOW_BATCH (a lock wait) no longer holds the others back."""
    import asyncio

    from idis.integrations.webhooks import _receiver

    monkeypatch.setattr(_receiver, "SLOW_BATCH", -1.0)  # every running batch counts as slow
    record = _Recorder()

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()
        run = record.held(started, release)
        committer = _receiver._LoopCommitter(run, parallel=4, linger=0.0)
        first = asyncio.create_task(committer.submit(_job(0)))
        await started.wait()
        second = asyncio.create_task(committer.submit(_job(1)))
        while record.most < 2:
            await asyncio.sleep(0)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 30)

    asyncio.run(scenario())

    assert (2, [1, 1]) == (record.most, record.sizes)


def test_the_thread_committer_runs_one_batch_at_a_time_until_it_falls_behind() -> None:
    """Threads: the first leads alone; five arriving meanwhile go in one batch after it."""
    from idis.integrations.webhooks._receiver import _ThreadCommitter

    record = _Recorder()
    lock = threading.Lock()
    release = threading.Event()
    committer: Any = None

    def run(jobs: list[Any]) -> None:
        with lock:
            record.sizes.append(len(jobs))
            record.running += 1
            record.most = max(record.most, record.running)
        if len(record.sizes) == 1:
            release.wait(30)
        with lock:
            record.running -= 1

    committer = _ThreadCommitter(run, parallel=4)
    threads = [threading.Thread(target=committer.submit, args=(_job(n),)) for n in range(6)]
    threads[0].start()
    while not record.sizes:
        time.sleep(0.001)
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30
    while len(committer._queue) < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(30)

    assert (1, [1, 5]) == (record.most, record.sizes)
    assert (2, 6) == (committer.pace.batches, committer.pace.deliveries)
