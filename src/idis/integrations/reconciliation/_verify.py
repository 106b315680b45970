"""``verify_sync``: compare the host's records with the provider's (RB-09 Verification 3).

Two samples, so that a record missing on either side can be found:

* ``sample_size`` records drawn from the host's side, each fetched from the
  provider (a record the host created that never reached the provider shows
  as ``missing_remote``);
* ``sample_size`` records drawn from the provider's list, each read on the
  host's side (a record whose creation never reached the host shows as
  ``missing_local``).

A record drawn by both is compared once. The host's side is a
:class:`~._host.HostRecordSource` over the host's own table when one is given
(``host_records=``, ``Settings.host_records`` / ``IDIS_HOST_RECORDS``): then a
row changed by hand is a field-level mismatch. Without one it is the inbox's
version ledger (:class:`~._ledger.AppliedRecordSource`), which only tells
whether the provider moved on without us.

``repair`` fixes the mismatches on one side:

* ``"host"`` (``True``, the historical ``--repair``): the provider's state is
  applied through the host's handlers as a snapshot event (see
  :mod:`._fallback`); when the inbox already applied that version (the row was
  changed in the host, not at the provider) the host record source writes it;
* ``"provider"``: the host's record is pushed to the provider through the
  outbox (``PUT /records/{id}``), queued for the outbox workers to deliver.

Each repair writes one ``verify_sync.record_repaired`` audit row
(``source='repair'``, ``details.side``), and each run one
``verify_sync.completed`` row: the evidence for the runbook's Verification step.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import Engine

from .._audit import record_audit
from .._clock import Clock, system_clock
from ..config import Settings
from ..exceptions import ConfigError
from ..observability._logs import get_logger, redact_text
from ..sync._inbox import ApplyOutcome, HandlerRegistry, get_registry
from ._db import default_client, default_engine, sessions, transaction
from ._fallback import (
    CONFIRM_AFTER,
    adapter_ordering,
    apply_snapshots,
    confirm_missing,
    snapshot_event,
)
from ._host import HostRecordSource, load_host_records
from ._ledger import AppliedRecordSource, LocalRecordSource, read_ledger
from ._logic import LocalRecord, RecordComparison, compare_record
from ._replay import require_handlers

__all__ = ["MAX_SAMPLE_SIZE", "REPAIR_SIDES", "Repair", "VerifyReport", "verify_sync"]

log = get_logger()

#: Largest sample one run checks per direction (each sampled record costs one call).
MAX_SAMPLE_SIZE = 10_000
#: The sides ``repair`` can fix.
REPAIR_SIDES = ("host", "provider")
#: Records per page when listing the provider's side.
_LIST_PAGE = 500
#: Audit action of a repair.
REPAIRED = "verify_sync.record_repaired"

RepairSide = Literal["host", "provider"]


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``repair`` did for one mismatched record."""

    record_id: str
    #: ``repaired`` (verified equal afterwards), ``queued`` (a push waits in the
    #: outbox), ``failed`` or ``not_repairable``.
    outcome: str
    #: Why, when not repaired.
    reason: str | None = None
    #: The side repaired: ``host`` or ``provider``.
    side: str = "host"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of one verification run."""

    provider: str
    #: The seed the samples were drawn with (pass it again to check the same records).
    seed: int
    sample_size: int
    #: One comparison per sampled record (host sample first), before any repair.
    comparisons: list[RecordComparison] = field(default_factory=list)
    #: Repairs attempted (``repair`` only).
    repairs: list[Repair] = field(default_factory=list)
    #: Run id (correlation id of its audit rows).
    run_id: str = ""
    #: Records drawn from the host's side and from the provider's.
    host_sampled: int = 0
    provider_sampled: int = 0
    #: What the host's side was: ``host_records`` (the host's table) or ``ledger``.
    local_source: str = "ledger"
    #: The side ``repair`` fixed, or None.
    repair_side: str | None = None
    #: Matches that are deletions on both sides: the provider answered 404 for a record the
    #: host's side holds as deleted (expected 404s, logged at debug and counted here).
    gone: int = 0

    @property
    def mismatches(self) -> list[RecordComparison]:
        """Comparisons that found a difference."""
        return [c for c in self.comparisons if not c.ok]

    @property
    def repaired(self) -> list[str]:
        """Ids repaired and verified equal afterwards."""
        return [r.record_id for r in self.repairs if r.outcome == "repaired"]

    @property
    def queued(self) -> list[str]:
        """Ids whose host version waits in the outbox for the provider."""
        return [r.record_id for r in self.repairs if r.outcome == "queued"]

    @property
    def ok(self) -> bool:
        """No mismatch is left: none found, or every one repaired (or its push queued)."""
        return len(self.repaired) + len(self.queued) == len(self.mismatches)

    def counts(self) -> dict[str, Any]:
        """The run's figures without the records: what its audit row and log line say."""
        return {
            "seed": self.seed,
            "sample_size": self.sample_size,
            "local_source": self.local_source,
            "host_sampled": self.host_sampled,
            "provider_sampled": self.provider_sampled,
            "checked": len(self.comparisons),
            "matched": len(self.comparisons) - len(self.mismatches),
            "gone": self.gone,
            "mismatched": len(self.mismatches),
            "repair_side": self.repair_side,
            "repaired": len(self.repaired),
            "queued": len(self.queued),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "provider": self.provider,
            **self.counts(),
            "ok": self.ok,
            "run_id": self.run_id,
            # Each comparison and repair with all its fields (a diff list, not a tuple).
            "records": [
                asdict(c) | {"diffs": [asdict(d) for d in c.diffs]} for c in self.comparisons
            ],
            "repairs": [asdict(r) for r in self.repairs],
        }


def _check_sample_size(sample_size: int) -> None:
    if isinstance(sample_size, bool) or not isinstance(sample_size, int):
        raise ConfigError(
            f"--sample-size={sample_size!r} is not an integer", variable="--sample-size"
        )
    if not 1 <= sample_size <= MAX_SAMPLE_SIZE:
        raise ConfigError(
            f"--sample-size={sample_size!r} must be between 1 and {MAX_SAMPLE_SIZE}",
            variable="--sample-size",
        )


def _repair_side(repair: bool | str | None) -> RepairSide | None:
    if repair is None or repair is False:
        return None
    if repair is True:
        return "host"  # the historical --repair: the provider's state into the host
    if repair == "host":
        return "host"
    if repair == "provider":
        return "provider"
    raise ConfigError(
        f"--repair={repair!r} is not a side: expected host (the provider's version into the "
        "host) or provider (the host's version to the provider)",
        variable="--repair",
    )


def _as_mapping(record: Any | None) -> dict[str, Any] | None:
    """The provider's record as compare_record reads it (``version``: its order key's major)."""
    if record is None:
        return None
    order = getattr(record, "order", None)
    version = order.major if order is not None else record.version
    return {"tenant_id": record.tenant_id, "version": version, "data": record.data}


def _sample_provider(client: Any, n: int, seed: int) -> list[Any]:
    """``n`` of the provider's records, uniformly at random (one pass, reservoir sampling).

    Seeded from ``seed`` on its own stream, so the host's sample and this one
    are independent, and a seed repeats both while neither side changes.
    """
    rng = random.Random(f"provider:{seed}")  # noqa: S311  # sampling, not crypto
    chosen: list[Any] = []
    seen = 0
    cursor: str | None = None
    cursors: set[str] = set()
    while True:
        page = client.list_records(cursor=cursor, limit=_LIST_PAGE)
        for record in page.items:
            seen += 1
            if len(chosen) < n:
                chosen.append(record)
            else:
                slot = rng.randrange(seen)
                if slot < n:
                    chosen[slot] = record
        cursor = page.next_cursor
        # A provider that hands back a cursor it gave before would loop forever.
        if not cursor or cursor in cursors:
            break
        cursors.add(cursor)
    return chosen


def verify_sync(
    provider: str,
    sample_size: int,
    *,
    seed: int | None = None,
    repair: bool | str | None = False,
    host_records: HostRecordSource | None = None,
    local_records: LocalRecordSource | None = None,
    fields: Sequence[str] | None = None,
    settings: Settings | None = None,
    client: Any | None = None,
    engine: Engine | None = None,
    handlers: HandlerRegistry | None = None,
    actor: str = "system",
    clock: Clock = system_clock,
    confirm_after: timedelta = CONFIRM_AFTER,
    on_checked: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Compare a random sample of the host's records, and of the provider's, across the two.

    Example::

        report = verify_sync("crm_provider", 20, seed=7, host_records=deals)
        for mismatch in report.mismatches:
            print(mismatch.record_id, mismatch.status, mismatch.diffs)

    Args:
        provider: Provider name as configured.
        sample_size: Records to sample on each side (1-10000).
        seed: Sampling seed (default: a random one, reported in the result).
        repair: ``"host"`` (or True): bring the host to the provider's state;
            ``"provider"``: push the host's records through the outbox.
        host_records: The host's records (default: the factory named by
            ``settings.host_records``, else the inbox's version ledger).
        local_records: A read-only source of the host's records (sample, get);
            the older form of ``host_records``, which cannot ``write``.
        fields: Data fields that matter (default: the source's ``fields``, else all).
        settings: Library settings (default: from the environment).
        client: The provider adapter (``get_record``, ``list_records``); default a
            ``ProviderClient``.
        engine: Database engine (default: one for ``settings.database_url``).
        handlers: The host's handlers, for host repairs (default: the process-wide registry).
        actor: Who runs it, for the audit trail.
        clock: Time source (tests pass a manual clock).
        confirm_after: A record the provider answers 404 for is read again this
            much later before a host repair deletes it.
        on_checked: Called with 1 after each record compared (progress).

    Raises:
        ConfigError: unknown provider, bad sample size or repair side, a host
            repair without handlers, or both ``host_records`` and ``local_records``.
        ProviderError: the provider failed while fetching a record.
        StorageError: the database is unreachable.
    """
    settings = settings if settings is not None else Settings.from_env()
    settings.provider(provider)
    _check_sample_size(sample_size)
    side = _repair_side(repair)
    if host_records is not None and local_records is not None:
        raise ConfigError(
            "verify_sync takes host_records or local_records, not both", variable="host_records"
        )
    registry = handlers if handlers is not None else get_registry()
    if side == "host":
        require_handlers(registry, provider)
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    run_id = f"vs_{uuid.uuid4().hex[:20]}"
    tick = on_checked if on_checked is not None else (lambda _n: None)
    with ExitStack() as stack:
        engine = engine if engine is not None else default_engine(settings, stack)
        client = client if client is not None else default_client(settings, provider, stack, engine)
        factory = sessions(engine)
        ordering = adapter_ordering(client, settings, provider)
        host = host_records
        if host is None and local_records is None and settings.host_records:
            host = load_host_records(
                settings.host_records, provider=provider, engine=engine, settings=settings
            )
            close = getattr(host, "close", None)
            if callable(close):
                stack.callback(close)
        local: LocalRecordSource = (
            host
            if host is not None
            else local_records
            if local_records is not None
            else AppliedRecordSource(engine, provider)
        )
        wanted = fields if fields is not None else getattr(host, "fields", None)
        remotes: dict[str, Any | None] = {}
        comparisons: list[RecordComparison] = []
        gone = 0
        host_sample = local.sample(sample_size, seed)
        for item in host_sample:
            if item.record_id in remotes:
                continue
            remote = client.get_record(item.record_id)
            remotes[item.record_id] = remote
            comparison = compare_record(item, item.record_id, _as_mapping(remote), fields=wanted)
            comparisons.append(comparison)
            if remote is None:
                gone += _log_not_found(provider, item, comparison)
            tick(1)
        provider_sample = (
            _sample_provider(client, sample_size, seed)
            if callable(getattr(client, "list_records", None))
            else []
        )
        for record in provider_sample:
            if record.id in remotes:
                continue  # drawn by both samples: compared once
            remotes[record.id] = record
            comparisons.append(
                compare_record(local.get(record.id), record.id, _as_mapping(record), fields=wanted)
            )
            tick(1)
        report = VerifyReport(
            provider,
            seed,
            sample_size,
            comparisons,
            [],
            run_id,
            host_sampled=len(host_sample),
            provider_sampled=len(provider_sample),
            local_source="host_records" if host is not None else "ledger",
            repair_side=side,
            gone=gone,
        )
        if side is not None and report.mismatches:
            context = _RepairContext(
                report=report,
                remotes=remotes,
                local=local,
                host=host,
                engine=engine,
                client=client,
                ordering=ordering,
                registry=registry,
                actor=actor,
                clock=clock,
                confirm_after=confirm_after,
                fields=wanted,
            )
            report.repairs.extend(
                _repair_host(context) if side == "host" else _repair_provider(context)
            )
        with transaction(factory) as session:
            record_audit(
                session,
                "verify_sync.completed",
                provider=provider,
                actor=actor,
                outcome="ok" if report.ok else "mismatch",
                details=report.counts()
                | {"mismatched_ids": [c.record_id for c in report.mismatches][:100]},
                correlation_id=run_id,
                message=(
                    f"verified {len(comparisons)} {provider} records: "
                    f"{len(report.mismatches)} mismatched, {len(report.repaired)} repaired"
                    + (f", {len(report.queued)} queued for the provider" if report.queued else "")
                ),
                occurred_at=clock.now(),
            )
    log.info(
        "idis.reconcile.verified",
        provider=provider,
        run_id=run_id,
        msg="sync verification finished",
        **report.counts(),
    )
    return report


def _log_not_found(provider: str, local: LocalRecord, comparison: RecordComparison) -> int:
    """Log one 404 of the host's sample; 1 when it was expected (the record is gone on both
    sides), else 0.

    A record the host's side holds as deleted is legitimately gone at the provider: a debug
    line (the summary counts them). One the host still holds is ``missing_remote``: a
    warning per record, the one place that says so in the logs.
    """
    if comparison.ok:
        log.debug(
            "idis.reconcile.verify_gone",
            provider=provider,
            record_id=local.record_id,
            msg=f"{local.record_id}: deleted on the host's side and gone at {provider} (404)",
        )
        return 1
    log.warning(
        "idis.reconcile.verify_missing_remote",
        provider=provider,
        record_id=local.record_id,
        local_version=local.version,
        msg=(
            f"{local.record_id}: the host holds it (version {local.version}) "
            f"but {provider} answers 404"
        ),
    )
    return 0


@dataclass(slots=True)
class _RepairContext:
    report: VerifyReport
    remotes: dict[str, Any | None]
    local: LocalRecordSource
    host: HostRecordSource | None
    engine: Engine
    client: Any
    ordering: Any
    registry: HandlerRegistry
    actor: str
    clock: Clock
    confirm_after: timedelta
    fields: Sequence[str] | None

    def compare(self, record_id: str) -> RecordComparison:
        return compare_record(
            self.local.get(record_id),
            record_id,
            _as_mapping(self.remotes[record_id]),
            fields=self.fields,
        )

    def audit(
        self,
        record_id: str,
        tenant_id: str | None,
        *,
        side: str,
        outcome: str,
        details: dict[str, Any],
        message: str | None = None,
        also: Callable[[Any], None] | None = None,
    ) -> None:
        """One ``verify_sync.record_repaired`` row (with ``also`` in the same transaction)."""
        with transaction(sessions(self.engine)) as session:
            if also is not None:
                also(session)
            record_audit(
                session,
                REPAIRED,
                provider=self.report.provider,
                actor=self.actor,
                subject_type="record",
                subject_id=record_id,
                tenant_id=tenant_id,
                source="repair",
                outcome=outcome,
                details={"side": side, **details},
                message=message,
                correlation_id=self.report.run_id,
                occurred_at=self.clock.now(),
            )


def _repair_host(ctx: _RepairContext) -> list[Repair]:
    """Bring the host to the provider's state: through the inbox, else the source's ``write``."""
    provider = ctx.report.provider
    mismatched = {c.record_id: c for c in ctx.report.mismatches}
    with transaction(sessions(ctx.engine, write=False)) as session:
        ledger = read_ledger(session, provider, list(mismatched))
    # A 404 may be transient: read again before deleting the host's copy.
    suspects = [rid for rid in mismatched if ctx.remotes[rid] is None]
    ctx.remotes.update(
        confirm_missing(ctx.client, suspects, clock=ctx.clock, after=ctx.confirm_after)
    )
    repairs: dict[str, Repair] = {}
    for record_id in suspects:
        if ctx.remotes[record_id] is not None and ctx.compare(record_id).ok:
            repairs[record_id] = Repair(
                record_id, "repaired", "the provider's 404 was transient: the record matches"
            )
    events = []
    writes: list[str] = []
    now = ctx.clock.now()
    for record_id in mismatched:
        if record_id in repairs:
            continue
        remote = ctx.remotes[record_id]
        if remote is None and record_id not in ledger:
            # Nothing says the provider ever had it: deleting the host's row
            # would lose a record that only needs pushing.
            repairs[record_id] = Repair(
                record_id,
                "not_repairable",
                "the provider never had this record as far as the inbox knows; "
                "--repair=provider pushes the host's",
            )
            continue
        event = snapshot_event(
            record_id, remote, ledger.get(record_id), ordering=ctx.ordering, now=now
        )
        if event is not None:
            events.append(event)
        elif ctx.host is not None:
            writes.append(record_id)
        else:
            # The inbox already holds the provider's version: the host's data
            # differs at the same version, which only the host can repair.
            repairs[record_id] = Repair(
                record_id,
                "not_repairable",
                "the provider's version is already applied; the local data differs at the "
                "same version, so the host must repair it (IDIS_HOST_RECORDS can)",
            )
    if events:
        result = apply_snapshots(
            ctx.engine,
            provider,
            events,
            registry=ctx.registry,
            action=REPAIRED,
            audit_source="repair",
            actor=ctx.actor,
            correlation_id=ctx.report.run_id,
            clock=ctx.clock,
            details=lambda e: {
                "side": "host",
                "via": "handlers",
                "fields": [d.field for d in mismatched[e.record_id].diffs],
                "local_version": mismatched[e.record_id].local_version,
            },
        )
        for event, error in result.failed:
            repairs[event.record_id] = Repair(event.record_id, "failed", type(error).__name__)
        for event in [*result.of(ApplyOutcome.SUPERSEDED), *result.of(ApplyOutcome.IGNORED)]:
            if ctx.host is not None:
                writes.append(event.record_id)
            else:
                repairs[event.record_id] = Repair(
                    event.record_id, "not_repairable", "the inbox did not apply the snapshot"
                )
        for event in result.applied:
            record_id = event.record_id
            if ctx.compare(record_id).ok:
                repairs[record_id] = Repair(record_id, "repaired")
            elif ctx.host is not None:
                # The handlers kept the host's row (say, an unpushed local edit):
                # the operator asked for the provider's version, so write it.
                writes.append(record_id)
            else:
                repairs[record_id] = Repair(record_id, "failed", "still differs after the repair")
    for record_id in writes:
        repairs[record_id] = _write_host(ctx, record_id, mismatched[record_id])
    return [repairs[rid] for rid in mismatched if rid in repairs]


def _write_host(ctx: _RepairContext, record_id: str, comparison: RecordComparison) -> Repair:
    assert ctx.host is not None  # only called with a host source
    remote = ctx.remotes[record_id]
    changed = [d.field for d in comparison.diffs]
    try:
        ctx.host.write(record_id, remote)
    except Exception as exc:  # noqa: BLE001  # the host's code: report, audit, go on
        ctx.audit(
            record_id,
            comparison.tenant_id,
            side="host",
            outcome="failed",
            details={"via": "host_records", "fields": changed, "error": type(exc).__name__},
            message=redact_text(str(exc))[:500],
        )
        return Repair(record_id, "failed", type(exc).__name__)
    after = ctx.compare(record_id)
    ctx.audit(
        record_id,
        comparison.tenant_id,
        side="host",
        outcome="ok" if after.ok else "failed",
        details={
            "via": "host_records",
            "fields": changed,
            "local_version": comparison.local_version,
            "remote_version": comparison.remote_version,
            "deleted": remote is None,
        },
    )
    if after.ok:
        return Repair(record_id, "repaired")
    return Repair(record_id, "failed", "still differs after the host record source wrote it")


def _enqueuer(message: Any) -> Callable[[Any], None]:
    from ..outbox import enqueue

    def add(session: Any) -> None:
        enqueue(session, message)

    return add


def _repair_provider(ctx: _RepairContext) -> list[Repair]:
    """Push the host's version of each mismatched record through the outbox."""
    from ..outbox import NewMessage

    provider = ctx.report.provider
    repairs: list[Repair] = []
    for comparison in ctx.report.mismatches:
        record_id = comparison.record_id
        local: LocalRecord | None = ctx.local.get(record_id)
        if local is None or local.deleted:
            repairs.append(
                Repair(
                    record_id,
                    "not_repairable",
                    "the host has no such record; --repair=host brings the provider's",
                    side="provider",
                )
            )
            continue
        if local.data is None:
            repairs.append(
                Repair(
                    record_id,
                    "not_repairable",
                    "the host's side has no data to push (the inbox's ledger): set "
                    "IDIS_HOST_RECORDS or --host-records",
                    side="provider",
                )
            )
            continue
        data = {k: v for k, v in local.data.items() if ctx.fields is None or k in ctx.fields}
        key = f"verify-{ctx.report.run_id}-{record_id}"
        message = NewMessage.request(
            provider,
            "record",
            method="PUT",
            path_params={"id": record_id},
            json={"tenant_id": local.tenant_id, "data": data},
            idempotency_key=key,
            # Behind any push of the same record the host already queued.
            ordering_key=record_id,
            tenant_id=local.tenant_id,
        )
        ctx.audit(
            record_id,
            local.tenant_id,
            side="provider",
            outcome="ok",
            details={
                "via": "outbox",
                "idempotency_key": key,
                "fields": [d.field for d in comparison.diffs],
                "status": comparison.status,
            },
            message=f"queued the host's version of {record_id} for {provider}",
            also=_enqueuer(message),
        )
        repairs.append(Repair(record_id, "queued", "the outbox delivers it", side="provider"))
    return repairs
