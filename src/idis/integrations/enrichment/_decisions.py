"""Enrichment decisions, written once and shared by the sync and async drivers.

Nothing here does I/O or sleeps. The drivers (:mod:`.enricher`, :mod:`.worker`)
ask these functions which providers to try, what to do when none served, how
long a deferred request waits before its next attempt, and how large the next
refresh batch may be.

The decision chain for one enrichment::

    primary → fallbacks (in order; a provider whose breaker is open is skipped)
      → served?                 enriched / served_from_fallback
      → every failure a 4xx?    raise ProviderRejected (deferring would not help)
      → cached result?          cached_stale (and, with defer_on_error, also defer)
      → defer_on_error?         deferred (request persisted, subject stale, defect opened)
      → otherwise               raise the primary's ProviderError
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from ..config import EnrichmentSettings, Settings
from ..exceptions import AuthError, ConfigError, ProviderError, UnknownProviderError

__all__ = [
    "Attempt",
    "EnrichmentResult",
    "FailureAction",
    "ResultStatus",
    "SubjectKey",
    "default_primary",
    "describe_attempts",
    "next_batch_size",
    "plan_failure",
    "provider_chain",
    "refresh_delay",
]

ResultStatus = Literal["enriched", "served_from_fallback", "cached_stale", "deferred"]
#: Bounded vocabulary of ``EnrichmentResult.status`` (also the metric's ``result`` label).
RESULT_STATUSES: tuple[str, ...] = ("enriched", "served_from_fallback", "cached_stale", "deferred")
#: 4xx statuses that say the subject itself cannot be enriched: retrying will not help.
_FINAL_STATUSES = frozenset({400, 404, 410, 422})


@dataclass(frozen=True, slots=True)
class SubjectKey:
    """Identifies one enriched subject under its primary provider."""

    provider: str
    tenant_id: str
    subject_type: str
    subject_id: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """What happened when one provider of the chain was asked."""

    #: Provider name.
    provider: str
    #: ``served``, ``failed``, or ``skipped`` (breaker open or 429 pause: not called).
    outcome: Literal["served", "failed", "skipped"]
    #: The error's bounded type (``server_error``, ``circuit_open``...), if it failed.
    error_type: str | None = None
    #: Whether asking again later may succeed (False for a 4xx).
    retryable: bool = True

    @classmethod
    def from_error(cls, provider: str, error: ProviderError | AuthError) -> Attempt:
        """The attempt record for a provider that raised ``error``.

        Only a 4xx about the subject itself (400, 404, 410, 422) is final. A 401,
        a 403 or a token that cannot be obtained (``AuthError``) says our
        credentials are wrong, which an operator fixes (RB-09 Recovery 1-2)
        without the subject changing, so it is treated like an outage: deferred
        and retried, never given up on.
        """
        if isinstance(error, AuthError):
            return cls(provider, "failed", "auth", True)
        retryable = type(error).retryable or error.status_code not in _FINAL_STATUSES
        return cls(provider, "failed", error.error_type, retryable)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnrichmentResult:
    """The answer to one enrichment request; never an exception while deferral is on."""

    #: ``enriched`` (primary served), ``served_from_fallback``, ``cached_stale`` or ``deferred``.
    status: ResultStatus
    tenant_id: str
    subject_type: str
    subject_id: str
    #: The primary provider the enrichment was asked of (defects are filed under it).
    primary: str
    #: The provider that served the data (for ``cached_stale``: the one that served the
    #: cached copy); None when deferred.
    provider: str | None
    #: The enrichment data; None when deferred without a cached copy.
    data: Mapping[str, Any] | None
    #: When the data was fetched from the provider.
    fetched_at: datetime | None = None
    #: How old the cached data is (``cached_stale`` only).
    age: timedelta | None = None
    #: True when the data is old or missing because no provider could serve.
    stale: bool = False
    #: True when a deferred request is pending for this subject (refreshes by itself).
    deferred: bool = False
    #: The pending deferred request, if any.
    request_id: int | None = None
    #: The OPEN STALE_ENRICHMENT defect for this subject, if any.
    defect_id: int | None = None
    #: What each provider of the chain did.
    attempts: tuple[Attempt, ...] = field(default_factory=tuple)

    @property
    def served(self) -> bool:
        """Whether fresh data was served (``enriched`` or ``served_from_fallback``)."""
        return self.status in ("enriched", "served_from_fallback")


@dataclass(frozen=True, slots=True)
class FailureAction:
    """What to do when no provider of the chain served."""

    #: ``raise``, ``cached_stale`` or ``deferred``.
    kind: Literal["raise", "cached_stale", "deferred"]
    #: Persist a deferred request and open a defect.
    defer: bool
    #: Record the subject as stale (every outage failure is recorded, raised or not).
    mark_stale: bool


def default_primary(settings: Settings) -> str:
    """The enrichment provider used when the caller names none.

    ``IDIS_ENRICHMENT_PROVIDER`` if set, else the first provider of kind
    ``enrichment``.

    Raises:
        ConfigError: when neither exists.
    """
    if settings.enrichment.provider:
        return settings.provider(settings.enrichment.provider).name
    for provider in settings.providers.values():
        if provider.kind == "enrichment":
            return provider.name
    raise ConfigError(
        "no enrichment provider: set IDIS_ENRICHMENT_PROVIDER or declare a provider of kind "
        "enrichment",
        variable="IDIS_ENRICHMENT_PROVIDER",
    )


def provider_chain(
    settings: Settings, primary: str | None = None, providers: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The ordered providers to try: ``providers`` if given, else the primary and its fallbacks.

    Duplicates are dropped (first occurrence wins).

    Raises:
        UnknownProviderError: naming a provider that is not configured.
        ConfigError: for an explicitly empty list.
    """
    if providers is not None:
        if isinstance(providers, str):
            providers = [providers]
        if not providers:
            raise ConfigError("providers=[] is empty: expected at least one provider name")
        names: Sequence[str] = providers
    else:
        head = settings.provider(primary).name if primary else default_primary(settings)
        names = (head, *settings.provider(head).fallbacks)
    chain: list[str] = []
    for name in names:
        if name not in settings.providers:
            raise UnknownProviderError(name, tuple(settings.providers))
        if name not in chain:
            chain.append(name)
    return tuple(chain)


def plan_failure(
    attempts: Sequence[Attempt], *, has_cache: bool, settings: EnrichmentSettings
) -> FailureAction:
    """Decide what happens when no provider served.

    A chain where every provider answered 4xx is the caller's problem, not an
    outage: the error is raised and nothing is deferred. Otherwise the subject
    is stale; the cached copy is served if allowed and present, and the request
    is deferred (with a defect) when ``defer_on_error`` is on, whether or not a
    cached copy was served, so that the cached subject also refreshes by itself
    and stays visible as a defect until it has.
    """
    outage = any(a.outcome != "served" and a.retryable for a in attempts)
    if not outage:
        return FailureAction("raise", defer=False, mark_stale=False)
    defer = settings.defer_on_error
    if settings.serve_cached and has_cache:
        return FailureAction("cached_stale", defer=defer, mark_stale=True)
    if defer:
        return FailureAction("deferred", defer=True, mark_stale=True)
    return FailureAction("raise", defer=False, mark_stale=True)


def describe_attempts(attempts: Sequence[Attempt]) -> str:
    """A bounded one-line summary, e.g. ``enrichment_provider:server_error, backup:skipped``."""
    parts = [f"{a.provider}:{a.error_type or a.outcome}" for a in attempts if a.outcome != "served"]
    return ", ".join(parts)[:255]


def refresh_delay(
    attempts: int,
    settings: EnrichmentSettings,
    rng: random.Random | None = None,
) -> timedelta:
    """Wait before the next refresh attempt: exponential cap, full jitter.

    ``attempts`` counts attempts already made (1 after the first failure). The
    cap doubles from ``retry_backoff`` up to ``retry_max_backoff``; the delay is
    uniform in [cap/2, cap] so retries of many subjects spread out while each
    still waits a meaningful time.
    """
    base = settings.retry_backoff.total_seconds()
    ceiling = settings.retry_max_backoff.total_seconds()
    cap = min(ceiling, base * (2 ** max(0, attempts - 1)))
    draw = (rng or random).uniform(cap / 2, cap)
    return timedelta(seconds=draw)


def next_batch_size(current: int, maximum: int, outcome: Literal["ok", "failed", "gated"]) -> int:
    """Slow start for refresh batches after a provider recovers.

    A provider that was unavailable (``gated``) or failed mid-batch restarts
    at one request per batch; each fully successful batch doubles the size up
    to ``maximum``. A recovered provider therefore sees 1, 2, 4, ... requests
    per batch instead of the whole backlog at once.
    """
    if outcome != "ok":
        return 1
    return max(1, min(maximum, current * 2))
