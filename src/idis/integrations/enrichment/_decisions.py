"""Enrichment decisions, written once: the enricher's flow and the deferred worker share them.

Nothing here does I/O or sleeps. The enricher (:mod:`._flow`) and the worker
(:mod:`._worker`) ask these functions which providers to try, what a chain's
answers mean, what to do when none served, how long a deferred request waits
before its next attempt, and how large the next refresh batch may be.

What one provider's answer means (:meth:`Attempt.from_error`):

* **served**: 2xx with data;
* **an answer without data**: 404/410 ("no match": the provider does not know
  the subject) and 400/422 (the request about the subject is invalid). Asking
  again later would get the same answer: final;
* **unavailable**: 5xx, timeouts, connection errors, 429 (rate limited), 401/403
  or a token that cannot be obtained (our credentials, fixed by an operator),
  and a provider skipped without a call (breaker open or 429 pause). Asking
  again later may succeed.

A chain is an **outage** (:func:`is_outage`) when no provider served and at
least one was unavailable, even if others answered "no match": the unavailable
one might have had the data, so the subject is stale, not absent. A mixed chain
(primary 404, fallback 503; or primary 503, fallback 404) is therefore an
outage; only a chain where *every* provider answered without data is final.

The decision chain for one enrichment::

    primary → fallbacks (in order; a provider whose breaker is open is skipped)
      → served?                 enriched / served_from_fallback
      → not an outage?          raise ProviderRejected (every provider answered: no data)
      → cached result?          cached_stale (and, with defer_on_error, also defer)
      → defer_on_error?         deferred (request persisted, subject stale, defect opened)
      → otherwise               raise the primary's ProviderError
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from .._backoff import Backoff
from ..config import EnrichmentSettings, Settings
from ..exceptions import AuthError, ConfigError, ProviderError, UnknownProviderError

__all__ = [
    "Attempt",
    "EnrichmentResult",
    "FailureAction",
    "RefreshVerdict",
    "ResultStatus",
    "SubjectKey",
    "default_primary",
    "describe_attempts",
    "is_outage",
    "next_batch_size",
    "plan_failure",
    "provider_chain",
    "refresh_backoff",
    "refresh_verdict",
]

#: Bounded vocabulary of ``EnrichmentResult.status`` (also the metric's ``result`` label).
ResultStatus = Literal["enriched", "served_from_fallback", "cached_stale", "deferred"]
#: What a deferred refresh came to (see :func:`refresh_verdict`).
RefreshVerdict = Literal["refreshed", "rescheduled", "failed", "gated"]
#: 4xx statuses that answer about the subject itself: 404/410 "no match", 400/422 "invalid".
#: Asking again later gets the same answer, so they are final, never an outage.
_FINAL_STATUSES = frozenset({400, 404, 410, 422})


@dataclass(frozen=True, slots=True)
class SubjectKey:
    """Identifies one enriched subject under its primary provider."""

    provider: str
    tenant_id: str
    subject_type: str
    subject_id: str

    def log_fields(self) -> dict[str, str]:
        """The subject in a log line: ``provider``, ``tenant_id`` and ``subject_id``."""
        return {
            "provider": self.provider,
            "tenant_id": self.tenant_id,
            "subject_id": self.subject_id,
        }


@dataclass(frozen=True, slots=True)
class Attempt:
    """What happened when one provider of the chain was asked."""

    #: Provider name.
    provider: str
    #: ``served``, ``failed``, or ``skipped`` (breaker open or 429 pause: not called).
    outcome: Literal["served", "failed", "skipped"]
    #: The error's bounded type (``server_error``, ``circuit_open``...), if it failed.
    error_type: str | None = None
    #: Whether asking again later may succeed: False for an answer without data
    #: (404/410 no match, 400/422 invalid), True for unavailability and skips.
    retryable: bool = True

    @classmethod
    def from_error(cls, provider: str, error: ProviderError | AuthError) -> Attempt:
        """The attempt record for a provider that raised ``error``.

        Only a 4xx about the subject itself (404/410 no match, 400/422 invalid)
        is final. A 429 is unavailability (the provider will answer later). A 401,
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

    A chain where every provider answered without data (no match, invalid) is
    not an outage: the error is raised and nothing is deferred. Otherwise (see
    :func:`is_outage`) the subject is stale; the cached copy is served if
    allowed and present, and the request is deferred (with a defect) when
    ``defer_on_error`` is on, whether or not a cached copy was served, so that
    the cached subject also refreshes by itself and stays visible as a defect
    until it has.
    """
    if not is_outage(attempts):
        return FailureAction("raise", defer=False, mark_stale=False)
    defer = settings.defer_on_error
    if settings.serve_cached and has_cache:
        return FailureAction("cached_stale", defer=defer, mark_stale=True)
    if defer:
        return FailureAction("deferred", defer=True, mark_stale=True)
    return FailureAction("raise", defer=False, mark_stale=True)


def is_outage(attempts: Sequence[Attempt]) -> bool:
    """Whether the chain failed for unavailability (the subject is stale: retry later).

    True when no provider served and at least one was unavailable or skipped,
    whatever the others answered: a primary's 404 next to a fallback's 503 (or
    the reverse) leaves the subject's data unknown, not absent. False when a
    provider served, when every provider answered without data (404/410/400/422),
    and for an empty chain.
    """
    if any(a.outcome == "served" for a in attempts):
        return False
    return any(a.retryable for a in attempts)


def refresh_verdict(attempts: Sequence[Attempt]) -> RefreshVerdict:
    """What a deferred refresh came to, from its chain's attempts.

    ``refreshed``: a provider served. ``gated``: no provider was called (all
    skipped, or none left configured): the request goes back untouched.
    ``rescheduled``: an outage (:func:`is_outage`): retry after a backoff.
    ``failed``: every provider answered without data: give up, keep the defect.
    """
    if any(a.outcome == "served" for a in attempts):
        return "refreshed"
    if all(a.outcome == "skipped" for a in attempts):
        return "gated"
    return "rescheduled" if is_outage(attempts) else "failed"


def describe_attempts(attempts: Sequence[Attempt]) -> str:
    """A bounded one-line summary, e.g. ``enrichment_provider:server_error, backup:skipped``."""
    parts = [f"{a.provider}:{a.error_type or a.outcome}" for a in attempts if a.outcome != "served"]
    return ", ".join(parts)[:255]


def refresh_backoff(settings: EnrichmentSettings) -> Backoff:
    """The backoff between refresh attempts of one deferred request.

    The cap doubles from ``retry_backoff`` up to ``retry_max_backoff``; the delay
    is drawn in [cap/2, cap] ("equal" jitter) so retries of many subjects spread
    out while each still waits a meaningful time. A maximum below the first cap
    caps every delay at the maximum, as it always did.
    """
    ceiling = settings.retry_max_backoff.total_seconds()
    return Backoff(
        initial=min(settings.retry_backoff.total_seconds(), ceiling),
        maximum=ceiling,
        jitter="equal",
    )


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
