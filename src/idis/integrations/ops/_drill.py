"""``idis-integrations drill``: rehearse RB-09 end to end on the embedded defaults, in seconds.

The drill runs the real library against the real simulator over loopback HTTP:
a SQLite file in a temporary folder (or ``--database-url``), the simulator in a
thread of its own, and one event loop that runs what the example service runs
(``examples/integrations_service/runtime.py``): one async engine, one shared
``AsyncGateway`` with OAuth and a ``HealthSampler`` hooked to its breakers, the
``AsyncSyncService`` (sentinel, mode controller, poller) with its webhook
receiver served by uvicorn on that same loop, the ``AsyncOutboxWorker``, the
``AsyncEnricher`` and the ``AsyncDeferredEnrichmentWorker``. Every part reads
one manual clock. Two differences, both about time: the parts get the drill's
clock (and its seed), and the drill turns each loop once per tick
(``tick_all``, ``run_once``, ``sample``) instead of starting their ``run()``,
because a manual clock's waits advance it: a worker waiting for its next poll
would move the whole incident forward. A tick is ``--speed`` simulated
seconds, so a twenty-minute incident takes about eighty ticks.

The outage is built so that every way back is needed. Webhooks stop; the
provider's changes feed keeps events for :data:`FEED_RETENTION_TICKS` only
(the simulator's feed retention), and the outage lasts longer than that. The
events of the outage's first minutes then come back through nothing but
replay: without Recovery 3 (``--break reconcile``) they are lost and the drill
fails, naming them.

The drill's steps follow RB-09, one function each (:data:`STEPS`): healthy
traffic, Detection, Triage, Containment 1-4, the rest of the outage, Recovery
1-5 and Verification. Each step records its phase on the timeline, its markers
(alert, breaker, failover and return, token refresh, reconcile) and its checks.
A verification table and a summary end the run; the exit status is non-zero
when a check fails; an HTML report with the timeline chart is written.
``--break reconcile`` (or ``failover``, ``enrichment``) disables a piece on
purpose to show that the drill can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .._clock import ManualClock
from .._redact import mask_url
from ..config import (
    BreakerPolicy,
    OutboxSettings,
    RetryPolicy,
    Settings,
    SyncSettings,
    TimeoutPolicy,
)
from ..exceptions import ConfigError, IntegrationError, UsageError
from ..observability._metrics import Metrics
from ._drill_api import APIS, DrillApi, drill_api
from ._report import Check, Marker, Phase, Report, Series, render_html

__all__ = ["APIS", "BREAKABLE", "SCENARIOS", "STEPS", "DrillOptions", "DrillResult", "run_drill"]

T = TypeVar("T")

#: Outages the drill can rehearse.
SCENARIOS = ("full-outage", "rate-limit-storm", "token-revocation", "webhook-only")
#: Pieces ``--break`` can disable to prove the drill fails.
BREAKABLE = ("reconcile", "failover", "enrichment")

# The schedule, in ticks (``--speed`` simulated seconds each; 15 s by default).
#: Healthy traffic before the outage.
HEALTHY_TICKS = 8
#: From the provider failing to its recovery: longer than the feed retention below.
OUTAGE_TICKS = 48
#: How long the provider's changes feed serves an event (the simulator's feed retention):
#: the outage's first OUTAGE_TICKS - FEED_RETENTION_TICKS ticks come back by replay only.
FEED_RETENTION_TICKS = 16
#: The simulated seconds a tick lasts by default (``--speed``).
DEFAULT_SPEED = 15.0
#: The alert (docs/ops/alerts.yml): ``rate(...[15m]) > 0.05`` ``for: 5m``, in ticks of the
#: default 15 s, so that it keeps its shape at any speed. The drill's traffic is so much per
#: tick, so at another speed the threshold scales too (:func:`alert_threshold`).
ALERT_THRESHOLD = 0.05
ALERT_WINDOW_TICKS = 60
ALERT_FOR_TICKS = 20
#: The errors alert's name (RB-09's), and the rate-limit alert's (docs/ops/alerts.yml).
ERRORS_ALERT = "IDISIntegrationProviderErrors"
RATE_LIMIT_ALERT = "IDISIntegrationProviderRateLimited"
#: The rate-limit alert: more than this share of the attempts sent to a provider answered
#: HTTP 429 over 15m, and at least this many 429s in those 15m (a low-traffic provider's
#: one 429 is not a storm), for 5m (the same window and ``for`` as the errors alert). A
#: share and a count of one window do not depend on the drill's speed.
RATE_LIMIT_ALERT_SHARE = 0.25
RATE_LIMIT_ALERT_MIN_429S = 5
#: When the alert does not fire (tokens revoked, webhooks only), how long until someone
#: notices the missing sync, unless the sync service fails over first.
QUIET_DETECTION_TICKS = 8
#: Most ticks the steps after the outage may take (each waits at most this long).
RECOVERY_TICKS = 1 + 8 + 12 + 24 + 3
#: Upper bound of the ticks one drill runs, to place simulated time before the run.
MAX_TICKS = HEALTHY_TICKS + OUTAGE_TICKS + RECOVERY_TICKS
#: The deals the outbox pushes (seeded at the provider by ``--api`` drills: those APIs update).
DEALS = tuple(f"deal-{n}" for n in range(7))
#: Subjects PDL knows (``--api pdl``): more than the claims one drill enriches.
PDL_SUBJECTS = 120
#: Every n-th subject is unknown to PDL (404 not_found: an answer, not a failure).
PDL_NO_MATCH_EVERY = 10
#: Records deleted in the outage's first ticks (``--api`` hubspot/salesforce): their
#: deletions are seen by no poll, only by Recovery 3.
OUTAGE_DELETIONS = 3
#: Drive watch channels (``--api gdrive``): how long one lives, and how long before its
#: expiry the host's scheduler opens the next. In the outage renewal fails and the
#: channel lapses without a word: the webhook loss RB-09's failover exists for.
CHANNEL_TTL_TICKS = 8
CHANNEL_MARGIN_TICKS = 3
#: Real seconds a tick waits for the simulator's webhooks to be delivered (it returns as
#: soon as they are; a webhook left in flight would race the clock on a busy machine).
FLUSH_TIMEOUT = 30.0

_drill_meta = MetaData()
#: The drill's stand-in for the host's data: every application of every event.
applied_table = Table(
    "drill_applied_events",
    _drill_meta,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("record_id", String(255), nullable=False),
    Column("version", Integer, nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    # What --api drills count by (record states, not the provider's event ids).
    Column("event_type", String(64), nullable=True),
    Column("occurred_at", DateTime(timezone=True), nullable=True),
)


@dataclass(frozen=True, slots=True)
class DrillOptions:
    """How to run the drill. Every field is validated in ``__post_init__``."""

    #: One of :data:`SCENARIOS`.
    scenario: str = "full-outage"
    #: The CRM provider whose outage is rehearsed.
    provider: str = "crm_provider"
    #: The enrichment provider (also down in a full outage).
    enrichment_provider: str = "enrichment_provider"
    #: Simulated seconds per tick: larger is faster and coarser.
    speed: float = DEFAULT_SPEED
    #: Seed for the simulator's faults and the verification sample.
    seed: int = 7
    #: Run against this database instead of a temporary SQLite file.
    database_url: str | None = None
    #: Where to write the HTML report (None: do not write one).
    report_path: Path | None = Path("drill-report.html")
    #: Pieces disabled on purpose (see :data:`BREAKABLE`).
    broken: frozenset[str] = frozenset()
    #: Changes the provider emits per tick.
    events_per_tick: int = 2
    #: The provider API (pack) rehearsed: one of :data:`APIS` (see ``_drill_api``).
    api: str = "generic"

    def __post_init__(self) -> None:
        def invalid(flag: str, value: str, expected: str) -> ConfigError:
            return ConfigError(f"{flag}={value} is not valid{expected}", variable=flag)

        if self.api not in APIS:
            raise invalid("--api", repr(self.api), f": expected one of {', '.join(APIS)}")
        if self.scenario == "webhook-only" and not drill_api(self.api).failover:
            why = drill_api(self.api).no_failover
            raise invalid("--scenario", self.scenario, f" with --api={self.api}: {why}")
        if self.scenario not in SCENARIOS:
            expected = f": expected one of {', '.join(SCENARIOS)}"
            raise invalid("--scenario", repr(self.scenario), expected)
        if not 1 <= self.speed <= 120:
            expected = ": expected simulated seconds per tick between 1 and 120"
            raise invalid("--speed", repr(self.speed), expected)
        unknown = set(self.broken) - set(BREAKABLE)
        if unknown:
            expected = f": expected one of {', '.join(BREAKABLE)}"
            raise invalid("--break", ", ".join(sorted(unknown)), expected)


def alert_threshold(speed: float) -> float:
    """The alert's 0.05 errors/s, for the drill's traffic at ``speed`` seconds per tick."""
    return ALERT_THRESHOLD * DEFAULT_SPEED / speed


@dataclass(frozen=True, slots=True)
class DrillSummary:
    """The drill's outcome in numbers (what the CLI prints last)."""

    checks_passed: int
    checks_failed: int
    #: Events the provider emitted (its event log).
    emitted: int
    #: Events the host applied exactly once.
    applied_once: int
    #: Ids of events the host never applied, and of those it applied more than once.
    lost: tuple[str, ...]
    doubled: tuple[str, ...]
    #: Events reconcile applied (None: it did not run).
    reconcile_applied: int | None
    #: Outbox messages given up on.
    dead_letters: int
    #: Checks this provider API cannot make (each says why in the table).
    checks_not_applicable: int = 0
    #: Records the resync by id applied (None: it did not run; ``--api hubspot``).
    resync_applied: int | None = None
    #: Records at the provider, when events are counted by record state (``--api`` with
    #: derived ids): ``lost`` then names records, ``applied_once`` counts event ids.
    records: int | None = None

    def lines(self) -> list[str]:
        """The summary as a few lines of text."""
        replayed = (
            "not run" if self.reconcile_applied is None else f"{self.reconcile_applied} applied"
        )
        na = f", {self.checks_not_applicable} not applicable" if self.checks_not_applicable else ""
        lines = [
            f"checks: {self.checks_passed} passed, {self.checks_failed} failed{na}",
            f"events: {self.emitted} emitted, {self.applied_once} applied once, "
            f"{len(self.lost)} lost, {len(self.doubled)} applied twice"
            if self.records is None
            else f"records: {self.records} at the provider, {self.records - len(self.lost)} at "
            f"their latest state, {len(self.lost)} lost; events: {self.emitted} emitted, "
            f"{self.applied_once} applied once, {len(self.doubled)} applied twice",
            f"reconcile: {replayed}",
            *([] if self.resync_applied is None else [f"resync: {self.resync_applied} applied"]),
            f"dead letters: {self.dead_letters}",
        ]
        if self.lost:
            lines.append(f"lost: {id_ranges(self.lost)}")
        if self.doubled:
            lines.append(f"applied twice: {id_ranges(self.doubled)}")
        return lines


@dataclass(slots=True)
class DrillResult:
    """The outcome of one drill."""

    report: Report
    report_path: Path | None
    database_url: str
    summary: DrillSummary

    @property
    def ok(self) -> bool:
        """Whether every verification check passed."""
        return self.report.ok


def id_ranges(ids: Sequence[str]) -> str:
    """``evt_3-evt_7, evt_9``: provider event ids (``<prefix><n>``) as runs."""
    numbered: list[tuple[str, int]] = []
    others: list[str] = []
    for event_id in ids:
        match = re.fullmatch(r"(.*?)(\d+)", event_id)
        if match is None:
            others.append(event_id)
        else:
            numbered.append((match[1], int(match[2])))
    runs = []
    # In a run, number minus position is one constant: consecutive ids group together.
    for _, group in groupby(
        enumerate(sorted(numbered)), lambda i_n: (i_n[1][0], i_n[1][1] - i_n[0])
    ):
        run = [id_ for _, id_ in group]
        (prefix, first), (_, last) = run[0], run[-1]
        runs.append(f"{prefix}{first}" + (f"-{prefix}{last}" if last > first else ""))
    return ", ".join(runs + sorted(others))


# --------------------------------------------------------------------------- the record


def _clock_label(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"T+{minutes:02d}:{secs:02d}"


class _Record:
    """What the drill saw, on its clock: phases, markers, notes, checks and chart samples."""

    def __init__(self, clock: ManualClock, echo: Callable[[str], None]) -> None:
        self.clock = clock
        self.start = clock.now()
        self.echo = echo
        #: The report, filled as the drill goes (its title, end and chart come last: _report).
        self.report = Report(title="", subtitle="", started_at=self.start)
        self.series: dict[str, list[tuple[float, float]]] = {}
        self._notes: list[str] = []

    @property
    def t(self) -> float:
        """Simulated seconds since the drill started."""
        return (self.clock.now() - self.start).total_seconds()

    def note(self, text: str, *, echo: bool = True) -> None:
        """A line of the story: printed, listed under the current phase and in the events."""
        self.report.events.append((self.t, text))
        self._notes.append(text)
        if echo:
            self.echo(f"  [{_clock_label(self.t)}] {text}")

    def mark(self, kind: str, label: str, note: str | None = None) -> None:
        """A moment drawn on the chart (and told as a note)."""
        self.report.markers.append(Marker(self.t, label, kind))
        self.note(note or label)

    @contextlib.contextmanager
    def phase(self, name: str, short: str = "") -> Iterator[None]:
        """Record ``name`` from now to the end of the ``with`` block."""
        self.echo(f"== {name}")
        start, self._notes = self.t, []
        try:
            yield
        finally:
            self.report.phases.append(Phase(name, start, self.t, tuple(self._notes), short))

    def check(self, name: str, expected: str, actual: str, ok: bool) -> None:
        """One row of the verification table."""
        self.report.checks.append(Check(name, expected, actual, ok))

    def not_applicable(self, name: str, why: str) -> None:
        """A row for a check this provider API cannot make, saying why (never a silent pass)."""
        self.report.checks.append(Check(name, "not applicable", why, True, applicable=False))

    def sample(self, name: str, value: float) -> None:
        """One point of a chart series, now."""
        self.series.setdefault(name, []).append((self.t, value))


# --------------------------------------------------------------------------- settings


def _drill_settings(base: Settings, options: DrillOptions) -> Settings:
    """Policies compressed to the drill's clock: thresholds in ticks, not hours."""
    step = options.speed
    providers = {}
    for name, provider in base.providers.items():
        providers[name] = replace(
            provider,
            # Real seconds (the deadline is the drill's clock's). No fault of the drill hangs a
            # request (a full outage's 503s come before its timeouts), so a timeout here could
            # only be the machine's load: at 0.5 s a busy machine timed a push out at the
            # provider's return, and that run opened the breaker and diverged from the others.
            timeouts=TimeoutPolicy(connect=2.5, read=2.5, write=2.5, pool=2.5, deadline=3.0),
            retry=RetryPolicy(
                max_attempts=2,
                initial_backoff=0.05,
                max_backoff=0.2,
                retry_after_cap=step,
                budget_min_retries=5,
            ),
            breaker=BreakerPolicy(
                failure_threshold=3,
                failure_rate=0.5,
                minimum_calls=4,
                window=step * 8,
                reset_timeout=step * 4,
                half_open_max_calls=1,
            ),
        )
    sync = SyncSettings(
        # An API without webhooks in the drill is polled throughout (CRM_MODE=polling).
        crm_mode="webhook" if drill_api(options.api).failover else "polling",
        crm_poll_interval=timedelta(seconds=step * 2),
        auto_failover="failover" not in options.broken,
        lag_threshold=timedelta(seconds=step * 4),
        stable_period=timedelta(seconds=step * 8),
        sentinel_interval=timedelta(seconds=step),
        poll_overlap=timedelta(seconds=step * 2),
        signature_failure_threshold=10,
        lock_timeout=timedelta(seconds=15),
        page_size=500,
    )
    outbox = OutboxSettings(
        max_retries=50,
        batch_size=50,
        lease=timedelta(seconds=step * 4),
        poll_interval=timedelta(seconds=1),
        initial_backoff=timedelta(seconds=step),
        max_backoff=timedelta(seconds=step * 4),
    )
    enrichment = replace(
        base.enrichment,
        defer_on_error="enrichment" not in options.broken,
        provider=options.enrichment_provider,
    )
    return replace(base, providers=providers, sync=sync, outbox=outbox, enrichment=enrichment)


@dataclass(frozen=True, slots=True)
class _Expect:
    """What a scenario should make the library do (by default, what a full outage makes it do)."""

    #: The provider's calls fail: errors counted, the alert fires, the breaker opens.
    alert: bool = True
    failover: bool = True
    deferral: bool = True
    outbox_hold: bool = True
    token: bool = False
    #: The provider answers 429 with Retry-After: the rate-limit alert detects it too (the
    #: library's pauses can hold the errors alert at its threshold: polling alone, Salesforce).
    rate_limit_alert: bool = False
    #: Nothing reaches the host during the outage (webhooks stopped, every poll fails),
    #: so replay must bring back what the feed no longer serves.
    replay: bool = True


_EXPECT = {
    "full-outage": _Expect(),
    "rate-limit-storm": _Expect(rate_limit_alert=True),
    "token-revocation": _Expect(alert=False, failover=False, token=True),
    "webhook-only": _Expect(alert=False, deferral=False, outbox_hold=False, replay=False),
}


# --------------------------------------------------------------------------- the parts


@dataclass(slots=True)
class _Alert:
    """One alert rule as Prometheus runs it: pending while its expression holds, then firing."""

    #: When the expression last turned true (None: false now, or fired).
    true_at: float | None = None
    #: When it fired (the drill keeps the first time).
    fired_at: float | None = None


@dataclass(slots=True)
class _Findings:
    """What one step learns and a later one checks."""

    outage_start: datetime | None = None
    #: The alert rules the drill evaluates, by name (errors, rate limits).
    alerts: dict[str, _Alert] = field(
        default_factory=lambda: {ERRORS_ALERT: _Alert(), RATE_LIMIT_ALERT: _Alert()}
    )
    reconciled: Any = None
    emitted: int = 0
    applied_once: int = 0
    lost: tuple[str, ...] = ()
    doubled: tuple[str, ...] = ()
    dead_letters: int = 0
    #: The sim's webhook deliveries when the provider came back.
    webhooks_at_recovery: int = 0
    log_lines: Counter[str] = field(default_factory=Counter)
    enrichment: Counter[str] = field(default_factory=Counter)
    refreshed_claims: int = 0
    #: Subjects PDL answered 404 not_found for (``--api pdl``).
    no_match: list[str] = field(default_factory=list)
    #: Records deleted during the outage (``--api`` with deletions).
    deleted: list[str] = field(default_factory=list)
    #: The resync that followed the replay (``--api hubspot``).
    resynced: Any = None
    #: The records at the provider (``--api`` counting by record state).
    records: int | None = None


class _Stage:
    """The parts the drill runs (built as the example service builds them) and one tick."""

    def __init__(self, options: DrillOptions, record: _Record, metrics: Metrics) -> None:
        self.options = options
        self.record = record
        self.metrics = metrics
        self.clock = record.clock
        #: What ``--api`` changes (nothing for the default drill).
        self.api: DrillApi = drill_api(options.api)
        self.provider = self.api.rehearsed(options.provider)
        self.enrich_provider = options.enrichment_provider
        self.expect = _EXPECT[options.scenario]
        self.found = _Findings()
        self.ticks = 0
        self.claims = 0
        self.deal_version = 0
        self.mode = "webhook" if self.api.failover else "polling"
        self.breaker = "closed"
        self._errors: list[tuple[float, dict[tuple[str, str, str], float]]] = []
        #: Per tick, by provider: 429s the provider answered, and attempts sent.
        self._limits: list[tuple[float, dict[str, tuple[float, float]]]] = []
        # Set by build().
        self.database_url = ""
        self.engine: Any = None
        self.async_engine: AsyncEngine = None  # type: ignore[assignment]  # set by build()
        self.settings: Settings = None  # type: ignore[assignment]  # set by build()
        self.sim: Any = None
        self.gateway: Any = None
        self.sampler: Any = None
        self.service: Any = None
        self.outbox: Any = None
        self.enricher: Any = None
        self.deferred: Any = None
        self.registry: Any = None
        #: The receiver's socket, bound early when its URL must be known (HubSpot v3).
        self._receiver_socket: socket.socket | None = None
        self.receiver_url = ""
        #: The open Drive watch channel (``--api gdrive``), and notifications delivered.
        self.channel: Any = None
        self.notifications_delivered = 0
        self._renewal_failed = False

    # ------------------------------------------------------------------ building

    async def build(
        self, stack: contextlib.AsyncExitStack, on_database: Callable[[str], None]
    ) -> None:
        """Database, simulator, settings, then the service's parts (the example's order)."""
        from ..db._engine import create_async_db_engine, create_db_engine
        from ..db._migrate import upgrade

        url = self.options.database_url
        if not url:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="idis-drill-"))
            url = f"sqlite:///{Path(folder) / 'drill.sqlite3'}"
        self.database_url = url
        on_database(url)
        await asyncio.to_thread(upgrade, url)
        # The sync engine is for the operator's commands (run in threads, as scripts).
        self.engine = create_db_engine(url)
        stack.callback(self.engine.dispose)
        await asyncio.to_thread(_drill_meta.drop_all, self.engine)
        await asyncio.to_thread(_drill_meta.create_all, self.engine)
        self.async_engine = create_async_db_engine(url)
        stack.push_async_callback(self.async_engine.dispose)
        await self._start_simulator(stack)
        await self._start_service(stack)

    async def _start_simulator(self, stack: contextlib.AsyncExitStack) -> None:
        from cryptography.fernet import Fernet

        from ..config import Secret
        from ..testing import run_simulator, simulator_settings

        options = self.options
        sim = self.sim = stack.enter_context(run_simulator(clock=self.clock.now, seed=options.seed))
        base = simulator_settings(
            sim.url,
            providers=sorted({self.provider, self.enrich_provider, "docs_provider"}),
            database_url=self.database_url,
            encryption_keys=(Secret(Fernet.generate_key().decode()),),
        )
        base = self.api.configure(base, self.provider, self.enrich_provider)
        if self.api.webhook_format == "hubspot":
            # HubSpot signs the full URL it calls (v3): the receiver must know its own.
            self._receiver_socket = stack.enter_context(contextlib.closing(_loopback_socket()))
            port = self._receiver_socket.getsockname()[1]
            base = base.with_providers(
                replace(base.provider(self.provider), webhook_public_url=f"http://127.0.0.1:{port}")
            )
        self.settings = _drill_settings(base, options)
        if self.api.feed_retention:
            await self.blocking(
                sim.control.set_feed_retention, self.provider, FEED_RETENTION_TICKS * options.speed
            )
        if not self.api.generic:
            await self._seed()
        temporary = "" if options.database_url else " (temporary: deleted after the drill)"
        self.record.report.facts += [
            ("database", mask_url(self.database_url) + temporary),
            ("scenario", options.scenario),
            ("provider", self.provider),
            ("simulator", sim.url),
            ("simulated seconds per tick", f"{options.speed:g}"),
            (
                "provider's changes feed keeps",
                f"{FEED_RETENTION_TICKS * options.speed:g} s "
                f"(the outage lasts {OUTAGE_TICKS * options.speed:g} s)"
                if self.api.feed_retention
                else "not applicable: this API serves current states or a durable feed",
            ),
            ("broken on purpose", ", ".join(sorted(options.broken)) or "nothing"),
        ]
        if not self.api.generic:
            self.record.report.facts.append(
                ("provider API (--api)", f"{self.api.name}: {self.api.about}")
            )

    async def _seed(self) -> None:
        """What a dialect needs at the provider before traffic starts (``--api`` only).

        The deals the outbox updates exist (HubSpot, Salesforce and Drive update,
        they do not create); PDL knows the claims' subjects, except every
        :data:`PDL_NO_MATCH_EVERY`-th, which it answers 404 ``not_found`` for.
        """
        control = self.sim.control
        if self.api.sync_api != "generic":
            await self.blocking(
                control.emit,
                self.provider,
                len(DEALS),
                record_ids=list(DEALS),
                tenant_ids=["tenant-a"],
                webhook=False,
            )
        if self.api.enrichment_api == "pdl":
            subjects = [f"claim-{n}" for n in range(1, PDL_SUBJECTS + 1)]
            await self.blocking(
                control.emit,
                self.enrich_provider,
                len(subjects),
                record_ids=subjects,
                webhook=False,
            )
            await self._pdl_control(
                no_match=[s for n, s in enumerate(subjects, 1) if n % PDL_NO_MATCH_EVERY == 0]
            )

    async def _sim_post(self, path: str, timeout: float = 5.0, **request: Any) -> Any:
        """POST to a dialect's own knob at the simulator (not the control API); its JSON, if any."""
        from .._http import httpx

        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            answer = await client.post(f"{self.sim.url}/p/{path}", **request)
            answer.raise_for_status()
            return answer.json() if answer.content else None

    async def drive_silence(self, on: bool) -> None:
        """The simulator's Drive channels stop (or resume) notifying, without a word."""
        await self._sim_post(f"{self.provider}/drive/_silence", params={"on": str(on).lower()})

    async def _pdl_control(self, **body: Any) -> None:
        """The simulator's PDL knobs (credits, no-match subjects)."""
        await self._sim_post(f"{self.enrich_provider}/v5/_control", json=body)

    async def _start_service(self, stack: contextlib.AsyncExitStack) -> None:
        """The example service's ``Runtime._start``, on the drill's clock (see the module doc).

        Every part registers its cleanup as it is created, so the stack undoes
        exactly what started, in reverse order.
        """
        from ..auth._httpx_auth import oauth_auth_factory
        from ..enrichment import AsyncDeferredEnrichmentWorker, AsyncEnricher
        from ..outbox import AsyncOutboxWorker
        from ..resilience import AsyncGateway, HealthSampler

        settings, engine, clock, metrics = (
            self.settings,
            self.async_engine,
            self.clock,
            self.metrics,
        )
        # What the sync service and the workers share: the engine, the metrics, the clock.
        shared: dict[str, Any] = {"engine": engine, "metrics": metrics, "clock": clock}
        # Seeded like the gateway: the jitter of token retries and of the hold after a failed
        # refresh would otherwise change how many refreshes a run attempts (token-revocation).
        auth = oauth_auth_factory(
            settings, async_engine=engine, metrics=metrics, clock=clock, seed=self.options.seed
        )
        stack.push_async_callback(auth.aclose)
        gateway_auth: Any = auth
        if not self.api.generic:
            from ..providers._pack import pack_auth

            # Each provider's pack decides: PDL's API key, OAuth for the others.
            gateway_auth = pack_auth(auth)
        self.sampler = HealthSampler(engine=engine, clock=clock, interval=self.options.speed)
        stack.push_async_callback(self.sampler.flush)
        self.gateway = gateway = AsyncGateway(
            settings,
            metrics=metrics,
            auth=gateway_auth,
            on_transition=[self.sampler.on_transition],
            clock=clock,
            sleep=clock.asleep,
            seed=self.options.seed,
        )
        stack.push_async_callback(gateway.aclose)
        await self._start_sync(stack, shared)
        # The library's own delivery (AsyncGatewayDelivery); the example wraps it to keep
        # its deals' crm_sync_status, which the drill's host has no column for.
        jitter = random.Random(self.options.seed)  # noqa: S311  # jitter, not cryptography
        self.outbox = AsyncOutboxWorker(settings=settings, gateway=gateway, rng=jitter, **shared)
        self.enricher = AsyncEnricher(settings, gateway, **shared)
        self.deferred = AsyncDeferredEnrichmentWorker(
            settings, gateway, seed=self.options.seed, on_refreshed=[self._refreshed], **shared
        )
        parts = [gateway, self.sampler, self.service, self.service.receiver]
        parts += [self.outbox, self.enricher, self.deferred]
        self.record.report.facts.append(
            ("service parts (one event loop)", ", ".join(type(p).__name__ for p in parts))
        )

    async def _start_sync(self, stack: contextlib.AsyncExitStack, shared: dict[str, Any]) -> None:
        """The sync service, its webhook receiver served on this loop, the simulator aimed at it."""
        from ..sync import AsyncSyncService, HandlerRegistry

        self.registry = HandlerRegistry()
        for event_type in ("record.created", "record.updated", "record.deleted"):
            self.registry.register(event_type, self._apply)
        self.service = AsyncSyncService(
            self.settings,
            gateway=self.gateway,
            registry=self.registry,
            replica_id="drill",
            # The default drill syncs the crm providers; Drive's is a documents provider.
            providers=None if self.api.generic else [self.provider],
            **shared,
        )
        stack.push_async_callback(self.service.aclose)
        url = await stack.enter_async_context(
            _serve_here(self.service.asgi_app(), self._receiver_socket)
        )
        self.receiver_url = url
        if not self.api.webhooks or self.api.notifications:
            return  # Drive: the channel is opened by the first tick's renewal
        secret = self.settings.provider(self.provider).webhook_secrets[0].get_secret_value()
        await self.blocking(
            self.sim.control.set_webhook_target,
            self.provider,
            f"{url}/{self.provider}",
            [secret],
            format=self.api.webhook_format,  # None: the simulator's default (Standard Webhooks)
        )

    def _apply(self, session: Any, event: Any) -> None:
        """The host's handler: one row per application (so a double shows)."""
        session.execute(
            insert(applied_table).values(
                event_id=event.id,
                record_id=event.record_id,
                version=event.version,
                applied_at=self.clock.now(),
                event_type=event.type,
                occurred_at=event.occurred_at,
            )
        )

    def _refreshed(self, _subject: Any, _result: Any) -> None:
        """The host's on_refreshed callback (the example copies the data onto the claim)."""
        self.found.refreshed_claims += 1

    # ------------------------------------------------------------------ running things

    async def blocking(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking call in a thread: a simulator control call (the receiver on this loop
        must answer) or an operator's command (a sync maintenance function, as a script runs it)."""
        return await asyncio.to_thread(call, *args, **kwargs)

    async def script(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """An operator's script (resync, timeline, verify-sync) on the drill's settings,
        database and clock."""
        return await self.blocking(
            call, *args, settings=self.settings, engine=self.engine, clock=self.clock, **kwargs
        )

    async def maintain(self, call: Callable[..., T], *args: Any) -> T:
        """A maintenance command on the drill's database, audited as ``drill``, at clock time."""
        return await self.blocking(
            call,
            *args,
            settings=self.settings,
            engine=self.engine,
            actor="drill",
            now=self.clock.now(),
        )

    async def tick(self, *, emit: bool = True) -> None:
        """One tick: provider changes, every loop once, the samples; then the clock moves."""
        options, control = self.options, self.sim.control
        self.ticks += 1
        if emit:
            await self.blocking(
                control.emit,
                self.provider,
                options.events_per_tick,
                tenant_ids=["tenant-a", "tenant-b"],
            )
        await self.blocking(control.flush_webhooks, self.provider, timeout=FLUSH_TIMEOUT)
        if self.api.notifications:
            await self._drive_push()
        reports = await self.service.tick_all()
        # --api drills push nothing in Verification's quiet ticks: a poll reads the last push.
        if self.ticks % 2 == 0 and (emit or self.api.generic):
            await self._push_deal()
        await self.outbox.run_once()
        # The pushes change records at the provider, whose webhooks would otherwise race the
        # clock: one applied after it moved is "replayed" by a reconcile that starts first.
        await self.blocking(control.flush_webhooks, self.provider, timeout=FLUSH_TIMEOUT)
        if self.ticks % 3 == 0:
            await self.enrich_claim()
        await self.deferred.run_once()
        self.sampler.sample(self.gateway.snapshot, self.settings.providers)
        await self.sampler.flush()
        await self._observe(reports)
        self.clock.advance(options.speed)

    async def _drive_push(self) -> None:
        """Drive (``--api gdrive``): what Drive pushes to the channel's address arrives at
        the receiver (the simulator's ``_push``, once a tick), and the host renews its watch
        channel on schedule."""
        from ..exceptions import AuthError, ProviderError

        feed = self.service.feeds[self.provider]
        address = f"{self.receiver_url}/{self.provider}"
        token = self.settings.provider(self.provider).webhook_secrets[0].get_secret_value()
        step = self.options.speed
        # First what Drive pushed since the last tick (it pushes at once: before any renewal
        # below stops the channel that would have sent it). The simulator POSTs each
        # notification to its channel's address, this receiver, served on this loop.
        pushed = await self._sim_post(f"{self.provider}/drive/_push", timeout=60.0)
        self.notifications_delivered += sum(
            1 for sent in pushed["pushed"] if sent.get("status") == 200
        )
        previous = self.channel
        try:
            self.channel = await feed.renew(
                self.channel,
                address,
                token,
                margin=timedelta(seconds=step * CHANNEL_MARGIN_TICKS),
                ttl=timedelta(seconds=step * CHANNEL_TTL_TICKS),
            )
        except (ProviderError, AuthError) as exc:
            if not self._renewal_failed:
                self.record.note(f"Drive channel renewal failed ({type(exc).__name__}): it lapses")
            self._renewal_failed = True
        else:
            if self.channel is not previous:
                what = "opened" if previous is None else "renewed before expiry"
                if self._renewal_failed:
                    what = "opened again (the last one lapsed in the outage)"
                self.record.note(f"Drive watch channel {what}")
                self._renewal_failed = False

    async def ticks_until(self, done: Callable[[], Awaitable[bool]], limit: int) -> bool:
        """Tick until ``done()`` (checked before each tick) or ``limit`` ticks; whether done."""
        for _ in range(limit):
            if await done():
                return True
            await self.tick()
        return await done()

    async def drained(self) -> bool:
        """Whether the outbox holds nothing undelivered for the provider."""
        pending, _ = await self.outbox_counts()
        return pending == 0

    async def _push_deal(self) -> None:
        """A host change pushed to the CRM through the outbox (a deal's stage)."""
        from ..outbox import NewMessage, enqueue_async
        from ..providers import pack_for

        self.deal_version += 1
        deal = f"deal-{self.deal_version % 7}"
        # The pack's update call (generic PUT record, HubSpot PATCH properties, Salesforce
        # PATCH fields, Drive PATCH appProperties): what a host pushes with that API.
        settings = self.settings.provider(self.provider)
        call = pack_for(settings).update_call(settings, deal, {"stage": f"v{self.deal_version}"})
        if self.api.sync_api == "generic":
            call["json"] = {"tenant_id": "tenant-a", **call["json"]}  # the record's tenant
        message = NewMessage.request(
            self.provider,
            idempotency_key=f"{deal}-v{self.deal_version}",
            ordering_key=deal,
            tenant_id="tenant-a",
            **call,
        )
        async with AsyncSession(self.async_engine) as session, session.begin():
            await enqueue_async(session, message, now=self.clock.now())

    async def enrich_claim(self) -> None:
        """A claim enriched as the host's request path does it."""
        self.claims += 1
        try:
            result = await self.enricher.enrich(
                f"claim-{self.claims}", tenant_id=f"tenant-{self.claims % 3}"
            )
            self.found.enrichment[str(result.status)] += 1
        except IntegrationError as exc:
            if self.api.enrichment_api == "pdl" and getattr(exc, "status_code", None) == 404:
                # PDL's 404 not_found: an answer about the subject, not a failure.
                self.found.enrichment["no match"] += 1
                self.found.no_match.append(f"claim-{self.claims}")
                return
            self.found.enrichment[f"error: {type(exc).__name__}"] += 1

    # ------------------------------------------------------------------ observing

    async def _observe(self, reports: Sequence[Any]) -> None:
        """Chart samples, and markers for what changed this tick."""
        record = self.record
        mode = next((str(r.mode) for r in reports if r.mode is not None), self.mode)
        if mode != self.mode:
            label = "failover: polling" if mode == "polling" else "back to webhooks"
            record.mark("mode", label, f"sync mode {self.mode} -> {mode}")
            self.mode = mode
        state = self.gateway.breaker_state(self.provider)
        if state != self.breaker:
            # Half-open trials are on the breaker line; the markers are open and closed.
            if state == "closed" or (state, self.breaker) == ("open", "closed"):
                record.mark("breaker", f"breaker {state}", f"breaker {self.breaker} -> {state}")
            self.breaker = state
        self._count_errors()
        rates = self.error_rates(alerting=True)
        self._alert_transitions(rates)
        self._rate_limit_transitions(self.rate_limited_shares())
        emitted = await self.emitted()
        applied = len(await self.applications())
        pending, dead = await self.outbox_counts()
        record.sample("error rate", round(rates[0][2] if rates else 0.0, 4))
        record.sample("breaker", {"closed": 0, "half_open": 1, "open": 2}[state])
        record.sample("sync mode", 1 if mode == "polling" else 0)
        record.sample("events not applied", max(0, emitted - applied))
        record.sample("outbox pending", pending)
        record.sample("dead letters", dead)
        record.sample("open defects", len(await self.open_defects()))

    def _samples(self, name: str) -> Iterator[Any]:
        """The samples of metric ``name`` (every label set) in the drill's registry."""
        for family in self.metrics.registry.collect():
            yield from (sample for sample in family.samples if sample.name == name)

    def _count_errors(self) -> None:
        """Keep ``integration_errors_total`` by (provider, endpoint, error_type), per tick."""
        counts = {
            (s.labels["provider"], s.labels["endpoint"], s.labels["error_type"]): s.value
            for s in self._samples("integration_errors_total")
        }
        self._errors.append((self.record.t, counts))
        limits: dict[str, tuple[float, float]] = {}
        for sample in self._samples("integration_rate_limited_total"):
            if sample.labels["source"] == "provider":
                refused, sent = limits.get(sample.labels["provider"], (0.0, 0.0))
                limits[sample.labels["provider"]] = (refused + sample.value, sent)
        for sample in self._samples("integration_request_duration_seconds_count"):
            refused, sent = limits.get(sample.labels["provider"], (0.0, 0.0))
            limits[sample.labels["provider"]] = (refused, sent + sample.value)
        self._limits.append((self.record.t, limits))

    def calls(self) -> tuple[float, float]:
        """The provider's successful calls and failed attempts so far (its metrics)."""

        def total(name: str, **labels: str) -> float:
            wanted = {"provider": self.provider, **labels}
            samples = self._samples(name)
            return float(sum(s.value for s in samples if wanted.items() <= s.labels.items()))

        ok = total("integration_requests_total", outcome="success")
        return ok, total("integration_errors_total")

    def error_rates(self, *, alerting: bool = False) -> list[tuple[str, str, float]]:
        """``sum by (provider, endpoint) (rate(integration_errors_total[15m]))``, highest first.

        RB-09 Triage 1's query; ``alerting``: the alert's, which leaves out
        ``error_type="client_error"`` (our own bad requests, docs/runbook.md).
        """
        if len(self._errors) < 2:
            return []
        now, counts = self._errors[-1]
        window = ALERT_WINDOW_TICKS * self.options.speed
        t0, before = next(p for p in self._errors if p[0] >= now - window)
        if now <= t0:
            return []
        sums: dict[tuple[str, str], float] = {}
        for (provider, endpoint, kind), value in counts.items():
            if not (alerting and kind == "client_error"):
                rate = (value - before.get((provider, endpoint, kind), 0.0)) / (now - t0)
                sums[(provider, endpoint)] = sums.get((provider, endpoint), 0.0) + rate
        ranked = sorted(sums.items(), key=lambda item: -item[1])
        return [(p, e, rate) for (p, e), rate in ranked if rate > 0]

    def rate_limited_shares(self) -> list[tuple[str, float, float]]:
        """The rate-limit alert's terms by provider, highest share first: the share of the
        attempts sent that the provider answered 429, and the 429s, over the alert's window.

        ``sum by (provider) (rate(integration_rate_limited_total{source="provider"}[15m]))
        / sum by (provider) (rate(integration_request_duration_seconds_count[15m]))`` and
        ``sum by (provider) (increase(integration_rate_limited_total{source="provider"}[15m]))``.
        """
        if len(self._limits) < 2:
            return []
        now, counts = self._limits[-1]
        window = ALERT_WINDOW_TICKS * self.options.speed
        t0, before = next(p for p in self._limits if p[0] >= now - window)
        shares = []
        for provider, (refused, sent) in counts.items():
            refused_before, sent_before = before.get(provider, (0.0, 0.0))
            attempts = sent - sent_before
            limited = refused - refused_before
            if now > t0 and attempts > 0 and limited > 0:
                shares.append((provider, limited / attempts, limited))
        return sorted(shares, key=lambda share: -share[1])

    def _hold(self, name: str, true: bool, pending: str) -> None:
        """An alert's expression this tick: pending when it turns true (``pending`` is told),
        firing once it held 5m (:data:`ALERT_FOR_TICKS`), back to inactive when it turns false."""
        alert, record = self.found.alerts[name], self.record
        if not true:
            alert.true_at = None
            return
        if alert.true_at is None:
            alert.true_at = record.t
            if alert.fired_at is None:
                record.note(f"{pending}: pending, fires if it holds 5m")
        held = record.t - alert.true_at
        if alert.fired_at is None and held >= ALERT_FOR_TICKS * self.options.speed:
            alert.fired_at = record.t
            label = "alert fires" if name == ERRORS_ALERT else "rate-limit alert fires"
            record.mark("alert", label, f"alert {name} FIRING")

    def _alert_transitions(self, rates: Sequence[tuple[str, str, float]]) -> None:
        """``> 0.05`` for 5m: pending when the expression turns true, firing once it held."""
        threshold = alert_threshold(self.options.speed)
        true = bool(rates) and rates[0][2] > threshold
        told = ""
        if true:
            provider, endpoint, value = rates[0]
            told = (
                f"alert expression true for {provider}/{endpoint} ({value:.3f} errors/s over "
                f"15m > {threshold:g})"
            )
        self._hold(ERRORS_ALERT, true, told)

    def _rate_limit_transitions(self, shares: Sequence[tuple[str, float, float]]) -> None:
        """The rate-limit alert (docs/ops/alerts.yml): a share of 429s and a least count."""
        storms = [
            (provider, share, refused)
            for provider, share, refused in shares
            if share > RATE_LIMIT_ALERT_SHARE and refused >= RATE_LIMIT_ALERT_MIN_429S
        ]
        told = ""
        if storms:
            provider, share, refused = storms[0]
            told = (
                f"{RATE_LIMIT_ALERT} expression true for {provider} ({share:.0%} of the attempts "
                f"sent answered 429 over 15m > {RATE_LIMIT_ALERT_SHARE:.0%}, {refused:.0f} 429s)"
            )
        self._hold(RATE_LIMIT_ALERT, bool(storms), told)

    # ------------------------------------------------------------------ queries

    async def _stats(self) -> dict[str, Any]:
        return await self.blocking(self.sim.control.stats, self.provider, detail=False)

    async def emitted(self) -> int:
        """Events in the provider's log."""
        return int((await self._stats()).get("events", 0) or 0)

    async def webhooks_delivered(self) -> int:
        """Events the provider delivered by webhook so far (Drive: notifications).

        Events, not requests: a HubSpot request carries whatever was queued when its
        sender took it, so the number of requests depends on thread timing.
        """
        if self.api.notifications:
            return self.notifications_delivered
        webhooks = (await self._stats()).get("webhooks", {})
        return int(webhooks.get("delivered_events", 0) or 0)

    async def rows(self, statement: Any) -> list[Any]:
        """The rows of a query on the drill's database."""
        async with self.async_engine.connect() as conn:
            return list((await conn.execute(statement)).all())

    async def applications(self) -> dict[str, int]:
        """Event id -> how many times the host applied it."""
        event_id = applied_table.c.event_id
        rows = await self.rows(select(event_id, func.count()).group_by(event_id))
        return {str(event): int(count) for event, count in rows}

    async def applied_records(self) -> set[str]:
        """Record ids the host applied something for."""
        return {str(row[0]) for row in await self.rows(select(applied_table.c.record_id))}

    async def outbox_counts(self) -> tuple[int, int]:
        """The provider's undelivered and dead-lettered outbox messages."""
        from ..outbox import outbox_summary_async

        async with AsyncSession(self.async_engine) as session:
            summaries = await outbox_summary_async(
                session, providers=[self.provider], include_delivered=False, now=self.clock.now()
            )
        return (
            sum(s.undelivered for s in summaries),
            sum(s.dead for s in summaries),
        )

    async def open_defects(self) -> list[str]:
        """The subjects of the STALE_ENRICHMENT defects still open, sorted."""
        from ..enrichment._models import Defect

        rows = await self.rows(select(Defect.subject_id).where(Defect.status == "OPEN"))
        return sorted(str(row[0]) for row in rows)

    async def impact(self) -> str:
        """RB-09 Triage 5: undelivered pushes and open defects, per tenant."""
        from ..enrichment._models import Defect
        from ..outbox import DELIVERED, OutboxMessageRow

        pushes = await self.rows(
            select(OutboxMessageRow.tenant_id, func.count())
            .where(OutboxMessageRow.provider == self.provider, OutboxMessageRow.status != DELIVERED)
            .group_by(OutboxMessageRow.tenant_id)
        )
        defects = await self.rows(
            select(Defect.tenant_id, func.count())
            .where(Defect.status == "OPEN")
            .group_by(Defect.tenant_id)
        )

        def per_tenant(rows: Sequence[Any]) -> str:
            return ", ".join(f"{tenant or 'none'} {count}" for tenant, count in sorted(rows))

        return (
            f"deal pushes not delivered: {per_tenant(pushes) or 'none'}; "
            f"claims with stale enrichment: {per_tenant(defects) or 'none'}"
        )


def _loopback_socket() -> socket.socket:
    """A TCP socket bound to a free port on 127.0.0.1 (the receiver's, before it serves)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def _serve_here(app: Any, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1, on the running loop (as the service does).

    ``Server._serve`` rather than ``serve``: ``serve`` takes over SIGINT, and
    Ctrl-C must stop the drill, not just this server.
    """
    from ..testing import _server_for

    server = _server_for(app, lifespan="off")
    sock = sock or _loopback_socket()
    task = asyncio.get_running_loop().create_task(server._serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise UsageError("the drill's webhook receiver did not start")
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


# --------------------------------------------------------------------------- the steps


async def _healthy(stage: _Stage) -> None:
    """Traffic before the outage: webhooks apply changes, pushes go out, claims enrich."""
    with stage.record.phase("healthy traffic", "healthy"):
        for _ in range(HEALTHY_TICKS):
            await stage.tick()
        applied = len(await stage.applications())
        # Polling is pinned where the service cannot judge webhooks (it may still get them).
        how = "webhook" if stage.api.failover else "polling"
        if stage.api.webhooks and not stage.api.failover:
            how = "webhook and polling"
        stage.record.note(f"{applied} events applied by {how}; breaker {stage.breaker}")


async def _detection(stage: _Stage) -> None:
    """RB-09 Detection: the provider fails; wait for the alert (or, webhooks only, failover)."""
    record, found, expect = stage.record, stage.found, stage.expect
    with record.phase("Detection", "Detection"):
        found.outage_start = stage.clock.now()
        await _start_outage(stage)

        async def detected() -> bool:
            if expect.alert:
                return any(found.alerts[name].fired_at is not None for name in _alerts(stage))
            return stage.mode == "polling" or stage.ticks >= HEALTHY_TICKS + QUIET_DETECTION_TICKS

        await stage.ticks_until(detected, limit=ALERT_FOR_TICKS + 16 + stage.api.extra_ticks)
        if not expect.alert:
            rates = stage.error_rates(alerting=True)
            highest = f"{rates[0][0]}/{rates[0][1]} {rates[0][2]:.3f}/s" if rates else "no errors"
            how = (
                "the sync service's failover (webhook lag)"
                if stage.mode == "polling"
                else "missing CRM sync (webhooks silent, nothing polled)"
            )
            record.note(f"alert not firing at this traffic (highest: {highest}); noticed by {how}")
    if expect.alert:
        names = _alerts(stage)
        fired = [(at, n) for n in names if (at := found.alerts[n].fired_at) is not None]
        expected = f"rate > {alert_threshold(stage.options.speed):g}/s for 5m"
        if RATE_LIMIT_ALERT in names:
            expected += (
                f", or > {RATE_LIMIT_ALERT_SHARE:.0%} of attempts answered 429 "
                f"(at least {RATE_LIMIT_ALERT_MIN_429S}) for 5m"
            )
        record.check(
            f"Detection: alert {' or '.join(names)} fired",
            expected,
            "; ".join(f"{n} fired at {_clock_label(t)}" for t, n in sorted(fired)) or "never",
            bool(fired),
        )
        opened = any(v == 2 for _, v in record.series.get("breaker", []))
        record.check(
            "Detection: breaker opened",
            "open during the outage",
            "opened" if opened else "never opened",
            opened,
        )


def _alerts(stage: _Stage) -> list[str]:
    """The alerts that detect this scenario's outage (RB-09's, and for 429s the rate-limit one)."""
    return [ERRORS_ALERT, *([RATE_LIMIT_ALERT] if stage.expect.rate_limit_alert else [])]


async def _start_outage(stage: _Stage) -> None:
    provider, enrich, control = stage.provider, stage.enrich_provider, stage.sim.control
    scenario = stage.options.scenario
    call = stage.blocking
    stopped = "webhooks stopped"
    await call(control.set_webhook_mode, provider, "stop")
    if stage.api.notifications:
        # Drive's channel stops notifying without a word (and, the API down, cannot be renewed).
        await stage.drive_silence(True)
        stopped = "its watch channel silent"
    if scenario == "full-outage":
        await call(control.set_fault, provider, "error", status=503)
        await call(control.set_fault, provider, "timeout", endpoint="changes", ratio=0.5)
        if stage.api.enrichment_api == "pdl":
            # What PDL answers when it is unavailable to us: 402, the credits are spent.
            await stage._pdl_control(credits=0)
            what = f"{provider}: 5xx storm and timeouts; {stopped}; {enrich} credits spent"
        else:
            await call(control.set_fault, enrich, "error", status=503)
            what = f"{provider}: 5xx storm and timeouts; {stopped}; {enrich} down"
    elif scenario == "rate-limit-storm":
        await call(
            control.set_fault, provider, "rate_limit", retry_after=stage.options.speed, ratio=0.8
        )
        await call(control.set_fault, enrich, "rate_limit", retry_after=stage.options.speed)
        what = f"{provider} and {enrich}: 429 storm with Retry-After; webhooks stopped"
    elif scenario == "token-revocation":
        await call(control.require_auth, provider, enabled=True)
        await call(control.set_fault, provider, "error", status=401, endpoint="token")
        await call(control.expire_tokens, provider)
        await call(control.set_fault, enrich, "error", status=503)
        what = f"{provider}: tokens revoked and the token endpoint refusing; webhooks stopped"
    else:
        what = f"{provider}: API healthy but webhooks silently dropped"
    stage.record.mark("outage", "outage begins", what)
    if stage.api.deletions:
        await _delete_during_outage(stage)


async def _delete_during_outage(stage: _Stage) -> None:
    """``--api`` hubspot/salesforce: records deleted while nobody listens.

    Search and SOQL serve the records that exist: no poll ever reads a deletion,
    so only Recovery 3 (Salesforce's ``deleted/`` replay, HubSpot's resync by id)
    brings these back.
    """
    applied = sorted(r for r in await stage.applied_records() if r.startswith("rec_"))
    chosen = applied[:OUTAGE_DELETIONS]
    if chosen:
        await stage.blocking(
            stage.sim.control.emit,
            stage.provider,
            len(chosen),
            record_ids=chosen,
            type="record.deleted",
        )
    stage.found.deleted = chosen
    stage.record.note(
        f"{len(chosen)} records deleted at the provider during the outage "
        f"({', '.join(chosen) or 'none'}): no poll reads a deletion"
    )


async def _triage(stage: _Stage) -> None:
    """RB-09 Triage 1-5, one tick each (the clock runs while on-call looks)."""
    from ..auth import check_token

    record, provider = stage.record, stage.provider
    with record.phase("Triage", "Triage"):
        rates = stage.error_rates()
        record.note(
            "Triage 1: errors/s by provider and endpoint: "
            + (", ".join(f"{p}/{e} {r:.3f}" for p, e, r in rates[:4]) or "none")
        )
        await stage.tick()
        grep = stage.found.log_lines["rate limit|429"]
        record.note(f'Triage 2: log lines matching grep -i "rate limit\\|429": {grep}')
        await stage.tick()
        token = await stage.blocking(
            check_token, provider, settings=stage.settings, clock=stage.clock
        )
        record.note(f"Triage 3: check_token: {token}")
        await stage.tick()
        health = await _health(stage)
        record.note(f"Triage 4: {provider} health endpoint: {health}")
        await stage.tick()
        record.note(f"Triage 5: impact: {await stage.impact()}")
        await stage.tick()
    if stage.expect.token:
        state = str(getattr(token, "state", token))
        record.check(
            "Triage 3: check_token shows the broken token",
            "not valid",
            state,
            state != "valid",
        )


async def _health(stage: _Stage) -> str:
    """The provider's health endpoint, asked directly (a status page is not behind our gateway)."""
    from .._http import httpx

    url = f"{stage.sim.url}/p/{stage.provider}/health"
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return f"unreachable ({type(exc).__name__})"
    return f"HTTP {response.status_code}"


async def _contain_failover(stage: _Stage) -> None:
    """RB-09 Containment 1: the library failed over to polling by itself (CRM_MODE unchanged)."""
    with stage.record.phase("Containment 1: polling failover", "C1"):
        await stage.tick()
        mode = stage.mode
        how = "automatic failover; CRM_MODE unchanged" if stage.api.failover else "CRM_MODE=polling"
        stage.record.note(f"sync mode {mode} ({how})")
    name = "Containment 1: automatic polling failover"
    if stage.expect.failover and not stage.api.failover:
        stage.record.not_applicable(name, stage.api.no_failover)
    elif stage.expect.failover:
        stage.record.check(name, "polling during the outage", mode, mode == "polling")


async def _contain_enrichment(stage: _Stage) -> None:
    """RB-09 Containment 2: enrichment deferred (ENRICHMENT_DEFER_ON_ERROR) as claims arrive."""
    found = stage.found
    with stage.record.phase("Containment 2: enrichment deferred", "C2"):
        for _ in range(2):
            await stage.enrich_claim()
            await stage.tick()
        stage.record.note(
            "enrichment results so far: "
            + ", ".join(f"{k} {v}" for k, v in sorted(found.enrichment.items()))
        )
    if stage.expect.deferral:
        deferred = found.enrichment["deferred"] + found.enrichment["cached_stale"]
        errors = sum(v for k, v in found.enrichment.items() if k.startswith("error"))
        stage.record.check(
            "Containment 2: enrichment deferred, no exception",
            "deferred results, no errors",
            f"{deferred} deferred or stale, {errors} errors",
            deferred > 0 and errors == 0,
        )


async def _contain_defects(stage: _Stage) -> None:
    """RB-09 Containment 3: ``create_stale_defects --since <outage start>``."""
    from ..enrichment import create_stale_defects

    found = stage.found
    with stage.record.phase("Containment 3: stale defects", "C3"):
        result = await stage.maintain(
            create_stale_defects, stage.enrich_provider, found.outage_start
        )
        open_defects = len(await stage.open_defects())
        stage.record.note(
            f"create_stale_defects: {result.created} created, {result.already_open} already "
            f"open; {open_defects} stale-enrichment defects open"
        )
        await stage.tick()
    if stage.expect.deferral:
        stage.record.check(
            "Containment 3: stale defects open for deferred claims",
            "at least one open",
            f"{open_defects} open",
            open_defects > 0,
        )


async def _check_no_match(stage: _Stage) -> None:
    """PDL's 404 not_found is an answer: those subjects are neither deferred nor defects."""
    from ..enrichment._models import Defect

    subjects = stage.found.no_match
    if not subjects:
        asked = [f"claim-{n}" for n in range(1, stage.claims + 1) if n % PDL_NO_MATCH_EVERY == 0]
        stage.record.not_applicable(
            "Verification 2: PDL no-match is an answer, not a defect",
            f"PDL answered no unknown subject directly: {', '.join(asked) or 'none'} arrived in "
            "the outage and were deferred before PDL could say; Recovery 4 shows what their "
            "refresh left",
        )
        return
    counted = select(func.count()).select_from(Defect).where(Defect.subject_id.in_(subjects))
    [(defects,)] = await stage.rows(counted)
    stage.record.check(
        "Verification 2: PDL no-match is an answer, not a defect",
        "404 not_found answered; 0 defects for those subjects",
        f"{len(subjects)} subjects not found, {defects} defects",
        len(subjects) > 0 and defects == 0,
    )


async def _contain_retries(stage: _Stage) -> None:
    """RB-09 Containment 4: ``queue_webhook_retries --max-retries 10``; the outbox holds."""
    from ..outbox import queue_webhook_retries

    with stage.record.phase("Containment 4: retries queued", "C4"):
        result = await stage.maintain(queue_webhook_retries, stage.provider, 10)
        pending, dead = await stage.outbox_counts()
        stage.record.note(
            f"queue_webhook_retries: {result.dead + result.failed} re-queued; outbox holding "
            f"{pending} deliveries, {dead} dead letters"
        )
        await stage.tick()
    if stage.expect.outbox_hold:
        stage.record.check(
            "Containment 4: outbox held deliveries",
            "pending while the provider is down",
            f"{pending} pending",
            pending > 0,
        )


async def _outage_continues(stage: _Stage) -> None:
    """The provider stays down past its feed's retention; then it comes back."""
    record, provider, control = stage.record, stage.provider, stage.sim.control
    with record.phase("outage continues", "outage"):
        while stage.ticks < HEALTHY_TICKS + OUTAGE_TICKS:
            await stage.tick()
        await stage.blocking(control.clear_faults, provider)
        await stage.blocking(control.clear_faults, stage.enrich_provider)
        if stage.api.enrichment_api == "pdl":
            await stage._pdl_control(credits=None)  # credits bought again
        if stage.api.notifications:
            await stage.drive_silence(False)
        await stage.blocking(control.set_webhook_mode, provider, "deliver")
        await stage.blocking(control.require_auth, provider, enabled=False)
        stage.found.webhooks_at_recovery = await stage.webhooks_delivered()
        record.mark("outage", "provider back", "provider back: faults cleared, webhooks delivering")


async def _recover_auth(stage: _Stage) -> None:
    """RB-09 Recovery 1: ``refresh_tokens --provider`` (a script: its own token manager)."""
    from ..auth import TokenManager, refresh_tokens

    record = stage.record
    with record.phase("Recovery 1: re-auth", "R1"):
        with contextlib.closing(
            TokenManager(
                stage.settings,
                engine=stage.engine,
                metrics=stage.metrics,
                clock=stage.clock,
                seed=stage.options.seed,
            )
        ) as manager:
            results = await stage.blocking(
                refresh_tokens, stage.provider, settings=stage.settings, manager=manager
            )
        outcome = ", ".join(f"{r.provider} {r.outcome}" for r in results)
        record.mark("token", "token refreshed", f"refresh_tokens: {outcome}")
        await stage.tick()
    refreshed = all(r.outcome in ("refreshed", "skipped") for r in results)
    record.check("Recovery 1: tokens refreshed", "refreshed", outcome, refreshed)


async def _recover_rotation(stage: _Stage) -> None:
    """RB-09 Recovery 2: rotate credentials only if compromised; in this drill they are not."""
    with stage.record.phase("Recovery 2: rotation (not needed)", "R2"):
        stage.record.note("credentials not compromised: rotate_credentials not run")


async def _recover_reconcile(stage: _Stage) -> None:
    """RB-09 Recovery 3: replay the outage (what the feed no longer serves comes back here)."""
    from ..providers import async_client_for
    from ..reconciliation import reconcile_async

    record, found = stage.record, stage.found
    assert found.outage_start is not None
    client = async_client_for(stage.gateway, stage.provider)  # the pack's (generic: the default)
    with record.phase("Recovery 3: reconcile", "R3"):

        async def breaker_closed() -> bool:
            return stage.breaker == "closed"

        await stage.ticks_until(breaker_closed, limit=8)
        if stage.api.recovery == "none":
            await _caught_up(stage)
        if "reconcile" in stage.options.broken:
            record.note("reconcile SKIPPED (--break reconcile)")
        else:
            found.reconciled = summary = await reconcile_async(
                stage.provider,
                found.outage_start - timedelta(seconds=stage.options.speed * 2),
                settings=stage.settings,
                handlers=stage.registry,
                client=client,
                engine=stage.async_engine,
                actor="drill",
                clock=stage.clock,
            )
            record.mark(
                "reconcile",
                f"reconcile: {summary.applied} applied",
                f"reconcile: fetched {summary.fetched}, already applied "
                f"{summary.already_applied}, applied {summary.applied}, failed {summary.failed}",
            )
            if stage.api.recovery == "resync":
                await _resync_by_id(stage)
        await stage.tick()
    _check_reconcile(stage)


async def _caught_up(stage: _Stage) -> None:
    """A durable feed (Drive): the outbox drains and a poll reads it, before reconcile runs.

    Reconcile then shows what only it could bring back, which for a durable feed
    is nothing; a push delivered after the last poll would otherwise be counted
    as "replayed" although the next poll reads it anyway.
    """

    await stage.ticks_until(stage.drained, limit=8)
    for _ in range(2):  # one poll interval, nothing new emitted or pushed
        await stage.tick(emit=False)
    stage.record.note("outbox drained and polled again before reconcile (the feed is durable)")


async def _resync_by_id(stage: _Stage) -> None:
    """The pack's fallback where replay cannot see deletions (HubSpot): resync by id.

    Every record the host holds is read again; one the provider answers 404 for
    twice is applied as deleted (``reconcile --resync`` by id).
    """
    from ..reconciliation._fallback import resync

    ids = sorted(await stage.applied_records())
    found = stage.found
    found.resynced = summary = await stage.script(
        resync, stage.provider, record_ids=ids, handlers=stage.registry, actor="drill"
    )
    stage.record.mark(
        "reconcile",
        f"resync: {summary.applied} applied",
        f"resync by id ({stage.api.name} replay cannot see deletions): fetched "
        f"{summary.fetched}, unchanged {summary.unchanged}, applied {summary.applied}, "
        f"failed {summary.failed}",
    )


def _check_reconcile(stage: _Stage) -> None:
    """Recovery 3: the replay; for ``--api``, the resync or the durable feed's nothing to do."""
    api, found, record = stage.api, stage.found, stage.record
    summary, deleted = found.reconciled, len(found.deleted)
    # What the run should have applied: a description, and the least it may have applied.
    if api.recovery == "none":
        expected, least = "a completed run that found everything applied (the feed is durable)", 0
    elif api.recovery == "resync":
        expected, least = "a completed run (search replay sees no deletions)", 0
    elif not api.generic:
        expected, least = "a completed run that applied what polling never saw", max(1, deleted)
        if stage.expect.replay and deleted:
            expected += f" ({deleted} deletions)"
    elif stage.expect.replay:
        expected, least = "a completed run that applied what the feed no longer served", 1
    else:
        expected, least = "a completed run (polling covered the outage)", 0
    name = "Recovery 3: replay reconciliation"
    if summary is None:
        record.check(name, expected if api.generic else "a completed run", "skipped", False)
        return
    ok = summary.completed and summary.failed == 0 and summary.applied >= least
    if api.recovery == "none":
        ok = ok and summary.applied == 0
    actual = f"fetched {summary.fetched}, applied {summary.applied}, failed {summary.failed}"
    record.check(name, expected, actual, ok)
    if api.recovery == "none":
        record.not_applicable(
            "Recovery 3: replay needed",
            f"{api.name}: the changes feed keeps every change; polling caught up after "
            "the outage, so replay had nothing left to bring back",
        )
    elif api.recovery == "resync":
        resynced = found.resynced
        applied = 0 if resynced is None else resynced.applied
        failed = 0 if resynced is None else resynced.failed
        record.check(
            "Recovery 3: resync by id (no replay of deletions)",
            f"the {deleted} deletions polling never saw applied",
            "not run" if resynced is None else f"applied {applied}, failed {failed}",
            resynced is not None and failed == 0 and applied >= deleted > 0,
        )


async def _recover_defects(stage: _Stage) -> None:
    """RB-09 Recovery 4: the deferred worker refreshes stale claims and resolves their defects."""
    from ..enrichment import clear_stale_defects

    record, found = stage.record, stage.found
    with record.phase("Recovery 4: stale defects cleared", "R4"):

        async def none_open() -> bool:
            return not await stage.open_defects()

        await stage.ticks_until(none_open, limit=12)
        left = await stage.open_defects()
        open_after = len(left)
        # RB-09's UPDATE (clear-stale-defects) for what the worker did not resolve.
        cleared = await stage.maintain(
            clear_stale_defects, stage.enrich_provider, found.outage_start
        )
        record.note(
            f"{found.refreshed_claims} claims refreshed by the deferred worker; "
            f"{open_after} defects left for clear_stale_defects, which resolved "
            f"{cleared.resolved}"
        )
    record.check(
        "Recovery 4: stale defects resolved by the worker",
        "0 open",
        f"{open_after} open" + (f": {', '.join(left[:8])}" if left else ""),
        open_after == 0,
    )


async def _recover_mode(stage: _Stage) -> None:
    """RB-09 Recovery 5: back to webhooks (after the stable period), the outbox drained.

    What the outbox gave up on during the outage (Containment 4's ``--max-retries 10``
    can run out before a long outage ends) is re-queued once more, now that the
    provider answers, so that it drains too.
    """
    from ..outbox import queue_webhook_retries

    record = stage.record
    with record.phase("Recovery 5: normal mode", "R5"):
        _, dead = await stage.outbox_counts()
        if dead:
            result = await stage.maintain(queue_webhook_retries, stage.provider, 10)
            record.note(f"queue_webhook_retries: {result.dead} dead letters re-queued")

        normal_mode = "webhook" if stage.api.failover else "polling"

        async def normal() -> bool:
            return stage.mode == normal_mode and await stage.drained()

        await stage.ticks_until(normal, limit=24)
        pending, dead = await stage.outbox_counts()
        record.note(f"sync mode {stage.mode}; outbox pending {pending}, dead letters {dead}")
    if not stage.api.failover:
        record.not_applicable(
            "Recovery 5: back to webhooks", f"{stage.api.no_failover}; mode {stage.mode}"
        )
        return
    record.check("Recovery 5: back to webhooks", "webhook", stage.mode, stage.mode == "webhook")


async def _verification(stage: _Stage) -> None:
    """RB-09 Verification 1-4: sync resumed; nothing lost, doubled or unaudited; verify-sync
    agrees; webhooks flow and the retry queue is empty."""
    record = stage.record
    with record.phase("Verification", "Verify"):
        before = stage.calls()
        # The provider's last changes arrive before anything is counted.
        for _ in range(3):
            await stage.tick(emit=False)
        _check_sync_resumed(stage, before)
        await _check_events(stage)
        await _check_timeline(stage)
        await _check_audit(stage)
        await _check_verify_sync(stage)
        await _check_delivery(stage)
        if stage.api.enrichment_api == "pdl":
            await _check_no_match(stage)
        for line in _summary(stage).lines():
            record.note(line, echo=False)  # the caller prints the summary after the table


def _check_sync_resumed(stage: _Stage, before: tuple[float, float]) -> None:
    ok, failed = (now - then for now, then in zip(stage.calls(), before, strict=True))
    stage.record.check(
        "Verification 1: sync resumed, no new errors",
        "calls succeed, 0 errors",
        f"{ok:.0f} calls succeeded, {failed:.0f} errors in the last {3 * stage.options.speed:g} s",
        ok > 0 and failed == 0,
    )


async def _check_events(stage: _Stage) -> None:
    """Zero lost, zero doubled: the provider's event log against the host's applications
    (for APIs with derived ids, every record's latest state: :func:`_count_states`)."""
    found = stage.found
    found.emitted = await stage.emitted()
    if stage.api.by_event_id:
        applied = await stage.applications()
        provider_ids = [f"evt_{seq}" for seq in range(1, found.emitted + 1)]
        found.lost = tuple(i for i in provider_ids if i not in applied)
        found.doubled = tuple(sorted(i for i, n in applied.items() if n > 1))
        found.applied_once = sum(1 for i in provider_ids if applied.get(i) == 1)
        total, name = found.emitted, "zero events lost"
        expected = f"{total} of {total} applied"
    else:
        total, name = await _count_states(stage), "zero records lost (latest state of each applied)"
        expected = f"{total} of {total} records at their latest state"

    def named(ids: Sequence[str]) -> str:
        return f": {id_ranges(ids) if stage.api.by_event_id else ', '.join(ids[:8])}" if ids else ""

    lost, doubled = found.lost, found.doubled
    actual = f"{total - len(lost)} applied, {len(lost)} lost{named(lost)}"
    stage.record.check(f"Verification 2: {name}", expected, actual, not lost)
    stage.record.check(
        "Verification 2: zero events applied twice",
        "0",
        f"{len(doubled)}{named(doubled)}",
        not doubled,
    )


def _ms(moment: datetime) -> int:
    """A time to the millisecond (what these APIs state), as an integer."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return int(aware.timestamp() * 1000)


async def _count_states(stage: _Stage) -> int:
    """Lost and doubled, for APIs whose ids are derived and whose polls read states; the
    number of records at the provider.

    Search, SOQL and Drive's changes name no event of the provider's log, and a
    record changed twice between two reads is read once: the change in between
    is *superseded*, not lost. So here a record is lost when its latest state at
    the provider (its last modification, or its deletion) was never applied. An
    event is applied twice when the host's handler ran twice for one event id
    (the pack's derived ids are the same on every read and redelivery: the
    inbox's promise). HubSpot's webhook deltas and its search snapshots of the
    same moment have different ids by design; states applied by both are
    counted and told, not failed.
    """
    found = stage.found
    sim = stage.sim.state
    with sim.lock:
        final = {
            rid: (rec.deleted, _ms(rec.updated_at))
            for rid, rec in sim.provider(stage.provider).records.items()
        }
    columns = applied_table.c
    rows = await stage.rows(
        select(columns.event_id, columns.record_id, columns.event_type, columns.occurred_at)
    )
    states: Counter[tuple[str, str]] = Counter()
    ids: Counter[str] = Counter()
    channels: dict[tuple[str, str], set[str]] = {}
    for event_id, record_id, event_type, occurred_at in rows:
        deleted = event_type == "record.deleted"
        state = (str(record_id), "deleted" if deleted else str(_ms(occurred_at)))
        states[state] += 1
        ids[str(event_id)] += 1
        channels.setdefault(state, set()).add(".poll:" if ".poll:" in str(event_id) else "other")
    lost = []
    for rid, (deleted, modified) in sorted(final.items()):
        if states[(rid, "deleted" if deleted else str(modified))] == 0:
            lost.append(f"{rid}@{'deleted' if deleted else modified}")
    doubled = sorted(event_id for event_id, n in ids.items() if n > 1)
    found.lost, found.doubled = tuple(lost), tuple(doubled)
    found.applied_once = sum(1 for n in ids.values() if n == 1)
    found.records = len(final)
    both = sum(1 for kinds in channels.values() if len(kinds) > 1)
    if both:
        stage.record.note(
            f"{both} record states applied both as webhook deltas and as a poll's snapshot "
            f"({stage.api.name}'s webhook events and search results never share an id; the "
            "snapshot, which carries every property, is applied after the deltas)"
        )
    stage.record.note(
        f"{found.emitted} changes at the provider over {len(final)} records: "
        f"{max(0, found.emitted - len(final))} superseded by a later change before any read "
        f"({stage.api.name} serves current states)",
        echo=False,
    )
    return len(final)


async def _check_verify_sync(stage: _Stage) -> None:
    from ..reconciliation import verify_sync

    report = await stage.script(
        verify_sync,
        stage.provider,
        20,
        seed=stage.options.seed,
        handlers=stage.registry,
        actor="drill",
    )
    mismatches = len(report.mismatches)
    stage.record.check(
        "Verification 3: verify-sync on 20 sampled records",
        "0 mismatches",
        f"{len(report.comparisons)} compared, {mismatches} mismatches",
        mismatches == 0,
    )


async def _check_timeline(stage: _Stage) -> None:
    from ..reconciliation import timeline

    until = stage.clock.now() - timedelta(seconds=stage.options.speed * 3)
    report = await stage.script(timeline, stage.provider, stage.record.start, until)
    stage.record.check(
        "Verification 2: no gaps in the sync timeline",
        "0 gaps",
        f"{len(report.gaps)} gaps",
        not report.gaps,
    )


async def _check_delivery(stage: _Stage) -> None:
    """Webhooks delivered again since the provider came back; the retry queue empty."""
    found = stage.found
    pending, found.dead_letters = await stage.outbox_counts()
    drained = f"{pending} pending, {found.dead_letters} dead"
    empty = pending == 0 and found.dead_letters == 0
    if not stage.api.webhooks:
        stage.record.not_applicable("Verification 4: webhooks delivered", stage.api.no_webhooks)
        stage.record.check(
            "Verification 4: retry queue drained", "0 pending, 0 dead letters", drained, empty
        )
        return
    delivered = await stage.webhooks_delivered() - found.webhooks_at_recovery
    stage.record.check(
        "Verification 4: webhooks delivered, retry queue drained",
        "webhooks arriving; 0 pending, 0 dead letters",
        f"{delivered} {'notifications' if stage.api.notifications else 'events'} by webhook "
        f"since recovery; {drained}",
        delivered > 0 and empty,
    )


async def _check_audit(stage: _Stage) -> None:
    from .._audit import AuditEvent

    actions = {row[0] for row in await stage.rows(select(AuditEvent.action).distinct())}
    expect = stage.expect
    wanted: list[tuple[str, str]] = [("reconcile", "reconcile.")]
    if expect.alert:
        wanted.append(("breaker transitions", "breaker."))
    if expect.failover and stage.api.failover:
        wanted.append(("sync mode switches", "sync.mode"))
    if expect.deferral:
        wanted.append(("defects", "defect"))
    if expect.token:
        wanted.append(("token refresh", "token."))
    missing = [label for label, prefix in wanted if not any(a.startswith(prefix) for a in actions)]
    stage.record.check(
        "Verification 2: every step audited",
        ", ".join(label for label, _ in wanted),
        f"{len(actions)} kinds of audit rows"
        + (f"; missing {', '.join(missing)}" if missing else ""),
        not missing,
    )


#: The drill, in RB-09's order: each step records its phase, markers and checks.
STEPS: tuple[Callable[[_Stage], Awaitable[None]], ...] = (
    _healthy,
    _detection,
    _triage,
    _contain_failover,
    _contain_enrichment,
    _contain_defects,
    _contain_retries,
    _outage_continues,
    _recover_auth,
    _recover_rotation,
    _recover_reconcile,
    _recover_defects,
    _recover_mode,
    _verification,
)


# --------------------------------------------------------------------------- running it


@contextlib.contextmanager
def _drill_logs(counts: Counter[str]) -> Iterator[None]:
    """The drill prints its own story; library warnings are counted (Triage 2's grep), not shown.

    The gateway's request ids are letters (``new_request_id``), so in a scenario without
    rate limits the grep matches nothing of theirs; timestamps, which can hold "429" in the
    service's logs, the drill's lines do not have.
    """
    import structlog

    pattern = re.compile(r"rate limit|429", re.IGNORECASE)

    def grep(_logger: Any, _name: str, line: Any) -> Any:
        if pattern.search(str(line)):
            counts["rate limit|429"] += 1
        raise structlog.DropEvent

    previous = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer(), grep],
        logger_factory=structlog.ReturnLoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(30),
    )
    try:
        yield
    finally:
        structlog.configure(**previous)


async def _rehearse(stage: _Stage, on_database: Callable[[str], None]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stage.build(stack, on_database)
        for step in STEPS:
            await step(stage)


def run_drill(
    options: DrillOptions,
    *,
    echo: Callable[[str], None] = print,
    on_database: Callable[[str], None] | None = None,
) -> DrillResult:
    """Run the RB-09 drill; return its report (``result.ok`` tells whether it passed).

    Args:
        options: What to rehearse.
        echo: Where the story goes, line by line: the title, each phase as it happens,
            the verification table and the summary.
        on_database: Called with the database URL once chosen (default: echoed,
            password hidden); the CLI names it on stderr as every command does.

    Raises:
        ConfigError: a bad option (named).
        StorageError: the database is unreachable.
    """
    from prometheus_client import CollectorRegistry

    from ..observability._metrics import set_default_metrics

    echo(_title(options))
    began, wall = time.monotonic(), datetime.now(UTC).replace(microsecond=0)
    # Simulated time ends before now: the drill's rows then read like a real incident's
    # (postmortem, audit --since) rather than lying in the future.
    extra = drill_api(options.api).extra_ticks
    clock = ManualClock(wall - timedelta(seconds=options.speed * (MAX_TICKS + extra)))
    record = _Record(clock, echo)
    metrics = Metrics(CollectorRegistry())
    stage = _Stage(options, record, metrics)
    announce = on_database or (lambda url: echo(f"database: {mask_url(url)}"))
    previous = set_default_metrics(metrics)
    try:
        with _drill_logs(stage.found.log_lines):
            asyncio.run(_rehearse(stage, announce))
    finally:
        set_default_metrics(previous)
    summary = _summary(stage)
    report = _report(stage, wall, time.monotonic() - began)
    _echo_table(record, summary)
    if options.report_path is not None:
        options.report_path.write_text(render_html(report), encoding="utf-8")
    return DrillResult(report, options.report_path, stage.database_url, summary)


def _summary(stage: _Stage) -> DrillSummary:
    checks, found = stage.record.report.checks, stage.found
    return DrillSummary(
        checks_passed=sum(1 for c in checks if c.ok and c.applicable),
        checks_failed=sum(1 for c in checks if not c.ok),
        checks_not_applicable=sum(1 for c in checks if not c.applicable),
        emitted=found.emitted,
        applied_once=found.applied_once,
        lost=found.lost,
        doubled=found.doubled,
        reconcile_applied=found.reconciled.applied if found.reconciled is not None else None,
        dead_letters=found.dead_letters,
        resync_applied=found.resynced.applied if found.resynced is not None else None,
        records=found.records,
    )


#: The chart's rows after the alert expression: (sample, unit, labels of its values).
_ROWS: tuple[tuple[str, str, dict[int, str]], ...] = (
    ("breaker", "", {0: "closed", 1: "half", 2: "open"}),
    ("sync mode", "", {0: "webhook", 1: "polling"}),
    ("events not applied", "events", {}),
    ("outbox pending", "msgs", {}),
    ("dead letters", "msgs", {}),
    ("open defects", "", {}),
)


def _report(stage: _Stage, wall: datetime, seconds: float) -> Report:
    """The record's report, completed: title, subtitle, end and the chart's rows."""
    record, options, report = stage.record, stage.options, stage.record.report
    end = report.ended_at = record.clock.now()
    report.title = _title(options)
    on = "on the embedded defaults"
    if not stage.api.generic:
        on = f"against the simulator's {stage.api.name} dialect"
    report.subtitle = (
        f"simulated incident {record.start:%H:%M:%S} to {end:%H:%M:%S} UTC "
        f"({options.speed:g} s per tick), rehearsed {wall:%Y-%m-%d %H:%M:%S} UTC "
        f"in {seconds:.1f} s {on}"
    )
    threshold, series = alert_threshold(options.speed), record.series
    report.series = [
        Series(
            "alert expression",
            series.get("error rate", []),
            "errors/s",
            step=False,
            threshold=threshold,
            threshold_label=f"alert threshold {threshold:g}/s",
        ),
        *(Series(name, series.get(name, []), unit, labels=labels) for name, unit, labels in _ROWS),
    ]
    return report


def _echo_table(record: _Record, summary: DrillSummary) -> None:
    """The story's end: the verification table, then the summary."""
    checks = record.report.checks
    width = max((len(c.name) for c in checks), default=0)
    record.echo("")
    for c in checks:
        label = "N/A " if not c.applicable else "PASS" if c.ok else "FAIL"
        record.echo(f"  {label}  {c.name:<{width}}  {c.actual}")
    for line in ["", *summary.lines()]:
        record.echo(line)


def _title(options: DrillOptions) -> str:
    """``RB-09 drill: full-outage of crm_provider`` (and the API of an ``--api`` drill)."""
    api = drill_api(options.api)
    title = f"RB-09 drill: {options.scenario} of {api.rehearsed(options.provider)}"
    return title if api.generic else f"{title} ({api.name} API)"
