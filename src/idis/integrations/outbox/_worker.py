"""The outbox worker: lease a batch, deliver each message, settle the batch; repeat.

One cycle (:meth:`AsyncOutboxWorker.run_once`):

1. in one transaction, settle what the previous cycle delivered (or could not
   write while the database was down) and lease up to ``batch_size`` due
   head-of-key messages, one provider at a time, skipping providers whose
   breaker is open or that are paused by a 429 (``availability``): their
   messages wait, and no attempt is counted. A message whose lease lapsed (its
   worker died) is due again and leased like any other;
2. deliver the batch through the ``deliver`` strategy (the gateway by
   default), ``concurrency`` at a time (a batch never holds two messages of
   one ordering key), a heartbeat renewing the leases while any send runs;
3. decide each outcome: delivered, retry with backoff, deferred (attempt
   given back), dead. ``run_once`` writes them at once; ``run`` writes them
   with the next cycle's lease.

Stopping (:meth:`AsyncOutboxWorker.stop`, SIGTERM in ``outbox work``) lets the
delivery in progress finish, settles it, and gives the rest of the batch back
(pending, attempt not counted) before the worker returns: nothing waits for a
lease to lapse. A worker killed outright (SIGKILL, power loss) loses nothing
either: its leases lapse after ``lease`` and another worker takes the messages.

Delivery is at least once; the idempotency key (sent as ``Idempotency-Key``)
makes it exactly once from the provider's point of view. Workers may run side
by side, as asyncio tasks or processes, on one database.

Background workers are async only (issue 12): this is the one outbox worker, as
the CLI (``outbox work``), the drill and the example service run it. The
decisions live in :class:`_WorkerCore` (no I/O) and ``_policy.py``; the worker
only performs the I/O they ask for. Enqueueing (the request path) keeps a sync
and an async face (``enqueue`` / ``enqueue_async``).

Each database transaction of the worker is one function of a blocking
``Connection``, run in one hop to a thread on a blocking twin of the async
engine (``db._engine.blocking_twin``: pysqlite, psycopg's blocking connection),
or through ``run_sync`` on the async engine when it has no twin. aiosqlite hops
to its thread for every statement and cursor call, and psycopg's async driver
waits for each result through the loop; a cycle here costs one hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import repeat
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from .._clock import Clock, SystemClock, system_clock
from ..config import OutboxSettings, Settings
from ..db._engine import (
    blocking_twin,
    load_json_column,
    load_json_values,
    on_driver,
    on_driver_pair,
    unwatched,
)
from ..exceptions import BulkheadFull, CircuitOpen, ConfigError, StorageError, UsageError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ._messages import KIND_WEBHOOK, OutboxMessage, leased_message
from ._models import DEAD, PENDING, RECEIVER_GONE
from ._policy import DEFER_DELAY, Action, Disposition, decide, describe_error, probe_decides
from ._queries import (
    LEASE_EXPIRED,
    SUSPECT,
    Prepared,
    database_now_statement,
    give_back_statement,
    gone_receivers_statement,
    id_list,
    lease_statement,
    mark_receiver_statement,
    packed_keys,
    release_own_statement,
    renew_statement,
    settle_delivered_statement,
    settle_statement,
)

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

T = TypeVar("T")

__all__ = [
    "AsyncDeliver",
    "AsyncOutboxWorker",
    "BatchResult",
]

#: A delivery strategy: return when the provider accepted the message, raise otherwise.
AsyncDeliver = Callable[[OutboxMessage], Awaitable[None]]
#: Whether a provider accepts calls now (``Gateway.available``).
Availability = Callable[[str], bool]

_log = get_logger()
_from_iso = datetime.fromisoformat


def _sqlite_time(text: str) -> datetime:
    return _from_iso(text + "+00:00")


#: The earliest time, naive and aware (UTC): a naive UTC wall time's distance
#: from the first, added to the second, is that time made aware.
_NAIVE_MIN = datetime.min  # noqa: DTZ901  # naive on purpose: the wall time's origin
_UTC_MIN = datetime.min.replace(tzinfo=UTC)


def _naive_utc(moment: datetime) -> datetime:
    """``moment.replace(tzinfo=UTC)``, by arithmetic: about 0.1 µs against 1.1 µs.

    PostgreSQL's leased times come back as UTC wall times (``_queries.utc_wall``).
    ``datetime.replace`` parses its keyword arguments on every call (CPython
    3.11: most of a microsecond); the subtraction and the addition are exact
    (whole microseconds) and give the same value, with ``UTC`` as its tzinfo.
    """
    return _UTC_MIN + (moment - _NAIVE_MIN)


def _aware_column(times: Sequence[datetime]) -> Iterable[datetime]:
    """:func:`_naive_utc` of each: in C, no Python frame per value."""
    return map(_UTC_MIN.__add__, map(datetime.__sub__, times, repeat(_NAIVE_MIN)))


def _sqlite_time_column(times: Sequence[str]) -> Iterable[datetime]:
    return map(_sqlite_time, times)


#: How a leased batch's payload and ``created_at`` columns are decoded, by "is
#: it SQLite" (``_queries._leased_columns``): the payload is JSON text on both
#: (on PostgreSQL the ``jsonb``'s own output, each text one value);
#: ``created_at`` UTC text on SQLite, naive UTC datetimes on PostgreSQL.
_COLUMN_DECODERS: dict[
    bool,
    tuple[Callable[[Sequence[str]], Sequence[Any]], Callable[[Sequence[Any]], Iterable[datetime]]],
] = {
    True: (load_json_column, _sqlite_time_column),
    False: (load_json_values, _aware_column),
}


def _monotonic_of(clock: Clock) -> Callable[[], float]:
    """``clock.monotonic``; the system clock's is ``time.monotonic`` itself (read
    after each send: no Python call of its own)."""
    return time.monotonic if type(clock) is SystemClock else clock.monotonic


#: ``_write_unsettled``'s plan not made yet.
_UNPLANNED: Any = object()


#: ``last_error`` of a leased message a worker that died held (see ``_isolate``).
_SUSPECTS = frozenset({LEASE_EXPIRED, SUSPECT})


def _by_id(message: OutboxMessage) -> int:
    return message.id


def _by_attempts(message: OutboxMessage) -> tuple[int, int]:
    return message.attempts, message.id


def _all_delivered(items: Sequence[_Outcome]) -> bool:
    """Whether every outcome is a delivered message (none a ``_Settlement``, a class
    without subclasses), tested in C."""
    return _Settlement not in set(map(type, items))


def _delivered_labels(items: Sequence[OutboxMessage]) -> dict[tuple[str, str], int]:
    """How many delivered messages of each (provider, kind): one pair, nearly always."""
    providers = {m.provider for m in items}
    kinds = {m.kind for m in items}
    if len(providers) == 1 and len(kinds) == 1:
        [provider], [kind] = providers, kinds
        return {(provider, kind): len(items)}
    return Counter([(m.provider, m.kind) for m in items])


_DB_ERRORS = (OperationalError, DBAPIError, StorageError)
#: Messages whose excused failures a worker remembers (a bound, not a tuning knob).
_MAX_EXCUSED = 10_000
#: Tries to write the last outcomes when stopping, before leaving them to lapse.
_FLUSH_ATTEMPTS = 3
#: Longest pause between attempts to reach a database that is down.
_MAX_DB_BACKOFF = 5.0


def default_worker_id() -> str:
    """``host:pid:random``: unique per worker, readable in ``lease_owner``."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(slots=True)
class BatchResult:
    """What one cycle (or a whole run, summed) did."""

    leased: int = 0
    delivered: int = 0
    retried: int = 0
    deferred: int = 0
    dead: int = 0
    released: int = 0
    #: Leases taken over from workers that died.
    reclaimed: int = 0
    #: Settles written after another worker re-leased the message: fenced off, no effect.
    fenced: int = 0

    def add(self, other: BatchResult) -> None:
        """Add ``other``'s counts to these."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class _Settlement:
    message: OutboxMessage
    disposition: Disposition
    #: The attempt reached (or may have reached) the provider and failed.
    failed_attempt: bool = False
    #: Given back because the worker is stopping.
    released: bool = False


def _unsent_dead(message: OutboxMessage, why: str) -> _Settlement:
    """Dead without another attempt (the attempt counted for the lease is given back)."""
    return _Settlement(message, Disposition(Action.DEAD, None, why), released=True)


#: One message's outcome: a delivered message stands for its own settlement
#: (the common case, with nothing else to record: no object per delivery).
_Outcome = _Settlement | OutboxMessage


class _Leases:
    """The leases of one batch being delivered: when they lapse, which are lost."""

    def __init__(self, batch: Sequence[OutboxMessage], core: _WorkerCore) -> None:
        self._core = core
        #: Messages whose leases renewing keeps: the whole batch, sent ones too,
        #: until their outcomes are written (else another worker could take a
        #: message already delivered but not yet marked so).
        self.open = {m.id for m in batch}
        #: Messages whose lease could not be renewed: not to be sent.
        self.lost: set[int] = set()
        self.expires = min((m.lease_expires_at for m in batch), default=None)
        #: When (the clock's monotonic time) a renewal falls due: checked before
        #: each send, where reading the time of day would cost more.
        self.renew_at = self._renew_at()

    def _renew_at(self) -> float:
        core = self._core
        if self.expires is None:
            return math.inf
        # ``needs_renewal``'s moment (less than half a lease left), on the
        # monotonic clock, which moves as the time of day does.
        left = (self.expires - core.now() - core.lease / 2).total_seconds()
        return core.clock.monotonic() + left

    def renewal_due(self, now: float) -> bool:
        """A renewal may be due at ``now`` (the clock's monotonic time;
        :meth:`_WorkerCore.needs_renewal` decides)."""
        return now >= self.renew_at and bool(self.open)

    def renewed(self, held: set[int], expires: datetime) -> None:
        """Record a renewal: ``held`` keep their lease to ``expires``; other open ones lost it."""
        self.lost |= self.open - held
        self.open &= held
        self.expires = expires
        self.renew_at = self._renew_at()


@dataclass(slots=True)
class _ProbeVerdict:
    """A provider's last health probe, as the outbox worker uses it."""

    #: When it started (the clock's monotonic time): evidence only for failures before.
    started: float
    #: Still waiting for the answer.
    running: bool = False
    #: It answered healthy (an unhealthy answer, an error or no endpoint: False).
    healthy: bool = False


class _WorkerCore:
    """Everything the worker decides, with no I/O (the worker performs what it asks for)."""

    def __init__(
        self,
        settings: Settings,
        *,
        providers: Sequence[str] | None,
        availability: Availability | None,
        worker_id: str | None,
        clock: Clock | None,
        rng: random.Random | None,
        metrics: Metrics | None,
        batch_size: int | None,
        concurrency: int | None,
        lease: timedelta | None,
        poll_interval: timedelta | None,
        metrics_interval: timedelta | None,
        lease_clock: str | None = None,
        probing: bool = False,
    ) -> None:
        outbox = settings.outbox
        names = tuple(providers) if providers is not None else tuple(settings.providers)
        for name in names:
            settings.provider(name)  # UnknownProviderError names it
        if not names:
            raise UsageError("an outbox worker needs at least one provider to deliver to")
        self.settings = settings
        self.outbox: OutboxSettings = outbox
        self.providers = names
        self.available: Availability = availability or (lambda _name: True)
        self.worker_id = worker_id or default_worker_id()
        self.clock = clock or system_clock
        if lease_clock not in (None, "database", "worker"):
            raise UsageError(f"lease_clock={lease_clock!r}: expected 'database' or 'worker'")
        #: Lease, due and settle times follow the database's clock (a worker whose
        #: clock runs ahead would otherwise take over live leases). A manual
        #: clock (tests, the drill) is its own authority.
        self.database_clock = (
            lease_clock == "database"
            if lease_clock is not None
            else isinstance(self.clock, SystemClock)
        )
        self._offset = timedelta(0)
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self._metrics = metrics
        self.batch_size = batch_size or outbox.batch_size
        self.concurrency = max(1, concurrency or outbox.concurrency)
        self.lease = lease or outbox.lease
        self.poll_interval = poll_interval if poll_interval is not None else outbox.poll_interval
        self.metrics_interval = metrics_interval or timedelta(seconds=15)
        if self.batch_size < 1 or self.lease <= timedelta(0):
            raise UsageError(
                f"batch_size={self.batch_size} and lease={self.lease} must both be positive"
            )
        self._rotation = 0
        self._last_gauges = -math.inf
        self._gone: set[tuple[str, str]] = set()
        #: Deliveries per provider, by this worker: the evidence that a provider
        #: works for others while one message keeps failing.
        self._served: Counter[str] = Counter()
        #: Message id -> (``_served`` of its provider when its failure was last
        #: excused as the outage's, failures excused so far).
        self._excused: dict[int, tuple[int, int]] = {}
        #: Provider -> the configuration error its last delivery met (cleared by a delivery).
        self.config_errors: dict[str, str] = {}
        #: The driver can probe a provider's health (it has a gateway).
        self.probing = probing
        #: Provider -> its last health probe (the evidence when only poison is left).
        self._probes: dict[str, _ProbeVerdict] = {}
        #: Provider -> seconds between its probes, and the quiet time (no delivery
        #: by this worker) before the first: its breaker's reset timeout (the pace
        #: of its half-open trials, so a lone poison message's every trial may be
        #: judged), at least a backoff step, never longer than a lease.
        self.probe_interval = {
            name: min(
                self.lease.total_seconds(),
                max(
                    DEFER_DELAY.total_seconds(),
                    outbox.initial_backoff.total_seconds(),
                    settings.provider(name).breaker.reset_timeout,
                ),
            )
            for name in names
        }
        #: Provider -> when this worker last delivered to it (monotonic).
        self._served_at: dict[str, float] = {}
        #: Outcomes not yet written (the next cycle's transaction writes them, or
        #: the database was unreachable).
        self.unsettled: list[_Outcome] = []
        #: A cycle's transaction failed: its COMMIT may have succeeded unseen,
        #: leaving leases this worker does not know it holds.
        self.unsure_of_leases = False
        self.db_failures = 0
        #: Settles fenced off by a newer lease generation, since the worker started.
        self.stale_settles = 0
        #: Leases the last batch took over from workers that died (``to_messages``).
        self.reclaimed = 0
        #: Ids of the last lease's messages that a worker that died held (``to_messages``).
        self.suspects: list[int] = []
        #: The last batch was a suspect sent alone (its warning is logged once).
        self.isolating = False
        self.log = _log.bind(worker=self.worker_id)

    @property
    def metrics(self) -> Metrics:
        return self._metrics or get_metrics()

    # ------------------------------------------------------------ scheduling

    def providers_to_lease(self) -> list[str]:
        """Available providers, rotated so that each gets first pick in turn."""
        start = self._rotation % len(self.providers)
        self._rotation += 1
        ordered = self.providers[start:] + self.providers[:start]
        return [name for name in ordered if self.available(name)]

    def gauges_due(self) -> bool:
        now = self.clock.monotonic()
        due = now - self._last_gauges >= self.metrics_interval.total_seconds()
        if due:
            self._last_gauges = now
        return due

    @staticmethod
    def has_webhooks(rows: Sequence[Any]) -> bool:
        """Whether a leased batch holds webhooks (whose receivers' state must be read)."""
        return any(row[2] == KIND_WEBHOOK for row in rows)  # LEASED_COLUMNS' kind

    def set_gone(self, rows: Sequence[Any]) -> None:
        self._gone = {(str(r[0]), str(r[1])) for r in rows}

    @property
    def gone_receivers(self) -> bool:
        """Whether any webhook receiver is known gone (else no message is skipped)."""
        return bool(self._gone)

    def lease_params(self, provider: str, limit: int, now: datetime) -> dict[str, Any]:
        """Parameters of ``lease_statement`` (both clocks': each ignores the other's)."""
        return {
            "p_provider": provider,
            "p_now": now,
            "p_limit": limit,
            "p_owner": self.worker_id,
            "p_expires": now + self.lease,  # what ``to_messages`` is told
            "p_lease": self.lease,  # on the statement's clock (PostgreSQL)
        }

    def now(self) -> datetime:
        """The worker's time, corrected to the database's clock when it follows it."""
        return self.clock.now() + self._offset

    def follow_database(self, database_now: Any) -> None:
        """Correct :meth:`now` by the database's clock, as the lease transaction saw it."""
        if isinstance(database_now, str):  # SQLite: text, UTC
            database_now = datetime.fromisoformat(database_now).replace(tzinfo=UTC)
        elif database_now.tzinfo is None:
            database_now = database_now.replace(tzinfo=UTC)
        self._offset = database_now - self.clock.now()

    def release_own_params(self) -> dict[str, Any]:
        """Parameters of ``release_own_statement``: run before leasing, no batch in flight."""
        self.log.warning(
            "idis.outbox.unacknowledged_leases_released",
            msg="a cycle's transaction failed; leases it may have taken unseen are given back",
        )
        return {"p_owner": self.worker_id, "p_now": self.now()}

    def to_messages(
        self, rows: Sequence[Any], expires: datetime, dialect: str
    ) -> list[OutboxMessage]:
        """Leased rows (``LEASED_COLUMNS``, unprocessed; any column after them
        ignored) as messages.

        ``expires``: when their lease ends. One pass: the SQLite text columns
        are decoded here (``_queries._leased_columns``), and leases taken over
        from a worker that died are counted in :attr:`reclaimed` for
        :meth:`taken_over`.
        """
        if not rows:
            return []
        # Column by column (a transpose, then C-level maps): no Python loop
        # iteration, unpacking or decoder call per row.
        (
            ids,
            providers,
            kinds,
            idempotency_keys,
            payloads,
            ordering_keys,
            tenant_ids,
            attempts,
            max_retries,
            created_at,
            generations,
            last_errors,
            *_after,
        ) = zip(*rows, strict=True)
        lapsed = last_errors.count(LEASE_EXPIRED)
        self.reclaimed += lapsed
        if lapsed or SUSPECT in last_errors:  # rare: a worker died holding some of these
            self.suspects.extend(
                [i for i, error in zip(ids, last_errors, strict=True) if error in _SUSPECTS]
            )
        payloads_of, times_of = _COLUMN_DECODERS[dialect == "sqlite"]
        default_retries = self.outbox.max_retries
        if None in max_retries:
            max_retries = tuple(default_retries if m is None else m for m in max_retries)
        return list(
            map(
                leased_message,
                ids,
                providers,
                kinds,
                idempotency_keys,
                payloads_of(payloads),
                ordering_keys,
                tenant_ids,
                attempts,
                max_retries,
                times_of(created_at),
                repeat(expires),
                generations,
            )
        )

    def needs_renewal(self, expires: datetime | None, now: datetime) -> bool:
        return expires is not None and expires - now < self.lease / 2

    @property
    def renew_check(self) -> float:
        """Seconds between lease checks while a batch is out (a quarter of the lease)."""
        return max(0.05, self.lease.total_seconds() / 4)

    # -------------------------------------------------------------- decisions

    def receiver_of(self, message: OutboxMessage) -> tuple[str, str] | None:
        if message.kind != KIND_WEBHOOK:
            return None
        return (message.provider, str(message.payload.get("endpoint") or "webhooks"))

    def skip_gone(self, message: OutboxMessage) -> _Settlement | None:
        """A webhook to a receiver that answered 410: dead without another attempt."""
        receiver = self.receiver_of(message)
        if receiver is None or receiver not in self._gone:
            return None
        return _unsent_dead(message, "receiver gone: it answered 410, deliveries to it are stopped")

    def split_spent(self, batch: list[OutboxMessage], out: list[_Outcome]) -> list[OutboxMessage]:
        """Settle into ``out`` the messages whose budget lapsed leases spent; return the rest."""
        ready = []
        for message in batch:
            # ``spent``'s test, inline: it holds for all but a poisoned few.
            if message.attempts <= message.max_retries + 1:
                ready.append(message)
                continue
            spent = self.spent(message)
            assert spent is not None
            out.append(spent)
        return ready

    def probe_due(self, message: OutboxMessage, error: BaseException | None) -> float | None:
        """Whether to probe the provider's health before settling this failure.

        Only when the probe is the evidence the failure lacks (``probe_decides``:
        a provider fault left the provider unavailable and no other message got
        through since), this worker delivered nothing to the provider for
        ``probe_interval`` (only poison is left: while others get through, their
        deliveries are the evidence, and a busy provider is not probed at all),
        no probe of the provider is running, and the last one started at least
        ``probe_interval`` ago. Returns the probe's start (monotonic), to be
        passed to :meth:`probed`, or None: no probe.
        """
        provider = message.provider
        if error is None or not self.probing:
            return None
        served, _excused = self._excused.get(message.id, (self._served[provider], 0))
        if not probe_decides(
            error,
            provider_available=self.available(provider),
            served_others=self._served[provider] > served,
        ):
            return None
        now = self.clock.monotonic()
        interval = self.probe_interval[provider]
        served_at = self._served_at.get(provider)
        if served_at is not None and now - served_at < interval:
            return None
        last = self._probes.get(provider)
        if last is not None and (last.running or now - last.started < interval):
            return None
        self._probes[provider] = _ProbeVerdict(started=now, running=True)
        return now

    def probed(
        self, provider: str, started: float, report: Any, error: BaseException | None
    ) -> None:
        """Record a health probe's answer (``report``), or the error it raised."""
        if error is not None:
            result, detail = "error", describe_error(error)
        elif report is None or getattr(report, "status_code", None) is None:
            # No health endpoint configured: the gateway says "ok" without asking.
            result, detail = "unknown", str(getattr(report, "detail", "no report"))
        else:
            result = "healthy" if report.ok else "unhealthy"
            detail = str(report.detail)
        self._probes[provider] = _ProbeVerdict(started=started, healthy=result == "healthy")
        self.metrics.outbox_health_probes.labels(provider, result).inc()
        self.log.info(
            "idis.outbox.health_probe",
            msg="probed a provider whose message failed while nothing else got through: "
            + (
                "healthy, so the failure is the message's own and counts"
                if result == "healthy"
                else "no evidence it works, so the failure is given back as the outage's"
            ),
            provider=provider,
            result=result,
            detail=detail,
        )

    def healthy_since(self, provider: str, failed_at: float) -> bool:
        """Whether a probe started at or after ``failed_at`` found the provider healthy."""
        verdict = self._probes.get(provider)
        return (
            verdict is not None
            and not verdict.running
            and verdict.healthy
            and verdict.started >= failed_at
        )

    def settle(
        self,
        message: OutboxMessage,
        error: BaseException | None,
        now: datetime,
        *,
        failed_at: float | None = None,
    ) -> _Outcome:
        """Decide one attempt's outcome (``failed_at``: when it failed, monotonic)."""
        provider = message.provider
        if error is None:
            return self.delivered(message)
        if isinstance(error, ConfigError):
            text = describe_error(error)
            if self.config_errors.get(provider) != text:
                self.log.error(
                    "idis.outbox.config_error",
                    msg="outbox delivery stopped by our configuration; messages wait, "
                    "their attempts are not counted",
                    provider=provider,
                    error=text,
                )
            self.config_errors[provider] = text
        # The gateway raises CircuitOpen/BulkheadFull only when nothing went
        # out; once a request was sent, its failure is what comes back.
        failed = not isinstance(error, CircuitOpen | BulkheadFull | ConfigError)
        served, excused = self._excused.get(message.id, (self._served[provider], 0))
        disposition = decide(
            error,
            kind=message.kind,
            attempts=message.attempts,
            max_retries=message.max_retries,
            provider_available=self.available(provider),
            now=now,
            settings=self.outbox,
            rng=self.rng,
            served_others=self._served[provider] > served,
            provider_healthy=failed_at is not None and self.healthy_since(provider, failed_at),
            excused=excused,
        )
        if disposition.action is Action.DEFER and failed:
            # Given back as the outage's: remember what the provider had served,
            # so that its next failure counts if others got through meanwhile.
            self._excused[message.id] = (self._served[provider], excused + 1)
            if len(self._excused) > _MAX_EXCUSED:
                # Messages another worker settled never come back here: forget the oldest.
                del self._excused[next(iter(self._excused))]
        elif failed:
            self._excused.pop(message.id, None)
        if disposition.action is Action.GONE:
            receiver = self.receiver_of(message)
            if receiver is not None:
                self._gone.add(receiver)
        return _Settlement(message, disposition, failed_attempt=failed)

    def delivered(self, message: OutboxMessage, at: float | None = None) -> OutboxMessage:
        """The provider accepted ``message`` (at ``at``, the clock's monotonic time,
        default now): its outcome is the message itself."""
        provider = message.provider
        self._served[provider] += 1
        self._served_at[provider] = self.clock.monotonic() if at is None else at
        if self._excused:
            self._excused.pop(message.id, None)
        if self.config_errors:
            self.config_errors.pop(provider, None)
        return message

    def release(self, message: OutboxMessage, now: datetime) -> _Settlement:
        """Give a leased, unattempted message back (the worker is stopping)."""
        return _Settlement(
            message, Disposition(Action.DEFER, now, "released: worker stopping"), released=True
        )

    def write_params(
        self, items: Sequence[_Outcome], now: datetime, dialect: str
    ) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
        """(delivered params, settle rows, receiver rows) for one settle transaction.

        Delivered params are None when nothing was delivered, else what
        ``settle_delivered_statement(dialect)`` takes.
        """
        ids: list[int] = []
        generations: list[int] = []
        rows: list[dict[str, Any]] = []
        receivers: list[dict[str, Any]] = []
        if _all_delivered(items):  # the common case: the messages themselves
            messages: Sequence[Any] = items
            ids = [m.id for m in messages]
            generations = [m.lease_generation for m in messages]
        else:
            for item in items:
                if not isinstance(item, _Settlement):  # delivered: the message itself
                    ids.append(item.id)
                    generations.append(item.lease_generation)
                    continue
                action = item.disposition.action
                if action is Action.DELIVERED:
                    ids.append(item.message.id)
                    generations.append(item.message.lease_generation)
                    continue
                giveback = 1 if (action is Action.DEFER or item.released) else 0
                status = DEAD if action in (Action.DEAD, Action.GONE) else PENDING
                rows.append(
                    {
                        "p_b_id": item.message.id,
                        "p_b_gen": item.message.lease_generation,
                        "p_b_status": status,
                        "p_b_next": item.disposition.next_attempt_at or now,
                        "p_b_error": item.disposition.error,
                        "p_b_giveback": giveback,
                        "p_owner": self.worker_id,
                        "p_now": now,
                    }
                )
                if action is Action.GONE:
                    receiver = self.receiver_of(item.message)
                    assert receiver is not None
                    receivers.append(
                        {
                            "p_provider": receiver[0],
                            "p_endpoint": receiver[1],
                            "p_status": RECEIVER_GONE,
                            "p_code": 410,
                            "p_reason": item.disposition.error,
                            "p_now": now,
                        }
                    )
        params: Any = None
        if ids and dialect == "postgresql":
            params = {
                "p_ids": id_list(dialect, ids),
                "p_gens": id_list(dialect, generations),
                "p_now": now,
            }
        elif ids:
            params = {"p_ids": id_list(dialect, ids), "p_now": now}
            keys = packed_keys(ids, generations)
            if keys is not None:
                params["p_keys"] = keys
            else:
                # [[id, generation], ...]: the JSON text, without json.dumps's walk.
                params["p_pairs"] = (
                    "["
                    + ",".join([f"[{i},{g}]" for i, g in zip(ids, generations, strict=True)])
                    + "]"
                )
        return params, rows, receivers

    def fenced(self, items: Sequence[_Outcome], applied: int) -> int:
        """Count and log the settles that found the message re-leased by another worker.

        A worker whose lease lapsed (a pause, a partition) settles late: the
        generation it leased under is no longer the message's, so its settle
        changed nothing and the current holder's outcome stands.
        """
        stale = len(items) - applied
        if stale > 0:
            self.stale_settles += stale
            self.log.warning(
                "idis.outbox.stale_settle_fenced",
                msg="outbox settles ignored: their leases lapsed and the messages were "
                "leased again (the current holder's outcome stands)",
                count=stale,
            )
        return max(stale, 0)

    # ---------------------------------------------------------- observation

    def observe(self, items: Sequence[_Outcome], result: BatchResult) -> None:
        metrics = self.metrics
        if _all_delivered(items):  # the common case
            result.delivered += len(items)
            messages: Sequence[Any] = items
            for (provider, kind), count in _delivered_labels(messages).items():
                metrics.outbox_deliveries.labels(provider, kind, "delivered").inc(count)
            return
        # Counted per batch, not per message: one labelled increment per outcome.
        outcomes: Counter[tuple[str, str, str]] = Counter()
        webhook_failures: Counter[str] = Counter()
        dead: Counter[tuple[str, str]] = Counter()
        delivered = 0
        for item in items:
            if not isinstance(item, _Settlement):  # delivered: the common case, first and short
                outcomes[(item.provider, item.kind, "delivered")] += 1
                delivered += 1
                continue
            msg = item.message
            action = item.disposition.action
            outcome = "released" if item.released and action is Action.DEFER else action.value
            outcomes[(msg.provider, msg.kind, outcome)] += 1
            if item.failed_attempt and msg.kind == KIND_WEBHOOK:
                webhook_failures[msg.provider] += 1
            if action is Action.DELIVERED:
                delivered += 1
            elif action is Action.RETRY:
                result.retried += 1
                self.log.info(
                    "idis.outbox.retry_scheduled",
                    msg="outbox delivery failed; retry scheduled",
                    provider=msg.provider,
                    kind=msg.kind,
                    message_id=msg.id,
                    attempts=msg.attempts,
                    max_retries=msg.max_retries,
                    next_attempt_at=item.disposition.next_attempt_at,
                    error=item.disposition.error,
                )
            elif action is Action.DEFER:
                if item.released:
                    result.released += 1
                else:
                    result.deferred += 1
            else:
                result.dead += 1
                dead[(msg.provider, msg.kind)] += 1
                if action is Action.GONE:
                    self.log.warning(
                        "idis.outbox.receiver_gone",
                        msg="webhook receiver answered 410 Gone; deliveries to it stop",
                        provider=msg.provider,
                        endpoint=msg.payload.get("endpoint"),
                    )
                self.log.warning(
                    "idis.outbox.dead_lettered",
                    msg="outbox message dead-lettered",
                    provider=msg.provider,
                    kind=msg.kind,
                    message_id=msg.id,
                    attempts=msg.attempts,
                    error=item.disposition.error,
                )
        result.delivered += delivered
        for labels, count in outcomes.items():
            metrics.outbox_deliveries.labels(*labels).inc(count)
        for provider, count in webhook_failures.items():
            metrics.webhook_delivery_failures.labels(provider).inc(count)
        for (provider, kind), count in dead.items():
            metrics.outbox_dead_letters.labels(provider, kind).inc(count)

    def taken_over(self, result: BatchResult) -> None:
        """Count and log the leases the last batch took over from a worker that died."""
        lapsed, self.reclaimed = self.reclaimed, 0
        if lapsed:
            result.reclaimed += lapsed
            self.log.warning(
                "idis.outbox.leases_reclaimed",
                msg="took over lapsed outbox leases (a worker stopped without settling)",
                count=lapsed,
            )

    def spent(self, message: OutboxMessage) -> _Settlement | None:
        """A message whose budget lapsed leases used up: dead without another attempt.

        A worker that dies mid-attempt keeps that attempt counted, so a message
        that kills every worker taking it ends here instead of looping forever.
        """
        if message.attempts <= message.max_retries + 1:
            return None
        return _unsent_dead(
            message, "retries spent: its last attempts were lost with their workers"
        )

    def flush_abandoned(self) -> None:
        self.log.warning(
            "idis.outbox.settle_abandoned",
            msg="stopping with unsettled outbox messages; their leases will lapse and they "
            "will be delivered again (idempotently)",
            count=len(self.unsettled),
        )

    def db_backoff(self, exc: BaseException) -> float:
        self.db_failures += 1
        delay = min(_MAX_DB_BACKOFF, 0.05 * 2 ** min(self.db_failures, 10))
        self.log.warning(
            "idis.outbox.storage_error",
            msg="outbox database unreachable; will retry",
            error=describe_error(exc),
            retry_in=round(delay, 3),
        )
        return self.rng.uniform(delay / 2, delay)


class _Database(Protocol):
    """Where the worker's transactions run; each is one function of a blocking ``Connection``."""

    async def run(self, work: Callable[[Connection], T], *, hold: bool) -> T:
        """Run ``work`` in one transaction (on the held connection with ``hold``); commit."""
        ...

    async def release(self) -> None:
        """Close the held connection, if any."""
        ...


class _AsyncDatabase:
    """The async engine itself, for one without a blocking twin: ``work`` runs through
    ``run_sync``, each statement awaited on the async driver."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._conn: AsyncConnection | None = None

    async def run(self, work: Callable[[Connection], T], *, hold: bool) -> T:
        if not hold:
            async with self.engine.begin() as conn:
                return await conn.run_sync(work)
        if self._conn is None:
            self._conn = await self.engine.connect()
        try:
            async with self._conn.begin():
                return await self._conn.run_sync(work)
        except _DB_ERRORS:
            await self.release()
            raise

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


class _ThreadDatabase:
    """A whole transaction in one hop to a thread, on a blocking twin of the engine.

    aiosqlite hops to its thread and back for every statement, cursor call and
    COMMIT (about a dozen per cycle), and psycopg's async driver waits for
    each result through the event loop; here a cycle's settle and lease cost
    one hop, and the event loop is never blocked.
    The lock keeps the held connection to one thread at a time, also when a
    cancelled caller releases it while its last transaction still runs.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    async def run(self, work: Callable[[Connection], T], *, hold: bool) -> T:
        return await asyncio.to_thread(self._run, work, hold)

    def _run(self, work: Callable[[Connection], T], hold: bool) -> T:
        with self._lock:
            if not hold:
                with self.engine.begin() as conn:
                    return work(conn)
            if self._conn is None:
                self._conn = self.engine.connect()
            try:
                with self._conn.begin():
                    return work(self._conn)
            except _DB_ERRORS:
                self._close()
                raise

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _release(self) -> None:
        with self._lock:
            self._close()

    async def release(self) -> None:
        await asyncio.to_thread(self._release)


class _Direct:
    """The worker's two statements per batch (lease, delivered settle) on the driver's cursor.

    Only while nothing watches SQLAlchemy's execution of them (no
    ``before_cursor_execute``/``after_cursor_execute`` or ``handle_error``
    listener, no statement logging): then SQLAlchemy's execute would do
    nothing for the worker that the driver's cursor does not, at about 40 µs
    a statement. Errors come out as SQLAlchemy's would (``DBAPIError``
    subclasses; a lost connection invalidated), so the worker's handling is
    the same either way. In ``run``, a batch's delivered settle goes with the
    next lease (:meth:`count_then_rows`): on psycopg in one round trip, a
    pipeline inside the cycle's transaction (psycopg's BEGIN still takes its
    own): a round trip costs the client tens of µs of CPU.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._prepared: dict[Any, Prepared] = {}
        self._dialect: Any = None

    def _usable(self, conn: Connection) -> bool:
        return self.enabled and unwatched(conn)

    def _prepared_for(self, conn: Connection, stmt: Any) -> Prepared:
        dialect = conn.dialect
        if dialect is not self._dialect:
            self._prepared.clear()
            self._dialect = dialect
        prepared = self._prepared.get(stmt)
        if prepared is None:
            prepared = self._prepared[stmt] = Prepared(stmt, dialect)
        return prepared

    def _execute(self, conn: Connection, stmt: Any, params: dict[str, Any], fetch: bool) -> Any:
        prepared = self._prepared_for(conn, stmt)
        return on_driver(conn, prepared.sql, prepared.params(params), rowcount=not fetch)

    def rows(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> Sequence[Any]:
        """The rows ``stmt`` returns (tuples, or SQLAlchemy rows: both index alike)."""
        if self._usable(conn):
            rows: Sequence[Any] = self._execute(conn, stmt, params, True)
            return rows
        return conn.execute(stmt, params).all()

    def count_then_rows(
        self,
        conn: Connection,
        first: tuple[Any, dict[str, Any]],
        second: tuple[Any, dict[str, Any]],
    ) -> tuple[int, Sequence[Any]]:
        """How many rows the ``first`` statement changed, then the rows the ``second``
        returns (each a statement and its parameters): in one round trip where the
        driver pipelines (``on_driver_pair``)."""
        if self._usable(conn):
            (stmt1, params1), (stmt2, params2) = first, second
            prepared1 = self._prepared_for(conn, stmt1)
            prepared2 = self._prepared_for(conn, stmt2)
            return on_driver_pair(
                conn,
                prepared1.sql,
                prepared1.params(params1),
                prepared2.sql,
                prepared2.params(params2),
            )
        return self.count(conn, *first), self.rows(conn, *second)

    def count(self, conn: Connection, stmt: Any, params: dict[str, Any]) -> int:
        """How many rows ``stmt`` changed."""
        if self._usable(conn):
            count: int = self._execute(conn, stmt, params, False)
            return count
        return conn.execute(stmt, params).rowcount


class AsyncOutboxWorker:
    """Deliver outbox messages from an ``AsyncEngine``: the library's one outbox worker.

    Run it as a task inside the service, or alone with ``asyncio.run`` (what
    ``idis-integrations outbox work`` does)::

        worker = AsyncOutboxWorker(async_engine, settings, gateway=async_gateway)
        task = worker.start()            # asyncio.Task
        ...
        worker.stop(); await task

    :meth:`stop` is safe from a signal handler on the loop's thread. Several
    workers (tasks or processes) may share one database.

    Args:
        engine: The library's database (an async engine).
        settings: Library settings (providers, ``outbox`` section).
        deliver: Delivery strategy (a coroutine function); defaults to
            :class:`AsyncGatewayDelivery` on ``gateway``.
        gateway: The resilient call pipeline (``AsyncGateway``); also supplies
            ``availability`` and the health probe that tells a poison message
            from an outage when nothing else is left to deliver.
        availability: Whether a provider accepts calls now; defaults to
            ``gateway.available`` (or always True without a gateway).
        providers: Providers this worker serves (default: every configured one).
        worker_id: Lease owner name (default ``host:pid:random``).
        clock: Time source (tests inject a manual clock).
        rng: Random source for backoff jitter.
        metrics: Metrics to record into (default: the process-wide set).
        batch_size: Messages per lease (default ``IDIS_OUTBOX_BATCH_SIZE``).
        concurrency: Messages of a batch delivered at once (default
            ``IDIS_OUTBOX_CONCURRENCY``); 1 delivers one by one.
        lease: Lease length (default ``IDIS_OUTBOX_LEASE``).
        poll_interval: Idle wait when nothing is due (default ``IDIS_OUTBOX_POLL_INTERVAL``).
        metrics_interval: How often the queue gauges are refreshed (default 15 s).
        lease_clock: ``"database"``: lease, due and settle times follow the
            database's clock, once per cycle: PostgreSQL leases on the statement's
            own clock, SQLite's is the host's (default with the system clock);
            ``"worker"``: the worker's own ``clock`` (default with an injected one).

    Raises:
        UnknownProviderError: when ``providers`` names an undeclared provider.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        deliver: AsyncDeliver | None = None,
        gateway: Any = None,
        availability: Availability | None = None,
        providers: Sequence[str] | None = None,
        worker_id: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        batch_size: int | None = None,
        concurrency: int | None = None,
        lease: timedelta | None = None,
        poll_interval: timedelta | None = None,
        metrics_interval: timedelta | None = None,
        lease_clock: str | None = None,
    ) -> None:
        if deliver is None:
            if gateway is None:
                raise UsageError("AsyncOutboxWorker needs a deliver strategy or a gateway")
            from ._delivery import AsyncGatewayDelivery

            deliver = AsyncGatewayDelivery(gateway, settings, clock=clock)
        if availability is None and gateway is not None:
            availability = gateway.available
        self.engine = engine
        self.deliver = deliver
        self._health = getattr(gateway, "health", None)
        self._core = _WorkerCore(
            settings,
            providers=providers,
            availability=availability,
            worker_id=worker_id,
            clock=clock,
            rng=rng,
            metrics=metrics,
            batch_size=batch_size,
            concurrency=concurrency,
            lease=lease,
            poll_interval=poll_interval,
            metrics_interval=metrics_interval,
            lease_clock=lease_clock,
            probing=self._health is not None,
        )
        self._dialect = engine.dialect.name
        self._stop = asyncio.Event()
        self._stop_requested = False
        self._hold = False
        twin = blocking_twin(engine)
        #: Where each transaction runs: in one hop to a thread, on a blocking twin
        #: of the engine (one hop per cycle instead of one or more per statement);
        #: on the async engine itself when it has no twin.
        self._db: _Database = _AsyncDatabase(engine) if twin is None else _ThreadDatabase(twin)
        self._direct = _Direct(enabled=twin is not None)

    @property
    def worker_id(self) -> str:
        """The lease owner name this worker writes."""
        return self._core.worker_id

    @property
    def config_errors(self) -> dict[str, str]:
        """Provider -> the configuration error stopping its deliveries (empty when healthy).

        A configuration error (missing Vault variables, no webhook secret) is
        ours, not the message's: the message waits with its attempts intact,
        and the host reports the worker unhealthy with this text until a
        delivery to that provider succeeds.
        """
        return dict(self._core.config_errors)

    @property
    def stale_settles(self) -> int:
        """Settles fenced off since the worker started: its lease lapsed and another worker
        leased the message again, so the late outcome was not written."""
        return self._core.stale_settles

    def stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler on the loop's thread)."""
        self._stop_requested = True
        self._stop.set()

    async def run_once(self) -> BatchResult:
        """Run one cycle: settle leftovers, lease, deliver, settle.

        Returns:
            What the cycle did (``leased == 0`` means nothing was due).

        Raises:
            StorageError: when the database is unreachable (``run`` retries instead).
        """
        result = await self._cycle()
        result.fenced += await self._settle_now()
        return result

    async def run(self, *, until_idle: bool = False, max_cycles: int | None = None) -> BatchResult:
        """Run cycles until :meth:`stop` (or until nothing is due, with ``until_idle``).

        Database outages are survived: the worker backs off (up to 5 s) and
        carries on when the database is back. On stop, leftover settlements are
        written if the database allows (three tries). While running, the worker
        holds one connection, and each cycle's single transaction both settles
        the previous batch and leases the next one. The transaction runs in one
        hop to a thread, on a blocking twin of ``engine`` (``blocking_twin``):
        the event loop is never blocked, and the held connection is the twin's,
        outside ``engine``'s pool.

        Args:
            until_idle: Return after the first cycle that found nothing due.
            max_cycles: Return after this many cycles.

        Returns:
            The summed counts of every cycle.
        """
        total = BatchResult()
        cycles = 0
        idle = self._core.poll_interval.total_seconds()
        self._hold = True
        try:
            while not self._stop_requested:
                try:
                    result = await self._cycle()
                except StorageError as exc:
                    await self._wait(self._core.db_backoff(exc))
                    continue
                self._core.db_failures = 0
                total.add(result)
                cycles += 1
                if max_cycles is not None and cycles >= max_cycles:
                    break
                if result.leased == 0:
                    if until_idle:
                        break
                    await self._wait(idle)
            await self._final_flush()
        finally:
            self._hold = False
            await self._db.release()
        return total

    def start(self) -> asyncio.Task[BatchResult]:
        """Run :meth:`run` as a task on the running loop."""
        self._stop_requested = False
        self._stop.clear()
        return asyncio.get_running_loop().create_task(
            self.run(), name=f"idis-outbox-{self.worker_id}"
        )

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)

    async def _cycle(self) -> BatchResult:
        core = self._core
        result = BatchResult()

        # Decided here, on the loop: availability may read the gateway's state,
        # which belongs to the loop's thread; the work below runs in another.
        providers = core.providers_to_lease()

        def work(conn: Connection) -> list[OutboxMessage]:
            plan = self._settle_plan()
            if plan is not None and providers and not core.unsure_of_leases:
                delivered, rows, receivers = plan
                if delivered is not None and not rows and not receivers:
                    # Delivered outcomes only (the common case): their settle goes
                    # with the first lease, in one round trip (``_Direct.count_then_rows``).
                    return self._lease(conn, providers, result, settle=self._settle_of(delivered))
            result.fenced += self._write_unsettled(conn, plan)
            if core.unsure_of_leases:
                conn.execute(release_own_statement(), core.release_own_params())
            return self._lease(conn, providers, result)

        try:
            batch = await self._db.run(work, hold=self._hold)
            core.unsure_of_leases = False
            core.unsettled.clear()
            if core.gauges_due():
                await self._refresh_gauges()
        except _DB_ERRORS as exc:
            core.unsure_of_leases = True
            raise _as_storage_error(exc) from exc
        result.leased = len(batch)
        if batch:
            settlements = await self._deliver_batch(batch)
            core.unsettled.extend(settlements)
            core.observe(settlements, result)
        return result

    def _lease(
        self,
        conn: Connection,
        providers: list[str],
        result: BatchResult,
        *,
        settle: tuple[Any, dict[str, Any]] | None = None,
    ) -> list[OutboxMessage]:
        """Lease a batch; first, with ``settle`` (the delivered settle's statement and
        parameters, for ``core.unsettled``), write it with the first lease."""
        core = self._core
        if not providers:
            return []
        # PostgreSQL leases on the statement's own clock, whose time comes back
        # with the rows: no round trip to read it. SQLite runs in this process:
        # its clock ('now') is this host's real-time clock, read here without
        # a statement.
        on_statement_clock = core.database_clock and self._dialect == "postgresql"
        if core.database_clock and not on_statement_clock:
            core.follow_database(datetime.now(UTC))
        now = core.now()
        stmt = lease_statement(self._dialect, database_clock=on_statement_clock)
        batch: list[OutboxMessage] = []
        webhooks = False
        core.suspects.clear()
        for provider in providers:
            limit = core.batch_size - len(batch)
            if limit <= 0:
                break
            params = core.lease_params(provider, limit, now)
            if settle is not None:
                applied, rows = self._direct.count_then_rows(conn, settle, (stmt, params))
                result.fenced += core.fenced(core.unsettled, applied)
                settle = None
            else:
                rows = self._direct.rows(conn, stmt, params)
            if not rows:
                continue
            if on_statement_clock:
                database_now = _naive_utc(rows[0][-1])
                core.follow_database(database_now)
                expires = database_now + core.lease
            else:
                expires = now + core.lease
            webhooks = webhooks or core.has_webhooks(rows)
            batch.extend(core.to_messages(rows, expires, self._dialect))
        if on_statement_clock and not batch:
            # Nothing leased, so no time came back: read it, so the worker's
            # time (gauges, the next cycle's settles) still follows the database.
            core.follow_database(conn.execute(database_now_statement(self._dialect)).scalar_one())
        if webhooks:
            core.set_gone(conn.execute(gone_receivers_statement()).all())
        batch.sort(key=_by_id)
        core.taken_over(result)
        if core.suspects or core.isolating:  # rare: see _isolate
            batch = self._isolate(conn, batch)
        return batch

    def _isolate(self, conn: Connection, batch: list[OutboxMessage]) -> list[OutboxMessage]:
        """A batch holding suspects (messages a worker that died held) becomes one
        suspect alone, the one with the fewest attempts; the rest is given back untried,
        in the lease's transaction.

        A message that kills the worker sending it (a crash in the delivery, the
        process killed for memory) takes down every message leased with it, and
        every lease counts an attempt: sent in batches again, it would spend its
        neighbours' retries with its own and dead-letter them all, most never
        sent. Alone, it spends only its own; a neighbour pays at most the
        attempt of the batch it was first leased in. Each cycle sends one
        suspect until none is left (a cycle's lease and give-back write rows
        that are not sent, but only after a worker died); each leased message is
        a head of its ordering key, so any of them may go first.
        """
        core = self._core
        suspects = set(core.suspects)
        # The suspect with the fewest attempts: one that keeps killing its worker
        # gains one per death and goes last, so the others are not held behind it.
        kept = min((m for m in batch if m.id in suspects), key=_by_attempts, default=None)
        was_isolating, core.isolating = core.isolating, kept is not None
        if kept is None or len(batch) == 1:
            return batch
        others = [m.id for m in batch if m is not kept]
        conn.execute(
            give_back_statement(self._dialect),
            {"p_ids": id_list(self._dialect, others), "p_owner": core.worker_id},
        )
        if not was_isolating:
            core.log.warning(
                "idis.outbox.suspects_isolated",
                msg="a worker stopped holding some of these messages: they are sent one at "
                "a time until each settles, so one that kills its worker spends only its "
                "own retries",
                suspects=len(suspects),
                message_id=kept.id,
                given_back=len(others),
            )
        return [kept]

    async def _refresh_gauges(self) -> None:
        from ._admin import refresh_gauges

        core = self._core
        now = core.now()
        await self._db.run(
            lambda conn: refresh_gauges(conn, core.metrics, providers=core.providers, now=now),
            hold=self._hold,
        )

    async def _renew(self, ids: list[int], now: datetime) -> set[int]:
        core = self._core
        params = {
            "p_ids": id_list(self._dialect, ids),
            "p_owner": core.worker_id,
            "p_expires": now + core.lease,
        }
        stmt = renew_statement(self._dialect)
        return await self._db.run(
            lambda conn: {int(r[0]) for r in conn.execute(stmt, params)}, hold=self._hold
        )

    async def _deliver_batch(self, batch: list[OutboxMessage]) -> list[_Outcome]:
        core = self._core
        out: list[_Outcome] = []
        ready = core.split_spent(batch, out)
        leases = _Leases(ready, core)
        renewing = asyncio.Lock()
        finished = asyncio.Event()
        settled: list[_Outcome | None] = [None] * len(ready)
        queue = iter(enumerate(ready))
        deliver = self.deliver
        delivered = core.delivered
        monotonic = _monotonic_of(core.clock)

        async def lane() -> None:
            # ``concurrency`` lanes take the batch's messages in order: at most
            # that many sends at once, a sliding window; distinct ordering keys
            # within a batch, so per-key order holds. No task per message, and
            # the common case (send, delivered) without a coroutine of its own.
            # ``now``: the monotonic time, read once after each send, for both
            # the delivery's record and the next message's renewal check (the
            # lane does not yield between them).
            now = monotonic()
            for index, message in queue:
                # A renewal due or running: wait for it (it may lose this lease).
                if renewing.locked() or leases.renewal_due(now):
                    async with renewing:
                        await self._keep_leases(leases)
                if (
                    self._stop_requested
                    or (leases.lost and message.id in leases.lost)
                    or core.gone_receivers
                ):
                    skipped = self._not_sent(message, leases)
                    if skipped is not None:
                        settled[index] = skipped
                        continue
                try:
                    await deliver(message)
                except Exception as exc:  # noqa: BLE001  # every failure is settled, none escapes
                    settled[index] = await self._failed(message, exc)
                    now = monotonic()
                else:
                    now = monotonic()
                    settled[index] = delivered(message, now)

        async def heartbeat(*, first: bool) -> None:
            # Renews while any send runs, even the only one of a batch of one.
            # Stopped by an event, never cancelled: a cancelled renewal would
            # leave the held connection mid-transaction.
            while True:
                if not first:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(finished.wait(), timeout=core.renew_check)
                first = False
                if finished.is_set():
                    return
                async with renewing:
                    await self._keep_leases(leases)

        # The heartbeat's task starts when its first check falls due (a timer,
        # not a task and a timeout per batch): a batch that is sent before
        # then, nearly every one, never needs it.
        loop = asyncio.get_running_loop()
        beat: list[asyncio.Task[None]] = []
        timer = loop.call_later(
            core.renew_check, lambda: beat.append(loop.create_task(heartbeat(first=True)))
        )
        try:
            lanes = min(core.concurrency, len(ready))
            if lanes == 1:
                await lane()
            elif lanes > 1:
                await asyncio.gather(*(lane() for _ in range(lanes)))
        finally:
            timer.cancel()
            finished.set()
            if beat:
                await beat[0]
        out.extend(filter(None, settled))
        return out

    def _not_sent(self, message: OutboxMessage, leases: _Leases) -> _Settlement | None:
        """The outcome of a message not to send (the worker stops, its lease was lost, its
        receiver is gone), or None: send it."""
        core = self._core
        if self._stop_requested or (leases.lost and message.id in leases.lost):
            return core.release(message, core.now())
        if core.gone_receivers:
            return core.skip_gone(message)
        return None

    async def _failed(self, message: OutboxMessage, exc: Exception) -> _Outcome:
        core = self._core
        failed_at = core.clock.monotonic()
        started = core.probe_due(message, exc)
        if started is not None:
            await self._probe(message.provider, started)
        return core.settle(message, exc, core.now(), failed_at=failed_at)

    async def _probe(self, provider: str, started: float) -> None:
        assert self._health is not None
        try:
            report = await self._health(provider)
        except Exception as exc:  # noqa: BLE001  # a failed probe is no evidence
            self._core.probed(provider, started, None, exc)
        except BaseException as exc:  # cancelled: recorded, then propagated
            self._core.probed(provider, started, None, exc)
            raise
        else:
            self._core.probed(provider, started, report, None)

    async def _keep_leases(self, leases: _Leases) -> None:
        core = self._core
        now = core.now()
        if not leases.open or not core.needs_renewal(leases.expires, now):
            return
        try:
            held = await self._renew(sorted(leases.open), now)
        except _DB_ERRORS as exc:
            held = set()
            core.log.warning(
                "idis.outbox.lease_renewal_failed",
                msg="could not renew outbox leases; the rest of the batch is given back",
                error=describe_error(exc),
            )
        leases.renewed(held, now + core.lease)

    def _settle_plan(self) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]] | None:
        """``write_params`` of the pending settlements, as of now; None when there are none."""
        core = self._core
        if not core.unsettled:
            return None
        return core.write_params(core.unsettled, core.now(), self._dialect)

    def _settle_of(self, delivered: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The delivered settle's statement, with its parameters."""
        return settle_delivered_statement(self._dialect, packed="p_keys" in delivered), delivered

    def _write_unsettled(self, conn: Connection, plan: Any = _UNPLANNED) -> int:
        """Write the pending settlements (``plan``: their ``_settle_plan``, when made);
        return how many were fenced off."""
        core = self._core
        items = core.unsettled
        if plan is _UNPLANNED:
            plan = self._settle_plan()
        if plan is None:
            return 0
        delivered, rows, receivers = plan
        applied = 0
        if delivered:
            applied += self._direct.count(conn, *self._settle_of(delivered))
        if rows:
            applied += conn.execute(settle_statement(), rows).rowcount
        for receiver in receivers:
            conn.execute(mark_receiver_statement(self._dialect), receiver)
        return core.fenced(items, applied)

    async def _final_flush(self) -> None:
        for attempt in range(_FLUSH_ATTEMPTS):
            try:
                await self._settle_now()
                return
            except StorageError as exc:
                delay = self._core.db_backoff(exc)
                if attempt < _FLUSH_ATTEMPTS - 1:
                    await asyncio.sleep(delay)
        self._core.flush_abandoned()

    async def _settle_now(self) -> int:
        if not self._core.unsettled:
            return 0
        try:
            fenced = await self._db.run(self._write_unsettled, hold=self._hold)
        except _DB_ERRORS as exc:
            raise _as_storage_error(exc) from exc
        self._core.unsettled.clear()
        return fenced


def _as_storage_error(exc: BaseException) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    return StorageError(
        f"outbox database unreachable or refused the statement: {describe_error(exc)}"
    )
