"""``resync``: the fallback when the replay does not reach back far enough.

A full resync fetches the records as the provider holds them *now* (those
updated since a time, or a list of ids) and applies every one whose order key
(``ProviderRecord.order``, the adapter's rule) is newer than the key the
inbox's ledger holds for it, through the same handlers and the same inbox as
every other channel. It cannot reproduce the intermediate changes a replay
would have delivered, only the current state; that is what makes it the
fallback rather than the first choice.

Each record is applied as a *snapshot event*: a ``ProviderEvent`` of type
``record.created`` / ``record.updated`` carrying the record's order key, whose
id, ``resync:<record>:v<key>``, makes a second resync of the same state a
duplicate. A record asked for by id that the provider answers 404 for is a
deletion only once a second read, after the rest of the batch and
``confirm_after``, still finds nothing (a 404 can be transient: a replica
behind, an eventually consistent index); it is then applied as
``record.deleted`` at the adapter's deletion key, just after everything we
applied. ``verify_sync(repair=True)`` applies its repairs the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from .._clock import Clock, system_clock
from .._flow import drive
from .._timeparse import parse_since
from ..config import Settings
from ..exceptions import ConfigError
from ..observability._logs import get_logger, redact_text
from ..providers._order import Ordering, ordering_for
from ..sync._effects import SyncFace
from ..sync._inbox import ApplyOutcome, ApplyResult, HandlerRegistry, get_registry
from ._db import audit_result, commit_flow, default_client, default_engine, sessions, transaction
from ._ledger import LedgerEntry, read_ledger
from ._replay import EventFailure, require_handlers

__all__ = [
    "CONFIRM_AFTER",
    "INBOX_SOURCE",
    "ResyncSummary",
    "adapter_ordering",
    "apply_snapshots",
    "confirm_missing",
    "resync",
    "snapshot_event",
]

log = get_logger()

#: Inbox channel of snapshot events: like a poll, they are fetched by us from the
#: provider's current state (the inbox knows the channels webhook, poll, replay).
INBOX_SOURCE = "poll"
#: Records fetched and applied per transaction.
_BATCH = 500
#: How long after a 404 the record is read again before its deletion is believed.
CONFIRM_AFTER = timedelta(seconds=2)


def adapter_ordering(client: Any, settings: Settings, provider: str) -> Ordering:
    """The provider adapter's ordering rule (``client.ordering``), else the configured one."""
    ordering = getattr(client, "ordering", None)
    if ordering is not None:
        return ordering  # type: ignore[no-any-return]  # an adapter's Ordering
    return ordering_for(settings.provider(provider).order_by)


def snapshot_event(
    record_id: str,
    record: Any | None,
    ledger: LedgerEntry | None,
    *,
    ordering: Ordering,
    now: datetime,
) -> Any | None:
    """The event that brings the host to the provider's current state, or None if it is there.

    Args:
        record_id: The record id.
        record: The provider's record now (``ProviderRecord``), or None when the
            provider confirmed it has none (see :func:`confirm_missing`).
        ledger: What the inbox applied for the record, or None.
        ordering: The provider's ordering rule (deletion keys).
        now: The current time (a deletion's time and key).

    Returns:
        A ``ProviderEvent`` (``seq`` 0: it has no place in the change feed), or
        None when the ledger already holds this state (or the deletion).
    """
    from ..providers import ProviderEvent
    from ..providers._order import OrderKey

    if record is None:
        if ledger is None or ledger.deleted:
            return None
        key = ordering.deletion_key(ledger.order, now)
        return ProviderEvent(
            id=f"resync:{record_id}:deleted:v{key}",
            seq=0,
            type="record.deleted",
            record_id=record_id,
            tenant_id=ledger.tenant_id,
            version=key.major if ordering.name == "version" else 0,
            occurred_at=now,
            data={},
            order=key,
        )
    order = record.order if isinstance(record.order, OrderKey) else OrderKey(record.version)
    if ledger is not None and ledger.order >= order and not ledger.deleted:
        return None
    return ProviderEvent(
        id=f"resync:{record.id}:v{order}",
        seq=0,
        type="record.created" if ledger is None or ledger.deleted else "record.updated",
        record_id=record.id,
        tenant_id=record.tenant_id,
        version=record.version,
        occurred_at=record.updated_at,
        data=dict(record.data),
        order=order,
    )


def confirm_missing(
    client: Any, record_ids: Iterable[str], *, clock: Clock, after: timedelta
) -> dict[str, Any | None]:
    """Read records that answered 404 once more, ``after`` later: ``{id: record or None}``.

    None means the deletion is confirmed by two reads; a record means the
    first 404 was transient.
    """
    ids = list(record_ids)
    if not ids:
        return {}
    clock.sleep(after.total_seconds())
    return {rid: client.get_record(rid) for rid in ids}


def apply_snapshots(
    engine: Engine,
    provider: str,
    events: Sequence[Any],
    *,
    registry: HandlerRegistry,
    action: str,
    audit_source: str,
    actor: str,
    correlation_id: str,
    clock: Clock = system_clock,
    details: Callable[[Any], dict[str, Any]] | None = None,
) -> ApplyResult:
    """Apply snapshot events through the inbox in one transaction, one audit row each.

    Returns:
        What was applied, superseded (a newer key arrived meanwhile) or failed.
    """

    def write_audit(session: Session, result: ApplyResult, now: datetime) -> None:
        def applied(event: Any) -> dict[str, Any]:
            return {
                "event_id": event.id,
                "event_type": event.type,
                "version": event.version,
                "order": str(event.order),
                **(details(event) if details else {}),
            }

        audit_result(
            session,
            result,
            applied,
            applied=action,
            failed=action,
            provider=provider,
            actor=actor,
            source=audit_source,
            correlation_id=correlation_id,
            occurred_at=now,
        )

    return drive(
        commit_flow(
            provider,
            list(events),
            registry=registry,
            source=INBOX_SOURCE,
            clock=clock,
            also=write_audit,
        ),
        SyncFace(clock=clock, engine=engine),
    )


@dataclass(frozen=True, slots=True)
class ResyncSummary:
    """What one resync did."""

    provider: str
    run_id: str | None
    #: Records fetched from the provider (ids asked for, or updated since).
    fetched: int = 0
    #: Already at the provider's state locally: nothing to do.
    unchanged: int = 0
    #: Applied through the host's handlers (dry run: would be applied).
    applied: int = 0
    #: Asked for by id but absent at the provider and locally.
    missing: int = 0
    #: No handler takes the record's event type: recorded, not applied.
    ignored: int = 0
    #: Handler raised: not applied.
    failed: int = 0
    #: A 404 the second read contradicted (the record exists): not deleted.
    unconfirmed: int = 0
    dry_run: bool = False
    failures: tuple[EventFailure, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return self.failed == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self) | {"ok": self.ok}


def _record_batches(
    client: Any, since: datetime | None, record_ids: Sequence[str] | None
) -> Iterable[list[tuple[str, Any | None]]]:
    if record_ids is not None:
        for start in range(0, len(record_ids), _BATCH):
            chunk = record_ids[start : start + _BATCH]
            yield [(rid, client.get_record(rid)) for rid in chunk]
        return
    cursor: str | None = None
    while True:
        page = client.list_records(updated_since=since, cursor=cursor, limit=_BATCH)
        yield [(record.id, record) for record in page.items]
        cursor = page.next_cursor
        if not cursor:
            return


def resync(
    provider: str,
    *,
    since: datetime | str | None = None,
    record_ids: Sequence[str] | None = None,
    settings: Settings | None = None,
    handlers: HandlerRegistry | None = None,
    client: Any | None = None,
    engine: Engine | None = None,
    dry_run: bool = False,
    actor: str = "system",
    clock: Clock = system_clock,
    progress: Callable[[int], None] | None = None,
    confirm_after: timedelta = CONFIRM_AFTER,
) -> ResyncSummary:
    """Fetch the provider's current records and apply those the host does not have yet.

    Give exactly one of ``since`` (records updated since then, via
    ``list_records``) or ``record_ids`` (via ``get_record``; an id the provider
    answers 404 for twice, ``confirm_after`` apart, is applied as a deletion
    when the host still has it). Every applied record gets a
    ``reconcile.record_resynced`` audit row (``source='resync'``).

    Raises:
        ConfigError: unknown provider, bad ``since``, neither or both selectors,
            or no handlers registered.
        ProviderError: the provider failed; records applied so far stay applied,
            and running again continues (applied ones are unchanged by then).
        StorageError: the database is unreachable.
    """
    settings = settings if settings is not None else Settings.from_env()
    settings.provider(provider)
    if (since is None) == (record_ids is None):
        raise ConfigError(
            "resync needs exactly one of since= (records updated since a time) or "
            "record_ids= (a list of ids)",
            variable="since",
        )
    start = None if since is None else parse_since(since, name="since", now=clock.now)
    ids = None if record_ids is None else list(dict.fromkeys(str(r) for r in record_ids))
    registry = handlers if handlers is not None else get_registry()
    if not dry_run:
        require_handlers(registry, provider)
    run_id = f"rs_{uuid.uuid4().hex[:20]}"
    names = ("fetched", "unchanged", "applied", "missing", "ignored", "failed", "unconfirmed")
    counts = dict.fromkeys(names, 0)
    failures: list[EventFailure] = []
    with ExitStack() as stack:
        engine = engine if engine is not None else default_engine(settings, stack)
        client = client if client is not None else default_client(settings, provider, stack, engine)
        ordering = adapter_ordering(client, settings, provider)
        factory = sessions(engine)
        for batch in _record_batches(client, start, ids):
            counts["fetched"] += len(batch)
            with transaction(factory) as session:
                ledger = read_ledger(session, provider, [rid for rid, _ in batch])
            suspects = [
                rid
                for rid, record in batch
                if record is None and rid in ledger and not ledger[rid].deleted
            ]
            second = confirm_missing(client, suspects, clock=clock, after=confirm_after)
            counts["unconfirmed"] += sum(1 for r in second.values() if r is not None)
            now = clock.now()
            events = []
            for rid, first in batch:
                record = second.get(rid, first)
                event = snapshot_event(rid, record, ledger.get(rid), ordering=ordering, now=now)
                if event is not None:
                    events.append(event)
                elif record is None and rid not in ledger:
                    counts["missing"] += 1
                else:
                    counts["unchanged"] += 1
            if dry_run or not events:
                counts["applied"] += len(events) if dry_run else 0
            else:
                result = apply_snapshots(
                    engine,
                    provider,
                    events,
                    registry=registry,
                    action="reconcile.record_resynced",
                    audit_source="resync",
                    actor=actor,
                    correlation_id=run_id,
                    clock=clock,
                )
                counts["applied"] += result.count(ApplyOutcome.APPLIED)
                counts["unchanged"] += result.count(ApplyOutcome.DUPLICATE) + result.count(
                    ApplyOutcome.SUPERSEDED
                )
                counts["ignored"] += result.count(ApplyOutcome.IGNORED)
                counts["failed"] += len(result.failed)
                failures.extend(
                    EventFailure(str(e.id), e.record_id, type(x).__name__, redact_text(str(x)))
                    for e, x in result.failed
                )
            if progress is not None:
                progress(len(batch))
    log.info(
        "idis.reconcile.resynced",
        provider=provider,
        run_id=run_id,
        dry_run=dry_run,
        msg="resync finished",
        **counts,
    )
    return ResyncSummary(
        provider=provider,
        run_id=None if dry_run else run_id,
        dry_run=dry_run,
        failures=tuple(failures[:100]),
        **counts,
    )
