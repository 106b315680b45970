"""Impact of a provider outage per tenant (RB-09 Triage 5): who to notify, with counts.

Three counts per tenant, each for the window after ``since`` and still true now:

* ``failed_to_sync``: rows of the host's deals table (on
  :class:`~idis.integrations.enrichment._syncstatus.CrmSyncStatusMixin`) whose
  ``crm_sync_status`` is 'FAILED' and ``updated_at`` is in the window: exactly
  RB-09's SQL. Counted for CRM providers (kind ``crm``) when a deals table is
  given or configured (``IDIS_IMPACT_DEALS_TABLE``); None otherwise;
* ``enrichment_deferred``: deferred enrichment requests created in the window
  and still pending;
* ``open_defects``: STALE_ENRICHMENT defects created in the window and still OPEN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, MetaData, Table, bindparam, func, inspect, select
from sqlalchemy.exc import NoSuchTableError
from sqlalchemy.orm import Session

from .._timeparse import parse_since
from ..config import Settings
from ..db._base import UTCDateTime
from ..db._engine import read_only, session_scope
from ..exceptions import ConfigError
from ._defects import _Database
from ._models import DEFECT_OPEN, REQUEST_PENDING, STALE_ENRICHMENT, Defect, EnrichmentRequest
from ._syncstatus import REQUIRED_COLUMNS, SYNC_FAILED

__all__ = ["TenantImpact", "impact", "reflect_deals_table"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantImpact:
    """One affected tenant and what is affected."""

    tenant_id: str
    #: Deals whose CRM push failed in the window (None: not counted, see module doc).
    failed_to_sync: int | None
    #: Enrichments deferred in the window and still waiting.
    enrichment_deferred: int
    #: STALE_ENRICHMENT defects opened in the window and still OPEN.
    open_defects: int

    @property
    def total(self) -> int:
        """Sum of the counts (for sorting: most affected first)."""
        return (self.failed_to_sync or 0) + self.enrichment_deferred + self.open_defects

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for ``--json``)."""
        return asdict(self)


def reflect_deals_table(engine: Engine, name: str, *, variable: str = "deals_table") -> Table:
    """Load the host table ``name`` (``deals`` or ``schema.deals``) and check its columns.

    Raises:
        ConfigError: naming ``variable`` and the table when it does not exist or lacks
            ``tenant_id``, ``crm_sync_status`` or ``updated_at``.
    """
    schema, _, table_name = name.rpartition(".")
    try:
        table = Table(table_name, MetaData(), autoload_with=engine, schema=schema or None)
    except NoSuchTableError:
        raise ConfigError(
            f"{variable}={name!r}: no such table in the library's database: expected a host "
            "table with tenant_id and the CrmSyncStatusMixin columns",
            variable=variable,
        ) from None
    return _checked(table, name, variable)


def _checked(table: Table, name: str, variable: str) -> Table:
    missing = [column for column in REQUIRED_COLUMNS if column not in table.c]
    if missing:
        raise ConfigError(
            f"{variable}={name!r} has no column {', '.join(missing)}: expected tenant_id and "
            "the CrmSyncStatusMixin columns (crm_sync_status, updated_at)",
            variable=variable,
        )
    return table


def _resolve_table(deals_table: Any, engine: Engine, settings: Settings) -> Table | None:
    if deals_table is None:
        name = settings.enrichment.impact_deals_table
        if name is None:
            return None
        return reflect_deals_table(engine, name, variable="IDIS_IMPACT_DEALS_TABLE")
    if isinstance(deals_table, str):
        return reflect_deals_table(engine, deals_table)
    if isinstance(deals_table, Table):
        return _checked(deals_table, deals_table.name, "deals_table")
    table = inspect(deals_table).local_table
    assert isinstance(table, Table)
    return _checked(table, table.name, "deals_table")


def _per_tenant(session: Session, tenant: Any, *where: Any) -> dict[str, int]:
    """How many rows match ``where``, per value of the ``tenant`` column."""
    rows = session.execute(select(tenant, func.count()).where(*where).group_by(tenant)).all()
    return {str(value): int(count) for value, count in rows}


def impact_in_session(
    session: Session, provider: str, since: datetime, deals: Table | None
) -> list[TenantImpact]:
    """The counts per tenant, computed in ``session`` (see :func:`impact`)."""
    failed: dict[str, int] = {}
    if deals is not None:
        # RB-09 Triage 5's query; the bound time goes through UTCDateTime so a
        # SQLite table stored the library's way compares as text correctly.
        moment = bindparam("since", since, type_=UTCDateTime())
        failed = _per_tenant(
            session,
            deals.c.tenant_id,
            deals.c.crm_sync_status == SYNC_FAILED,
            deals.c.updated_at > moment,
        )
    deferred = _per_tenant(
        session,
        EnrichmentRequest.tenant_id,
        EnrichmentRequest.provider == provider,
        EnrichmentRequest.status == REQUEST_PENDING,
        EnrichmentRequest.created_at > since,
    )
    defects = _per_tenant(
        session,
        Defect.tenant_id,
        Defect.defect_type == STALE_ENRICHMENT,
        Defect.provider == provider,
        Defect.status == DEFECT_OPEN,
        Defect.created_at > since,
    )
    tenants = set(failed) | set(deferred) | set(defects)
    result = [
        TenantImpact(
            tenant_id=tenant,
            failed_to_sync=failed.get(tenant, 0) if deals is not None else None,
            enrichment_deferred=deferred.get(tenant, 0),
            open_defects=defects.get(tenant, 0),
        )
        for tenant in tenants
    ]
    result.sort(key=lambda item: (-item.total, item.tenant_id))
    return result


def impact(
    provider: str,
    since: str | datetime,
    *,
    deals_table: Any = None,
    settings: Settings | None = None,
    engine: Engine | None = None,
) -> list[TenantImpact]:
    """Affected tenants of ``provider`` since ``since``, most affected first.

    Args:
        provider: Provider name as configured.
        since: ``"1 hour ago"``, ISO-8601, or an aware datetime.
        deals_table: The host's deals table: a mapped class or ``Table`` on the mixin, or a
            table name to reflect. Default: ``IDIS_IMPACT_DEALS_TABLE``, if set. Counted only
            for providers of kind ``crm``.
        settings: Library settings (default: from the environment).
        engine: Database engine (default: one on ``settings.database_url``).

    Raises:
        UnknownProviderError: ``provider`` is not configured.
        ConfigError: a bad ``since`` or deals table (named).
        StorageError: the database is unreachable.
    """
    settings = settings or Settings.from_env()
    kind = settings.provider(provider).kind
    start = parse_since(since, name="since")
    with _Database(settings, engine) as db:
        reader = read_only(db)
        table = _resolve_table(deals_table, reader, settings) if kind == "crm" else None
        with session_scope(db, write=False) as session:
            return impact_in_session(session, provider, start, table)
