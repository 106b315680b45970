"""Turning a webhook's JSON payload into the same event object the poller and replay produce.

Handlers see one event type whatever the channel: ``providers.ProviderEvent``.
A webhook body may be the event itself (``{"id", "seq", "type", "record_id",
"tenant_id", "version", "occurred_at", "data"}``) or a Standard Webhooks
envelope whose ``data`` is the event (``{"type", "timestamp", "data": {...}}``).
Every stored field is checked here (types, lengths, characters PostgreSQL
cannot store) so a hostile body is a 400, never a database error. The event is
keyed here too, by the provider's ordering rule (``ProviderSettings.order_by``,
see :mod:`idis.integrations.providers._order`): an event that lacks what the
rule needs (a version, for a provider ordered by version) is a 400 naming the
setting, never a 5xx the provider would retry forever.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from ..exceptions import UsageError, WebhookVerificationError
from ..providers import ProviderEvent
from ..providers._order import BY_VERSION, MissingOrder, Ordering, ordering_for

__all__ = ["event_from_payload", "ordering_of"]

_LIMITS = {"id": 255, "type": 128, "record_id": 255, "tenant_id": 128}
#: Largest integer a BIGINT column holds.
_MAX_BIGINT = 2**63 - 1


def _invalid(message: str) -> WebhookVerificationError:
    return WebhookVerificationError(f"webhook event is invalid: {message}", reason="invalid_event")


def _text(payload: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = payload.get(key)
    if value is None:
        if required:
            raise _invalid(f"{key} is missing")
        return None
    if not isinstance(value, str) or not value:
        raise _invalid(f"{key} must be a non-empty string")
    if len(value) > _LIMITS[key]:
        raise _invalid(f"{key} is longer than {_LIMITS[key]} characters")
    if not value.isprintable():
        raise _invalid(f"{key} contains control characters")
    return value


def _integer(payload: Mapping[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_BIGINT:
        raise _invalid(f"{key} must be a non-negative integer")
    return value


def _time(payload: Mapping[str, Any], key: str) -> datetime | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise _invalid(f"{key} must be an ISO-8601 time")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _invalid(f"{key} must be an ISO-8601 time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 lies before the first representable time
        raise _invalid(f"{key} is out of range") from None


def ordering_of(settings: Any, provider: str) -> Ordering:
    """The ordering rule of ``provider`` (``order_by``), or the default for an unknown name."""
    config = settings.providers.get(provider)
    return ordering_for(config.order_by) if config is not None else BY_VERSION


def event_from_payload(
    payload: Mapping[str, Any], *, ordering: Ordering = BY_VERSION
) -> ProviderEvent:
    """Build a ``ProviderEvent`` from a verified webhook's JSON object, keyed by ``ordering``.

    Raises:
        WebhookVerificationError: reason ``invalid_event``, naming the field (or
            the ordering setting an event without a version needs).
    """
    body = payload
    inner = payload.get("data")
    if "id" not in payload and isinstance(inner, Mapping) and "id" in inner:
        body = inner  # Standard Webhooks envelope around the event
    data = body.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _invalid("data must be an object")
    seq = _integer(body, "seq")
    if seq is None:
        raise _invalid("seq is missing")
    occurred_at = _time(body, "occurred_at")
    if occurred_at is None:
        raise _invalid("occurred_at is missing")
    version = _integer(body, "version")
    event_id = _required(body, "id")
    try:
        order = ordering.event_key(
            event_id=event_id, seq=seq, version=version or None, occurred_at=occurred_at
        )
    except (MissingOrder, UsageError) as exc:
        raise _invalid(str(exc)) from None
    return ProviderEvent(
        id=event_id,
        seq=seq,
        type=_required(body, "type"),
        record_id=_required(body, "record_id"),
        tenant_id=_text(body, "tenant_id", required=False),
        version=0 if version is None else version,
        occurred_at=occurred_at,
        data=dict(data),
        order=order,
    )


def _required(payload: Mapping[str, Any], key: str) -> str:
    value = _text(payload, key, required=True)
    assert value is not None
    return value
