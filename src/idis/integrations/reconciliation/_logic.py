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
    "RecordComparison",
    "check_retention",
    "compare_record",
    "compute_gaps",
    "data_hash",
    "merge_intervals",
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
    stated: timedelta | None = None,
) -> ReplayWindowExceeded:
    """The error for a replay window older than the provider retains.

    The message names the window, the retention and the fallback, so the
    operator reading it at 3 a.m. knows both what is wrong and what to run.
    When the provider refused and stated its own retention (``stated``: a
    422's ``retention_seconds``), that is the retention reported, next to the
    configured one, and kept on the error's ``retention``.
    """
    effective = stated if stated is not None else retention
    held = format_duration(effective) if effective is not None else "unknown"
    asked = f" ({format_duration(now - since)} ago)" if now is not None else ""
    who = "the provider refused it: " if refused_by_provider else ""
    source = (
        "as the provider states it"
        + (f"; configured {format_duration(retention)}" if retention is not None else "")
        if stated is not None
        else "replay_retention"
    )
    outcome = " Nothing was applied." if applied_nothing else ""
    command = (
        f'idis-integrations reconcile --provider {provider} --since "{since.isoformat()}" --resync'
    )
    error = ReplayWindowExceeded(
        f"{provider}: the replay window since {since.isoformat()}{asked} is older than "
        f"{who}the provider's replay retention of {held} ({source}).{outcome} "
        f"Reconcile a window within the last {held}, or run a full resync of the affected "
        f"records instead: {command} (resync(provider, since=...) in Python)",
        provider=provider,
        endpoint="replay",
    )
    error.retention = effective
    return error


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

    Versions are always compared, tenants when both sides state one. The data
    is compared field by field when the local source has it (only ``fields``
    when given), else by
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
    # A side that does not state the tenant cannot disagree about it: HubSpot's
    # objects carry none (the portal is the tenant), its webhooks do (portalId).
    if None not in (local.tenant_id, remote_tenant) and local.tenant_id != remote_tenant:
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
