"""Pushing deals to the CRM through the outbox, keeping ``crm_sync_status`` current.

``POST /deals`` writes the row (PENDING) and enqueues the push in one
transaction (:func:`push_message`). The outbox worker delivers it through the
shared gateway with :class:`DealPushDelivery`, which records each attempt's
outcome on the row with the library's
:func:`~idis.integrations.enrichment.sync_status_update` statement:

* FAILED after a failed attempt (the outbox retries it; RB-09 Triage 5 counts it);
* SYNCED after a delivery, but only if the delivered push carried the row's
  latest edit: a deal edited twice while the CRM was down stays PENDING until
  its second push is through;
* ``crm_version``, the CRM record's version the push produced (from the PUT's
  answer), so that the provider's webhook echoing an *older* push, arriving
  late, is recognised as stale by the handler and never undoes a newer edit.

The library's ``AsyncSyncStatusDelivery`` wraps ``AsyncGatewayDelivery``, which
discards the provider's answer, and marks the row SYNCED on any delivered push;
the two points above are why this service builds the call itself (with the
library's :func:`~idis.integrations.outbox.build_call`).
"""

from __future__ import annotations

import re
import time
from typing import Any

from sqlalchemy import case, update
from sqlalchemy.ext.asyncio import AsyncEngine

from idis.integrations.config import Settings
from idis.integrations.enrichment._syncstatus import (
    SYNC_FAILED,
    SYNC_SYNCED,
    SyncStatus,
    sync_status_update,
)
from idis.integrations.observability._logs import get_logger
from idis.integrations.outbox import AsyncGatewayDelivery, NewMessage, build_call
from idis.integrations.resilience import AsyncGateway

from .models import Deal

__all__ = ["DealPushDelivery", "idempotency_key", "parse_idempotency_key", "push_message"]

_log = get_logger()
_KEY = re.compile(r"^deal-(?P<id>.+)-r(?P<revision>\d+)$")


def idempotency_key(deal_id: str, revision: int) -> str:
    """The push's idempotency key: one per deal edit, so a retried push is applied once."""
    return f"deal-{deal_id}-r{revision}"


def parse_idempotency_key(key: str) -> tuple[str, int] | None:
    """``(deal_id, revision)`` of a deal push's key; None for any other message."""
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    return match["id"], int(match["revision"])


def push_message(crm_provider: str, deal: Deal) -> NewMessage:
    """The outbox message that pushes ``deal``'s current state to the CRM (``PUT /records/{id}``).

    Ordered per deal (``ordering_key``): a later edit is never sent before an earlier one.
    """
    return NewMessage.request(
        crm_provider,
        "record",
        method="PUT",
        path_params={"id": deal.id},
        json={
            "tenant_id": deal.tenant_id,
            "data": {"name": deal.name, "stage": deal.stage, "amount": deal.amount},
        },
        idempotency_key=idempotency_key(deal.id, deal.revision),
        ordering_key=deal.id,
        tenant_id=deal.tenant_id,
    )


class DealPushDelivery:
    """Outbox delivery strategy: deal pushes through the gateway, recorded on the deal.

    Other messages go to the library's ``AsyncGatewayDelivery`` unchanged.

    Args:
        gateway: The shared gateway.
        settings: The library's settings.
        engine: The service's async engine (the ``deals`` table).
    """

    def __init__(self, gateway: AsyncGateway, settings: Settings, engine: AsyncEngine) -> None:
        self.gateway = gateway
        self.settings = settings
        self.engine = engine
        self._default = AsyncGatewayDelivery(gateway, settings)

    async def __call__(self, message: Any) -> None:
        """Deliver ``message``; record the outcome on its deal; re-raise a failure."""
        target = parse_idempotency_key(message.idempotency_key)
        if target is None or message.kind != "request":
            await self._default(message)
            return
        deal_id, revision = target
        call = build_call(message, self.settings, now=time.time())
        try:
            response = await self.gateway.request(call.provider, call.endpoint, **call.kwargs)
        except Exception:
            await self._record(deal_id, revision, version=None, delivered=False)
            raise
        await self._record(deal_id, revision, version=_version(response), delivered=True)

    async def _record(
        self, deal_id: str, revision: int, *, version: int | None, delivered: bool
    ) -> None:
        status: SyncStatus = SYNC_SYNCED if delivered else SYNC_FAILED
        try:
            async with self.engine.begin() as conn:
                if version is not None:
                    newer = case(
                        (Deal.crm_version.is_(None) | (Deal.crm_version < version), version),
                        else_=Deal.crm_version,
                    )
                    await conn.execute(
                        update(Deal).where(Deal.id == deal_id).values(crm_version=newer)
                    )
                statement = sync_status_update(Deal, [deal_id], status)
                if delivered:
                    # An older edit's push leaves a newer pending edit PENDING.
                    statement = statement.where(Deal.revision == revision)
                await conn.execute(statement)
        except Exception as exc:  # noqa: BLE001  # a status write must not turn a delivery into a retry
            _log.warning(
                "idis.example.sync_status_write_failed",
                msg=f"could not mark deal {deal_id} {status}",
                error_type=type(exc).__name__,
            )


def _version(response: Any) -> int | None:
    """The record version in the CRM's answer to a PUT, if it says."""
    try:
        version = response.json().get("version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
