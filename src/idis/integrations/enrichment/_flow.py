"""One enrichment, written once: the flow that both faces of the enricher drive.

:func:`enrich_flow` is a sans-I/O generator (see ``idis.integrations._flow``):
it yields the I/O it needs, a provider availability check (:class:`Available`),
a provider call (:class:`Fetch`) and database transactions, and the
:class:`~idis.integrations.enrichment.Enricher` runs it with ``drive`` while
the :class:`~idis.integrations.enrichment.AsyncEnricher` runs it with
``adrive``. The order of the steps and the error handling therefore exist
once::

    ask the chain (primary, then fallbacks; skip a provider that is not available)
      → served:      cache it and resolve the subject's stale state (one transaction);
                     a database that fails here does not lose the answer
      → not served:  one transaction applies the failure decision (plan_failure):
                     mark stale, serve the cached copy, defer with a defect, or raise

The deferred-enrichment worker asks the chain through the same
:func:`ask_chain` flow, so a refresh and an enrichment classify answers alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from .._clock import Clock, system_clock
from .._flow import Awaited, Effect, Flow, Transaction, perform
from ..config import Settings
from ..exceptions import (
    AuthError,
    CircuitOpen,
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    StorageError,
    UsageError,
)
from ..observability._logs import get_logger
from ..observability._metrics import Metrics
from . import _store
from ._decisions import (
    Attempt,
    EnrichmentResult,
    FailureAction,
    ResultStatus,
    SubjectKey,
    describe_attempts,
    plan_failure,
    provider_chain,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "ENRICH_ENDPOINT",
    "Available",
    "ChainOutcome",
    "EnrichCore",
    "Fetch",
    "FlowIO",
    "ask_chain",
    "served_result",
]

_log = get_logger()
#: Endpoint name of the enrichment call (``/enrich/{id}`` on the simulator).
ENRICH_ENDPOINT = "enrich"
#: Statuses that say the provider does not know the subject ("no match").
_NO_MATCH_STATUSES = frozenset({404, 410})
_ID = re.compile(r"^\S(.*\S)?$")


@dataclass(slots=True)
class FlowIO:
    """What the enrichment effects run against: a gateway, an engine and a clock.

    The sync face fills it with a ``Gateway`` and an ``Engine``, the async face
    and the worker with an ``AsyncGateway`` and an ``AsyncEngine``.
    """

    gateway: Any
    engine: Any
    clock: Clock = system_clock


def _payload_data(provider: str, payload: Any) -> Mapping[str, Any]:
    """The enrichment data in a provider's answer (its ``data`` object, or the whole body)."""
    if isinstance(payload, Mapping):
        inner = payload.get("data")
        return dict(inner) if isinstance(inner, Mapping) else dict(payload)
    raise MalformedResponse(
        f"{provider} answered the enrichment with {type(payload).__name__}: expected an object",
        provider=provider,
        endpoint=ENRICH_ENDPOINT,
    )


@dataclass(frozen=True, slots=True)
class Fetch(Awaited[Any]):
    """Ask one provider for a subject's enrichment through the gateway's ``enrich`` endpoint
    (the answer as it came: :func:`_payload_data` reads it)."""

    provider: str
    subject_id: str

    def call(self, io: FlowIO) -> Any:
        """``get_json`` on the face's gateway (awaited on an ``AsyncGateway``)."""
        # A 404 is "no match", an answer (``ChainOutcome.no_match``): not a warning per subject.
        return io.gateway.get_json(
            self.provider, ENRICH_ENDPOINT, path_params={"id": self.subject_id}, not_found_ok=True
        )


@dataclass(frozen=True, slots=True)
class Available(Effect[bool]):
    """Whether the gateway would call the provider now (breaker, 429 pause)."""

    provider: str

    def run(self, io: FlowIO) -> bool:
        """``Gateway.available``."""
        return bool(io.gateway.available(self.provider))

    async def arun(self, io: FlowIO) -> bool:
        """``AsyncGateway.available`` (not a coroutine: it reads local state)."""
        return bool(io.gateway.available(self.provider))


@dataclass(slots=True)
class ChainOutcome:
    """What asking the chain produced: the serving provider and data, or every failure."""

    attempts: list[Attempt] = field(default_factory=list)
    errors: dict[str, ProviderError | AuthError] = field(default_factory=dict)
    served_by: str | None = None
    data: Mapping[str, Any] | None = None

    @property
    def no_match(self) -> bool:
        """Every provider was asked and answered "no match" (404/410): an answer, not a failure.

        A skipped provider (breaker open, pause) or any other error means the
        chain does not know, so nothing is remembered.
        """
        return (
            self.served_by is None
            and len(self.errors) == len(self.attempts) > 0
            and all(
                isinstance(error, ProviderRejected) and error.status_code in _NO_MATCH_STATUSES
                for error in self.errors.values()
            )
        )

    def error_to_raise(self, *, outage: bool) -> ProviderError | AuthError:
        """The error a chain that did not serve raises.

        For an outage, the first unavailability in chain order (a provider's
        error, or ``CircuitOpen`` for one that was skipped): raising a
        fallback's 404 there would tell the caller "no match" when the truth is
        "unknown, ask again later". Otherwise the primary's answer.
        """
        for attempt in self.attempts:
            if outage and not attempt.retryable:
                continue
            if attempt.provider in self.errors:
                return self.errors[attempt.provider]
            if attempt.outcome == "skipped":
                return CircuitOpen(
                    f"{attempt.provider} was not called: its circuit breaker is open or a "
                    "rate-limit pause holds",
                    provider=attempt.provider,
                    endpoint=ENRICH_ENDPOINT,
                )
        raise UsageError("error_to_raise needs a chain outcome with a failed or skipped provider")


def ask_chain(chain: Sequence[str], subject_id: str) -> Flow[ChainOutcome]:
    """Ask each provider in order until one serves; skip those the gateway would not call.

    A provider's error is recorded (:meth:`Attempt.from_error`) and the next
    provider asked; what the errors mean together is decided afterwards
    (:func:`~._decisions.plan_failure`, :func:`~._decisions.refresh_verdict`).
    """
    outcome = ChainOutcome()
    for name in chain:
        if not (yield from perform(Available(name))):
            outcome.attempts.append(Attempt(name, "skipped", "circuit_open"))
            continue
        try:
            outcome.data = _payload_data(name, (yield from perform(Fetch(name, subject_id))))
        except (ProviderError, AuthError) as exc:
            outcome.attempts.append(Attempt.from_error(name, exc))
            outcome.errors[name] = exc
            continue
        outcome.attempts.append(Attempt(name, "served"))
        outcome.served_by = name
        break
    return outcome


def served_result(key: SubjectKey, outcome: ChainOutcome, now: datetime) -> EnrichmentResult:
    """The result of a chain that served (``enriched`` or ``served_from_fallback``)."""
    if outcome.served_by is None or outcome.data is None:
        raise UsageError("served_result needs a chain outcome that served")
    status: ResultStatus = (
        "served_from_fallback" if outcome.served_by != key.provider else "enriched"
    )
    return EnrichmentResult(
        status=status,
        tenant_id=key.tenant_id,
        subject_type=key.subject_type,
        subject_id=key.subject_id,
        primary=key.provider,
        provider=outcome.served_by,
        data=outcome.data,
        fetched_at=now,
        attempts=tuple(outcome.attempts),
    )


@dataclass(frozen=True, slots=True)
class _Stored:
    """What the failure path stored (returned from inside the transaction)."""

    action: FailureAction
    cached: _store.CachedCopy | None
    request_id: int | None
    defect_id: int | None


def _store_success(
    session: Session,
    key: SubjectKey,
    *,
    served_by: str,
    data: Mapping[str, Any],
    now: datetime,
    actor: str,
    metrics: Metrics,
    providers: Sequence[str],
) -> list[int]:
    """Cache a fresh result and resolve the subject's stale state (one transaction)."""
    resolved, finished = _store.record_success(
        session, key, served_by=served_by, data=data, fetched_at=now, now=now, actor=actor
    )
    if resolved or finished:
        _store.refresh_gauges(session, metrics, providers)
    return resolved


def _store_failure(
    session: Session,
    key: SubjectKey,
    *,
    chain: Sequence[str],
    attempts: Sequence[Attempt],
    no_match: bool,
    settings: Settings,
    now: datetime,
    actor: str,
    metrics: Metrics,
) -> _Stored:
    """Apply the failure decision: mark stale, serve the cache or defer (one transaction)."""
    cached = _store.load_cached(session, key) if settings.enrichment.serve_cached else None
    action = plan_failure(attempts, has_cache=cached is not None, settings=settings.enrichment)
    error = describe_attempts(attempts)
    if action.mark_stale:
        _store.record_failure(session, key, error=error, now=now)
    request_id = defect_id = None
    if no_match and _store.record_no_match(session, key, now=now, actor=actor):
        _store.refresh_gauges(session, metrics, settings.providers)
    if action.defer:
        request_id, defect_id = _store.defer(
            session,
            key,
            chain=chain,
            now=now,
            error=error,
            origin="cached_stale" if action.kind == "cached_stale" else "deferred",
            actor=actor,
            cached_age=(now - cached.fetched_at) if cached is not None else None,
        )
        _store.refresh_gauges(session, metrics, settings.providers)
    return _Stored(action, cached if action.kind == "cached_stale" else None, request_id, defect_id)


class EnrichCore:
    """What both faces share: settings, validation, the flow, results, metrics and logs."""

    def __init__(
        self,
        settings: Settings,
        *,
        provider: str | None,
        metrics: Metrics,
        clock: Clock | None,
        actor: str,
    ) -> None:
        self.settings = settings
        self.default_chain = provider_chain(settings, provider)
        self.metrics = metrics
        self.clock: Clock = clock or system_clock
        self.actor = actor

    def prepare(
        self,
        subject_id: str,
        tenant_id: str,
        subject_type: str,
        providers: Sequence[str] | None,
    ) -> tuple[SubjectKey, tuple[str, ...]]:
        """Validate the caller's ids and pick the chain; raise before any I/O."""
        for name, value, limit in (
            ("subject_id", subject_id, 255),
            ("tenant_id", tenant_id, 128),
            ("subject_type", subject_type, 64),
        ):
            if not isinstance(value, str) or not _ID.fullmatch(value) or len(value) > limit:
                raise UsageError(
                    f"{name}={value!r} is invalid: expected a non-blank string of at most "
                    f"{limit} characters without surrounding spaces"
                )
        chain = (
            provider_chain(self.settings, providers=providers)
            if providers is not None
            else self.default_chain
        )
        return SubjectKey(chain[0], tenant_id, subject_type, subject_id), chain

    def enrich_flow(self, key: SubjectKey, chain: Sequence[str]) -> Flow[EnrichmentResult]:
        """The whole enrichment of one subject (see the module docstring)."""
        ttl = self.settings.enrichment.no_match_ttl
        if ttl > timedelta(0):
            since = self.clock.now() - ttl
            known = partial(_store.load_no_match, key=key, since=since)
            try:
                answered_at = yield from perform(Transaction(known, write=False))
            except StorageError:
                # The remembered answer only saves a call: without the database,
                # ask the providers (fresh data is still worth returning).
                answered_at = None
            if answered_at is not None:
                raise self._no_match_known(key, answered_at)
        outcome = yield from ask_chain(chain, key.subject_id)
        now = self.clock.now()
        if outcome.served_by is not None:
            assert outcome.data is not None
            store = partial(
                _store_success,
                key=key,
                served_by=outcome.served_by,
                data=outcome.data,
                now=now,
                actor=self.actor,
                metrics=self.metrics,
                providers=tuple(self.settings.providers),
            )
            try:
                resolved = yield from perform(Transaction(store))
            except StorageError as exc:
                resolved = self._cache_write_failed(key, exc)
            return self._served(key, outcome, now, resolved)
        fail = partial(
            _store_failure,
            key=key,
            chain=chain,
            attempts=outcome.attempts,
            no_match=outcome.no_match,
            settings=self.settings,
            now=now,
            actor=self.actor,
            metrics=self.metrics,
        )
        stored = yield from perform(Transaction(fail))
        return self._failed(key, outcome, stored)

    def _no_match_known(self, key: SubjectKey, answered_at: datetime) -> ProviderRejected:
        """The remembered "no match", raised as the provider's own 404 was (no call made)."""
        self.metrics.enrichment_requests.labels(
            provider=key.provider, result="no_match_cached"
        ).inc()
        _log.info(
            "idis.enrichment.no_match_cached",
            msg="every provider answered no match recently; answering that without asking",
            **key.log_fields(),
            no_match_at=answered_at.isoformat(),
        )
        error = ProviderRejected(
            f"{key.provider} found no match for this subject at {answered_at.isoformat()}; "
            "answered from the cache without a call (IDIS_ENRICHMENT_NO_MATCH_TTL)",
            provider=key.provider,
            endpoint=ENRICH_ENDPOINT,
            status_code=404,
        )
        error.details = {"cached": True}
        return error

    @staticmethod
    def _cache_write_failed(key: SubjectKey, exc: StorageError) -> list[int]:
        """Fresh data is still worth returning when only caching it failed."""
        # Its staleness (if any) stays recorded and any deferred request stays
        # pending, so the worker refreshes and resolves it once the database is back.
        _log.warning(
            "idis.enrichment.cache_write_failed",
            msg="enrichment served but could not be cached; returning it anyway",
            **key.log_fields(),
            error=str(exc),
        )
        return []

    def _served(
        self, key: SubjectKey, outcome: ChainOutcome, now: datetime, resolved: list[int]
    ) -> EnrichmentResult:
        result = served_result(key, outcome, now)
        self.metrics.enrichment_requests.labels(provider=key.provider, result=result.status).inc()
        if result.status == "served_from_fallback":
            _log.warning(
                "idis.enrichment.fallback_served",
                msg=f"{key.provider} could not serve; {outcome.served_by} did",
                **key.log_fields(),
                served_by=outcome.served_by,
                attempts=describe_attempts(outcome.attempts),
            )
        if resolved:
            _log.info(
                "idis.enrichment.refreshed",
                msg="stale enrichment refreshed; its defects are resolved",
                **key.log_fields(),
                defects_resolved=len(resolved),
            )
        return result

    def _failed(self, key: SubjectKey, outcome: ChainOutcome, stored: _Stored) -> EnrichmentResult:
        """The result for a chain that did not serve, or raise when the decision says so."""
        action = stored.action
        summary = describe_attempts(outcome.attempts)
        if action.kind == "raise":
            error = outcome.error_to_raise(outage=action.mark_stale)
            result = "error" if action.mark_stale else "rejected"
            self.metrics.enrichment_requests.labels(provider=key.provider, result=result).inc()
            if not action.mark_stale and outcome.no_match:
                # A subject no provider knows is an answer, one per unknown subject: not
                # an operator's warning (an invalid request, 400/422, is ours: it warns).
                _log.info(
                    "idis.enrichment.no_match",
                    msg="every provider answered no match (404/410)",
                    **key.log_fields(),
                    attempts=summary,
                )
                raise error
            _log.warning(
                "idis.enrichment.failed",
                msg="enrichment failed and is not deferred (ENRICHMENT_DEFER_ON_ERROR=false)"
                if action.mark_stale
                else "every provider answered without data (no match or invalid request)",
                **key.log_fields(),
                attempts=summary,
            )
            raise error
        now = self.clock.now()
        self.metrics.enrichment_requests.labels(provider=key.provider, result=action.kind).inc()
        common: dict[str, Any] = {
            "tenant_id": key.tenant_id,
            "subject_type": key.subject_type,
            "subject_id": key.subject_id,
            "primary": key.provider,
            "stale": True,
            "deferred": action.defer,
            "request_id": stored.request_id,
            "defect_id": stored.defect_id,
            "attempts": tuple(outcome.attempts),
        }
        if action.kind == "cached_stale":
            cached = stored.cached
            assert cached is not None
            age = max(timedelta(0), now - cached.fetched_at)
            _log.warning(
                "idis.enrichment.cached_stale",
                msg="no provider could serve; serving the cached enrichment marked stale",
                **key.log_fields(),
                age_seconds=round(age.total_seconds(), 3),
                deferred=action.defer,
                attempts=summary,
            )
            return EnrichmentResult(
                status="cached_stale",
                provider=cached.served_by,
                data=cached.data,
                fetched_at=cached.fetched_at,
                age=age,
                **common,
            )
        _log.warning(
            "idis.enrichment.deferred",
            msg="no provider could serve; enrichment deferred and the subject marked stale",
            **key.log_fields(),
            request_id=stored.request_id,
            defect_id=stored.defect_id,
            attempts=summary,
        )
        return EnrichmentResult(status="deferred", provider=None, data=None, **common)
