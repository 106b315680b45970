"""``idis-integrations postmortem``: an incident report rebuilt from what the library recorded.

RB-09's postmortem asks: was the fallback effective, was reconciliation
complete, how long did it take. Everything needed is already in the database
of a running service: the audit trail (breaker and mode transitions, defects,
reconciled events, token refreshes), the health samples the
:class:`~idis.integrations.resilience.HealthSampler` writes, and the
outbox's own timestamps. This module turns them into the same report the
drill writes (HTML with a timeline chart, or Markdown).

The operator's ``--since`` is a search window ("6 hours ago"); the report
zooms to the incident in it: from the first sign of failure to the recovery,
with a margin either side, so a ten-minute outage is not a sliver of a
six-hour chart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from .._audit import AuditEvent
from .._timeparse import format_duration, utcnow
from ..db._engine import read_only
from ..resilience._recorder import HealthSample, timeline_of_live_samples
from ._report import Check, Phase, Report, Series

__all__ = ["PostmortemFacts", "build_postmortem", "describe_audit_row", "incident_window"]

_BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
#: Margin either side of the incident: this share of its length, at least MIN_MARGIN.
MARGIN_SHARE = 0.1
MIN_MARGIN = timedelta(minutes=2)
_TIME = "%Y-%m-%d %H:%M:%S"


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
    #: Messages dead-lettered (gave up) and still dead at the end of the window.
    dead_letters: int = 0
    #: Messages still pending (waiting to be delivered) at the end of the window.
    pending_at_end: int = 0


@dataclass(frozen=True, slots=True)
class _Outbox:
    """One outbox message's life: created, then delivered or dead-lettered (or neither yet)."""

    created: datetime
    delivered: datetime | None
    died: datetime | None


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
    return [(max(a, since), min(b, until)) for a, b in spans if b > since and a < until]


def _outbox(session: Session, provider: str, since: datetime, until: datetime) -> list[_Outbox]:
    """Outbox messages alive in the window; a dead one died at its last update."""
    from ..outbox import OutboxMessageRow

    rows = session.execute(
        select(
            OutboxMessageRow.created_at,
            OutboxMessageRow.delivered_at,
            OutboxMessageRow.status,
            OutboxMessageRow.updated_at,
        ).where(
            OutboxMessageRow.provider == provider,
            OutboxMessageRow.created_at < until,
            or_(OutboxMessageRow.delivered_at.is_(None), OutboxMessageRow.delivered_at >= since),
        )
    ).all()
    return [
        _Outbox(created, delivered, updated if status == "dead" else None)
        for created, delivered, status, updated in rows
    ]


def _step_series(
    steps: list[tuple[datetime, int]], since: datetime, until: datetime
) -> list[tuple[datetime, int]]:
    """A count over time from its arrivals (+1) and departures (-1), from ``since``.

    At the same instant an arrival counts before a departure; a departure of
    something that arrived before the rows read (a defect created before the
    search) does not take the count below 0.
    """
    steps = sorted(
        ((max(at, since), delta) for at, delta in steps if at <= until),
        key=lambda step: (step[0], -step[1]),
    )
    series, depth = [(since, 0)], 0
    for at, delta in steps:
        depth = max(0, depth + delta)
        series.append((at, depth))
    return series


def _pending_series(
    messages: Sequence[_Outbox], since: datetime, until: datetime
) -> list[tuple[datetime, int]]:
    """Messages waiting to be delivered over time (not the dead-lettered ones)."""
    steps: list[tuple[datetime, int]] = []
    for message in messages:
        end = message.delivered or message.died
        if end is not None and end < since:
            continue
        steps.append((message.created, 1))
        if end is not None:
            steps.append((end, -1))
    return _step_series(steps, since, until)


def _dead_series(
    messages: Sequence[_Outbox], since: datetime, until: datetime
) -> list[tuple[datetime, int]]:
    """Dead letters over time (they stay until re-queued)."""
    return _step_series([(m.died, 1) for m in messages if m.died is not None], since, until)


def incident_window(
    marks: Sequence[datetime], recovered: datetime | None, since: datetime, until: datetime
) -> tuple[datetime, datetime] | None:
    """The incident, first sign of failure to recovery, widened by a margin, within the search.

    Args:
        marks: times something failed or recovered (transitions, failing samples, defects...).
        recovered: when it was over (the last breaker close, return to webhooks, drain), if it was.
        since: start of the operator's search window.
        until: end of the operator's search window.

    Returns:
        ``(start, end)``, or None when nothing happened in the search window.
    """
    inside = [m for m in marks if since <= m <= until]
    if not inside:
        return None
    first = min(inside)
    last = max([*inside, recovered] if recovered is not None else inside)
    margin = max(MIN_MARGIN, (last - first) * MARGIN_SHARE)
    return max(since, first - margin), min(until, last + margin)


def _plain(value: Any) -> str:
    """A detail value as text an operator reads: never a Python repr of a dict or list."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set):
        items = [_plain(v) for v in value]
        return ", ".join(items) if len(items) <= 5 else f"{len(items)} items"
    if isinstance(value, datetime):
        return value.strftime(_TIME)
    return str(value)


#: Detail keys that name one record or one moment; left out of a line so that lines
#: about the same kind of thing group ("defect.created: STALE_ENRICHMENT, claim x11").
_IDENTIFYING = ("_id", "_ids", "_at", "_seq", "generation", "since", "until")


def describe_audit_row(row: AuditEvent, provider: str) -> str:
    """One line for an audit row: action, then its message or its details, as plain text."""
    text = row.message
    if not text:
        details = {
            key: value
            for key, value in (row.details or {}).items()
            if value not in (None, "", [], {}) and not key.endswith(_IDENTIFYING)
        }
        text = ", ".join(f"{k}={_plain(v)}" for k, v in details.items())
    line = f"{row.action}: {text}" if text else row.action
    if row.provider and row.provider != provider:
        line = f"[{row.provider}] {line}"
    return line


def _recovery(
    breaker_changes: Sequence[tuple[datetime, str]],
    mode_changes: Sequence[tuple[datetime, str]],
    pending: Sequence[tuple[datetime, int]],
) -> datetime | None:
    """When the incident was over: breaker closed, back on webhooks, queue drained."""
    if breaker_changes and breaker_changes[-1][1] != "closed":
        return None  # still failing at the end of the window
    if mode_changes and mode_changes[-1][1] == "polling":
        return None
    ends = [at for at, state in breaker_changes[-1:]] + [at for at, _ in mode_changes[-1:]]
    if not ends:
        return None
    closed = max(ends)
    drained = next((at for at, depth in pending if at >= closed and depth == 0), None)
    return max(closed, drained) if drained is not None else closed


def build_postmortem(
    engine: Engine,
    provider: str,
    since: datetime,
    until: datetime | None = None,
) -> tuple[Report, PostmortemFacts]:
    """Rebuild the incident of ``provider`` found in ``[since, until]`` from the database."""
    until = until or utcnow()
    with Session(read_only(engine)) as session:
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
        messages = _outbox(session, provider, since, until)

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
    created = [row for row in audit if row.action == "defect.created"]
    resolved = [row for row in audit if row.action == "defect.resolved"]
    marks = (
        [at for at, _ in breaker_changes]
        + [at for at, _ in mode_changes]
        + [s.sampled_at for s in samples if s.failures]
        + [row.occurred_at for row in created + resolved]
        + [m.died for m in messages if m.died is not None]
    )
    recovered = _recovery(breaker_changes, mode_changes, _pending_series(messages, since, until))
    window = incident_window(marks, recovered, since, until)
    start, end = window if window is not None else (since, until)

    def t(at: datetime) -> float:
        return (at - start).total_seconds()

    def points(counts: Sequence[tuple[datetime, int]]) -> list[tuple[float, float]]:
        return [(t(at), float(count)) for at, count in counts]

    pending = _pending_series(messages, start, end)
    defect_steps = [(row.occurred_at, 1) for row in created]
    defect_steps += [(row.occurred_at, -1) for row in resolved]
    dead = _dead_series(messages, start, end)
    # A breaker that half-opens and fails its trial is one outage, not several.
    open_spans = _intervals(breaker_changes, frozenset({"open", "half_open"}), start, end)
    fallback_spans = _intervals(mode_changes, frozenset({"polling"}), start, end)
    in_window = [row for row in audit if start <= row.occurred_at <= end]
    refresh_failures = sum(
        1
        for row in in_window
        if row.provider == provider
        and row.action in ("token.refresh_failing", "token.reauthorization_required")
    )
    peak = max((depth for _, depth in pending), default=0)
    drain: float | None = None
    last_close = next((at for at, state in reversed(breaker_changes) if state == "closed"), None)
    if last_close is not None:
        empty_after = next((at for at, depth in pending if at >= last_close and depth == 0), None)
        drain = (empty_after - last_close).total_seconds() if empty_after else None

    facts = PostmortemFacts(
        breaker_open_seconds=sum((b - a).total_seconds() for a, b in open_spans),
        fallback_seconds=sum((b - a).total_seconds() for a, b in fallback_spans),
        events_reconciled=sum(1 for row in ours if row.action == "reconcile.event_applied"),
        defects_created=len(created),
        defects_resolved=len(resolved),
        queue_peak=peak,
        queue_drain_seconds=drain,
        token_refresh_failures=refresh_failures,
        dead_letters=dead[-1][1],
        pending_at_end=pending[-1][1],
    )
    report = Report(
        title=f"RB-09 postmortem: {provider}",
        subtitle=_subtitle(window, recovered, since, until),
        started_at=start,
        ended_at=end,
        phases=sorted(
            [
                Phase(f"breaker not closed {format_duration(b - a)}", t(a), t(b))
                for a, b in open_spans
            ]
            + [Phase(f"polling {format_duration(b - a)}", t(a), t(b)) for a, b in fallback_spans],
            key=lambda p: p.start,
        ),
        series=[
            Series(
                "error rate",
                _error_rate(samples, start, end, t),
                "of calls",
                step=False,
            ),
            Series(
                "breaker",
                _state_series(breaker_changes, _BREAKER_VALUE, start, end, t),
                labels={0: "closed", 1: "half", 2: "open"},
            ),
            Series(
                "sync mode",
                _state_series(mode_changes, {"polling": 1.0}, start, end, t),
                labels={0: "webhook", 1: "polling"},
            ),
            Series("outbox pending", points(pending), "msgs"),
            Series("dead letters", points(dead), "msgs"),
            Series("open defects", points(_step_series(defect_steps, start, end))),
        ],
        checks=_checks(facts, bool(open_spans), pending, dead),
        facts=_fact_rows(facts, window=window, audit=audit, start=start, end=end),
        events=[
            (t(row.occurred_at), describe_audit_row(row, provider))
            for row in in_window
            if row.action != "reconcile.event_applied"
        ][:2000],
    )
    return report, facts


def _state_series(
    changes: Sequence[tuple[datetime, str]],
    values: Mapping[str, float],
    start: datetime,
    end: datetime,
    t: Any,
) -> list[tuple[float, float]]:
    """A state's chart line: the state in force at ``start`` (the last change before it),
    then each change in the window."""
    before = [state for when, state in changes if when <= start]
    first = values.get(before[-1], 0.0) if before else 0.0
    return [(0.0, first)] + [(t(at), values.get(s, 0.0)) for at, s in changes if start < at <= end]


def _subtitle(
    window: tuple[datetime, datetime] | None,
    recovered: datetime | None,
    since: datetime,
    until: datetime,
) -> str:
    searched = f"searched {since:{_TIME}} to {until:{_TIME}} UTC"
    if window is None:
        return f"no incident found ({searched}): nothing failed or changed state"
    start, end = window
    state = f"recovered {recovered:%H:%M:%S}" if recovered is not None else "not recovered yet"
    return f"incident window {start:{_TIME}} to {end:{_TIME}} UTC, {state} ({searched})"


def _checks(
    facts: PostmortemFacts,
    breaker_opened: bool,
    pending: Sequence[tuple[datetime, int]],
    dead: Sequence[tuple[datetime, int]],
) -> list[Check]:
    still_open = facts.defects_created - facts.defects_resolved
    return [
        Check(
            "Fallback engaged while the breaker was open",
            "polling during the outage",
            format_duration(facts.fallback_seconds) + " in polling",
            not breaker_opened or facts.fallback_seconds > 0,
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
            f"{pending[-1][1]} pending",
            pending[-1][1] == 0,
        ),
        Check(
            "No dead letters left",
            "0 dead (re-queued with queue-webhook-retries)",
            f"{dead[-1][1]} dead",
            dead[-1][1] == 0,
        ),
    ]


def _fact_rows(
    facts: PostmortemFacts,
    *,
    window: tuple[datetime, datetime] | None,
    audit: Sequence[AuditEvent],
    start: datetime,
    end: datetime,
) -> list[tuple[str, str]]:
    drain = facts.queue_drain_seconds
    rows = [
        ("time with the breaker open", format_duration(facts.breaker_open_seconds)),
        ("time in polling fallback", format_duration(facts.fallback_seconds)),
        ("events missed and reconciled by replay", str(facts.events_reconciled)),
        ("stale defects created / resolved", f"{facts.defects_created} / {facts.defects_resolved}"),
        ("retry-queue peak (pending)", f"{facts.queue_peak} messages"),
        (
            "retry-queue drain time after recovery",
            "n/a" if drain is None else format_duration(drain),
        ),
        ("pending at the end (waiting to be delivered)", f"{facts.pending_at_end} messages"),
        ("dead letters at the end (gave up; need a re-queue)", f"{facts.dead_letters} messages"),
        ("token refresh failures", str(facts.token_refresh_failures)),
    ]
    outside = sum(1 for row in audit if not start <= row.occurred_at <= end)
    if window is not None and outside:
        rows.append(("audit rows outside the incident window (not shown)", str(outside)))
    return rows


def _error_rate(
    samples: Sequence[HealthSample], start: datetime, end: datetime, t: Any
) -> list[tuple[float, float]]:
    """The error rate over every replica still reporting at each sample time in the window.

    A replica counts while it keeps reporting (``live_samples``): samples of a
    replica that was restarted stop counting within two of its intervals.
    """
    points = []
    for at, live in timeline_of_live_samples(samples):
        if start <= at <= end:
            calls = sum(s.calls for s in live)
            failures = sum(s.failures for s in live)
            points.append((t(at), round(failures / calls, 3) if calls else 0.0))
    return points
