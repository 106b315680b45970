"""Pushing deals to the CRM through the outbox, keeping ``crm_sync_status`` current.

``POST /deals`` writes the row (PENDING) and enqueues the push in one
transaction (:func:`push_message`). The outbox worker delivers it through the
shared gateway with :func:`deal_push_delivery`, which records each attempt's
outcome on the row:

* FAILED after a failed attempt (the outbox retries it; RB-09 Triage 5 counts it);
* SYNCED after a delivery, but only if the delivered push carried the row's
  latest edit: a deal edited twice while the CRM was down stays PENDING until
  its second push is through;
* ``crm_version``, the CRM record's version the push produced (from the PUT's
  answer), so that the provider's webhook echoing an *older* push, arriving
  late, is recognised as stale by the handler and never undoes a newer edit.

All of it is the library's ``AsyncSyncStatusDelivery`` (``revision=``,
``on_delivered=``) over ``AsyncGatewayDelivery``: :func:`deal_push_delivery`
only says which deal and revision a push is about, and how to keep
``crm_version``. A deal edited while the CRM is down is written FAILED at once
(``app.upsert_deal`` asks the gateway), so RB-09's impact query counts it
mid-outage, before any attempt.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Update, case, update
from sqlalchemy.ext.asyncio import AsyncEngine

from idis.integrations.config import Settings
from idis.integrations.enrichment import AsyncSyncStatusDelivery
from idis.integrations.outbox import AsyncGatewayDelivery, NewMessage
from idis.integrations.resilience import AsyncGateway

from .models import Deal

__all__ = ["deal_push_delivery", "idempotency_key", "parse_idempotency_key", "push_message"]

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


def deal_push_delivery(
    gateway: AsyncGateway, settings: Settings, engine: AsyncEngine
) -> AsyncSyncStatusDelivery:
    """The outbox delivery strategy: the library's, version-aware, keeping ``crm_version``.

    :class:`~idis.integrations.enrichment.AsyncSyncStatusDelivery` over
    :class:`~idis.integrations.outbox.AsyncGatewayDelivery`: a deal push marks the
    deal FAILED after a failed attempt and SYNCED after its delivery only if the
    deal is still at the pushed revision; every delivered push keeps the highest
    CRM record version it produced in ``crm_version``. Other messages (webhooks)
    go through unrecorded.
    """
    return AsyncSyncStatusDelivery(
        AsyncGatewayDelivery(gateway, settings),
        engine,
        Deal,
        record_id=_deal_of,
        kinds=("request",),
        revision=_revision_of,
        on_delivered=_keep_crm_version,
    )


def _deal_of(message: Any) -> str | None:
    target = parse_idempotency_key(message.idempotency_key)
    return target[0] if target is not None else None


def _revision_of(message: Any) -> int | None:
    target = parse_idempotency_key(message.idempotency_key)
    return target[1] if target is not None else None


def _keep_crm_version(message: Any, response: Any) -> Update | None:
    """Raise ``crm_version`` to the version this push produced (never lower it)."""
    version = _version(response)
    deal_id = _deal_of(message)
    if version is None or deal_id is None:
        return None
    newer = case(
        (Deal.crm_version.is_(None) | (Deal.crm_version < version), version),
        else_=Deal.crm_version,
    )
    return update(Deal).where(Deal.id == deal_id).values(crm_version=newer)


def _version(response: Any) -> int | None:
    """The record version in the CRM's answer to a PUT, if it says."""
    try:
        version = response.json().get("version")
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None
