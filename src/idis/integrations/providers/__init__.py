"""Provider adapters: typed access to a provider's records, changes, replay and enrichment.

:class:`ProviderClient` (sync) and :class:`AsyncProviderClient` speak the
generic REST shape the simulator serves (and that most CRM/enrichment APIs
can be mapped onto): records with versions and ``updated_at``, a changes
feed ordered by sequence number, a replay API with a retention window, and
an enrichment lookup. Every call goes through the resilient gateway, so
breakers, retries and metrics apply. A provider with another shape gets its
own adapter implementing :class:`ProviderAdapter`.

Decoding is written once (``parse_*``), and so is each client method: a flow
on ``_GenericFlows`` that both clients list (``sync_face`` / ``async_face``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from .._flow import Flow, async_face, sync_face
from .._timeparse import format_duration, utcnow
from ..exceptions import MalformedResponse, ProviderRejected, ReplayWindowExceeded, UsageError
from ..resilience._gateway import AsyncGateway, Gateway
from ._client import AsyncReplayPages, Call, ClientFlows, ReplayPages, provider_time
from ._order import (
    BY_MODIFIED,
    BY_VERSION,
    ByModified,
    ByVersion,
    MissingOrder,
    Ordering,
    OrderKey,
    order_key,
    ordering_for,
)
from ._pack import (
    BearerToken,
    Capabilities,
    ProviderPack,
    RateLimitReading,
    known_packs,
    pack_auth,
    pack_for,
    register_pack,
)

__all__ = [
    "BY_MODIFIED",
    "BY_VERSION",
    "AsyncProviderClient",
    "BearerToken",
    "ByModified",
    "ByVersion",
    "Capabilities",
    "ChangesPage",
    "MissingOrder",
    "OrderKey",
    "Ordering",
    "ProviderAdapter",
    "ProviderClient",
    "ProviderEvent",
    "ProviderPack",
    "ProviderRecord",
    "RateLimitReading",
    "RecordPage",
    "ReplayPage",
    "async_client_for",
    "check_replay_window",
    "client_for",
    "known_packs",
    "order_key",
    "ordering_for",
    "pack_auth",
    "pack_for",
    "parse_event",
    "parse_record",
    "register_pack",
    "stated_retention",
]


def _order_from_version(item: ProviderRecord | ProviderEvent) -> None:
    """An item without an order key is ordered by its version (when it has one)."""
    if item.order is None and item.version and item.version > 0:
        object.__setattr__(item, "order", OrderKey(int(item.version)))


@dataclass(frozen=True, slots=True)
class ProviderRecord:
    """A record as the provider holds it now."""

    id: str
    tenant_id: str | None
    #: The provider's record version (0 when the provider sends none).
    version: int
    updated_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    #: Where this state stands in the record's history, comparable with the keys of
    #: the record's events (see :mod:`._order`); set by the adapter, or from ``version``.
    order: OrderKey | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _order_from_version(self)


@dataclass(frozen=True, slots=True)
class ProviderEvent:
    """One change the provider emitted (by webhook, changes feed or replay)."""

    #: Provider's event id: the dedupe key across every channel.
    id: str
    #: Provider's sequence number (total order per provider).
    seq: int
    #: ``record.created``, ``record.updated``, ``record.deleted``...
    type: str
    record_id: str
    tenant_id: str | None
    #: Record version this event produced (0 when the provider sends none).
    version: int
    occurred_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    #: The event's place in its record's history: what every apply path orders by
    #: (see :mod:`._order`). Set by the adapter from its dialect's rule; when not
    #: given it is the record version (None when there is none).
    order: OrderKey | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        _order_from_version(self)


@dataclass(frozen=True, slots=True)
class RecordPage:
    """One page of records."""

    items: list[ProviderRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ChangesPage:
    """One page of the changes feed."""

    events: list[ProviderEvent]
    #: The generic feed's next ``seq`` (None for APIs whose cursor is not a number).
    next_after: int | None
    has_more: bool
    #: Where the next page starts, as the provider states it: opaque text the
    #: poller stores and hands back as ``changes(after=...)``. The generic feed's
    #: is its ``next_after`` as text.
    next_cursor: str | None = field(default=None, kw_only=True)
    #: The oldest ``seq`` the feed still serves, when the API states it (the
    #: generic feed's ``oldest_seq``): a position before it means the feed no
    #: longer holds some events after that position.
    oldest_seq: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.next_cursor is None and self.next_after is not None:
            object.__setattr__(self, "next_cursor", str(self.next_after))


@dataclass(frozen=True, slots=True)
class ReplayPage:
    """One page of the replay API."""

    events: list[ProviderEvent]
    next_cursor: str | None


def _version(raw: Any) -> int:
    value = raw.get("version")
    return 0 if value is None else int(value)


def parse_record(raw: Any, provider: str, ordering: Ordering = BY_VERSION) -> ProviderRecord:
    """Decode one record, keyed by ``ordering``.

    Raises:
        MalformedResponse: it does not have the expected shape, or lacks what
            ``ordering`` needs (a version under ``ByVersion``).
    """
    try:
        version = _version(raw)
        updated_at = provider_time(raw["updated_at"], "record.updated_at", provider)
        return ProviderRecord(
            id=str(raw["id"]),
            tenant_id=None if raw.get("tenant_id") is None else str(raw["tenant_id"]),
            version=version,
            updated_at=updated_at,
            data=dict(raw.get("data") or {}),
            order=ordering.record_key(version=version or None, updated_at=updated_at),
        )
    except (KeyError, TypeError, ValueError, AttributeError, UsageError, MissingOrder) as exc:
        raise MalformedResponse(
            f"{provider}: malformed record ({type(exc).__name__}: {exc})", provider=provider
        ) from None


def parse_event(raw: Any, provider: str, ordering: Ordering = BY_VERSION) -> ProviderEvent:
    """Decode one event, keyed by ``ordering``.

    Raises:
        MalformedResponse: it does not have the expected shape, or lacks what
            ``ordering`` needs (a version under ``ByVersion``).
    """
    try:
        event_id = str(raw["id"])
        seq = int(raw["seq"])
        version = _version(raw)
        occurred_at = provider_time(raw["occurred_at"], "event.occurred_at", provider)
        return ProviderEvent(
            id=event_id,
            seq=seq,
            type=str(raw["type"]),
            record_id=str(raw["record_id"]),
            tenant_id=None if raw.get("tenant_id") is None else str(raw["tenant_id"]),
            version=version,
            occurred_at=occurred_at,
            data=dict(raw.get("data") or {}),
            order=ordering.event_key(
                event_id=event_id, seq=seq, version=version or None, occurred_at=occurred_at
            ),
        )
    except (KeyError, TypeError, ValueError, AttributeError, UsageError, MissingOrder) as exc:
        raise MalformedResponse(
            f"{provider}: malformed event ({type(exc).__name__}: {exc})", provider=provider
        ) from None


def _records_page(body: Any, provider: str, ordering: Ordering) -> RecordPage:
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise MalformedResponse(f"{provider}: records page has no 'items' list", provider=provider)
    return RecordPage(
        [parse_record(r, provider, ordering) for r in body["items"]], body.get("next_cursor")
    )


def _changes_page(body: Any, provider: str, ordering: Ordering) -> ChangesPage:
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise MalformedResponse(f"{provider}: changes page has no 'events' list", provider=provider)
    events = [parse_event(e, provider, ordering) for e in body["events"]]
    next_after = body.get("next_after")
    oldest = body.get("oldest_seq")
    return ChangesPage(
        events,
        None if next_after is None else int(next_after),
        bool(body.get("has_more")),
        oldest_seq=None if oldest is None else int(oldest),
    )


def _replay_page(body: Any, provider: str, ordering: Ordering) -> ReplayPage:
    if not isinstance(body, dict) or not isinstance(body.get("events"), list):
        raise MalformedResponse(f"{provider}: replay page has no 'events' list", provider=provider)
    return ReplayPage(
        [parse_event(e, provider, ordering) for e in body["events"]], body.get("next_cursor")
    )


def check_replay_window(
    provider: str, since: datetime, retention_seconds: float, *, now: datetime | None = None
) -> None:
    """Refuse a replay that reaches further back than the provider retains.

    Raises:
        ReplayWindowExceeded: naming the window and the fallback.
    """
    now = now or utcnow()
    if since < now - timedelta(seconds=retention_seconds):
        window = format_duration(retention_seconds)
        raise ReplayWindowExceeded(
            f"{provider} replay retains only {window} of events; {since.isoformat()} is older. "
            f"Reconcile a window within the last {window}, and run a full resync "
            f"(`idis-integrations reconcile --provider {provider} --resync`) for older changes",
            provider=provider,
            endpoint="replay",
        )


def stated_retention(exc: ProviderRejected) -> timedelta | None:
    """The retention a refusal states (``retention_seconds`` in a 410/422 body), if any."""
    details = exc.details or {}
    value = details.get("retention_seconds")
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e10:
        return None
    return timedelta(seconds=value)


def _retention_error(exc: ProviderRejected, provider: str, since: datetime) -> Exception:
    """A 410/422 retention_exceeded from the provider, translated; keeps the stated retention."""
    retention = stated_retention(exc)
    held = f" of {format_duration(retention)}" if retention is not None else ""
    error = ReplayWindowExceeded(
        f"{provider} replay refused {since.isoformat()}: older than its retention window{held}. "
        f"Reconcile a shorter window, and run a full resync for older changes",
        provider=provider,
        endpoint="replay",
        status_code=exc.status_code,
    )
    error.retention = retention
    return error


@runtime_checkable
class ProviderAdapter(Protocol):
    """What the library needs from a provider (sync)."""

    name: str

    def get_record(self, record_id: str) -> ProviderRecord | None:
        """The record as the provider holds it, or None when it does not exist."""

    def list_records(
        self, *, updated_since: datetime | None = None, cursor: str | None = None, limit: int = 100
    ) -> RecordPage:
        """One page of records, optionally only those updated since a time."""

    def changes(
        self, *, after: int | str | None = None, since: datetime | None = None, limit: int = 100
    ) -> ChangesPage:
        """One page of the changes feed after a sequence number (or since a time)."""

    def replay(self, since: datetime, *, cursor: str | None = None, limit: int = 500) -> ReplayPage:
        """One page of the replay API."""


def _records_params(
    updated_since: datetime | None, cursor: str | None, limit: int
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if updated_since is not None:
        params["updated_since"] = updated_since.isoformat()
    if cursor:
        params["cursor"] = cursor
    return params


def _changes_params(after: int | str | None, since: datetime | None, limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if after is not None:
        if isinstance(after, str) and not (after.isascii() and after.isdigit()):
            raise UsageError(
                f"cursor {after[:40]!r} is not a position in the generic changes feed: "
                "expected its seq (digits)"
            )
        params["after"] = int(after)
    elif since is not None:
        params["since"] = since.isoformat()
    return params


def _replay_params(since: datetime, cursor: str | None, limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {"since": since.isoformat(), "limit": limit}
    if cursor:
        params["cursor"] = cursor
    return params


class _GenericFlows(ClientFlows):
    """The generic REST shape's client methods, each written once as a flow."""

    def __init__(self, gateway: Any, provider: str) -> None:
        super().__init__(gateway, provider)
        #: How this provider's events and records are ordered (``order_by``).
        self.ordering = ordering_for(self.settings.order_by)

    @staticmethod
    def accepts_cursor(position: str) -> bool:
        """Whether ``position`` is a changes-feed cursor of this shape (a ``seq``)."""
        return position.isascii() and position.isdigit()

    def _get_record(self, record_id: str) -> Flow[ProviderRecord | None]:
        """The record, or None on 404."""
        try:
            # A 404 is the answer "no such record": no warning (the caller decides).
            body = yield Call("record", {"path_params": {"id": record_id}, "not_found_ok": True})
        except ProviderRejected as exc:
            if exc.status_code == 404:
                return None
            raise
        return parse_record(body, self.name, self.ordering)

    def _list_records(
        self, *, updated_since: datetime | None = None, cursor: str | None = None, limit: int = 100
    ) -> Flow[RecordPage]:
        """One page of records."""
        body = yield Call("records", {"params": _records_params(updated_since, cursor, limit)})
        return _records_page(body, self.name, self.ordering)

    def _put_record(
        self,
        record_id: str,
        data: Mapping[str, Any],
        *,
        tenant_id: str | None = None,
        idempotency_key: str,
    ) -> Flow[ProviderRecord]:
        """Create or update a record; the idempotency key makes retries safe."""
        body = yield Call(
            "record",
            {
                "method": "PUT",
                "path_params": {"id": record_id},
                "json": {"tenant_id": tenant_id, "data": dict(data)},
                "idempotency_key": idempotency_key,
            },
        )
        return parse_record(body, self.name, self.ordering)

    def _changes(
        self, *, after: int | str | None = None, since: datetime | None = None, limit: int = 100
    ) -> Flow[ChangesPage]:
        """One page of the changes feed."""
        body = yield Call("changes", {"params": _changes_params(after, since, limit)})
        return _changes_page(body, self.name, self.ordering)

    def _replay(
        self, since: datetime, *, cursor: str | None = None, limit: int = 500
    ) -> Flow[ReplayPage]:
        """One page of the replay API.

        Raises:
            ReplayWindowExceeded: ``since`` is older than the provider retains.
        """
        check_replay_window(
            self.name,
            since,
            self.settings.replay_retention.total_seconds(),
            now=self.gateway.clock.now(),
        )
        try:
            body = yield Call("replay", {"params": _replay_params(since, cursor, limit)})
        except ProviderRejected as exc:
            if exc.status_code in (410, 422):
                raise _retention_error(exc, self.name, since) from exc
            raise
        return _replay_page(body, self.name, self.ordering)

    def _enrich(self, subject_id: str) -> Flow[dict[str, Any]]:
        """Enrichment data for a subject."""
        body = yield Call("enrich", {"path_params": {"id": subject_id}})
        if not isinstance(body, dict):
            raise MalformedResponse(f"{self.name}: enrichment is not an object", provider=self.name)
        return body


class ProviderClient(_GenericFlows, ReplayPages):
    """Sync adapter for the generic REST provider shape. Thread-safe (the gateway is)."""

    gateway: Gateway

    get_record = sync_face(_GenericFlows._get_record)
    list_records = sync_face(_GenericFlows._list_records)
    put_record = sync_face(_GenericFlows._put_record)
    changes = sync_face(_GenericFlows._changes)
    replay = sync_face(_GenericFlows._replay)
    enrich = sync_face(_GenericFlows._enrich)
    health = sync_face(_GenericFlows._health)


class AsyncProviderClient(_GenericFlows, AsyncReplayPages):
    """Async twin of :class:`ProviderClient`."""

    gateway: AsyncGateway

    get_record = async_face(_GenericFlows._get_record)
    list_records = async_face(_GenericFlows._list_records)
    put_record = async_face(_GenericFlows._put_record)
    changes = async_face(_GenericFlows._changes)
    replay = async_face(_GenericFlows._replay)
    enrich = async_face(_GenericFlows._enrich)
    health = async_face(_GenericFlows._health)


def client_for(gateway: Gateway, provider: str) -> Any:
    """The sync adapter of ``provider``'s pack (``IDIS_PROVIDER_<NAME>_API``) over ``gateway``.

    Raises:
        ConfigError: the provider's pack is unknown.
    """
    return pack_for(gateway.settings.provider(provider)).client(gateway, provider)


def async_client_for(gateway: AsyncGateway, provider: str) -> Any:
    """The async adapter of ``provider``'s pack over ``gateway`` (see :func:`client_for`)."""
    return pack_for(gateway.settings.provider(provider)).async_client(gateway, provider)
