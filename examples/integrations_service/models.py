"""The service's own tables: ``deals`` (pushed to the CRM) and ``claims`` (enriched).

They live in the service's own :class:`~sqlalchemy.MetaData`, not the library's:
the host owns its schema and creates it itself (``create_all`` at start, or its
own migrations), while the library's tables come from ``idis-integrations db
upgrade``. Both sets live in the same database, because a webhook's inbox row
and the deal it changes must commit in one transaction.

``deals`` takes :class:`~idis.integrations.enrichment.CrmSyncStatusMixin`, so
RB-09 Triage 5 runs on it verbatim::

    SELECT tenant_id, COUNT(*) as affected_deals FROM deals
    WHERE crm_sync_status = 'FAILED' AND updated_at > NOW() - INTERVAL '1 hour'
    GROUP BY tenant_id;
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, Integer, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from idis.integrations._timeparse import utcnow
from idis.integrations.db._base import NAMING_CONVENTION, JSONType, UTCDateTime
from idis.integrations.enrichment import CrmSyncStatusMixin

__all__ = ["Claim", "Deal", "HostBase", "host_metadata"]

#: The service's schema; never mixed into the library's metadata.
host_metadata = MetaData(naming_convention=NAMING_CONVENTION)


class HostBase(DeclarativeBase):
    """Declarative base of the service's tables."""

    metadata = host_metadata


class Deal(HostBase, CrmSyncStatusMixin):
    """A deal; the CRM (``crm_provider``) holds the same record under the same id.

    ``revision`` counts local edits: each ``POST /deals`` bumps it and enqueues a push
    whose idempotency key carries it, so a delivery only marks the row SYNCED when it
    pushed the row's latest edit.
    """

    __tablename__ = "deals"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    stage: Mapped[str | None] = mapped_column(String(32))
    #: Whole currency units.
    amount: Mapped[int | None] = mapped_column(BigInteger)
    #: Local edits made through the API (0 for a deal that only ever came from the CRM).
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    #: The CRM record's version as last received (webhook, poll or replay).
    crm_version: Mapped[int | None] = mapped_column(Integer)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready representation."""
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "name": self.name,
            "stage": self.stage,
            "amount": self.amount,
            "revision": self.revision,
            "crm_version": self.crm_version,
            "crm_sync_status": self.crm_sync_status,
            "crm_synced_at": _iso(self.crm_synced_at),
            "updated_at": _iso(self.updated_at),
        }


class Claim(HostBase):
    """A claim about a deal, enriched with company data by an enrichment provider."""

    __tablename__ = "claims"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(128), nullable=False, index=True)
    deal_id: Mapped[str | None] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    #: The last enrichment the service holds (None until the first success).
    enrichment: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: Primary provider the claim is enriched from (the library files defects under it).
    enrichment_provider: Mapped[str | None] = mapped_column(String(64))
    #: When ``enrichment`` was fetched from the provider.
    enriched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    #: True while the last enrichment attempt failed: show ``enrichment`` as stale.
    enrichment_stale: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow, onupdate=utcnow
    )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready representation."""
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "deal_id": self.deal_id,
            "text": self.text,
            "enrichment": self.enrichment,
            "enrichment_provider": self.enrichment_provider,
            "enriched_at": _iso(self.enriched_at),
            "enrichment_stale": self.enrichment_stale,
            "updated_at": _iso(self.updated_at),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
