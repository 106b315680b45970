"""The decisions of reconciliation, written once as pure code (no I/O, no clock).

The sync and async drivers, the CLI and the tests all call these: whether a
window is within the provider's replay retention, how a page splits into
events to skip and events to apply, where the covered window ends, where the
sync timeline has gaps, and how a local record differs from the provider's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from .._timeparse import format_duration
from ..exceptions import ReplayWindowExceeded

__all__ = [
    "FieldDiff",
    "Gap",
    "LocalRecord",
    "PagePlan",
    "RecordComparison",
    "check_retention",
    "compare_record",
    "compute_gaps",
    "data_hash",
    "merge_intervals",
    "order_key",
    "plan_page",
    "retention_error",
]


# --------------------------------------------------------------------------- retention


def retention_error(
    provider: str,
    since: datetime,
    retention: timedelta | None,
    *,
    now: datetime | None = None,
    refused_by_provider: bool = False,
    applied_nothing: bool = True,
) -> ReplayWindowExceeded:
    """The error for a replay window older than the provider retains.

    The message names the window, the retention and the fallback, so the
    operator reading it at 3 a.m. knows both what is wrong and what to run.
    """
    held = format_duration(retention) if retention is not None else "unknown"
    asked = f" ({format_duration(now - since)} ago)" if now is not None else ""
    who = "the provider refused it: " if refused_by_provider else ""
    outcome = " Nothing was applied." if applied_nothing else ""
    command = (
        f'idis-integrations reconcile --provider {provider} --since "{since.isoformat()}" --resync'
    )
    return ReplayWindowExceeded(
        f"{provider}: the replay window since {since.isoformat()}{asked} is older than "
        f"{who}the provider's replay retention of {held} (replay_retention).{outcome} "
        f"Reconcile a window within the last {held}, or run a full resync of the affected "
        f"records instead: {command} (resync(provider, since=...) in Python)",
        provider=provider,
        endpoint="replay",
    )


def check_retention(provider: str, since: datetime, retention: timedelta, now: datetime) -> None:
    """Refuse a window the provider's replay API cannot serve in full.

    Checked before the first call so that a too-old ``since`` never yields a
    silently partial replay, even from a provider that would answer one.

    Raises:
        ReplayWindowExceeded: naming the window, the retention and the fallback.
    """
    if since < now - retention:
        raise retention_error(provider, since, retention, now=now)


# --------------------------------------------------------------------------- timeline


@dataclass(frozen=True, slots=True)
class Gap:
    """A stretch of time no channel covered: events in it may be missing."""

    provider: str
    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        """Length in seconds."""
        return (self.end - self.start).total_seconds()


def merge_intervals(
    intervals: Iterable[tuple[datetime, datetime]], *, tolerance: timedelta = timedelta(0)
) -> list[tuple[datetime, datetime]]:
    """Union of intervals, sorted; pieces closer than ``tolerance`` are joined."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if merged and start <= merged[-1][1] + tolerance:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def compute_gaps(
    provider: str,
    intervals: Iterable[Sequence[Any]],
    since: datetime,
    until: datetime,
    *,
    tolerance: timedelta = timedelta(0),
) -> list[Gap]:
    """The parts of ``[since, until)`` that no interval covers, oldest first.

    Args:
        provider: Provider name, carried on each gap.
        intervals: Covered stretches from any channel, each ``(start, end, ...)``
            (``sync.timeline.CoveredInterval`` is one); they may overlap.
        since: Start of the inspected window.
        until: End of the inspected window.
        tolerance: Uncovered stretches this short or shorter are not gaps
            (clock granularity between one channel's coverage and the next).
    """
    clipped = [(max(i[0], since), min(i[1], until)) for i in intervals]
    gaps: list[Gap] = []
    cursor = since
    for start, end in merge_intervals(clipped):
        if start - cursor > tolerance:
            gaps.append(Gap(provider, cursor, start))
        cursor = max(cursor, end)
    if until - cursor > tolerance:
        gaps.append(Gap(provider, cursor, until))
    return gaps


# --------------------------------------------------------------------------- verification


def data_hash(data: Mapping[str, Any] | None) -> str:
    """SHA-256 of a record's data as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(
        dict(data or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class LocalRecord:
    """What the host holds for one provider record."""

    record_id: str
    tenant_id: str | None
    version: int
    #: :func:`data_hash` of the data as applied, when the local source knows it.
    data_hash: str | None = None
    #: The data itself, when the local source has it (enables field-level diffs).
    data: Mapping[str, Any] | None = None
    #: The last applied event deleted the record.
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One field that differs between the local and the provider's record."""

    field: str
    local: Any
    remote: Any


@dataclass(frozen=True, slots=True)
class RecordComparison:
    """The result of comparing one sampled record with the provider's copy."""

    record_id: str
    tenant_id: str | None
    #: ``match``, ``mismatch``, ``missing_remote`` or ``missing_local``.
    status: str
    local_version: int | None
    remote_version: int | None
    diffs: tuple[FieldDiff, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """Whether the two copies agree."""
        return self.status == "match"


def compare_record(
    local: LocalRecord | None,
    record_id: str,
    remote: Mapping[str, Any] | None,
    *,
    fields: Sequence[str] | None = None,
) -> RecordComparison:
    """Compare a local record with the provider's copy.

    Versions and tenants are always compared. The data is compared field by
    field when the local source has it (only ``fields`` when given), else by
    :func:`data_hash` when the local source knows the hash; a source that knows
    neither (the default ledger) is compared on versions, which every change
    at the provider increments.

    Args:
        local: What the host holds (None: nothing).
        record_id: The record id.
        remote: The provider's record as a mapping with ``tenant_id``,
            ``version`` and ``data`` (None: the provider has no such record).
        fields: Data fields that matter; None compares the whole data.
    """
    if remote is None:
        if local is None or local.deleted:
            return RecordComparison(record_id, None, "match", None, None)
        return RecordComparison(
            record_id,
            local.tenant_id,
            "missing_remote",
            local.version,
            None,
            (FieldDiff("exists", True, False),),
        )
    remote_data: Mapping[str, Any] = remote.get("data") or {}
    remote_version = int(remote["version"])
    remote_tenant = remote.get("tenant_id")
    if local is None or local.deleted:
        return RecordComparison(
            record_id,
            remote_tenant,
            "missing_local",
            None if local is None else local.version,
            remote_version,
            (FieldDiff("exists", False, True),),
        )
    diffs: list[FieldDiff] = []
    if local.version != remote_version:
        diffs.append(FieldDiff("version", local.version, remote_version))
    if local.tenant_id is not None and local.tenant_id != remote_tenant:
        diffs.append(FieldDiff("tenant_id", local.tenant_id, remote_tenant))
    if local.data is not None:
        names = list(fields) if fields is not None else sorted(set(local.data) | set(remote_data))
        diffs.extend(
            FieldDiff(f"data.{name}", local.data.get(name), remote_data.get(name))
            for name in names
            if local.data.get(name) != remote_data.get(name)
        )
    elif local.data_hash is not None and fields is None:
        remote_hash = data_hash(remote_data)
        if local.data_hash != remote_hash:
            diffs.append(FieldDiff("data_hash", local.data_hash[:12], remote_hash[:12]))
    return RecordComparison(
        record_id,
        local.tenant_id if local.tenant_id is not None else remote_tenant,
        "mismatch" if diffs else "match",
        local.version,
        remote_version,
        tuple(diffs),
    )


# --------------------------------------------------------------------------- page plan


@dataclass(slots=True)
class PagePlan:
    """What to do with each event of one replay page (see :func:`plan_page`)."""

    #: Already in the inbox (any channel) or repeated within the page: skip.
    duplicates: list[Any] = field(default_factory=list)
    #: Call the handler, in this order.
    apply: list[Any] = field(default_factory=list)
    #: A newer version of the record is (or will be) applied: record, do not apply.
    superseded: list[Any] = field(default_factory=list)
    #: No handler takes the type: record, do not apply.
    ignored: list[Any] = field(default_factory=list)
    #: Newest order key applied per record, to store in the version ledger.
    versions: dict[str, tuple[int, str]] = field(default_factory=dict)

    def status_of(self) -> dict[str, str]:
        """Inbox status per new event id (``applied``, ``superseded``, ``ignored``)."""
        statuses = {e.id: "applied" for e in self.apply}
        statuses.update({e.id: "superseded" for e in self.superseded})
        statuses.update({e.id: "ignored" for e in self.ignored})
        return statuses


def order_key(event: Any) -> int | None:
    """The event's position in its record's history: its version, else its feed seq."""
    if event.version is not None:
        return int(event.version)
    if event.seq is not None:
        return int(event.seq)
    return None


def plan_page(
    events: Sequence[Any],
    known_ids: set[str],
    current_versions: Mapping[str, int],
    handles: Any,
) -> PagePlan:
    """Split one page of events the way the inbox's ``apply_event`` would, event by event.

    This is the inbox's rule (``sync.inbox``) applied to a whole page at once,
    so the page can be written with one statement per table: an event id
    already known is a duplicate; a type without a handler is ignored; an
    event whose version is not newer than the record's newest applied one is
    superseded; anything else is applied, in page (provider) order, and
    becomes the record's newest version.

    Args:
        events: The page, in the provider's order.
        known_ids: Ids the inbox already holds.
        current_versions: Newest applied order key per record id (from the ledger).
        handles: ``handles(event_type) -> bool``, whether a handler takes the type.
    """
    plan = PagePlan()
    seen: set[str] = set(known_ids)
    newest: dict[str, int] = dict(current_versions)
    for event in events:
        if event.id in seen:
            plan.duplicates.append(event)
            continue
        seen.add(event.id)
        if not handles(event.type):
            plan.ignored.append(event)
            continue
        key = order_key(event)
        if event.record_id is None or key is None:
            plan.apply.append(event)
            continue
        current = newest.get(event.record_id)
        if current is not None and key <= current:
            plan.superseded.append(event)
            continue
        newest[event.record_id] = key
        plan.versions[event.record_id] = (key, event.id)
        plan.apply.append(event)
    return plan
