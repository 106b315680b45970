"""What the host holds, as far as the library knows: the inbox's per-record version ledger.

The sync inbox keeps, per provider and record, the newest version it applied
through the host's handlers (``sync_record_versions``) and the event that
brought it (whose ``sync_inbox`` row has the tenant and the event type). That
is enough to tell whether the provider's copy moved on without us: every
change at the provider increments the record's version.

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
    """The newest version of one record applied through the inbox."""

    record_id: str
    version: int
    event_id: str
    tenant_id: str | None
    #: The event that brought the version deleted the record.
    deleted: bool

    def as_local(self) -> LocalRecord:
        """As a :class:`LocalRecord` (no data, no hash: compared on versions)."""
        return LocalRecord(
            record_id=self.record_id,
            tenant_id=self.tenant_id,
            version=self.version,
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
                SyncRecordVersion.version,
                SyncRecordVersion.event_id,
                SyncInbox.tenant_id,
                SyncInbox.event_type,
            )
            .select_from(SyncRecordVersion)
            .outerjoin(
                SyncInbox,
                and_(
                    SyncInbox.provider == SyncRecordVersion.provider,
                    SyncInbox.event_id == SyncRecordVersion.event_id,
                ),
            )
            .where(SyncRecordVersion.provider == provider, SyncRecordVersion.record_id.in_(chunk))
        )
        for record_id, version, event_id, tenant_id, event_type in session.execute(query):
            found[record_id] = LedgerEntry(
                record_id=record_id,
                version=int(version),
                event_id=event_id,
                tenant_id=tenant_id,
                deleted=event_type == "record.deleted",
            )
    return found


class AppliedRecordSource:
    """:class:`LocalRecordSource` over the inbox's version ledger (the default).

    Args:
        engine: The library's database.
        provider: Provider name.
    """

    def __init__(self, engine: Engine, provider: str) -> None:
        self._factory = sessions(engine)
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
                    .where(SyncRecordVersion.provider == self.provider)
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
