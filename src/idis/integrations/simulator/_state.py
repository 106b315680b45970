"""The simulator's in-memory model: providers, records, event logs, faults, webhooks, tokens.

Everything here is plain Python with no I/O, guarded by one re-entrant lock so
that the ASGI app (on the server's event loop) and in-process callers (a test
or the RB-09 drill on another thread) can share one :class:`SimulatorState`.

Time comes from an injectable clock plus an adjustable offset, so tests and
the drill can move simulated time without sleeping. Event and record
timestamps never go backwards within a provider, even if the clock does: each
is clamped to the previous one, which keeps the time indexes sorted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from copy import copy
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .._timeparse import utcnow
from ..exceptions import ConfigError

__all__ = [
    "DEFAULT_OUTBOUND_WEBHOOK_SECRET",
    "DEFAULT_RETENTION_SECONDS",
    "DEFAULT_WEBHOOK_SECRET",
    "ENDPOINTS",
    "FAULT_KINDS",
    "WEBHOOK_MODES",
    "Clock",
    "Delivery",
    "Fault",
    "ProviderState",
    "ReceiverConfig",
    "RetentionExceeded",
    "SimulatorInputError",
    "SimulatorState",
    "WebhookConfig",
    "format_time",
    "parse_time",
]

Clock = Callable[[], datetime]

#: Logical endpoint names a fault can target (``None`` targets them all).
ENDPOINTS: tuple[str, ...] = (
    "health",
    "records",
    "record",
    "changes",
    "replay",
    "enrich",
    "token",
    "revoke",
    "rotate",
    "webhooks_inbound",
    "account_info",
)
FAULT_KINDS: tuple[str, ...] = (
    "error",
    "latency",
    "timeout",
    "drop",
    "rate_limit",
    "malformed",
    "outage",
)
_FAULT_ALIASES = {"hang": "timeout", "http_error": "error", "429": "rate_limit"}
WEBHOOK_MODES: tuple[str, ...] = ("deliver", "stop", "delay", "duplicate", "reorder", "corrupt")
#: Outbound webhook shapes (``WebhookConfig.format``).
WEBHOOK_FORMATS = ("standard", "hubspot")
RECEIVER_MODES: tuple[str, ...] = ("accept", "gone", "fail")
EVENT_TYPES: tuple[str, ...] = ("record.created", "record.updated", "record.deleted")
DEFAULT_RETENTION_SECONDS = 72 * 3600
#: Same value as the embedded default settings, so the library and the simulator agree.
DEFAULT_WEBHOOK_SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLXdlYmhvb2s="  # noqa: S105  # public test key
#: What the receiver for the library's outbound webhooks verifies by default: a
#: key of its own, so a captured outbound delivery never verifies inbound.
DEFAULT_OUTBOUND_WEBHOOK_SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLW91dGJvdW5k"  # noqa: S105  # public test key
_PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RECORD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
#: Physically drop expired events once this many have piled up (memory, not semantics).
_PRUNE_BATCH = 1024


class SimulatorInputError(ConfigError):
    """A control or provider API call got a value it cannot use; nothing was changed."""


class RetentionExceeded(Exception):  # a domain answer, not a bug
    """A replay asked for events older than the provider retains."""

    def __init__(self, retention_seconds: int, oldest: datetime | None) -> None:
        super().__init__(f"replay retention is {retention_seconds} s")
        self.retention_seconds = retention_seconds
        self.oldest = oldest


def format_time(value: datetime) -> str:
    """ISO-8601 in UTC with a ``Z`` suffix and microseconds."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, name: str) -> datetime:
    """Parse an ISO-8601 time (naive means UTC).

    Raises:
        SimulatorInputError: naming the parameter and the value.
    """
    # A literal "+" in a query string decodes to a space.
    cleaned = text.strip().replace(" ", "+")
    try:
        parsed = datetime.fromisoformat(cleaned)
    except ValueError:
        raise SimulatorInputError(
            f"{name}={text!r} is not an ISO-8601 time like 2026-01-19T10:00:00Z", variable=name
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _number(value: object, name: str, *, minimum: float, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SimulatorInputError(f"{name}={value!r} is not a number", variable=name)
    number = float(value)
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and at most {maximum:g}" if maximum is not None else ""
        raise SimulatorInputError(
            f"{name}={value!r} is out of range: expected at least {minimum:g}{upper}", variable=name
        )
    return number


def _integer(value: object, name: str, *, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SimulatorInputError(f"{name}={value!r} is not an integer", variable=name)
    _number(value, name, minimum=minimum, maximum=maximum)
    return value


def _choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise SimulatorInputError(
            f"{name}={value!r} is not one of {', '.join(choices)}", variable=name
        )
    return cast(str, value)


def _given(check: Callable[..., Any], value: object, name: str, *args: Any, **limits: Any) -> Any:
    """``check(value, name, ...)``'s checked value, or None when ``value`` was not given."""
    return None if value is None else check(value, name, *args, **limits)


def _apply(target: object, changes: Mapping[str, object]) -> None:
    """Set the given (not None) ``changes`` on ``target``: a setter checks every argument
    first, so a bad one leaves the target as it was."""
    for name, value in changes.items():
        if value is not None:
            setattr(target, name, value)


def _whsec_list(secrets: Sequence[str] | None) -> tuple[str, ...] | None:
    """``secrets`` checked (a non-empty list of whsec_ secrets), or None when not given."""
    if secrets is None:
        return None
    if isinstance(secrets, str) or not secrets:
        raise SimulatorInputError(
            "secrets must be a non-empty list of whsec_ secrets", variable="secrets"
        )
    return tuple(_whsec(s, f"secrets[{i}]") for i, s in enumerate(secrets))


def _whsec(value: object, name: str) -> str:
    import base64
    import binascii

    text = str(value)
    if not text.startswith("whsec_"):
        raise SimulatorInputError(
            f"{name}: expected a Standard Webhooks secret starting with whsec_", variable=name
        )
    try:
        base64.b64decode(text[len("whsec_") :], validate=True)
    except (binascii.Error, ValueError):
        # Never echo a secret, even a malformed one.
        raise SimulatorInputError(
            f"{name}: the part after whsec_ is not base64", variable=name
        ) from None
    return text


# --------------------------------------------------------------------------- faults


@dataclass(slots=True)
class Fault:
    """One injected failure; see docs/simulator.md for each kind."""

    id: int
    kind: str
    endpoint: str | None
    status: int
    ratio: float
    seconds: float
    retry_after: float | None
    retry_after_format: str
    expires_at: datetime | None
    remaining: int | None
    rng: random.Random
    fired: int = 0
    #: A dialect's name for the limit a ``rate_limit`` fault reports (HubSpot's
    #: ``policyName``: ``DAILY`` or ``TEN_SECONDLY_ROLLING``, the default).
    policy: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON view for the control API."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rng"}
        return shown | {"expires_at": format_time(self.expires_at) if self.expires_at else None}


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class Record:
    """A provider-side record."""

    id: str
    tenant_id: str
    version: int
    updated_at: datetime
    data: dict[str, Any]
    write_no: int
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        """The record as the provider API returns it."""
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "version": self.version,
            "updated_at": format_time(self.updated_at),
            "data": self.data,
        }


@dataclass(slots=True)
class IdempotencyEntry:
    """The stored outcome of the first request that carried a key, and what the key did since.

    Counted, never assumed: ``received`` is every request that reached the
    provider with the key (faults answer before that and are counted in
    ``faults_fired``), ``applications`` every time a write under it was really
    applied, ``duplicates`` the repeats answered from this entry instead.
    """

    fingerprint: str
    status: int
    body: dict[str, Any]
    applications: int = 0
    duplicates: int = 0
    received: int = 0


# --------------------------------------------------------------------------- webhooks


@dataclass(slots=True)
class Delivery:
    """One event waiting to be POSTed to the provider's webhook target."""

    event: dict[str, Any]
    mode: str
    #: ``time.monotonic()`` before which it must not be sent (delay mode).
    due: float


@dataclass(slots=True)
class WebhookConfig:
    """Outbound webhook target, delivery mode, stop windows and counters."""

    url: str | None = None
    secrets: tuple[str, ...] = (DEFAULT_WEBHOOK_SECRET,)
    #: Body shape and signature: ``standard`` (Standard Webhooks, one event per request)
    #: or ``hubspot`` (a JSON array of HubSpot events per request, ``X-HubSpot-Signature-v3``).
    format: str = "standard"
    mode: str = "deliver"
    delay: float = 0.0
    reorder_batch: int = 5
    max_attempts: int = 3
    retry_backoff: float = 0.05
    timeout: float = 5.0
    stop_windows: list[tuple[datetime, datetime]] = field(default_factory=list)
    queue: deque[Delivery] = field(default_factory=deque)
    in_flight: int = 0
    delivered: int = 0
    delivered_events: int = 0
    duplicated: int = 0
    corrupted: int = 0
    reordered_batches: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    dropped: int = 0
    dropped_ids: list[str] = field(default_factory=list)
    no_target: int = 0

    def stats(self) -> dict[str, Any]:
        """Settings and counters for the stats API (never the secrets)."""
        hidden = ("secrets", "reorder_batch", "max_attempts", "retry_backoff", "timeout", "queue")
        return _shown(self, hidden) | {
            "url": _masked_url(self.url),
            "stop_windows": [[format_time(a), format_time(b)] for a, b in self.stop_windows],
            "pending": len(self.queue),
        }


def _shown(config: Any, hidden: Sequence[str]) -> dict[str, Any]:
    """A config's fields but ``hidden``, for the stats: lists and counters copied."""
    shown = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in hidden}
    return {k: dict(v) if isinstance(v, dict) else copy(v) for k, v in shown.items()}


def _masked_url(url: str | None) -> str | None:
    """``url`` for the stats: a password in it, or any query value, becomes ``***``."""
    if url is None:
        return None
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
    query = "&".join(
        f"{name}=***" if value else name
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(slots=True)
class ReceiverConfig:
    """The inbound webhook receiver (for the library's outbound webhooks)."""

    secrets: tuple[str, ...] = (DEFAULT_OUTBOUND_WEBHOOK_SECRET,)
    mode: str = "accept"
    fail_status: int = 503
    fail_ratio: float = 1.0
    #: Accepted clock difference for webhook-timestamp, seconds; None disables the check.
    tolerance: float | None = 300.0
    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    received_per_id: Counter[str] = field(default_factory=Counter)
    applied_per_id: Counter[str] = field(default_factory=Counter)
    deliveries: list[dict[str, Any]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """Counters for the stats API."""
        hidden = ("secrets", "fail_status", "fail_ratio", "tolerance", "deliveries")
        return _shown(self, hidden)


# --------------------------------------------------------------------------- provider


class ProviderState:
    """One simulated provider. Call its methods with the owning state's lock held."""

    def __init__(self, name: str, owner: SimulatorState) -> None:
        from ._oauth import OAuthState  # which checks its settings with this module's helpers

        self.name = name
        self._owner = owner
        self.retention_seconds = owner.default_retention_seconds
        #: How far back ``/changes`` reaches (None: as far as replay). Real feeds are
        #: bounded (Salesforce keeps Change Data Capture events 72 hours, Pub/Sub API
        #: guide "Event Message Durability"); a client further behind must replay.
        self.feed_retention_seconds: int | None = None
        self.require_auth = False
        #: False plays a provider that ignores Idempotency-Key (every request applies).
        self.honor_idempotency = True
        self.records: dict[str, Record] = {}
        # Records in write order: parallel lists, sorted by write number and time.
        self._order_nos: list[int] = []
        self._order_ids: list[str] = []
        self._order_times: list[datetime] = []
        self._write_no = 0
        self._stale = 0
        # The event log: seq of _events[i] is _base_seq + i + 1.
        self._events: list[dict[str, Any]] = []
        self._event_times: list[datetime] = []
        self._base_seq = 0
        self._last_time: datetime | None = None
        self._new_record_no = 0
        self.idempotency: dict[str, IdempotencyEntry] = {}
        self.writes: dict[str, list[dict[str, Any]]] = {}
        self.faults: list[Fault] = []
        self.requests: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.faults_fired: Counter[str] = Counter()
        self.auth_failures = 0
        self.webhooks = WebhookConfig()
        self.receiver = ReceiverConfig()
        self.oauth = OAuthState(name)
        self.data_rng = random.Random(f"{owner.seed}:{name}:data")  # noqa: S311  # seeded simulation
        self.receiver_rng = random.Random(f"{owner.seed}:{name}:receiver")  # noqa: S311  # seeded simulation

    # ------------------------------------------------------------------ time

    def _stamp(self) -> datetime:
        now = self._owner.now()
        if self._last_time is not None and now < self._last_time:
            now = self._last_time
        self._last_time = now
        return now

    def _cutoff_index(self, now: datetime) -> int:
        cutoff = now - timedelta(seconds=self.retention_seconds)
        index = bisect.bisect_left(self._event_times, cutoff)
        if index >= _PRUNE_BATCH:
            # Memory only: what replay/changes return is decided by the cutoff anyway.
            del self._events[:index]
            del self._event_times[:index]
            self._base_seq += index
            index = 0
        return index

    # ------------------------------------------------------------------ records and events

    def write_record(
        self,
        record_id: str,
        data: Mapping[str, Any],
        *,
        tenant_id: str | None = None,
        event_type: str | None = None,
        emit_event: bool = True,
        webhook: bool = True,
        idempotency_key: str | None = None,
    ) -> tuple[Record, dict[str, Any] | None, bool]:
        """Create, update or delete a record; return (record, event or None, created).

        Raises:
            SimulatorInputError: for a bad record id, tenant id, data or event type.
        """
        if not isinstance(record_id, str) or not _RECORD_ID.fullmatch(record_id):
            raise SimulatorInputError(
                f"record id {record_id!r} is invalid: expected 1-128 letters, digits or _.:@-",
                variable="record_id",
            )
        if not isinstance(data, Mapping):
            raise SimulatorInputError(f"data={data!r} is not a JSON object", variable="data")
        if tenant_id is not None and (not isinstance(tenant_id, str) or not tenant_id):
            raise SimulatorInputError(
                f"tenant_id={tenant_id!r} is not a non-empty string", variable="tenant_id"
            )
        if event_type is not None:
            _choice(event_type, "type", EVENT_TYPES)
        now = self._stamp()
        existing = self.records.get(record_id)
        created = existing is None or existing.deleted
        if existing is not None:
            self._stale += 1
        self._write_no += 1
        kind = event_type or ("record.created" if created else "record.updated")
        record = Record(
            id=record_id,
            tenant_id=tenant_id or (existing.tenant_id if existing else "tenant_1"),
            version=(existing.version + 1) if existing else 1,
            updated_at=now,
            data=dict(data),
            write_no=self._write_no,
            deleted=kind == "record.deleted",
        )
        self.records[record_id] = record
        self._order_nos.append(self._write_no)
        self._order_ids.append(record_id)
        self._order_times.append(now)
        if self._stale > 256 and self._stale * 2 > len(self._order_nos):
            self._compact()
        self.writes.setdefault(record_id, []).append(
            {
                "version": record.version,
                "idempotency_key": idempotency_key,
                "data": record.data,
                "at": format_time(now),
            }
        )
        event: dict[str, Any] | None = None
        if emit_event:
            event = self._append_event(kind, record, now)
            if webhook:
                self._owner._enqueue_webhook(self, event)
        return record, event, created

    def _compact(self) -> None:
        live = sorted(self.records.values(), key=lambda r: r.write_no)
        self._order_nos = [r.write_no for r in live]
        self._order_ids = [r.id for r in live]
        self._order_times = [r.updated_at for r in live]
        self._stale = 0

    def _append_event(self, kind: str, record: Record, now: datetime) -> dict[str, Any]:
        seq = self._base_seq + len(self._events) + 1
        event = {
            "id": f"evt_{seq}",
            "seq": seq,
            "type": kind,
            "record_id": record.id,
            "tenant_id": record.tenant_id,
            "version": record.version,
            "occurred_at": format_time(now),
            "data": record.data,
        }
        self._events.append(event)
        self._event_times.append(now)
        return event

    def emit(
        self,
        count: int = 1,
        *,
        tenant_ids: Sequence[str] | None = None,
        record_ids: Sequence[str] | None = None,
        event_type: str | None = None,
        data: Mapping[str, Any] | None = None,
        webhook: bool = True,
    ) -> list[dict[str, Any]]:
        """Make ``count`` changes; each appends an event and (by default) queues a webhook.

        Record ids cycle through ``record_ids``; without them each change creates
        a new record ``rec_<n>``. Tenant ids cycle through ``tenant_ids``.

        Raises:
            SimulatorInputError: for a bad count, id list or event type.
        """
        _integer(count, "count", minimum=1, maximum=1_000_000)
        for name, given, valid in (
            ("tenant_ids", tenant_ids, re.compile(".+", re.DOTALL)),
            ("record_ids", record_ids, _RECORD_ID),
        ):
            if given is not None and (
                isinstance(given, str)
                or not given
                or not all(isinstance(v, str) and valid.fullmatch(v) for v in given)
            ):
                raise SimulatorInputError(
                    f"{name}={given!r} must be a non-empty list of valid ids", variable=name
                )
        if event_type is not None:
            _choice(event_type, "type", EVENT_TYPES)
        if data is not None and not isinstance(data, Mapping):
            raise SimulatorInputError(f"data={data!r} is not a JSON object", variable="data")
        events: list[dict[str, Any]] = []
        for index in range(count):
            if record_ids:
                record_id = record_ids[index % len(record_ids)]
            else:
                self._new_record_no += 1
                record_id = f"rec_{self._new_record_no}"
                while record_id in self.records:
                    self._new_record_no += 1
                    record_id = f"rec_{self._new_record_no}"
            tenant = tenant_ids[index % len(tenant_ids)] if tenant_ids else None
            payload = dict(data) if data is not None else self._fake_data(record_id)
            _, event, _ = self.write_record(
                record_id, payload, tenant_id=tenant, event_type=event_type, webhook=webhook
            )
            assert event is not None
            events.append(event)
        return events

    def _fake_data(self, record_id: str) -> dict[str, Any]:
        rng = self.data_rng
        return {
            "name": f"Deal {record_id}",
            "amount": rng.randrange(1_000, 1_000_000),
            "stage": rng.choice(("lead", "qualified", "proposal", "won", "lost")),
            "change": self._write_no + 1,
        }

    def list_records(
        self, *, updated_since: datetime | None, cursor: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of live records in write order, and the cursor of the next page."""
        start = 0
        if updated_since is not None:
            start = bisect.bisect_left(self._order_times, updated_since)
        if cursor is not None:
            after = _parse_cursor(cursor, "w")
            start = max(start, bisect.bisect_right(self._order_nos, after))
        items: list[dict[str, Any]] = []
        index = start
        total = len(self._order_nos)
        last_no: int | None = None
        while index < total and len(items) < limit:
            record = self.records[self._order_ids[index]]
            if record.write_no == self._order_nos[index] and not record.deleted:
                items.append(record.to_json())
                last_no = record.write_no
            index += 1
        next_cursor = f"w{last_no}" if index < total and last_no is not None else None
        return items, next_cursor

    def changes(self, *, after: int | None, since: datetime | None, limit: int) -> dict[str, Any]:
        """A page of the event log by sequence number (``after``) or time (``since``)."""
        now = self._owner.now()
        cutoff = self._cutoff_index(now)
        if self.feed_retention_seconds is not None:
            # After _cutoff_index, which may prune (and so move every index).
            feed_start = now - timedelta(seconds=self.feed_retention_seconds)
            cutoff = max(cutoff, bisect.bisect_left(self._event_times, feed_start))
        start = 0
        if after is not None:
            start = max(start, after - self._base_seq)
        if since is not None:
            start = max(start, bisect.bisect_left(self._event_times, since))
        start = max(start, cutoff)
        page = self._events[start : start + limit]
        end = start + len(page)
        return {
            "events": page,
            "next_after": max(self._base_seq + end, after or 0),
            "has_more": end < len(self._events),
            "oldest_seq": self._base_seq + cutoff + 1 if cutoff < len(self._events) else None,
        }

    def replay(self, *, since: datetime | None, cursor: str | None, limit: int) -> dict[str, Any]:
        """A page of the event log from a time, within the retention window.

        Raises:
            RetentionExceeded: ``since`` (or the cursor's position) is older than retained.
            SimulatorInputError: neither ``since`` nor ``cursor`` given, or a bad cursor.
        """
        now = self._owner.now()
        retention = timedelta(seconds=self.retention_seconds)
        cutoff = self._cutoff_index(now)
        oldest = self._event_times[cutoff] if cutoff < len(self._events) else None
        if since is not None and since < now - retention:
            raise RetentionExceeded(self.retention_seconds, oldest)
        if cursor is not None:
            start = _parse_cursor(cursor, "e") - self._base_seq
            if start < cutoff:
                # Events after the cursor were pruned meanwhile: the caller lost some.
                raise RetentionExceeded(self.retention_seconds, oldest)
        elif since is not None:
            start = max(bisect.bisect_left(self._event_times, since), cutoff)
        else:
            raise SimulatorInputError(
                "replay needs since=ISO-8601 time (or a cursor from a previous page)",
                variable="since",
            )
        page = self._events[start : start + limit]
        end = start + len(page)
        has_more = end < len(self._events)
        last_seq = self._base_seq + end
        return {
            "events": page,
            "next_after": last_seq,
            "has_more": has_more,
            "next_cursor": f"e{last_seq}" if has_more else None,
        }

    def event_count(self) -> int:
        """Events ever appended (pruned ones included)."""
        return self._base_seq + len(self._events)

    # ------------------------------------------------------------------ idempotency

    def put_record(
        self,
        record_id: str,
        body: Mapping[str, Any],
        idempotency_key: str | None,
    ) -> tuple[int, dict[str, Any], bool]:
        """Apply a client PUT; return (status, body, replayed).

        A repeated ``idempotency_key`` returns the first outcome without applying
        anything; the same key with a different request is a 422. Unless the
        provider ignores keys (``honor_idempotency = False``): then every
        request applies again. Either way the key's entry counts what was
        received and what was applied.

        Raises:
            SimulatorInputError: for a bad body or record id.
        """
        if not isinstance(body, Mapping) or not isinstance(body.get("data"), Mapping):
            raise SimulatorInputError(
                'PUT body must be a JSON object like {"tenant_id": "t1", "data": {...}}',
                variable="data",
            )
        tenant = body.get("tenant_id")
        entry: IdempotencyEntry | None = None
        if idempotency_key is not None:
            fingerprint = hashlib.sha256(
                json.dumps([record_id, body], sort_keys=True, default=str).encode()
            ).hexdigest()
            entry = self.idempotency.get(idempotency_key)
            if entry is None:
                entry = IdempotencyEntry(fingerprint, 0, {})
                self.idempotency[idempotency_key] = entry
            entry.received += 1
            if entry.applications and self.honor_idempotency:
                if entry.fingerprint != fingerprint:
                    return (
                        422,
                        {
                            "error": "idempotency_key_reused",
                            "detail": "this Idempotency-Key was used for a different request",
                        },
                        False,
                    )
                entry.duplicates += 1
                return entry.status, entry.body, True
        record, _, created = self.write_record(
            record_id,
            body["data"],
            tenant_id=tenant if isinstance(tenant, str) else None,
            idempotency_key=idempotency_key,
        )
        status = 201 if created else 200
        result = record.to_json()
        if entry is not None:
            entry.applications += 1
            if entry.applications == 1:
                entry.status, entry.body = status, result
        return status, result, False

    # ------------------------------------------------------------------ faults

    def add_fault(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        ratio: float = 1.0,
        seconds: float | None = None,
        retry_after: float | None = None,
        retry_after_format: str = "seconds",
        duration: float | None = None,
        count: int | None = None,
        policy: str | None = None,
    ) -> Fault:
        """Validate and install a fault.

        On a dialect's path a ``rate_limit`` answers as that API does: with
        ``policy="REQUEST_LIMIT_EXCEEDED"`` Salesforce's 403 (a JSON error array), and
        HubSpot's 429 with ``policyName`` ``policy`` (``DAILY`` or ``TEN_SECONDLY_ROLLING``,
        the default).

        Raises:
            SimulatorInputError: naming the bad argument.
        """
        kind = _FAULT_ALIASES.get(kind, kind)
        _choice(kind, "kind", FAULT_KINDS)
        _given(_choice, endpoint, "endpoint", ENDPOINTS)
        default_status = {"rate_limit": 429, "timeout": 504}.get(kind, 503)
        resolved_status = default_status if status is None else status
        _integer(resolved_status, "status", minimum=100, maximum=599)
        _number(ratio, "ratio", minimum=0.0, maximum=1.0)
        default_seconds = {"latency": 0.5, "timeout": 60.0}.get(kind, 0.0)
        resolved_seconds = default_seconds if seconds is None else seconds
        _number(resolved_seconds, "seconds", minimum=0.0, maximum=3600.0)
        if kind == "rate_limit" and retry_after is None:
            retry_after = 1.0
        _given(_number, retry_after, "retry_after", minimum=0.0, maximum=86400.0)
        _choice(retry_after_format, "retry_after_format", ("seconds", "date"))
        _given(_number, duration, "duration", minimum=0.0)
        _given(_integer, count, "count", minimum=1)
        _given(
            _choice, policy, "policy", ("DAILY", "TEN_SECONDLY_ROLLING", "REQUEST_LIMIT_EXCEEDED")
        )
        self._owner._fault_ids += 1
        fault_id = self._owner._fault_ids
        fault = Fault(
            id=fault_id,
            kind=kind,
            endpoint=endpoint,
            status=resolved_status,
            ratio=float(ratio),
            seconds=float(resolved_seconds),
            retry_after=float(retry_after) if retry_after is not None else None,
            retry_after_format=retry_after_format,
            expires_at=(
                self._owner.now() + timedelta(seconds=duration) if duration is not None else None
            ),
            remaining=count,
            rng=random.Random(f"{self._owner.seed}:{self.name}:fault:{fault_id}"),  # noqa: S311  # seeded
            policy=policy,
        )
        self.faults.append(fault)
        return fault

    def clear_faults(self, *, endpoint: str | None = None, fault_id: int | None = None) -> int:
        """Remove faults (all, those on ``endpoint``, or one by id); return how many."""
        before = len(self.faults)
        self.faults = [
            f
            for f in self.faults
            if not (
                (fault_id is None or f.id == fault_id)
                and (endpoint is None or f.endpoint == endpoint)
            )
        ]
        return before - len(self.faults)

    def on_request(self, endpoint: str) -> tuple[float, Fault | None]:
        """Count a request and decide what the fault layer does with it: extra latency
        (seconds), then maybe a fault."""
        self.requests[endpoint] += 1
        latency, chosen = 0.0, None
        if not self.faults:
            return latency, chosen
        now = self._owner.now()
        spent: list[Fault] = []
        # Outages win over other faults; otherwise the first installed fault that fires.
        ordered = sorted(self.faults, key=lambda f: f.kind != "outage")
        for fault in ordered:
            if fault.expires_at is not None and now >= fault.expires_at:
                spent.append(fault)
                continue
            if fault.endpoint is not None and fault.endpoint != endpoint:
                continue
            if fault.kind != "latency" and chosen is not None:
                continue
            if fault.ratio < 1.0 and fault.rng.random() >= fault.ratio:
                continue
            if fault.kind == "latency":
                latency += fault.seconds
            else:
                chosen = fault
            fault.fired += 1
            self.faults_fired[fault.kind] += 1
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    spent.append(fault)
        if spent:
            self.faults = [f for f in self.faults if f not in spent]
        return latency, chosen

    def in_outage(self) -> bool:
        """True while a provider-wide outage fault is active."""
        now = self._owner.now()
        return any(
            f.kind == "outage"
            and f.endpoint is None
            and (f.expires_at is None or now < f.expires_at)
            for f in self.faults
        )

    # ------------------------------------------------------------------ webhooks

    def set_webhook_target(
        self,
        url: str | None = None,
        secrets: Sequence[str] | None = None,
        *,
        max_attempts: int | None = None,
        retry_backoff: float | None = None,
        timeout: float | None = None,
        format: str | None = None,  # the control API's field name
    ) -> None:
        """Register (or with ``url=None`` remove) the outbound webhook target.

        ``format`` is ``standard`` (default) or ``hubspot`` (batched, v3-signed with the
        secret's text as HubSpot's client secret).

        Raises:
            SimulatorInputError: for a non-http URL, bad secrets or limits.
        """
        if url is not None and (
            not isinstance(url, str) or not url.startswith(("http://", "https://"))
        ):
            raise SimulatorInputError(f"url={url!r} is not an http(s) URL", variable="url")
        changes = {
            "secrets": _whsec_list(secrets),
            "max_attempts": _given(_integer, max_attempts, "max_attempts", minimum=1, maximum=20),
            "retry_backoff": _given(_number, retry_backoff, "retry_backoff", minimum=0, maximum=60),
            "timeout": _given(_number, timeout, "timeout", minimum=0.01, maximum=300.0),
            "format": _given(_choice, format, "format", WEBHOOK_FORMATS),
        }
        self.webhooks.url = url
        _apply(self.webhooks, changes)

    def set_webhook_mode(
        self, mode: str, *, delay: float | None = None, batch: int | None = None
    ) -> None:
        """Set how the next events' webhooks are delivered.

        Raises:
            SimulatorInputError: for an unknown mode or bad delay/batch.
        """
        changes = {
            "mode": _choice(mode, "mode", WEBHOOK_MODES),
            "delay": _given(_number, delay, "delay", minimum=0.0, maximum=3600.0),
            "reorder_batch": _given(_integer, batch, "batch", minimum=2, maximum=1000),
        }
        if mode == "delay" and delay is None and self.webhooks.delay == 0.0:
            changes["delay"] = 1.0  # a delay mode with no delay yet would not delay
        _apply(self.webhooks, changes)

    def add_stop_window(self, start: datetime, end: datetime) -> None:
        """Drop webhooks of events that occur in ``[start, end)`` (simulated time).

        Raises:
            SimulatorInputError: when ``end`` is not after ``start``.
        """
        if end <= start:
            raise SimulatorInputError(
                f"stop window end {format_time(end)} is not after start {format_time(start)}",
                variable="end",
            )
        self.webhooks.stop_windows.append((start, end))

    def configure_receiver(
        self,
        *,
        secrets: Sequence[str] | None = None,
        mode: str | None = None,
        fail_status: int | None = None,
        fail_ratio: float | None = None,
        tolerance: float | None = None,
    ) -> None:
        """Configure the inbound webhook receiver; ``None`` leaves a value unchanged.

        ``tolerance`` is the accepted webhook-timestamp skew in seconds; -1 disables the check.

        Raises:
            SimulatorInputError: naming the bad argument.
        """
        changes = {
            "secrets": _whsec_list(secrets),
            "mode": _given(_choice, mode, "mode", RECEIVER_MODES),
            "fail_status": _given(_integer, fail_status, "fail_status", minimum=400, maximum=599),
            "fail_ratio": _given(_number, fail_ratio, "fail_ratio", minimum=0.0, maximum=1.0),
        }
        if tolerance is not None and tolerance != -1:
            _number(tolerance, "tolerance", minimum=0.0)
        _apply(self.receiver, changes)
        if tolerance is not None:
            self.receiver.tolerance = None if tolerance == -1 else float(tolerance)

    # ------------------------------------------------------------------ settings and stats

    def set_retention(self, seconds: float) -> None:
        """Set how long replay retains events.

        Raises:
            SimulatorInputError: for a non-positive value.
        """
        _number(seconds, "seconds", minimum=1.0, maximum=100 * 365 * 86400.0)
        self.retention_seconds = int(seconds)

    def set_feed_retention(self, seconds: float | None = None) -> None:
        """Set how long ``/changes`` serves events; None: as long as replay does.

        The feed never reaches further back than the replay retention. Events it
        no longer serves stay in ``/replay``: a client whose feed position fell
        behind this window (an outage longer than it, webhooks lost meanwhile)
        gets them back only by replaying.

        Raises:
            SimulatorInputError: for a non-positive value.
        """
        checked = _given(_number, seconds, "seconds", minimum=1.0, maximum=100 * 365 * 86400.0)
        self.feed_retention_seconds = None if checked is None else int(checked)

    def stats(self, *, detail: bool = True) -> dict[str, Any]:
        """Everything tests assert on, as JSON; ``detail=False`` leaves out per-id/per-key maps."""
        result: dict[str, Any] = {
            "provider": self.name,
            "requests": dict(self.requests),
            "responses": dict(self.responses),
            "faults_fired": dict(self.faults_fired),
            "auth_failures": self.auth_failures,
            "records": sum(1 for r in self.records.values() if not r.deleted),
            "events": self.event_count(),
            "retention_seconds": self.retention_seconds,
            "feed_retention_seconds": self.feed_retention_seconds,
            "require_auth": self.require_auth,
            "honor_idempotency": self.honor_idempotency,
            "idempotency": {
                "keys": len(self.idempotency),
                "duplicate_total": sum(e.duplicates for e in self.idempotency.values()),
                "received_total": sum(e.received for e in self.idempotency.values()),
                "applied_total": sum(e.applications for e in self.idempotency.values()),
            },
            "webhooks": self.webhooks.stats(),
            "inbound": self.receiver.stats(),
            "oauth": self.oauth.stats(),
        }
        if detail:
            result["idempotency"]["applications"] = {
                k: e.applications for k, e in self.idempotency.items()
            }
            result["idempotency"]["duplicates"] = {
                k: e.duplicates for k, e in self.idempotency.items() if e.duplicates
            }
            result["idempotency"]["received"] = {k: e.received for k, e in self.idempotency.items()}
            result["writes"] = {rid: list(w) for rid, w in self.writes.items()}
        else:
            for section, key in (
                ("webhooks", "dropped_ids"),
                ("webhooks", "failed_ids"),
                ("inbound", "received_per_id"),
                ("inbound", "applied_per_id"),
                ("oauth", "refresh_requests"),
            ):
                del result[section][key]
        return result


def _parse_cursor(cursor: str, prefix: str) -> int:
    if not isinstance(cursor, str) or not cursor.startswith(prefix) or not cursor[1:].isdigit():
        raise SimulatorInputError(
            f"cursor={cursor!r} is not a cursor this endpoint issued", variable="cursor"
        )
    return int(cursor[1:])


# --------------------------------------------------------------------------- the whole simulator


class SimulatorState:
    """Every provider of one simulator, a clock, and a lock.

    Args:
        clock: returns the current aware UTC time; default real time. The
            control API's clock offset is added to it.
        seed: seeds every random choice (fault ratios, fake data, reordering).
        retention_seconds: replay retention of newly created providers.
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        seed: int = 0,
        retention_seconds: int = DEFAULT_RETENTION_SECONDS,
    ) -> None:
        self._clock: Clock = clock or utcnow
        self._offset = timedelta(0)
        self.seed = seed
        self.default_retention_seconds = retention_seconds
        self.lock = threading.RLock()
        self._providers: dict[str, ProviderState] = {}
        self._fault_ids = 0
        self._wakeup: Callable[[], None] | None = None
        #: Bumped by clear/reset/shutdown so hanging requests give up early.
        self.hang_generation = 0
        self.closing = False
        self.reorder_rng = random.Random(f"{seed}:reorder")  # noqa: S311  # seeded simulation

    # ------------------------------------------------------------------ time

    def now(self) -> datetime:
        """Simulated current time (clock plus offset)."""
        return self._clock() + self._offset

    def advance_clock(self, seconds: float) -> datetime:
        """Move simulated time forward; return the new time.

        Raises:
            SimulatorInputError: for a negative or non-numeric amount.
        """
        _number(seconds, "seconds", minimum=0.0)
        with self.lock:
            self._offset += timedelta(seconds=seconds)
            return self.now()

    @property
    def clock_offset(self) -> float:
        """Seconds added to the clock by :meth:`advance_clock`."""
        return self._offset.total_seconds()

    # ------------------------------------------------------------------ providers

    def provider(self, name: str) -> ProviderState:
        """The named provider, created on first use.

        Raises:
            SimulatorInputError: for a name that is not 1-64 letters, digits or _.-.
        """
        found = self._providers.get(name)
        if found is not None:
            return found
        if not isinstance(name, str) or not _PROVIDER_NAME.fullmatch(name):
            raise SimulatorInputError(
                f"provider name {name!r} is invalid: expected 1-64 letters, digits or _.-",
                variable="provider",
            )
        with self.lock:
            return self._providers.setdefault(name, ProviderState(name, self))

    def providers(self) -> list[str]:
        """Names of the providers that exist so far."""
        return sorted(self._providers)

    def declare_provider(
        self,
        name: str,
        *,
        retention_seconds: float | None = None,
        require_auth: bool | None = None,
    ) -> ProviderState:
        """Create (or update) a provider with settings."""
        if retention_seconds is not None:
            # Validate before the provider exists, so a bad value creates nothing.
            _number(retention_seconds, "retention_seconds", minimum=1.0)
        with self.lock:
            provider = self.provider(name)
            if retention_seconds is not None:
                provider.set_retention(retention_seconds)
            if require_auth is not None:
                provider.require_auth = bool(require_auth)
            return provider

    # ------------------------------------------------------------------ in-process use

    def emit(self, provider: str, count: int = 1, **kwargs: Any) -> list[dict[str, Any]]:
        """:meth:`ProviderState.emit` under the lock."""
        with self.lock:
            return self.provider(provider).emit(count, **kwargs)

    def mutate(
        self,
        provider: str,
        record_id: str,
        data: Mapping[str, Any] | None = None,
        *,
        tenant_id: str | None = None,
        event: bool = False,
        webhook: bool = False,
        delete: bool = False,
    ) -> dict[str, Any]:
        """Change a record at the provider (no ``data``: an empty object), by default
        silently (no event, no webhook)."""
        with self.lock:
            record, _, _ = self.provider(provider).write_record(
                record_id,
                {} if data is None else data,
                tenant_id=tenant_id,
                event_type="record.deleted" if delete else None,
                emit_event=event,
                webhook=webhook,
            )
            return record.to_json()

    def set_fault(self, provider: str, kind: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`ProviderState.add_fault` under the lock; returns the fault as JSON."""
        with self.lock:
            return self.provider(provider).add_fault(kind, **kwargs).to_json()

    def clear_faults(
        self,
        provider: str | None = None,
        *,
        endpoint: str | None = None,
        fault_id: int | None = None,
    ) -> int:
        """Clear faults of one provider (or all); release hanging requests."""
        if fault_id is not None and (isinstance(fault_id, bool) or not isinstance(fault_id, int)):
            raise SimulatorInputError(
                f"fault_id={fault_id!r} is not an integer", variable="fault_id"
            )
        with self.lock:
            targets = self.all_providers(provider)
            cleared = sum(p.clear_faults(endpoint=endpoint, fault_id=fault_id) for p in targets)
            self.hang_generation += 1
            return cleared

    def stats(self, provider: str | None = None, *, detail: bool = True) -> dict[str, Any]:
        """Stats of one provider, or ``{"providers": {name: stats}}``."""
        with self.lock:
            if provider is not None:
                return self.provider(provider).stats(detail=detail)
            return {"providers": {n: p.stats(detail=detail) for n, p in self._providers.items()}}

    def reset(self, provider: str | None = None) -> None:
        """Forget one provider (or every provider) and its data; clock offset too when all."""
        with self.lock:
            if provider is None:
                self._providers.clear()
                self._offset = timedelta(0)
            else:
                self._providers.pop(provider, None)
            self.hang_generation += 1
            if self._wakeup is not None:
                self._wakeup()

    # ------------------------------------------------------------------ webhook queue

    def _enqueue_webhook(self, provider: ProviderState, event: Mapping[str, Any]) -> None:
        import time

        config = provider.webhooks
        occurred = self._event_time(provider, event)
        if config.url is None:
            config.no_target += 1
            return
        if config.mode == "stop" or any(a <= occurred < b for a, b in config.stop_windows):
            config.dropped += 1
            config.dropped_ids.append(str(event["id"]))
            return
        due = time.monotonic() + (config.delay if config.mode == "delay" else 0.0)
        config.queue.append(Delivery(dict(event), config.mode, due))
        wake = self._wakeup
        if wake is not None:
            wake()

    @staticmethod
    def _event_time(provider: ProviderState, event: Mapping[str, Any]) -> datetime:
        seq = int(event["seq"])
        index = seq - provider._base_seq - 1
        if 0 <= index < len(provider._event_times):
            return provider._event_times[index]
        return parse_time(str(event["occurred_at"]), "occurred_at")

    def set_wakeup(self, wakeup: Callable[[], None] | None) -> None:
        """Register the emitter's wake-up callback (thread-safe callable)."""
        with self.lock:
            self._wakeup = wakeup
            if wakeup is not None and any(p.webhooks.queue for p in self._providers.values()):
                wakeup()

    def pending_webhooks(self, provider: str | None = None) -> int:
        """Deliveries queued or in flight."""
        with self.lock:
            targets = self.all_providers(provider)
            return sum(len(p.webhooks.queue) + p.webhooks.in_flight for p in targets)

    def has_webhook_targets(self) -> bool:
        """True when some provider has an outbound webhook target."""
        return any(p.webhooks.url is not None for p in list(self._providers.values()))

    def all_providers(self, name: str | None = None) -> list[ProviderState]:
        """The named provider, or (no name) every provider object."""
        with self.lock:
            return [self.provider(name)] if name else list(self._providers.values())
