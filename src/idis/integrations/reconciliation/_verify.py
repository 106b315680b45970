"""``verify_sync``: compare a random sample of local records with the provider (RB-09 Verif. 3).

A seedable random sample comes from a :class:`~.ledger.LocalRecordSource`
(default: :class:`~.ledger.AppliedRecordSource`, the inbox's version ledger);
each sampled record is fetched from the provider and compared
(:func:`~.logic.compare_record`: versions and tenants, plus data fields or a
data hash when the local source has them). A record changed only at the
provider, say by an edit whose webhook never came, shows as a version
mismatch.

With ``repair=True`` every mismatched record is re-synced through the host's
handlers as a snapshot event (see :mod:`.fallback`), audited as
``verify_sync.record_repaired`` (``source='repair'``), and compared again.
Every run writes one ``verify_sync.completed`` audit row: the evidence for
the runbook's Verification step.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine

from .._audit import record_audit
from .._clock import Clock, system_clock
from ..config import Settings
from ..exceptions import ConfigError
from ..observability._logs import get_logger
from ..sync._inbox import ApplyOutcome, HandlerRegistry, get_registry
from ._db import default_client, default_engine, sessions, transaction
from ._fallback import (
    CONFIRM_AFTER,
    adapter_ordering,
    apply_snapshots,
    confirm_missing,
    snapshot_event,
)
from ._ledger import AppliedRecordSource, LocalRecordSource, read_ledger
from ._logic import RecordComparison, compare_record
from ._replay import require_handlers

__all__ = ["MAX_SAMPLE_SIZE", "Repair", "VerifyReport", "verify_sync"]

log = get_logger()

#: Largest sample one run checks (each sampled record costs one provider call).
MAX_SAMPLE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Repair:
    """What ``--repair`` did for one mismatched record."""

    record_id: str
    #: ``repaired``, ``failed`` or ``not_repairable``.
    outcome: str
    #: Why, when not repaired.
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of one verification run."""

    provider: str
    #: The seed the sample was drawn with (pass it again to check the same records).
    seed: int
    sample_size: int
    #: One comparison per sampled record, in sample order (before any repair).
    comparisons: list[RecordComparison] = field(default_factory=list)
    #: Repairs attempted (``repair=True`` only).
    repairs: list[Repair] = field(default_factory=list)
    #: Run id (correlation id of its audit rows).
    run_id: str = ""

    @property
    def mismatches(self) -> list[RecordComparison]:
        """Comparisons that found a difference."""
        return [c for c in self.comparisons if not c.ok]

    @property
    def repaired(self) -> list[str]:
        """Ids repaired and verified equal afterwards."""
        return [r.record_id for r in self.repairs if r.outcome == "repaired"]

    @property
    def ok(self) -> bool:
        """No mismatch is left: none found, or every one repaired."""
        return len(self.repaired) == len(self.mismatches)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "provider": self.provider,
            "seed": self.seed,
            "sample_size": self.sample_size,
            "checked": len(self.comparisons),
            "matched": len(self.comparisons) - len(self.mismatches),
            "mismatched": len(self.mismatches),
            "repaired": len(self.repaired),
            "ok": self.ok,
            "run_id": self.run_id,
            "records": [
                {
                    "record_id": c.record_id,
                    "tenant_id": c.tenant_id,
                    "status": c.status,
                    "local_version": c.local_version,
                    "remote_version": c.remote_version,
                    "diffs": [
                        {"field": d.field, "local": d.local, "remote": d.remote} for d in c.diffs
                    ],
                }
                for c in self.comparisons
            ],
            "repairs": [
                {"record_id": r.record_id, "outcome": r.outcome, "reason": r.reason}
                for r in self.repairs
            ],
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


def _as_mapping(record: Any | None) -> dict[str, Any] | None:
    """The provider's record as compare_record reads it (``version``: its order key's major)."""
    if record is None:
        return None
    order = getattr(record, "order", None)
    version = order.major if order is not None else record.version
    return {"tenant_id": record.tenant_id, "version": version, "data": record.data}


def verify_sync(
    provider: str,
    sample_size: int,
    *,
    seed: int | None = None,
    repair: bool = False,
    local_records: LocalRecordSource | None = None,
    fields: Sequence[str] | None = None,
    settings: Settings | None = None,
    client: Any | None = None,
    engine: Engine | None = None,
    handlers: HandlerRegistry | None = None,
    actor: str = "system",
    clock: Clock = system_clock,
    confirm_after: timedelta = CONFIRM_AFTER,
) -> VerifyReport:
    """Compare ``sample_size`` random local records with the provider's copies.

    Example::

        report = verify_sync("crm_provider", 20, seed=7)
        for mismatch in report.mismatches:
            print(mismatch.record_id, mismatch.diffs)

    Args:
        provider: Provider name as configured.
        sample_size: Records to sample (1-10000).
        seed: Sampling seed (default: a random one, reported in the result).
        repair: Re-sync mismatched records through the host's handlers.
        local_records: The host's records (default: the inbox's version ledger).
        fields: Data fields that matter (default: all; needs a source with data).
        settings: Library settings (default: from the environment).
        client: The provider adapter (``get_record``); default a ``ProviderClient``.
        engine: Database engine (default: one for ``settings.database_url``).
        handlers: The host's handlers, for repairs (default: the process-wide registry).
        actor: Who runs it, for the audit trail.
        clock: Time source (tests pass a manual clock).
        confirm_after: A record the provider answers 404 for is read again this
            much later before a repair deletes it locally.

    Raises:
        ConfigError: unknown provider, bad sample size, or ``repair`` without handlers.
        ProviderError: the provider failed while fetching a record.
        StorageError: the database is unreachable.
    """
    settings = settings if settings is not None else Settings.from_env()
    settings.provider(provider)
    _check_sample_size(sample_size)
    registry = handlers if handlers is not None else get_registry()
    if repair:
        require_handlers(registry, provider)
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    run_id = f"vs_{uuid.uuid4().hex[:20]}"
    with ExitStack() as stack:
        engine = engine if engine is not None else default_engine(settings, stack)
        client = client if client is not None else default_client(settings, provider, stack, engine)
        factory = sessions(engine)
        ordering = adapter_ordering(client, settings, provider)
        local = (
            local_records if local_records is not None else AppliedRecordSource(engine, provider)
        )
        sample = local.sample(sample_size, seed)
        remotes: dict[str, Any | None] = {}
        comparisons: list[RecordComparison] = []
        for item in sample:
            remote = client.get_record(item.record_id)
            remotes[item.record_id] = remote
            comparisons.append(
                compare_record(item, item.record_id, _as_mapping(remote), fields=fields)
            )
        report = VerifyReport(provider, seed, sample_size, comparisons, [], run_id)
        if repair and report.mismatches:
            report.repairs.extend(
                _repair(
                    report,
                    remotes,
                    local,
                    engine=engine,
                    client=client,
                    ordering=ordering,
                    registry=registry,
                    actor=actor,
                    clock=clock,
                    confirm_after=confirm_after,
                    fields=fields,
                )
            )
        with transaction(factory) as session:
            record_audit(
                session,
                "verify_sync.completed",
                provider=provider,
                actor=actor,
                outcome="ok" if report.ok else "mismatch",
                details={
                    "seed": seed,
                    "sample_size": sample_size,
                    "checked": len(comparisons),
                    "mismatched": len(report.mismatches),
                    "repaired": len(report.repaired),
                    "mismatched_ids": [c.record_id for c in report.mismatches][:100],
                },
                correlation_id=run_id,
                message=(
                    f"verified {len(comparisons)} {provider} records: "
                    f"{len(report.mismatches)} mismatched, {len(report.repaired)} repaired"
                ),
                occurred_at=clock.now(),
            )
    log.info(
        "idis.reconcile.verified",
        provider=provider,
        run_id=run_id,
        seed=seed,
        checked=len(comparisons),
        mismatched=len(report.mismatches),
        repaired=len(report.repaired),
        msg="sync verification finished",
    )
    return report


def _repair(
    report: VerifyReport,
    remotes: dict[str, Any | None],
    local: LocalRecordSource,
    *,
    engine: Engine,
    client: Any,
    ordering: Any,
    registry: HandlerRegistry,
    actor: str,
    clock: Clock,
    confirm_after: timedelta,
    fields: Sequence[str] | None,
) -> list[Repair]:
    provider = report.provider
    mismatched = {c.record_id: c for c in report.mismatches}
    with transaction(sessions(engine, write=False)) as session:
        ledger = read_ledger(session, provider, list(mismatched))
    # A 404 may be transient: read again before deleting the host's copy.
    suspects = [rid for rid in mismatched if remotes[rid] is None]
    remotes.update(confirm_missing(client, suspects, clock=clock, after=confirm_after))
    repairs: dict[str, Repair] = {}
    for record_id in suspects:
        again = remotes[record_id]
        if (
            again is not None
            and compare_record(
                local.get(record_id), record_id, _as_mapping(again), fields=fields
            ).ok
        ):
            repairs[record_id] = Repair(
                record_id, "repaired", "the provider's 404 was transient: the record matches"
            )
    events = []
    now = clock.now()
    for record_id in mismatched:
        if record_id in repairs:
            continue
        event = snapshot_event(
            record_id, remotes[record_id], ledger.get(record_id), ordering=ordering, now=now
        )
        if event is None:
            # The inbox already holds the provider's version: the host's data
            # differs at the same version, which only the host can repair.
            repairs[record_id] = Repair(
                record_id,
                "not_repairable",
                "the provider's version is already applied; the local data differs at the "
                "same version, so the host must repair it",
            )
        else:
            events.append(event)
    if events:
        by_id = {e.record_id: e for e in events}
        result = apply_snapshots(
            engine,
            provider,
            events,
            registry=registry,
            action="verify_sync.record_repaired",
            audit_source="repair",
            actor=actor,
            correlation_id=report.run_id,
            clock=clock,
            details=lambda e: {
                "fields": [d.field for d in mismatched[e.record_id].diffs],
                "local_version": mismatched[e.record_id].local_version,
            },
        )
        for event, error in result.failed:
            repairs[event.record_id] = Repair(event.record_id, "failed", type(error).__name__)
        for event in [*result.of(ApplyOutcome.SUPERSEDED), *result.of(ApplyOutcome.IGNORED)]:
            repairs[event.record_id] = Repair(
                event.record_id, "not_repairable", "the inbox did not apply the snapshot"
            )
        for record_id in by_id:
            if record_id in repairs:
                continue
            after = compare_record(
                local.get(record_id), record_id, _as_mapping(remotes[record_id]), fields=fields
            )
            repairs[record_id] = (
                Repair(record_id, "repaired")
                if after.ok
                else Repair(record_id, "failed", "still differs after the repair")
            )
    return [repairs[rid] for rid in mismatched if rid in repairs]
