"""The service's deals as ``verify-sync`` reads them: a host record source.

RB-09 Verification 3 compares *the service's* deals with the CRM's records,
not the library's ledger with itself: a deal changed by hand in ``deals`` or
one whose push never reached the CRM is a mismatch only if the deals table
itself is read. The RB-09 scripts (another process) load this through
``IDIS_HOST_RECORDS``::

    cd examples
    export PYTHONPATH=. IDIS_HANDLERS=integrations_service.handlers:register
    export IDIS_HOST_RECORDS=integrations_service.host_records:deal_records
    python scripts/integrations/verify_sync.py --provider crm_provider --sample-size 20

A deal's comparable fields are the ones the service pushes (``name``,
``stage``, ``amount``), its tenant, and ``crm_version`` (the CRM version the
row last reflected). ``verify-sync --repair=host`` writes the CRM's record into
the row with :meth:`DealRecords.write` when the inbox cannot (it already
applied that version: the row was changed here, not at the CRM).
"""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import Engine, delete, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from idis.integrations._redact import mask_url
from idis.integrations._timeparse import utcnow
from idis.integrations.config import Settings
from idis.integrations.enrichment._syncstatus import SYNC_SYNCED
from idis.integrations.exceptions import ConfigError
from idis.integrations.reconciliation import LocalRecord

from .models import Deal

__all__ = ["FIELDS", "DealRecords", "deal_records"]

#: The deal fields the service keeps of a CRM record (what it pushes).
FIELDS = ("name", "stage", "amount")


def _local(deal: Deal) -> LocalRecord:
    return LocalRecord(
        record_id=deal.id,
        tenant_id=deal.tenant_id,
        version=deal.crm_version or 0,
        data={"name": deal.name, "stage": deal.stage, "amount": deal.amount},
    )


class DealRecords:
    """:class:`~idis.integrations.reconciliation.HostRecordSource` over ``deals``.

    Args:
        engine: The database holding ``deals`` (the service's, which is also the library's).
    """

    fields = FIELDS

    def __init__(self, engine: Engine) -> None:
        if not inspect(engine).has_table(Deal.__tablename__):
            # Say where we looked and what creates it, not an SQL traceback.
            raise ConfigError(
                f"IDIS_HOST_RECORDS: no {Deal.__tablename__!r} table in "
                f"{mask_url(engine.url.render_as_string(hide_password=False))}: the service "
                "creates its tables when it starts (integrations_service.runtime."
                "prepare_database); start it once against this database",
                variable="IDIS_HOST_RECORDS",
            )
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def sample(self, n: int, seed: int | None) -> list[LocalRecord]:
        """Up to ``n`` deals chosen uniformly at random (seedable; ids read in a fixed order)."""
        with self._sessions() as session:
            ids = list(session.scalars(select(Deal.id).order_by(Deal.id)))
            chosen = random.Random(seed).sample(ids, min(n, len(ids)))
            deals = {d.id: d for d in session.scalars(select(Deal).where(Deal.id.in_(chosen)))}
        return [_local(deals[i]) for i in chosen if i in deals]

    def get(self, record_id: str) -> LocalRecord | None:
        """The deal now, or None."""
        with self._sessions() as session:
            deal = session.get(Deal, record_id)
            return None if deal is None else _local(deal)

    def write(self, record_id: str, remote: Any | None) -> None:
        """Make the deal the CRM's record (``remote``: a ``ProviderRecord``; None deletes it)."""
        with self._sessions.begin() as session:
            if remote is None:
                session.execute(delete(Deal).where(Deal.id == record_id))
                return
            self._upsert(session, record_id, remote)

    @staticmethod
    def _upsert(session: Session, record_id: str, remote: Any) -> None:
        data = remote.data or {}
        deal = session.get(Deal, record_id, with_for_update=True)
        if deal is None:
            deal = Deal(id=record_id, revision=0)
            session.add(deal)
        deal.tenant_id = remote.tenant_id or deal.tenant_id or "unknown"
        name = data.get("name")
        deal.name = name[:200] if isinstance(name, str) and name.strip() else record_id
        stage = data.get("stage")
        deal.stage = stage[:32] if isinstance(stage, str) else None
        amount = data.get("amount")
        deal.amount = (
            int(amount)
            if isinstance(amount, int | float) and not isinstance(amount, bool)
            else None
        )
        deal.crm_version = remote.version
        # The row now is the CRM's state: nothing of it waits to be pushed.
        deal.crm_sync_status = SYNC_SYNCED
        deal.crm_synced_at = deal.updated_at = utcnow()


def deal_records(*, provider: str, engine: Engine, settings: Settings) -> DealRecords:
    """``IDIS_HOST_RECORDS`` entry point: the deals, for the CRM provider.

    The deals table lives in the library's database (one transaction holds a
    webhook's inbox row and the deal it changes), so the library's engine reads it.
    """
    del provider, settings  # one table, whichever CRM provider is verified
    return DealRecords(engine)
