"""Messages: what callers enqueue, and what a delivery strategy receives.

:class:`NewMessage` is what callers enqueue; :class:`OutboxMessage` is a leased message.

Two kinds ship with the library:

* ``request``: a provider call through the gateway. Payload:
  ``{"method", "endpoint", "path_params", "params", "json"}``.
* ``webhook``: an outbound webhook signed with Standard Webhooks headers. Payload:
  ``{"endpoint", "webhook_id", "event_type", "body"}`` where ``body`` is the exact
  JSON text sent on every attempt (the signature covers it byte for byte).

Other kinds may be enqueued when the worker is given a delivery strategy that
knows them; the default strategy dead-letters a kind it does not know.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..config import INT_SETTING_MAX
from ..exceptions import ConfigError

__all__ = [
    "KIND_REQUEST",
    "KIND_WEBHOOK",
    "NewMessage",
    "OutboxMessage",
]

#: A provider call through the gateway.
KIND_REQUEST = "request"
#: An outbound webhook (Standard Webhooks).
KIND_WEBHOOK = "webhook"

_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# Column sizes of outbox_messages; checked up front so a too-long value fails
# naming itself instead of as a driver error at commit.
_LIMITS = {"provider": 64, "idempotency_key": 255, "ordering_key": 255, "tenant_id": 128}


def _invalid(name: str, value: object, expected: str) -> ConfigError:
    return ConfigError(f"{name}={value!r} is invalid: expected {expected}", variable=name)


#: Largest retry budget the ``max_retries`` column holds (PostgreSQL INTEGER).
MAX_RETRIES_LIMIT = INT_SETTING_MAX


def check_max_retries(value: object, name: str = "max_retries") -> int:
    """``value`` as a retry budget (an int from 0 to MAX_RETRIES_LIMIT, not a bool).

    Anything else is a ConfigError naming ``name``: a budget the column cannot
    store would otherwise fail as a driver error at the UPDATE or INSERT.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES_LIMIT:
        raise _invalid(name, value, f"an integer from 0 to {MAX_RETRIES_LIMIT}")
    return value


def check_aware(name: str, value: datetime) -> None:
    """Refuse a naive datetime: a time without a zone is a guess."""
    if value.tzinfo is None:
        raise ConfigError(
            f"{name}={value!r} is naive: expected an aware UTC datetime", variable=name
        )


def _check_text(name: str, value: str | None, *, required: bool) -> None:
    if value is None:
        if required:
            raise ConfigError(f"{name} is required", variable=name)
        return
    if not isinstance(value, str) or not value.strip():
        raise _invalid(name, value, "a non-empty string")
    if len(value) > _LIMITS[name]:
        raise ConfigError(
            f"{name}={value[:40]!r}... is {len(value)} characters: at most {_LIMITS[name]} allowed",
            variable=name,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NewMessage:
    """A delivery to enqueue; validated on construction.

    Build one with :meth:`request` or :meth:`webhook`, or directly for a custom kind.

    Raises:
        ConfigError: naming the field and the bad value (empty, too long, not JSON).
    """

    #: Configured provider name the message goes to.
    provider: str
    #: Unique per message; enqueueing the same key again is a no-op.
    idempotency_key: str
    #: Kind-specific JSON object.
    payload: Mapping[str, Any]
    #: ``request``, ``webhook`` or a custom kind the worker's strategy handles.
    kind: str = KIND_REQUEST
    #: Messages with the same (provider, ordering_key) are delivered one at a time, in order.
    ordering_key: str | None = None
    #: Tenant the message concerns.
    tenant_id: str | None = None
    #: Retries after the first attempt; None uses ``IDIS_OUTBOX_MAX_RETRIES``.
    max_retries: int | None = None
    #: Do not deliver before this time (aware).
    not_before: datetime | None = None

    def __post_init__(self) -> None:
        _check_text("provider", self.provider, required=True)
        _check_text("idempotency_key", self.idempotency_key, required=True)
        _check_text("ordering_key", self.ordering_key, required=False)
        _check_text("tenant_id", self.tenant_id, required=False)
        if not isinstance(self.kind, str) or not _KIND.fullmatch(self.kind):
            raise _invalid("kind", self.kind, "lowercase letters, digits, '_', '.', '-'")
        if self.max_retries is not None:
            check_max_retries(self.max_retries)
        if self.not_before is not None:
            check_aware("not_before", self.not_before)
        if not isinstance(self.payload, Mapping):
            raise ConfigError(
                f"payload of type {type(self.payload).__name__} is invalid: expected a JSON object",
                variable="payload",
            )
        try:
            json.dumps(self.payload)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"payload is not JSON-serializable ({exc})", variable="payload"
            ) from None

    @classmethod
    def request(
        cls,
        provider: str,
        endpoint: str,
        *,
        idempotency_key: str,
        method: str = "POST",
        path_params: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        ordering_key: str | None = None,
        tenant_id: str | None = None,
        max_retries: int | None = None,
        not_before: datetime | None = None,
    ) -> NewMessage:
        """A provider call: ``gateway.request(provider, endpoint, method=..., ...)`` with the key.

        Args:
            provider: Configured provider name.
            endpoint: Logical endpoint name (``record``, ``records``...).
            idempotency_key: Unique key, sent as ``Idempotency-Key``.
            method: HTTP method.
            path_params: Values for the endpoint's path template.
            params: Query parameters.
            json: JSON body.
            ordering_key: FIFO key, typically the record id.
            tenant_id: Tenant the call concerns.
            max_retries: Retries after the first attempt (None: configured default).
            not_before: Earliest delivery time.

        Raises:
            ConfigError: naming the bad argument.
        """
        upper = str(method).upper()
        if upper not in _METHODS:
            raise _invalid("method", method, f"one of {', '.join(sorted(_METHODS))}")
        if not isinstance(endpoint, str) or not endpoint.strip():
            raise _invalid("endpoint", endpoint, "a name")
        payload: dict[str, Any] = {"method": upper, "endpoint": endpoint}
        if path_params:
            payload["path_params"] = {str(k): str(v) for k, v in path_params.items()}
        if params:
            payload["params"] = dict(params)
        if json is not None:
            payload["json"] = json
        return cls(
            provider=provider,
            idempotency_key=idempotency_key,
            payload=payload,
            kind=KIND_REQUEST,
            ordering_key=ordering_key,
            tenant_id=tenant_id,
            max_retries=max_retries,
            not_before=not_before,
        )

    @classmethod
    def webhook(
        cls,
        provider: str,
        event_type: str,
        data: Mapping[str, Any],
        *,
        webhook_id: str,
        endpoint: str = "webhooks",
        occurred_at: datetime | None = None,
        idempotency_key: str | None = None,
        ordering_key: str | None = None,
        tenant_id: str | None = None,
        max_retries: int | None = None,
    ) -> NewMessage:
        """An outbound webhook, in the Standard Webhooks payload shape.

        The body ``{"type", "timestamp", "data"}`` is rendered once, here, so
        every attempt sends the same bytes; each attempt signs them afresh
        with its own ``webhook-timestamp``.

        Args:
            provider: Provider whose receiver gets it (its ``endpoint`` URL).
            event_type: Event type, e.g. ``deal.updated``.
            data: Event data (JSON object).
            webhook_id: Stable event id, sent as ``webhook-id`` on every attempt.
            endpoint: Logical endpoint of the receiver.
            occurred_at: Event time (defaults to now).
            idempotency_key: Defaults to ``"<provider>:<webhook_id>"``.
            ordering_key: FIFO key.
            tenant_id: Tenant the event concerns.
            max_retries: Retries after the first attempt (None: configured default).

        Raises:
            ConfigError: naming the bad argument.
        """
        if not isinstance(webhook_id, str) or not webhook_id.strip() or len(webhook_id) > 200:
            raise _invalid("webhook_id", webhook_id, "1-200 characters")
        if not isinstance(event_type, str) or not event_type.strip():
            raise _invalid("event_type", event_type, "a name")
        when = (occurred_at or datetime.now(UTC)).astimezone(UTC)
        try:
            body = json.dumps(
                {
                    "type": event_type,
                    "timestamp": when.isoformat().replace("+00:00", "Z"),
                    "data": dict(data),
                },
                separators=(",", ":"),
                sort_keys=True,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"webhook data is not JSON-serializable ({exc})", variable="data"
            ) from None
        return cls(
            provider=provider,
            idempotency_key=idempotency_key or f"{provider}:{webhook_id}",
            payload={
                "endpoint": endpoint,
                "webhook_id": webhook_id,
                "event_type": event_type,
                "body": body,
            },
            kind=KIND_WEBHOOK,
            ordering_key=ordering_key,
            tenant_id=tenant_id,
            max_retries=max_retries,
        )


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A leased message, as a delivery strategy sees it (read-only)."""

    id: int
    provider: str
    kind: str
    idempotency_key: str
    payload: Mapping[str, Any]
    ordering_key: str | None
    tenant_id: str | None
    #: Attempts so far, this one included.
    attempts: int
    #: Retries allowed after the first attempt (the configured default already applied).
    max_retries: int
    created_at: datetime
    #: When this worker's lease lapses.
    lease_expires_at: datetime = field(compare=False)
    #: The lease's generation (fencing token): the settle of this lease applies
    #: only while the message is still under it.
    lease_generation: int = field(default=0, compare=False)


class _Shell:
    """The slots of :class:`OutboxMessage` in the same order, without the frozen
    ``__setattr__``: filled by plain attribute stores, then made an ``OutboxMessage``
    by assigning ``__class__`` (allowed between classes of one layout)."""

    # The dataclass's own slots (its fields, in order): what makes the ``__class__``
    # assignment legal, whatever fields OutboxMessage gains.
    __slots__ = OutboxMessage.__slots__


def leased_message(  # noqa: PLR0917  # one positional call per leased row, in field order
    id_: int,
    provider: str,
    kind: str,
    idempotency_key: str,
    payload: Mapping[str, Any],
    ordering_key: str | None,
    tenant_id: str | None,
    attempts: int,
    max_retries: int,
    created_at: datetime,
    lease_expires_at: datetime,
    lease_generation: int,
) -> OutboxMessage:
    """``OutboxMessage(...)`` with these fields, built the fast way (the worker makes
    one per leased row): the same object as the constructor's, at a fraction of the cost.

    The frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``; here each is a plain store into a shell of the same
    layout, whose class then becomes ``OutboxMessage``. The values are the
    database's (already typed), so nothing is checked here, as the constructor
    checks nothing either.
    """
    message: Any = _Shell()  # typed by the stores below, which mirror OutboxMessage's fields
    message.id = id_
    message.provider = provider
    message.kind = kind
    message.idempotency_key = idempotency_key
    message.payload = payload
    message.ordering_key = ordering_key
    message.tenant_id = tenant_id
    message.attempts = attempts
    message.max_retries = max_retries
    message.created_at = created_at
    message.lease_expires_at = lease_expires_at
    message.lease_generation = lease_generation
    message.__class__ = OutboxMessage  # same layout: see _Shell
    return message  # type: ignore[no-any-return]  # it is an OutboxMessage now
