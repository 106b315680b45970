"""``idis-integrations drill``: rehearse RB-09 end to end on the embedded defaults, in seconds.

The drill runs the real library against the real simulator over loopback HTTP:
a SQLite file in a temporary folder (or ``--database-url``), the simulator and
a webhook receiver served by uvicorn in this process, one manual clock that
every part reads. Time is compressed by advancing that clock one tick at a
time (``--speed`` simulated seconds per tick), so a forty-minute incident takes
a few hundred ticks.

Phases, as RB-09 orders them:

1. **healthy**: changes arrive by webhook, claims are enriched, deal updates
   are pushed to the CRM through the outbox;
2. **outage** (scenario-dependent): the provider fails (5xx, timeouts, 429s or
   revoked tokens), webhooks stop, enrichment is down;
3. **detection**: errors counted, breaker open, the alert expression true;
4. **containment**, by the library itself: polling failover, deferred
   enrichment with stale defects, the outbox holding deliveries;
5. **recovery**: provider back, token refresh, replay reconciliation,
   defects resolved, back to webhooks, outbox drained;
6. **verification**: verify-sync on a sample, no gaps in the timeline, zero
   events lost or applied twice, every step audited.

Each phase prints as it happens; a verification table ends the run; the exit
status is non-zero when a check fails; an HTML report with a timeline chart is
written. ``--break reconcile`` (or ``failover``, ``enrichment``) disables a
piece on purpose to show that the drill can fail.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.orm import Session

from .._audit import AuditEvent
from .._clock import ManualClock
from ..config import (
    BreakerPolicy,
    OutboxSettings,
    RetryPolicy,
    Settings,
    SyncSettings,
    TimeoutPolicy,
)
from ..db._engine import create_async_db_engine, create_db_engine
from ..db._migrate import upgrade
from ..exceptions import ConfigError, IntegrationError
from ..observability._metrics import Metrics
from ._report import Check, Phase, Report, Series, render_html

__all__ = ["BREAKABLE", "SCENARIOS", "DrillOptions", "DrillResult", "run_drill"]

#: Outages the drill can rehearse.
SCENARIOS = ("full-outage", "rate-limit-storm", "token-revocation", "webhook-only")
#: Pieces ``--break`` can disable to prove the drill fails.
BREAKABLE = ("reconcile", "failover", "enrichment")

#: Upper bound of the ticks one drill runs (phases below), to place simulated time.
MAX_TICKS = 70
#: The alert's threshold: errors per second over 15 minutes (docs/ops/alerts.yml).
ALERT_THRESHOLD = 0.05

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
)


@dataclass(frozen=True, slots=True)
class DrillOptions:
    """How to run the drill."""

    #: One of :data:`SCENARIOS`.
    scenario: str = "full-outage"
    #: The CRM provider whose outage is rehearsed.
    provider: str = "crm_provider"
    #: The enrichment provider (also down in a full outage).
    enrichment_provider: str = "enrichment_provider"
    #: Simulated seconds per tick: larger is faster and coarser.
    speed: float = 15.0
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

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ConfigError(
                f"--scenario={self.scenario!r} is not valid: expected one of "
                f"{', '.join(SCENARIOS)}",
                variable="--scenario",
            )
        if not 1 <= self.speed <= 120:
            raise ConfigError(
                f"--speed={self.speed!r} is not valid: expected simulated seconds per tick "
                "between 1 and 120",
                variable="--speed",
            )
        unknown = set(self.broken) - set(BREAKABLE)
        if unknown:
            raise ConfigError(
                f"--break={', '.join(sorted(unknown))} is not valid: expected one of "
                f"{', '.join(BREAKABLE)}",
                variable="--break",
            )


@dataclass(slots=True)
class DrillResult:
    """The outcome of one drill."""

    report: Report
    report_path: Path | None
    database_url: str

    @property
    def ok(self) -> bool:
        """Whether every verification check passed."""
        return self.report.ok


@dataclass(slots=True)
class _Samples:
    """Time series for the report, one point per tick."""

    error_rate: list[tuple[float, float]] = field(default_factory=list)
    breaker: list[tuple[float, float]] = field(default_factory=list)
    mode: list[tuple[float, float]] = field(default_factory=list)
    queue: list[tuple[float, float]] = field(default_factory=list)
    defects: list[tuple[float, float]] = field(default_factory=list)
    errors_total: list[tuple[float, float]] = field(default_factory=list)


def _sum_samples(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class _Drill:
    """One drill run: the parts, the clock, the phases and the checks."""

    def __init__(self, options: DrillOptions, echo: Callable[[str], None]) -> None:
        self.options = options
        self.echo = echo
        # Simulated time ends about now: the drill's rows then read like a real
        # incident's (postmortem, audit --since) rather than lying in the future.
        self.start = datetime.now(UTC).replace(microsecond=0) - timedelta(
            seconds=options.speed * MAX_TICKS
        )
        self.clock = ManualClock(self.start)
        self.metrics = Metrics(_fresh_registry())
        self.samples = _Samples()
        self.phases: list[Phase] = []
        self.events: list[tuple[float, str]] = []
        self.checks: list[Check] = []
        self.facts: list[tuple[str, str]] = []
        self._phase_start = 0.0
        self._phase_notes: list[str] = []
        self.claims = 0
        self.enrichment_results: Counter[str] = Counter()
        self.deal_version = 0

    # --------------------------------------------------------------- helpers

    @property
    def t(self) -> float:
        return (self.clock.now() - self.start).total_seconds()

    def note(self, text: str) -> None:
        self.events.append((self.t, text))
        self._phase_notes.append(text)
        self.echo(f"  [{_clock(self.t)}] {text}")

    def phase(self, name: str) -> None:
        if self.phases or self._phase_notes:
            self._close_phase()
        self._current = name
        self._phase_start = self.t
        self._phase_notes = []
        self.echo(f"== {name}")

    def _close_phase(self) -> None:
        self.phases.append(
            Phase(self._current, self._phase_start, self.t, tuple(self._phase_notes))
        )

    def check(self, name: str, expected: str, actual: str, ok: bool) -> None:
        self.checks.append(Check(name, expected, actual, ok))


def _fresh_registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"T+{minutes:02d}:{secs:02d}"


def _drill_settings(base: Settings, options: DrillOptions) -> Settings:
    """Policies compressed to the drill's clock: thresholds in ticks, not hours."""
    step = options.speed
    providers = {}
    for name, provider in base.providers.items():
        providers[name] = replace(
            provider,
            timeouts=TimeoutPolicy(connect=1.0, read=0.5, write=1.0, pool=1.0, deadline=3.0),
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
        crm_mode="webhook",
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


@contextmanager
def _quiet_logs() -> Iterator[None]:
    """The drill prints its own story; library warnings go to a null logger meanwhile."""
    import structlog

    previous = structlog.get_config()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.ReturnLoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(50),
    )
    try:
        yield
    finally:
        structlog.configure(**previous)


def run_drill(options: DrillOptions, *, echo: Callable[[str], None] = print) -> DrillResult:
    """Run the RB-09 drill; return its report (``result.ok`` tells whether it passed).

    Raises:
        ConfigError: a bad option (named).
        StorageError: the database is unreachable.
    """
    from ..observability._metrics import set_default_metrics

    drill = _Drill(options, echo)
    previous = set_default_metrics(drill.metrics)
    try:
        with ExitStack() as stack, _quiet_logs():
            report = _run(drill, stack)
    finally:
        set_default_metrics(previous)
    path = options.report_path
    if path is not None:
        path.write_text(render_html(report), encoding="utf-8")
    return DrillResult(report, path, drill.facts[0][1] if drill.facts else "")


def _run(drill: _Drill, stack: ExitStack) -> Report:
    from cryptography.fernet import Fernet

    from ..auth._httpx_auth import oauth_auth_factory
    from ..auth._tokens import refresh_tokens
    from ..enrichment import AsyncDeferredEnrichmentWorker, AsyncEnricher
    from ..outbox import NewMessage, OutboxWorker, enqueue
    from ..reconciliation import reconcile, verify_sync
    from ..reconciliation._sync_timeline import timeline
    from ..resilience._gateway import AsyncGateway, Gateway
    from ..resilience._recorder import HealthSampler
    from ..sync import AsyncSyncService, HandlerRegistry, sync_summary
    from ..testing import run_simulator, serve_asgi, simulator_settings
    from ..webhooks import WebhookReceiver

    options = drill.options
    provider, enrich_provider = options.provider, options.enrichment_provider
    step = options.speed
    if options.database_url:
        database_url = options.database_url
    else:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idis-drill-")))
        database_url = f"sqlite:///{folder / 'drill.sqlite3'}"
    drill.facts.append(("database", _safe_url(database_url)))
    upgrade(database_url)
    engine = create_db_engine(database_url)
    stack.callback(engine.dispose)
    _drill_meta.drop_all(engine)
    _drill_meta.create_all(engine)

    sim = stack.enter_context(run_simulator(clock=drill.clock.now, seed=options.seed))
    base = simulator_settings(
        sim.url,
        providers=sorted({provider, enrich_provider, "docs_provider"}),
        database_url=database_url,
        encryption_keys=(_secret(Fernet.generate_key().decode()),),
    )
    settings = _drill_settings(base, options)
    drill.facts += [
        ("scenario", options.scenario),
        ("provider", provider),
        ("simulator", sim.url),
        ("simulated seconds per tick", f"{step:g}"),
        ("broken on purpose", ", ".join(sorted(options.broken)) or "nothing"),
    ]

    auth = oauth_auth_factory(settings)
    stack.callback(auth.close)
    # The async sampler's breaker hook queues audit rows; the sync drill writes them
    # with flush() when it needs them (on the drill's event loop), and at the end.
    recorder = HealthSampler(database_url, clock=drill.clock)
    stack.callback(lambda: asyncio.run(recorder.flush()))
    gateway = Gateway(
        settings,
        metrics=drill.metrics,
        clock=drill.clock,
        sleep=drill.clock.sleep,
        auth=auth,
        seed=options.seed,
        on_transition=[recorder.on_transition],
    )
    stack.callback(gateway.close)

    registry = HandlerRegistry()

    def apply(session: Session, event: Any) -> None:
        session.execute(
            insert(applied_table).values(
                event_id=event.id,
                record_id=event.record_id,
                version=event.version,
                applied_at=drill.clock.now(),
            )
        )

    for event_type in ("record.created", "record.updated", "record.deleted"):
        registry.register(event_type, apply)

    # Background workers are async only (the ones the example service runs). One
    # event loop and one async engine for the whole drill: the async gateways'
    # connections belong to that loop.
    runner = stack.enter_context(asyncio.Runner())
    async_engine = create_async_db_engine(database_url)
    stack.callback(lambda: runner.run(async_engine.dispose()))
    stack.callback(lambda: runner.run(auth.aclose()))

    # The sync service (sentinel, mode controller, poller), on its own async gateway.
    # Webhooks go to a receiver on the drill's engine, served by its own thread.
    sync_gateway = AsyncGateway(
        settings,
        metrics=drill.metrics,
        clock=drill.clock,
        sleep=drill.clock.asleep,
        auth=auth,
        seed=options.seed,
    )
    stack.callback(lambda: runner.run(sync_gateway.aclose()))
    service = AsyncSyncService(
        settings,
        engine=async_engine,
        gateway=sync_gateway,
        registry=registry,
        providers=[provider],
        clock=drill.clock,
        metrics=drill.metrics,
        replica_id="drill",
        receiver=False,
    )
    stack.callback(lambda: runner.run(service.aclose()))
    receiver = WebhookReceiver(
        settings,
        engine,
        registry=registry,
        providers=[provider],
        clock=drill.clock,
        metrics=drill.metrics,
    )
    receiver_url = stack.enter_context(serve_asgi(receiver.asgi_app(), name="idis-drill-webhooks"))
    secret = settings.provider(provider).webhook_secrets[0].get_secret_value()
    sim.control.set_webhook_target(provider, f"{receiver_url}/{provider}", [secret])

    # Enrichment runs as in the example service: the async enricher and the async
    # deferred worker on one AsyncGateway, so the worker's gate sees the breaker
    # the enricher's failures opened (on the drill's one loop, above).
    enrich_gateway = AsyncGateway(
        settings,
        metrics=drill.metrics,
        clock=drill.clock,
        sleep=drill.clock.asleep,
        auth=auth,
        seed=options.seed,
        on_transition=[recorder.on_transition],
    )
    stack.callback(lambda: runner.run(enrich_gateway.aclose()))
    enricher = AsyncEnricher(
        settings, enrich_gateway, engine=async_engine, metrics=drill.metrics, clock=drill.clock
    )
    enrich_worker = AsyncDeferredEnrichmentWorker(
        settings,
        enrich_gateway,
        engine=async_engine,
        metrics=drill.metrics,
        clock=drill.clock,
        seed=options.seed,
    )
    outbox_worker = OutboxWorker(
        engine,
        settings,
        gateway=gateway,
        clock=drill.clock,
        metrics=drill.metrics,
        providers=[provider],
        concurrency=1,
    )

    def push_deal() -> None:
        drill.deal_version += 1
        deal = f"deal-{drill.deal_version % 7}"
        with Session(engine) as session, session.begin():
            enqueue(
                session,
                NewMessage.request(
                    provider,
                    "record",
                    method="PUT",
                    path_params={"id": deal},
                    json={"tenant_id": "tenant-a", "data": {"stage": f"v{drill.deal_version}"}},
                    idempotency_key=f"{deal}-v{drill.deal_version}",
                    ordering_key=deal,
                ),
                now=drill.clock.now(),
            )

    def enrich_claim() -> None:
        drill.claims += 1
        try:
            result = runner.run(
                enricher.enrich(f"claim-{drill.claims}", tenant_id=f"tenant-{drill.claims % 3}")
            )
            drill.enrichment_results[result.status] += 1
        except IntegrationError as exc:
            drill.enrichment_results[f"error:{type(exc).__name__}"] += 1

    def tick(*, emit: bool = True) -> None:
        if emit:
            sim.control.emit(
                provider, drill.options.events_per_tick, tenant_ids=["tenant-a", "tenant-b"]
            )
        sim.control.flush_webhooks(provider, timeout=5)
        runner.run(service.tick_all())
        if drill.deal_version < 10_000 and round(drill.t / step) % 2 == 0:
            push_deal()
        outbox_worker.run_once()
        if round(drill.t / step) % 3 == 0:
            enrich_claim()
        runner.run(enrich_worker.run_once())
        _sample(drill, engine, gateway, provider, service)
        drill.clock.advance(step)

    # ------------------------------------------------------------- phases
    healthy_ticks = 8
    drill.phase("1. healthy traffic")
    for _ in range(healthy_ticks):
        tick()
    drill.note(f"{_count_applied(engine)} events applied by webhook; breaker closed")

    drill.phase(f"2. outage: {options.scenario}")
    outage_start = drill.clock.now()
    _start_outage(drill, sim.control, provider, enrich_provider)
    for _ in range(6):
        tick()

    drill.phase("3. detection")
    alert_true_at = None
    for _ in range(24):
        tick()
        if alert_true_at is None and _alert_rate(drill.samples.errors_total) > ALERT_THRESHOLD:
            alert_true_at = drill.t
            drill.note(
                "alert expression true: sum by (provider, endpoint) "
                f"(rate(integration_errors_total[15m])) > {ALERT_THRESHOLD}"
            )
    errors = _sum_samples(drill.metrics, "integration_errors_total", provider=provider)
    drill.note(
        f"{errors:.0f} errors counted for {provider}; breaker {gateway.breaker_state(provider)}"
    )

    drill.phase("4. containment (by the library)")
    with Session(engine) as session:
        summary = {s.provider: s for s in sync_summary(session, [provider])}
    mode_during = summary[provider].mode if provider in summary else "unknown"
    pending_during = _outbox_pending(engine, provider)
    open_defects_during = _open_defects(engine)
    from .. import check_token

    token_during = check_token(provider, settings=settings)
    drill.note(f"check_token: {token_during}")
    drill.note(
        f"sync mode {mode_during}; outbox holding {pending_during} deliveries; "
        f"{open_defects_during} stale-enrichment defects open; enrichment results "
        f"{dict(drill.enrichment_results)}"
    )

    drill.phase("5. recovery")
    sim.control.clear_faults(provider)
    sim.control.clear_faults(enrich_provider)
    sim.control.set_webhook_mode(provider, "deliver")
    sim.control.require_auth(provider, enabled=False)
    drill.note("provider back: faults cleared, webhooks delivering")
    refreshed = refresh_tokens(provider, settings=settings)
    drill.note(
        "token refresh: " + ", ".join(f"{r.provider} {getattr(r, 'outcome', r)}" for r in refreshed)
    )
    for _ in range(6):
        tick()
    reconciled = None
    if "reconcile" not in options.broken:
        reconciled = reconcile(
            provider,
            outage_start - timedelta(seconds=step * 2),
            settings=settings,
            handlers=registry,
            engine=engine,
            actor="drill",
            clock=drill.clock,
        )
        drill.note(
            f"reconcile: fetched {reconciled.fetched}, already applied "
            f"{reconciled.already_applied}, applied {reconciled.applied}, "
            f"failed {reconciled.failed}"
        )
    else:
        drill.note("reconcile SKIPPED (--break reconcile)")
    for _ in range(20):
        tick()
        if (
            _mode(engine, provider) == "webhook"
            and _outbox_pending(engine, provider) == 0
            and _open_defects(engine) == 0
        ):
            break
    drill.note(
        f"mode {_mode(engine, provider)}; outbox pending {_outbox_pending(engine, provider)}; "
        f"open defects {_open_defects(engine)}"
    )
    # Let the provider's last changes arrive before verifying.
    for _ in range(3):
        tick(emit=False)

    drill.phase("6. verification")
    runner.run(recorder.flush())
    _verify(
        drill,
        engine=engine,
        sim=sim,
        settings=settings,
        registry=registry,
        outage_start=outage_start,
        alert_true_at=alert_true_at,
        mode_during=mode_during,
        pending_during=pending_during,
        open_defects_during=open_defects_during,
        token_during=token_during,
        reconciled=reconciled,
        verify_sync=verify_sync,
        timeline=timeline,
    )
    drill._close_phase()
    return Report(
        title=f"RB-09 drill: {options.scenario} of {provider}",
        subtitle="idis-integrations drill on the embedded defaults",
        started_at=drill.start,
        phases=drill.phases,
        series=[
            Series("error rate", drill.samples.error_rate, "errors/s", step=False),
            Series("breaker", drill.samples.breaker, labels={0: "closed", 1: "half", 2: "open"}),
            Series("sync mode", drill.samples.mode, labels={0: "webhook", 1: "polling"}),
            Series("outbox pending", drill.samples.queue, "msgs"),
            Series("open defects", drill.samples.defects),
        ],
        checks=drill.checks,
        facts=drill.facts,
        events=drill.events,
    )


def _secret(value: str) -> Any:
    from ..config import Secret

    return Secret(value)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _start_outage(drill: _Drill, control: Any, provider: str, enrich_provider: str) -> None:
    scenario = drill.options.scenario
    if scenario == "full-outage":
        control.set_fault(provider, "error", status=503)
        control.set_fault(provider, "timeout", endpoint="changes", ratio=0.5)
        control.set_webhook_mode(provider, "stop")
        control.set_fault(enrich_provider, "error", status=503)
        drill.note(f"{provider}: 5xx storm and timeouts; webhooks stopped; {enrich_provider} down")
    elif scenario == "rate-limit-storm":
        control.set_fault(provider, "rate_limit", retry_after=drill.options.speed, ratio=0.8)
        control.set_webhook_mode(provider, "stop")
        control.set_fault(enrich_provider, "rate_limit", retry_after=drill.options.speed)
        drill.note(
            f"{provider} and {enrich_provider}: 429 storm with Retry-After; webhooks stopped"
        )
    elif scenario == "token-revocation":
        control.require_auth(provider, enabled=True)
        control.set_fault(provider, "error", status=401, endpoint="token")
        control.expire_tokens(provider)
        control.set_webhook_mode(provider, "stop")
        control.set_fault(enrich_provider, "error", status=503)
        drill.note(f"{provider}: tokens revoked and the token endpoint refusing; webhooks stopped")
    else:
        control.set_webhook_mode(provider, "stop")
        drill.note(f"{provider}: API healthy but webhooks silently dropped")


def _alert_rate(errors_total: list[tuple[float, float]]) -> float:
    """rate(integration_errors_total[15m]) at the last point, as Prometheus would see it."""
    if len(errors_total) < 2:
        return 0.0
    t_now, v_now = errors_total[-1]
    window = [p for p in errors_total if p[0] >= t_now - 900]
    t0, v0 = window[0]
    return (v_now - v0) / (t_now - t0) if t_now > t0 else 0.0


def _count_applied(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(applied_table)).scalar_one())


def _outbox_pending(engine: Any, provider: str) -> int:
    from ..outbox import DELIVERED, OutboxMessageRow

    with Session(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(OutboxMessageRow)
                .where(OutboxMessageRow.provider == provider, OutboxMessageRow.status != DELIVERED)
            )
            or 0
        )


def _open_defects(engine: Any) -> int:
    from ..enrichment._models import Defect

    with Session(engine) as session:
        return int(
            session.scalar(select(func.count()).select_from(Defect).where(Defect.status == "OPEN"))
            or 0
        )


def _mode(engine: Any, provider: str) -> str:
    from ..sync import sync_summary

    with Session(engine) as session:
        for summary in sync_summary(session, [provider]):
            return str(summary.mode)
    return "unknown"


def _sample(drill: _Drill, engine: Any, gateway: Any, provider: str, service: Any) -> None:
    t = drill.t
    errors = _sum_samples(drill.metrics, "integration_errors_total", provider=provider)
    drill.samples.errors_total.append((t, errors))
    drill.samples.error_rate.append((t, round(_alert_rate(drill.samples.errors_total), 4)))
    state = gateway.breaker_state(provider)
    drill.samples.breaker.append((t, {"closed": 0, "half_open": 1, "open": 2}[state]))
    drill.samples.mode.append((t, 1 if _mode(engine, provider) == "polling" else 0))
    drill.samples.queue.append((t, _outbox_pending(engine, provider)))
    drill.samples.defects.append((t, _open_defects(engine)))
    previous_state = getattr(drill, "_last_breaker", "closed")
    if state != previous_state:
        drill.note(f"breaker {previous_state} -> {state}")
        drill._last_breaker = state  # type: ignore[attr-defined]  # ad hoc drill memory
    previous_mode = getattr(drill, "_last_mode", "webhook")
    mode = "polling" if drill.samples.mode[-1][1] else "webhook"
    if mode != previous_mode:
        drill.note(f"sync mode {previous_mode} -> {mode}")
        drill._last_mode = mode  # type: ignore[attr-defined]  # ad hoc drill memory


@dataclass(frozen=True, slots=True)
class _Expect:
    """What a scenario should make the library do."""

    breaker: bool
    failover: bool
    deferral: bool
    outbox_hold: bool
    token: bool


_EXPECT = {
    "full-outage": _Expect(
        breaker=True, failover=True, deferral=True, outbox_hold=True, token=False
    ),
    "rate-limit-storm": _Expect(
        breaker=True, failover=True, deferral=True, outbox_hold=True, token=False
    ),
    "token-revocation": _Expect(
        breaker=False, failover=False, deferral=True, outbox_hold=True, token=True
    ),
    "webhook-only": _Expect(
        breaker=False, failover=True, deferral=False, outbox_hold=False, token=False
    ),
}


def _verify(drill: _Drill, **ctx: Any) -> None:
    options = drill.options
    provider = options.provider
    engine = ctx["engine"]
    sim = ctx["sim"]
    settings: Settings = ctx["settings"]
    expect = _EXPECT[options.scenario]

    if expect.breaker:
        alert_at = ctx["alert_true_at"]
        drill.check(
            "Detection: alert expression true during the outage",
            f"rate > {ALERT_THRESHOLD}/s",
            "never" if alert_at is None else f"true at {_clock(alert_at)}",
            alert_at is not None,
        )
        opened = any(v == 2 for _, v in drill.samples.breaker)
        drill.check(
            "Detection: breaker opened",
            "open during the outage",
            "opened" if opened else "never opened",
            opened,
        )
    if expect.token:
        state = str(getattr(ctx["token_during"], "state", ctx["token_during"]))
        drill.check(
            "Triage 3: check_token shows the broken token",
            "not valid",
            state,
            "valid" not in state.lower() or "invalid" in state.lower(),
        )
    if expect.failover:
        drill.check(
            "Containment 1: automatic polling failover",
            "polling during the outage",
            ctx["mode_during"],
            ctx["mode_during"] == "polling",
        )
    if expect.deferral:
        results = drill.enrichment_results
        deferred = results.get("deferred", 0) + results.get("cached_stale", 0)
        errors = sum(v for k, v in results.items() if k.startswith("error"))
        drill.check(
            "Containment 2-3: enrichment deferred with stale defects",
            "deferred results and open defects, no exception",
            f"{deferred} deferred/stale, {ctx['open_defects_during']} defects open, "
            f"{errors} errors",
            deferred > 0 and ctx["open_defects_during"] > 0 and errors == 0,
        )
    if expect.outbox_hold:
        drill.check(
            "Containment 4: outbox held deliveries",
            "pending while the provider is down",
            f"{ctx['pending_during']} pending",
            ctx["pending_during"] > 0,
        )
    reconciled = ctx["reconciled"]
    drill.check(
        "Recovery 3: replay reconciliation ran and was audited",
        "a completed reconcile run",
        "skipped"
        if reconciled is None
        else (
            f"fetched {reconciled.fetched}, applied {reconciled.applied}, "
            f"failed {reconciled.failed}"
        ),
        reconciled is not None and reconciled.completed and reconciled.failed == 0,
    )
    open_after = _open_defects(engine)
    drill.check(
        "Recovery 4: stale defects resolved", "0 open", f"{open_after} open", open_after == 0
    )
    mode_after = _mode(engine, provider)
    drill.check("Recovery 5: back to webhooks", "webhook", mode_after, mode_after == "webhook")
    pending_after = _outbox_pending(engine, provider)
    drill.check(
        "Verification 4: retry queue drained",
        "0 pending",
        f"{pending_after} pending",
        pending_after == 0,
    )

    # Zero lost, zero doubled: the provider's event log against the host's applications.
    stats = sim.control.stats(provider, detail=False)
    emitted = int(stats.get("events", stats.get("last_seq", 0)) or 0)
    with engine.connect() as conn:
        rows = conn.execute(
            select(applied_table.c.event_id, func.count()).group_by(applied_table.c.event_id)
        ).all()
    applied_ids = {row[0] for row in rows}
    doubled = sum(1 for row in rows if row[1] > 1)
    provider_ids = {f"evt_{seq}" for seq in range(1, emitted + 1)}
    lost = len(provider_ids - applied_ids)
    drill.check(
        "Zero events lost",
        f"{emitted} of {emitted} applied",
        f"{len(provider_ids & applied_ids)} applied, {lost} lost",
        lost == 0,
    )
    drill.check("Zero events applied twice", "0", str(doubled), doubled == 0)

    report = ctx["verify_sync"](
        provider,
        20,
        seed=options.seed,
        settings=settings,
        engine=engine,
        handlers=ctx["registry"],
        actor="drill",
        clock=drill.clock,
    )
    mismatches = len(report.mismatches)
    drill.check(
        "Verification 3: verify-sync on 20 sampled records",
        "0 mismatches",
        f"{len(report.comparisons)} compared, {mismatches} mismatches",
        mismatches == 0,
    )
    tl = ctx["timeline"](
        provider,
        drill.start,
        drill.clock.now() - timedelta(seconds=options.speed * 3),
        settings=settings,
        engine=engine,
        clock=drill.clock,
    )
    drill.check(
        "Verification 2: no gaps in the sync timeline",
        "0 gaps",
        f"{len(tl.gaps)} gaps",
        not tl.gaps,
    )

    with Session(engine) as session:
        actions = set(session.scalars(select(AuditEvent.action).distinct()))
    wanted: list[tuple[str, str]] = [("reconcile", "reconcile.")]
    if expect.breaker:
        wanted.append(("breaker transitions", "breaker."))
    if expect.failover:
        wanted.append(("sync mode switches", "sync.mode"))
    if expect.deferral:
        wanted.append(("defects", "defect."))
    if expect.token:
        wanted.append(("token refresh", "token."))
    missing = [label for label, prefix in wanted if not any(a.startswith(prefix) for a in actions)]
    drill.check(
        "Every step audited",
        ", ".join(label for label, _ in wanted),
        f"{len(actions)} kinds of audit rows"
        + (f"; missing {', '.join(missing)}" if missing else ""),
        not missing,
    )
    width = max(len(c.name) for c in drill.checks)
    drill.echo("")
    for c in drill.checks:
        drill.echo(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.actual}")
