"""Persistence for the mode controller, the sentinel and the poller, and ``sync_summary``.

Everything here takes a SQLAlchemy ``Session`` and joins the caller's
transaction; the async drivers call the same functions through
``AsyncSession.run_sync``. Carrying out a mode transition is one function,
:func:`carry_out`, used by the controller's driver and by the operator's CLI
alike: it persists the state, writes the audit row (``sync.mode_changed``,
with the reason), logs ``idis.sync.mode_changed``, updates the metrics, and on
a switch to polling moves the poller's cursor back to the last position the
webhook channel is known to have covered, so the window between the last
good webhook and the switch is polled too.

Fencing
-------
Leadership (one poller, sentinel and controller per provider) is held by an
advisory lock on PostgreSQL or a lease row on SQLite (:mod:`.leader`); each
time a replica takes it, :func:`take_epoch` bumps the provider's
``leader_epoch``. Every write the leader makes to the cursor or the mode
state runs in a transaction that first calls :func:`fence`: it locks the state
row and checks the epoch is still its own, else raises :class:`Fenced` and
the transaction rolls back. So a poller deposed mid-poll (its lock connection
dropped, its lease lapsed), or one racing an operator's ``sync mode --set``
(which bumps the epoch too), can no longer move the cursor: a failover rewind
is never undone by a late page.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .._audit import record_audit
from .._timeparse import utcnow
from ..db._base import dialect_insert
from ..exceptions import ConfigError, IntegrationError
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
from ._mode import Mode, ModePolicy, ModeState, Reason, Transition, initial_state
from ._models import SyncCursor, SyncInbox, SyncProviderState

__all__ = [
    "CHANGES_STREAM",
    "NOTIFICATIONS_STREAM",
    "Fenced",
    "SyncSummary",
    "carry_out",
    "check_mode_target",
    "claim_cursor",
    "fence",
    "get_cursor",
    "last_webhook_at",
    "load_state",
    "mode_state",
    "move_cursor",
    "note_signature_spike",
    "override_mode",
    "release_epoch",
    "save_mode_state",
    "status_facts",
    "sync_summary",
    "take_epoch",
]

_log = get_logger()

#: The provider's change feed: the stream the poller and the sentinel read.
CHANGES_STREAM = "changes"
#: The feed position of a data-less notification channel (Google Drive): the fetches
#: notifications trigger read from here, apart from the poller's ``changes``.
NOTIFICATIONS_STREAM = "notifications"


def load_state(
    session: Session,
    provider: str,
    policy: ModePolicy,
    now: datetime,
    *,
    for_update: bool = False,
) -> SyncProviderState:
    """The provider's state row, created in its initial state when missing.

    Args:
        session: The caller's session.
        provider: Provider name.
        policy: Decides the initial mode (``CRM_MODE``).
        now: Creation time for a new row.
        for_update: Lock the row (PostgreSQL) so concurrent writers queue.
    """
    query = select(SyncProviderState).where(SyncProviderState.provider == provider)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is not None:
        return row
    initial = initial_state(policy, now)
    row = SyncProviderState(
        provider=provider,
        mode=initial.mode.value,
        reason=initial.reason.value,
        changed_at=now,
        updated_at=now,
    )
    # A savepoint: another replica may create the row at the same instant.
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # another replica created it first: use theirs
        found = session.scalar(query)
        if found is None:
            raise
        return found
    return row


class Fenced(IntegrationError):
    """This replica's leadership epoch is no longer current: its write was refused.

    Another replica took the leadership, or an operator overrode the mode, since
    this one took its epoch. Nothing was written; the leader steps down and
    tries again at its next tick.
    """

    retryable = True


def take_epoch(
    session: Session,
    provider: str,
    policy: ModePolicy,
    now: datetime,
    replica: str,
    *,
    lease: timedelta | None = None,
    current: int | None = None,
) -> int | None:
    """Take (or renew) the leadership of ``provider``: the new epoch, or None if refused.

    Args:
        session: The caller's session (commit to make it count).
        provider: Provider name.
        policy: For creating the state row.
        now: The current time.
        replica: This replica's id.
        lease: SQLite: take it only if nobody else holds an unexpired lease, and
            hold it until ``now + lease``. None (PostgreSQL): the caller holds the
            advisory lock, which is the leadership.
        current: The epoch this replica holds, to renew it: kept while it is
            still the row's (nobody took over), else a new one is taken.
    """
    row = load_state(session, provider, policy, now, for_update=True)
    if lease is not None:
        held_by_other = row.leader not in (None, replica)
        if held_by_other and row.lease_until is not None and row.lease_until > now:
            return None
    if current is None or row.leader_epoch != current or row.leader != replica:
        row.leader_epoch = (row.leader_epoch or 0) + 1
    row.leader = replica
    row.lease_until = now + lease if lease is not None else None
    row.updated_at = now
    return int(row.leader_epoch)


def release_epoch(session: Session, provider: str, replica: str, epoch: int) -> None:
    """Give up a leadership this replica still holds (lets a standby lead at once)."""
    session.execute(
        update(SyncProviderState)
        .where(
            SyncProviderState.provider == provider,
            SyncProviderState.leader == replica,
            SyncProviderState.leader_epoch == epoch,
        )
        .values(leader=None, lease_until=None)
    )


def fence(session: Session, provider: str, epoch: int) -> SyncProviderState:
    """Lock the provider's state row and check ``epoch`` is current (first in the transaction).

    Raises:
        Fenced: another replica or an operator moved the epoch on.
    """
    row = session.scalar(
        select(SyncProviderState).where(SyncProviderState.provider == provider).with_for_update()
    )
    if row is None or row.leader_epoch != epoch:
        raise Fenced(
            f"{provider}: leadership epoch {epoch} is no longer current "
            f"({None if row is None else row.leader_epoch}); the write was refused"
        )
    return row


def mode_state(row: SyncProviderState) -> ModeState:
    """The controller's view of a state row."""
    return ModeState(
        mode=Mode(row.mode),
        reason=Reason(row.reason),
        changed_at=row.changed_at,
        override=Mode(row.override) if row.override else None,
        healthy_since=row.healthy_since,
    )


def save_mode_state(row: SyncProviderState, state: ModeState, now: datetime) -> None:
    """Write the controller's state into the row."""
    row.mode = state.mode.value
    row.reason = state.reason.value
    row.changed_at = state.changed_at
    row.override = state.override.value if state.override else None
    row.healthy_since = state.healthy_since
    row.updated_at = now


def get_cursor(session: Session, provider: str, stream: str = CHANGES_STREAM) -> SyncCursor | None:
    """The poller's cursor for a provider stream, if it has one."""
    return session.scalar(
        select(SyncCursor).where(SyncCursor.provider == provider, SyncCursor.stream == stream)
    )


def claim_cursor(
    session: Session, provider: str, stream: str, expected: str | None, now: datetime
) -> bool:
    """Lock the stream's cursor row (created blank if missing) and check it still reads
    ``expected``, the position this poll started from or last wrote.

    Two polls of one stream (two replicas' webhook receivers each fetching what a Drive
    notification announced, or ``sync poll`` by hand beside the leader) both start from
    the same position; without this, the one that finishes last writes its page's
    position over the other's further one, and the stream goes back. The row lock
    orders the pages of both; the one that finds the position moved is told to stop
    (False): whoever moved it read on from where this one started. A blank row is
    inserted with ON CONFLICT DO NOTHING so that two first polls do not fail on the
    unique (provider, stream); a blank row starts a poll as no row does.
    """
    session.execute(
        dialect_insert(SyncCursor.__table__, session.get_bind().dialect.name)
        .values(provider=provider, stream=stream, updated_at=now)
        .on_conflict_do_nothing(index_elements=["provider", "stream"])
    )
    cursor = session.scalar(
        select(SyncCursor)
        .where(SyncCursor.provider == provider, SyncCursor.stream == stream)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    return cursor is not None and cursor.position == expected


def move_cursor(
    session: Session,
    provider: str,
    *,
    after_seq: int | None = None,
    watermark: datetime | None,
    now: datetime,
    moved_by: str | None = None,
    stream: str = CHANGES_STREAM,
    position: str | None = None,
) -> SyncCursor:
    """Set the poller's cursor (creating it).

    ``position`` is the provider's opaque cursor text; ``after_seq`` a generic
    feed seq (stored as its decimal text). With neither, the next poll starts
    from ``watermark``.
    """
    cursor = get_cursor(session, provider, stream)
    if cursor is None:
        cursor = SyncCursor(provider=provider, stream=stream, updated_at=now)
        session.add(cursor)
    if position is None and after_seq is not None:
        position = str(after_seq)
    cursor.position = position
    cursor.watermark = watermark
    cursor.moved_by = moved_by
    cursor.updated_at = now
    return cursor


def _last_webhook(provider: str) -> Select[datetime | None]:
    return select(func.max(SyncInbox.webhook_at)).where(SyncInbox.provider == provider)


def last_webhook_at(session: Session, provider: str) -> datetime | None:
    """When a webhook last delivered a change for ``provider`` (any replica)."""
    return session.scalar(_last_webhook(provider))


def note_signature_spike(session: Session, provider: str, at: datetime) -> None:
    """Record that the signature failure rate crossed the threshold (seen by every replica)."""
    row = session.scalar(select(SyncProviderState).where(SyncProviderState.provider == provider))
    if row is None:
        row = SyncProviderState(
            provider=provider,
            mode=Mode.WEBHOOK.value,
            reason=Reason.DEFAULT.value,
            changed_at=at,
            updated_at=at,
        )
        session.add(row)
    row.signature_spike_at = at
    row.updated_at = at


def carry_out(
    session: Session,
    row: SyncProviderState,
    state: ModeState,
    transition: Transition,
    *,
    actor: str = "system",
    metrics: Metrics | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Persist a mode switch and make it visible: audit, log, metrics; move the cursor.

    On a switch to polling the cursor moves to the last position the webhook
    channel is confirmed to have covered (``confirmed_seq``/``confirmed_at``),
    so the poller's first window starts there, not at the switch.
    """
    provider = row.provider
    save_mode_state(row, state, transition.at)
    info: dict[str, Any] = {
        "from": transition.from_mode.value,
        "to": transition.to_mode.value,
        "reason": transition.reason.value,
        "lag_seconds": row.lag_seconds,
    }
    if transition.to_mode is Mode.WEBHOOK:
        # Webhook coverage resumes where polling left off, and the sentinel
        # re-reads the feed from the poller's position: anything the poller had
        # not fetched yet is applied by the sentinel if no webhook brings it.
        cursor = get_cursor(session, provider)
        if cursor is not None and cursor.after_seq is not None:
            row.confirmed_seq = cursor.after_seq
            row.confirmed_at = cursor.watermark or row.confirmed_at
            if row.sentinel_seq is None or row.sentinel_seq > cursor.after_seq:
                row.sentinel_seq = cursor.after_seq
        row.silent_since = None
    if transition.to_mode is Mode.POLLING:
        # Polling starts where nothing after the last good webhook can be missed.
        after_seq, watermark = row.confirmed_seq, row.confirmed_at
        cursor = get_cursor(session, provider)
        if after_seq is not None or watermark is not None or cursor is None:
            move_cursor(
                session,
                provider,
                after_seq=after_seq,
                watermark=watermark,
                now=transition.at,
                moved_by="failover",
            )
        info["poll_from_seq"] = after_seq
        info["poll_from"] = watermark.isoformat() if watermark else None
    info.update(details or {})
    record_audit(
        session,
        "sync.mode_changed",
        provider=provider,
        actor=actor,
        subject_type="provider",
        subject_id=provider,
        details=info,
        message=f"{provider}: {transition.from_mode.value} -> {transition.to_mode.value} "
        f"({transition.reason.value}): {transition.detail}",
        occurred_at=transition.at,
    )
    m = metrics or get_metrics()
    m.mode_switches.labels(
        provider=provider, to_mode=transition.to_mode.value, reason=transition.reason.value
    ).inc()
    m.sync_mode.labels(provider=provider).set(1 if transition.to_mode is Mode.POLLING else 0)
    _log.warning(
        "idis.sync.mode_changed",
        msg=f"sync mode {transition.from_mode.value} -> {transition.to_mode.value}: "
        f"{transition.detail}",
        provider=provider,
        from_mode=transition.from_mode.value,
        to_mode=transition.to_mode.value,
        reason=transition.reason.value,
        actor=actor,
    )


@dataclass(frozen=True, slots=True)
class SyncSummary:
    """One provider's sync state, for ``idis-integrations status`` and ``sync status``."""

    provider: str
    #: ``webhook`` or ``polling``.
    mode: str
    #: Why (``default``, ``config``, ``operator``, ``webhook_lag``, ``recovered``...).
    reason: str
    #: When the mode last changed (None: the controller has not run yet).
    since: datetime | None
    #: Operator override (``polling`` pins, ``webhook`` beats CRM_MODE), or None.
    override: str | None
    #: When a webhook last delivered a change.
    last_webhook_at: datetime | None
    #: Webhook lag the sentinel last measured, in seconds.
    lag_seconds: float | None
    #: When the sentinel last checked.
    sentinel_at: datetime | None
    #: Since when webhooks look healthy (polling mode: the return countdown).
    healthy_since: datetime | None
    #: When the poller last completed a poll.
    polled_at: datetime | None
    #: The poller's cursor (sequence number).
    cursor_seq: int | None
    #: Replica holding the poller lock.
    leader: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: every field, times as ISO-8601."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in asdict(self).items()}


def sync_summary(session: Session, providers: list[str] | None = None) -> list[SyncSummary]:
    """The sync state of every provider the controller knows (or of ``providers``), by name.

    Providers never seen by the controller are omitted unless named, in which
    case they show their initial webhook state.
    """
    rows = {row.provider: row for row in session.scalars(select(SyncProviderState))}
    names = sorted(rows) if providers is None else list(providers)
    cursors = {
        c.provider: c.after_seq
        for c in session.scalars(select(SyncCursor).where(SyncCursor.stream == CHANGES_STREAM))
    }
    result = []
    for name in names:
        row = rows.get(name)
        result.append(
            SyncSummary(
                provider=name,
                mode=row.mode if row else Mode.WEBHOOK.value,
                reason=row.reason if row else Reason.DEFAULT.value,
                since=row.changed_at if row else None,
                override=row.override if row else None,
                last_webhook_at=last_webhook_at(session, name),
                lag_seconds=row.lag_seconds if row else None,
                sentinel_at=row.sentinel_at if row else None,
                healthy_since=row.healthy_since if row else None,
                polled_at=row.polled_at if row else None,
                cursor_seq=cursors.get(name),
                leader=row.leader if row else None,
            )
        )
    return result


def _synced_by_a_service(row: SyncProviderState | None) -> bool:
    """Whether a sync service has run for the row's provider (led it, polled it, or ran
    its sentinel), as opposed to a row an operator's override alone created."""
    if row is None:
        return False
    return any(
        value is not None
        for value in (
            row.leader,
            row.lease_until,
            row.sentinel_at,
            row.polled_at,
            row.confirmed_seq,
        )
    )


def check_mode_target(session: Session, settings: Any, provider: str, setting: str) -> None:
    """Refuse ``sync mode --set`` for a provider that has no webhook/polling sync.

    A sync mode applies to the providers a sync service syncs: every provider of kind
    ``crm`` (the default), and a provider of another kind once a service runs it (a
    documents provider on Drive's API passed as ``providers=[...]`` or ``sync run
    --provider``). Anything else (the documents or enrichment provider no service syncs)
    would get a mode nothing reads. Reads only: nothing is written.

    Raises:
        ConfigError: naming the provider, its kind, and the providers that accept a mode.
        UnknownProviderError: the provider is not configured.
    """
    kind = settings.provider(provider).kind
    if kind == "crm":
        return
    row = session.scalar(select(SyncProviderState).where(SyncProviderState.provider == provider))
    if _synced_by_a_service(row):
        return
    crm = sorted(name for name, p in settings.providers.items() if p.kind == "crm")
    raise ConfigError(
        f"sync mode --set {setting}: {provider} is a provider of kind {kind}, which no sync "
        "service syncs (no webhook/polling sync to switch); a sync mode applies to providers "
        f"of kind crm ({', '.join(crm) if crm else 'none configured'}), and to a provider of "
        "another kind only once a sync service syncs it (a documents provider on Drive's API "
        "run by `sync run --provider NAME`); nothing was changed",
        variable="--provider",
    )


def override_mode(
    session: Session,
    provider: str,
    setting: str,
    *,
    policy: ModePolicy,
    now: datetime,
    actor: str,
    metrics: Metrics | None = None,
) -> ModeState:
    """Apply the operator's ``sync mode --set webhook|polling|auto``, audited.

    Raises:
        ValueError: for an unknown setting (nothing changed).
    """
    from ._mode import operator_override

    row = load_state(session, provider, policy, now, for_update=True)
    # Fence the leader: a poll it has in flight must not undo what this does
    # (a cursor moved by a switch to polling); it takes a new epoch next tick.
    row.leader_epoch = (row.leader_epoch or 0) + 1
    decision = operator_override(mode_state(row), setting, now)
    if decision.transition is not None:
        carry_out(
            session,
            row,
            decision.state,
            decision.transition,
            actor=actor,
            metrics=metrics,
            details={"setting": setting},
        )
    else:
        save_mode_state(row, decision.state, now)
        record_audit(
            session,
            "sync.mode_override",
            provider=provider,
            actor=actor,
            subject_type="provider",
            subject_id=provider,
            details={"setting": setting, "mode": decision.state.mode.value},
            message=f"{provider}: operator set mode {setting} "
            f"(mode stays {decision.state.mode.value})",
            occurred_at=now,
        )
        _log.warning(
            "idis.sync.mode_override",
            msg=f"operator set sync mode {setting}",
            provider=provider,
            setting=setting,
            mode=decision.state.mode.value,
            actor=actor,
        )
    return decision.state


def status_facts(session: Session, settings: Any, provider: str) -> dict[str, Any]:
    """Sync facts for ``idis-integrations status`` (a ``status.FACT_SOURCES`` entry).

    Returns:
        ``sync_mode`` (with its reason), ``sync_override``, ``last_webhook_age_seconds``
        and ``webhook_lag_seconds`` for a provider the controller runs (or of kind
        crm, synced by default); nothing for others.
    """
    # The state row and the last webhook in one statement (two round trips were two
    # waits for a CPU per /status call on a busy machine); no row, no webhook read.
    last_webhook = _last_webhook(provider).scalar_subquery()
    found = session.execute(
        select(SyncProviderState, last_webhook).where(SyncProviderState.provider == provider)
    ).first()
    row, last = (found[0], found[1]) if found is not None else (None, None)
    if row is None and settings.provider(provider).kind != "crm":
        return {}
    now = utcnow()
    if row is None:
        pinned = settings.sync.crm_mode == "polling"
        return {
            "sync_mode": "polling (config, not started)" if pinned else "webhook (not started)",
            "last_webhook_age_seconds": None,
        }
    return {
        "sync_mode": f"{row.mode} ({row.reason})",
        "sync_override": row.override,
        "last_webhook_age_seconds": (
            round((now - last).total_seconds(), 1) if last is not None else None
        ),
        "webhook_lag_seconds": row.lag_seconds,
        # Bad signatures never switch modes; a recent spike is worth a look.
        "webhook_signature_spike_at": (
            row.signature_spike_at.isoformat() if row.signature_spike_at is not None else None
        ),
    }
