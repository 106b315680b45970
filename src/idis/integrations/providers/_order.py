"""Per-record ordering: one comparable key per event and per record, defined per dialect.

Every channel (webhook, poll, replay, resync, verify repair) applies a
provider's changes through the inbox, which keeps per record the newest key it
applied and applies an event only when its key is greater. That comparison is
the whole ordering rule, so it exists once, here:

* :class:`OrderKey` is a pair ``(major, minor)``: a signed 64-bit integer and a
  text tie-break, compared as a tuple. ``minor`` compares by Unicode code
  point, which is what Python's ``str`` comparison does, what SQLite's default
  ``BINARY`` collation does on UTF-8 text, and what PostgreSQL does under
  ``COLLATE "C"`` (the ledger's column is declared so, never the database's
  own collation). So the key compares the same in Python and in SQL.
* An :class:`Ordering` is a dialect's rule: how an event, a record fetched
  from the provider, and a confirmed deletion map to keys. Events and records
  of one provider must be comparable with each other, because ``resync``
  compares a fetched record with the key the inbox applied from an event.

The generic (simulator) dialect has two rules, chosen per provider by
``IDIS_PROVIDER_<NAME>_ORDER_BY``:

``version`` (default)
    ``major`` is the record version the provider sends with every event and
    record, ``minor`` is empty. Two events with the same version carry the same
    state: the second is not newer (superseded). A deletion confirmed by
    ``resync`` gets ``applied.major + 1``. An event or record without a version
    is malformed under this rule (the error names the setting).
``modified``
    For providers that send no version. ``major`` is the modification time in
    microseconds since the epoch (the event's ``occurred_at``, the record's
    ``updated_at``); an event's ``minor`` is its zero-padded feed ``seq`` and
    id (``"00000000000000000042:evt_42"``), a deterministic tie-break between
    changes stamped in the same microsecond; a record's ``minor`` is empty, so
    a record fetched by ``resync`` is never newer than the event that produced
    its state. A confirmed deletion gets the later of ``applied.major + 1``
    and the confirmation time.

Provider packs define their own :class:`Ordering` (HubSpot and Salesforce order
by modification time; the provider's event id is their tie-break).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from ..exceptions import IntegrationError, UsageError

__all__ = [
    "BY_MODIFIED",
    "BY_VERSION",
    "MAX_MINOR_LENGTH",
    "ByModified",
    "ByVersion",
    "MissingOrder",
    "OrderKey",
    "Ordering",
    "micros",
    "order_key",
    "ordering_for",
]

#: The ledger column's length; a tie-break longer than this is a provider-pack bug.
MAX_MINOR_LENGTH = 320
_MIN_BIGINT = -(2**63)
_MAX_BIGINT = 2**63 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True, order=True)
class OrderKey:
    """A record's place in its history: compared as ``(major, minor)``.

    Example::

        OrderKey(3) < OrderKey(4)                     # versions
        OrderKey(1_700_000_000_000_000, "0001:e1") < OrderKey(1_700_000_000_000_000, "0002:e2")
    """

    #: Signed 64-bit integer (a version, or microseconds since the epoch).
    major: int
    #: Tie-break, compared by code point (``COLLATE "C"`` in PostgreSQL).
    minor: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.major, bool) or not isinstance(self.major, int):
            raise UsageError(f"order key major={self.major!r}: expected an integer")
        if not _MIN_BIGINT <= self.major <= _MAX_BIGINT:
            raise UsageError(f"order key major={self.major!r}: outside a signed 64-bit integer")
        if not isinstance(self.minor, str) or len(self.minor) > MAX_MINOR_LENGTH:
            raise UsageError(
                f"order key minor={str(self.minor)[:40]!r}: expected text of at most "
                f"{MAX_MINOR_LENGTH} characters"
            )
        if "\x00" in self.minor:
            raise UsageError("order key minor contains NUL, which PostgreSQL text cannot hold")

    def __str__(self) -> str:
        return f"{self.major}" if not self.minor else f"{self.major}/{self.minor}"


class MissingOrder(IntegrationError, ValueError):
    """An event or record lacks what its provider's ordering rule needs (e.g. a version).

    Adapters turn it into ``MalformedResponse`` (feed, replay, records) or a 400
    ``invalid_event`` (webhooks); the message names the setting that fixes it.
    """

    retryable = False


def micros(moment: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (exact: integer arithmetic)."""
    if moment.tzinfo is None:
        raise MissingOrder(f"time {moment.isoformat()} has no timezone")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class Ordering(Protocol):
    """A dialect's ordering rule (see the module docstring)."""

    #: ``IDIS_PROVIDER_<NAME>_ORDER_BY`` value naming the rule.
    name: str

    def event_key(
        self, *, event_id: str, seq: int | None, version: int | None, occurred_at: datetime
    ) -> OrderKey:
        """The key of an event.

        Raises:
            MissingOrder: the event lacks what the rule needs.
        """

    def record_key(self, *, version: int | None, updated_at: datetime) -> OrderKey:
        """The key of a record as the provider holds it now (what ``resync`` applies).

        Raises:
            MissingOrder: the record lacks what the rule needs.
        """

    def deletion_key(self, applied: OrderKey, now: datetime) -> OrderKey:
        """The key of a deletion confirmed at ``now`` of a record last applied at ``applied``."""

    def same_state(self, applied: OrderKey, record: OrderKey) -> bool:
        """Whether the applied key and a fetched record's key denote the same state."""


class ByVersion:
    """Order by the record version the provider sends (the generic dialect's default)."""

    name = "version"

    def event_key(
        self, *, event_id: str, seq: int | None, version: int | None, occurred_at: datetime
    ) -> OrderKey:
        """``(version, "")``."""
        return OrderKey(self._version(version, f"event {event_id}"))

    def record_key(self, *, version: int | None, updated_at: datetime) -> OrderKey:
        """``(version, "")``: equal to the key of the event that produced it."""
        return OrderKey(self._version(version, "record"))

    def deletion_key(self, applied: OrderKey, now: datetime) -> OrderKey:
        """One version past what was applied: after everything we have."""
        return OrderKey(applied.major + 1)

    def same_state(self, applied: OrderKey, record: OrderKey) -> bool:
        """Same version."""
        return applied.major == record.major

    @staticmethod
    def _version(version: int | None, what: str) -> int:
        if version is None or isinstance(version, bool) or version <= 0:
            raise MissingOrder(
                f"{what} carries no record version (got {version!r}), and the provider is "
                "ordered by version; set IDIS_PROVIDER_<NAME>_ORDER_BY=modified for a "
                "provider that sends none"
            )
        return int(version)

    def __repr__(self) -> str:
        return "ByVersion()"


class ByModified:
    """Order by modification time, ties broken by feed position and event id."""

    name = "modified"

    def event_key(
        self, *, event_id: str, seq: int | None, version: int | None, occurred_at: datetime
    ) -> OrderKey:
        """``(occurred_at µs, "<seq, 20 digits>:<event id>")``."""
        tie = event_id if seq is None else f"{seq:020d}:{event_id}"
        return OrderKey(micros(occurred_at), tie[:MAX_MINOR_LENGTH])

    def record_key(self, *, version: int | None, updated_at: datetime) -> OrderKey:
        """``(updated_at µs, "")``: never newer than the event stamped at the same moment."""
        return OrderKey(micros(updated_at))

    def deletion_key(self, applied: OrderKey, now: datetime) -> OrderKey:
        """The confirmation time (or just past what was applied, if our clock lags)."""
        return OrderKey(max(applied.major + 1, micros(now)))

    def same_state(self, applied: OrderKey, record: OrderKey) -> bool:
        """Same modification time."""
        return applied.major == record.major

    def __repr__(self) -> str:
        return "ByModified()"


BY_VERSION = ByVersion()
BY_MODIFIED = ByModified()
_RULES: dict[str, Ordering] = {BY_VERSION.name: BY_VERSION, BY_MODIFIED.name: BY_MODIFIED}


def ordering_for(name: str) -> Ordering:
    """The generic dialect's rule named ``name`` (``ProviderSettings.order_by``).

    Raises:
        UsageError: for an unknown name.
    """
    try:
        return _RULES[name]
    except KeyError:
        raise UsageError(f"ordering {name!r} is not one of {', '.join(sorted(_RULES))}") from None


def order_key(event: Any) -> OrderKey:
    """The key the inbox orders ``event`` by: the one place every apply path reads it.

    ``event.order`` when the adapter set it (``ProviderEvent`` always has one
    when the provider sent a version); an event object without ``order`` (a
    host's own type) is ordered by its ``version``.

    Raises:
        UsageError: the event has neither an order key nor a version.
    """
    key = getattr(event, "order", None)
    if isinstance(key, OrderKey):
        return key
    version = getattr(event, "version", None)
    if isinstance(version, int) and not isinstance(version, bool) and version > 0:
        return OrderKey(version)
    raise UsageError(
        f"event {getattr(event, 'id', '?')!r} has no order key and no record version: its "
        "adapter must set one (for the generic dialect set IDIS_PROVIDER_<NAME>_ORDER_BY="
        "modified on a provider that sends no version)"
    )
