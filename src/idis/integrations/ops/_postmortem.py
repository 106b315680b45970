"""``idis-integrations postmortem``: an incident report rebuilt from what the library recorded.

RB-09's postmortem asks: was the fallback effective, was reconciliation
complete, how long did it take. Everything needed is already in the database
of a running service: the audit trail (breaker and mode transitions, defects,
reconciled events, token refreshes), the health samples the
:class:`~idis.integrations.resilience._recorder.StateRecorder` writes, and the
outbox's own timestamps. This module turns them into the same report the
drill writes (HTML with a timeline chart, or Markdown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from .._audit import AuditEvent
from .._timeparse import format_duration, utcnow
from ..resilience._recorder import HealthSample, timeline_of_live_samples
from ._report import Check, Phase, Report, Series

__all__ = ["PostmortemFacts", "build_postmortem"]

_BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


@dataclass(frozen=True, slots=True)
class PostmortemFacts:
    """The numbers RB-09's postmortem asks for."""

    breaker_open_seconds: float
    fallback_seconds: float
    events_reconciled: int
    defects_created: int
    defects_resolved: int
    queue_peak: int
    queue_drain_seconds: float | None
    token_refresh_failures: int


def _intervals(
    changes: Sequence[tuple[datetime, str]],
    active: frozenset[str],
    since: datetime,
    until: datetime,
) -> list[tuple[datetime, datetime]]:
    """Stretches of time during which the state was one of ``active``, from its changes."""
    spans: list[tuple[datetime, datetime]] = []
    started: datetime | None = None
    for at, state in changes:
        if state in active and started is None:
            started = at
        elif state not in active and started is not None:
            spans.append((started, at))
            started = None
    if started is not None:
        spans.append((started, until))
    return [(max(a, since), min(b, until)) for a, b in spans if b > since]


def _queue_series(
    session: Session, provider: str, since: datetime, until: datetime
) -> list[tuple[datetime, int]]:
    """Pending outbox messages over time, from each message's created/delivered times."""
    from ..outbox import OutboxMessageRow

    rows = session.execute(
        select(OutboxMessageRow.created_at, OutboxMessageRow.delivered_at).where(
            OutboxMessageRow.provider == provider,
            OutboxMessageRow.created_at < until,
            or_(OutboxMessageRow.delivered_at.is_(None), OutboxMessageRow.delivered_at >= since),
        )
    ).all()
    steps: list[tuple[datetime, int]] = []
    for created, delivered in rows:
        steps.append((max(created, since), 1))
        if delivered is not None and delivered < until:
            steps.append((delivered, -1))
    steps.sort(key=lambda item: (item[0], item[1]))
    series, depth = [(since, 0)], 0
    for at, delta in steps:
        depth += delta
        series.append((at, depth))
    return series


def build_postmortem(
    engine: Engine,
    provider: str,
    since: datetime,
    until: datetime | None = None,
) -> tuple[Report, PostmortemFacts]:
    """Rebuild the incident of ``provider`` in ``[since, until]`` from the database."""
    until = until or utcnow()
    with Session(engine) as session:
        audit = list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.occurred_at >= since, AuditEvent.occurred_at <= until)
                .order_by(AuditEvent.occurred_at, AuditEvent.id)
            )
        )
        samples = list(
            session.scalars(
                select(HealthSample)
                .where(
                    HealthSample.provider == provider,
                    HealthSample.sampled_at >= since,
                    HealthSample.sampled_at <= until,
                )
                .order_by(HealthSample.sampled_at, HealthSample.id)
            )
        )
        queue = _queue_series(session, provider, since, until)

    def t(at: datetime) -> float:
        return (at - since).total_seconds()

    ours = [row for row in audit if row.provider == provider]
    breaker_changes = [
        (row.occurred_at, row.action.removeprefix("breaker."))
        for row in ours
        if row.action.startswith("breaker.") and row.subject_id in (None, provider)
    ]
    mode_changes = [
        (row.occurred_at, str((row.details or {}).get("to", "")))
        for row in ours
        if row.action in ("sync.mode_changed", "sync.mode_override")
    ]
    # A breaker that half-opens and fails its trial is one outage, not several.
    open_spans = _intervals(breaker_changes, frozenset({"open", "half_open"}), since, until)
    fallback_spans = _intervals(mode_changes, frozenset({"polling"}), since, until)
    reconciled = sum(1 for row in ours if row.action == "reconcile.event_applied")
    created = [row for row in audit if row.action == "defect.created"]
    resolved = [row for row in audit if row.action == "defect.resolved"]
    refresh_failures = sum(
        1
        for row in ours
        if row.action in ("token.refresh_failing", "token.reauthorization_required")
    )
    peak = max((depth for _, depth in queue), default=0)
    drain: float | None = None
    last_close = next((at for at, state in reversed(breaker_changes) if state == "closed"), None)
    if last_close is not None:
        empty_after = next((at for at, depth in queue if at >= last_close and depth == 0), None)
        drain = (empty_after - last_close).total_seconds() if empty_after else None

    facts = PostmortemFacts(
        breaker_open_seconds=sum((b - a).total_seconds() for a, b in open_spans),
        fallback_seconds=sum((b - a).total_seconds() for a, b in fallback_spans),
        events_reconciled=reconciled,
        defects_created=len(created),
        defects_resolved=len(resolved),
        queue_peak=peak,
        queue_drain_seconds=drain,
        token_refresh_failures=refresh_failures,
    )

    series = [
        Series("error rate", _error_rate(samples, t), "of calls", step=False),
        Series(
            "breaker",
            [(0.0, 0.0)]
            + [(t(at), _BREAKER_VALUE.get(state, 0.0)) for at, state in breaker_changes],
            labels={0: "closed", 1: "half", 2: "open"},
        ),
        Series(
            "sync mode",
            [(0.0, 0.0)]
            + [(t(at), 1.0 if mode == "polling" else 0.0) for at, mode in mode_changes],
            labels={0: "webhook", 1: "polling"},
        ),
        Series("outbox pending", [(t(at), float(depth)) for at, depth in queue], "msgs"),
        Series("open defects", _defect_series(created, resolved, t)),
    ]
    phases = [
        Phase(f"breaker not closed {format_duration(b - a)}", t(a), t(b)) for a, b in open_spans
    ] + [Phase(f"polling {format_duration(b - a)}", t(a), t(b)) for a, b in fallback_spans]
    phases.sort(key=lambda p: p.start)
    still_open = len(created) - len(resolved)
    checks = [
        Check(
            "Fallback engaged while the breaker was open",
            "polling during the outage",
            format_duration(facts.fallback_seconds) + " in polling",
            not open_spans or facts.fallback_seconds > 0,
        ),
        Check(
            "Stale defects resolved",
            "all resolved",
            f"{max(0, still_open)} still open",
            still_open <= 0,
        ),
        Check(
            "Retry queue drained",
            "0 pending at the end",
            f"{queue[-1][1]} pending",
            queue[-1][1] == 0,
        ),
    ]
    report = Report(
        title=f"RB-09 postmortem: {provider}",
        subtitle=f"{since:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M} UTC, from the audit trail",
        started_at=since,
        phases=phases,
        series=series,
        checks=checks,
        facts=[
            ("time with the breaker open", format_duration(facts.breaker_open_seconds)),
            ("time in polling fallback", format_duration(facts.fallback_seconds)),
            ("events missed and reconciled by replay", str(facts.events_reconciled)),
            (
                "stale defects created / resolved",
                f"{facts.defects_created} / {facts.defects_resolved}",
            ),
            ("retry-queue peak", f"{facts.queue_peak} messages"),
            (
                "retry-queue drain time after recovery",
                "n/a" if drain is None else format_duration(drain),
            ),
            ("token refresh failures", str(facts.token_refresh_failures)),
        ],
        events=[
            (t(row.occurred_at), f"{row.action}: {row.message or ''}".strip(": "))
            for row in audit
            if row.action != "reconcile.event_applied"
        ][:500],
    )
    return report, facts


def _error_rate(samples: Sequence[HealthSample], t: Any) -> list[tuple[float, float]]:
    """The error rate over every replica still reporting at each sample time.

    A replica counts while it keeps reporting (``live_samples``): samples of a
    replica that was restarted stop counting within two of its intervals.
    """
    points = []
    for at, live in timeline_of_live_samples(samples):
        calls = sum(s.calls for s in live)
        failures = sum(s.failures for s in live)
        points.append((t(at), round(failures / calls, 3) if calls else 0.0))
    return points


def _defect_series(
    created: Sequence[AuditEvent], resolved: Sequence[AuditEvent], t: Any
) -> list[tuple[float, float]]:
    steps = sorted(
        [(row.occurred_at, 1) for row in created] + [(row.occurred_at, -1) for row in resolved],
        key=lambda item: item[0],
    )
    series, depth = [(0.0, 0.0)], 0
    for at, delta in steps:
        depth = max(0, depth + delta)
        series.append((t(at), float(depth)))
    return series


def default_window() -> tuple[datetime, datetime]:
    """The last four hours (RB-09 Recovery 4's window)."""
    now = utcnow()
    return now - timedelta(hours=4), now
