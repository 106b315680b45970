"""What the host holds, as far as the library knows: the inbox's per-record version ledger.

The sync inbox keeps, per provider and record, the order key of the newest
event it applied through the host's handlers (``sync_record_versions``) and
the event that brought it (whose ``sync_inbox`` row has the tenant, the type
and the version). That is enough to tell whether the provider's copy moved on
without us: every change at the provider moves the record's key (its version,
or its modification time for providers ordered by time). ``LocalRecord.version``
is that key's major part.

:class:`LocalRecordSource` is the protocol ``verify_sync`` samples from;
:class:`AppliedRecordSource` is its default, backed by that ledger. A host
that wants field-level comparisons implements the protocol over its own
tables and returns ``LocalRecord(data=...)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sqlalchemy import Engine, and_, select
from sqlalchemy.orm import Session

from ..providers._order import OrderKey
from ..sync._models import SyncInbox, SyncRecordVersion
from ._db import sessions, transaction
from ._logic import LocalRecord

__all__ = ["AppliedRecordSource", "LedgerEntry", "LocalRecordSource", "read_ledger"]

_CHUNK = 500


@runtime_checkable
class LocalRecordSource(Protocol):
    """The host's side of ``verify_sync``: sample local records and read one back."""

    def sample(self, n: int, seed: int | None) -> list[LocalRecord]:
        """Up to ``n`` records chosen at random; the same seed gives the same sample."""

    def get(self, record_id: str) -> LocalRecord | None:
        """The record as held locally now, or None."""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """The newest state of one record applied through the inbox."""

    record_id: str
    #: The order key of the newest applied event (``providers.OrderKey``).
    order: OrderKey
    event_id: str
    tenant_id: str | None
    #: The event that brought it deleted the record.
    deleted: bool
    #: The record version that event carried (0: the provider sends none).
    version: int = 0

    def as_local(self) -> LocalRecord:
        """As a :class:`LocalRecord` (no data, no hash: compared on the order key's major)."""
        return LocalRecord(
            record_id=self.record_id,
            tenant_id=self.tenant_id,
            version=self.order.major,
            deleted=self.deleted,
        )


def read_ledger(
    session: Session, provider: str, record_ids: Iterable[str]
) -> dict[str, LedgerEntry]:
    """Ledger entries of ``record_ids`` (absent ids: never applied)."""
    ids = sorted(set(record_ids))
    found: dict[str, LedgerEntry] = {}
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        query = (
            select(
                SyncRecordVersion.record_id,
                SyncRecordVersion.order_major,
                SyncRecordVersion.order_minor,
                SyncRecordVersion.event_id,
                SyncInbox.tenant_id,
                SyncInbox.event_type,
                SyncInbox.version,
            )
            .select_from(SyncRecordVersion)
            .outerjoin(
                SyncInbox,
                and_(
                    SyncInbox.provider == SyncRecordVersion.provider,
                    SyncInbox.event_id == SyncRecordVersion.event_id,
                ),
            )
            .where(
                SyncRecordVersion.provider == provider,
                SyncRecordVersion.record_id.in_(chunk),
                # A lock placeholder of an uncommitted apply is not a state.
                SyncRecordVersion.event_id != "",
            )
        )
        for row in session.execute(query):
            record_id, major, minor, event_id, tenant_id, event_type, version = row
            found[record_id] = LedgerEntry(
                record_id=record_id,
                order=OrderKey(int(major), minor),
                event_id=event_id,
                tenant_id=tenant_id,
                deleted=event_type == "record.deleted",
                version=int(version or 0),
            )
    return found


class AppliedRecordSource:
    """:class:`LocalRecordSource` over the inbox's version ledger (the default).

    Args:
        engine: The library's database.
        provider: Provider name.
    """

    def __init__(self, engine: Engine, provider: str) -> None:
        self._factory = sessions(engine, write=False)
        self.provider = provider

    def sample(self, n: int, seed: int | None) -> list[LocalRecord]:
        """Up to ``n`` applied records chosen uniformly at random (seedable).

        Ids are read in a fixed order before sampling, so one seed gives one
        sample for one ledger, on every backend.
        """
        with transaction(self._factory) as session:
            ids = list(
                session.scalars(
                    select(SyncRecordVersion.record_id)
                    .where(
                        SyncRecordVersion.provider == self.provider,
                        SyncRecordVersion.event_id != "",
                    )
                    .order_by(SyncRecordVersion.record_id)
                )
            )
            chosen = random.Random(seed).sample(ids, min(n, len(ids)))  # noqa: S311  # sampling, not crypto
            ledger = read_ledger(session, self.provider, chosen)
        return [ledger[rid].as_local() for rid in chosen if rid in ledger]

    def get(self, record_id: str) -> LocalRecord | None:
        """The ledger entry of ``record_id`` as a local record, or None."""
        with transaction(self._factory) as session:
            entry = read_ledger(session, self.provider, [record_id]).get(record_id)
        return None if entry is None else entry.as_local()
