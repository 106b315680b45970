"""A suspect given back unsent stays a suspect.

The suspect a lease keeps (``_isolate``) may never be sent: the gateway refuses
it (circuit open, bulkhead full, no token), the worker stops before sending it,
or the lease's COMMIT went unacknowledged. Nothing was learnt about it, so it
must still be sent alone: otherwise the message that killed a worker goes out
in the next batch and takes its neighbours' attempts with it again.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from idis.integrations._clock import ManualClock
from idis.integrations.exceptions import CircuitOpen
from idis.integrations.outbox._messages import OutboxMessage
from idis.integrations.outbox._models import OutboxMessageRow
from idis.integrations.outbox._queries import LEASE_EXPIRED, SUSPECT, release_own_statement

from .conftest import Loop, outbox_settings, put_messages, table

_LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def _held_by_dead_worker(engine: Engine, ids: list[int]) -> None:
    """``ids`` as a worker that died mid-batch leaves them: leased, lapsed, one attempt."""
    with Session(engine) as session, session.begin():
        session.execute(
            update(OutboxMessageRow)
            .where(OutboxMessageRow.id.in_(ids))
            .values(
                lease_owner="dead-worker",
                lease_expires_at=_LONG_AGO,
                attempts=1,
                lease_generation=1,
            )
        )


def test_a_suspect_the_gateway_refused_is_still_sent_alone(
    loop: Loop, engine: Engine, clock: ManualClock
) -> None:
    put_messages(engine, 3, clock=clock)
    first, *rest = [row.id for row in table(engine)]
    _held_by_dead_worker(engine, [first])
    sends: list[list[int]] = []
    refuse = True

    def deliver(message: OutboxMessage) -> None:
        sends[-1].append(message.id)
        if refuse:
            raise CircuitOpen("open", retry_in=20.0)

    worker = loop.worker(
        engine,
        outbox_settings(batch_size=10, concurrency=1),
        deliver=deliver,
        providers=["crm_provider"],
        clock=clock,
        rng=random.Random(5),
    )

    # The lapsed lease is taken over: its message is sent alone, the rest given back;
    # the breaker refuses it, so it is deferred, never sent.
    sends.append([])
    worker.run_once()
    assert [[first]] == sends
    rows = {row.id: row for row in table(engine)}
    assert 1 == rows[first].attempts
    assert SUSPECT == rows[first].last_error
    assert {None} == {rows[i].lease_owner for i in rest}

    # Once due again it is still a suspect: sent alone, not in a batch with the others.
    clock.advance(30)
    refuse = False
    sends.append([])
    worker.run_once()
    assert [first] == sends[-1]


def test_release_own_keeps_a_suspect(engine: Engine, clock: ManualClock) -> None:
    """A lease whose COMMIT went unacknowledged is given back; a suspect it held stays one."""
    put_messages(engine, 2, clock=clock)
    suspect, plain = [row.id for row in table(engine)]
    with Session(engine) as session, session.begin():
        session.execute(
            update(OutboxMessageRow)
            .where(OutboxMessageRow.id.in_([suspect, plain]))
            .values(lease_owner="me", lease_expires_at=_LONG_AGO, attempts=1)
        )
        session.execute(
            update(OutboxMessageRow)
            .where(OutboxMessageRow.id == suspect)
            .values(last_error=LEASE_EXPIRED)
        )
        session.execute(release_own_statement(), {"p_owner": "me", "p_now": clock.now()})
    rows = {row.id: row for row in table(engine)}
    assert SUSPECT == rows[suspect].last_error
    assert rows[plain].last_error not in (SUSPECT, LEASE_EXPIRED, None)
    assert (0, 0) == (rows[suspect].attempts, rows[plain].attempts)
