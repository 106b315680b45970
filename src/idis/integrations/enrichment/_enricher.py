"""Enrichment through the library: :class:`Enricher` (sync) and :class:`AsyncEnricher`.

Both ask the providers of the chain in order (primary, then its fallbacks or
an explicit ``providers=`` list) through the resilient gateway, skipping any
provider whose breaker is open. When none serves, the shared decision
(:func:`~idis.integrations.enrichment._decisions.plan_failure`) picks between
raising, serving the cached copy marked stale, and deferring; the storage
steps that follow are the same functions for both drivers (see ``_store.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session

from .._timeparse import utcnow
from ..config import Settings
from ..db._engine import create_async_db_engine, create_db_engine, session_scope, storage_errors
from ..exceptions import (
    AuthError,
    CircuitOpen,
    MalformedResponse,
    ProviderError,
    StorageError,
    UsageError,
)
from ..observability._logs import get_logger
from ..observability._metrics import Metrics, get_metrics
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
    from ..resilience import AsyncGateway, Gateway

__all__ = ["AsyncEnricher", "ChainOutcome", "Enricher"]

_log = get_logger()
#: Endpoint name of the enrichment call (``/enrich/{id}`` on the simulator).
ENRICH_ENDPOINT = "enrich"
_ID = re.compile(r"^\S(.*\S)?$")


class Clock(Protocol):
    """Anything with ``now()`` returning an aware UTC datetime (``resilience.Clock`` fits)."""

    def now(self) -> datetime:
        """Current aware UTC datetime."""


class _UTCNow:
    def now(self) -> datetime:
        return utcnow()


@dataclass(slots=True)
class ChainOutcome:
    """What asking the chain produced: the serving provider and data, or every failure."""

    attempts: list[Attempt] = field(default_factory=list)
    errors: dict[str, ProviderError | AuthError] = field(default_factory=dict)
    served_by: str | None = None
    data: Mapping[str, Any] | None = None

    @property
    def attempted(self) -> bool:
        """Whether any provider was actually called."""
        return any(a.outcome != "skipped" for a in self.attempts)

    def error_to_raise(self, chain: Sequence[str]) -> ProviderError | AuthError:
        """The primary's error if it was called, else the first one, else a CircuitOpen."""
        for name in chain:
            if name in self.errors:
                return self.errors[name]
        return CircuitOpen(
            f"no provider could be asked: every breaker of {', '.join(chain)} is open",
            provider=chain[0],
            endpoint=ENRICH_ENDPOINT,
        )


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


def fetch(gateway: Gateway, provider: str, subject_id: str) -> Mapping[str, Any]:
    """Ask one provider for a subject's enrichment (sync).

    Raises:
        ProviderError: whatever the call pipeline raised.
    """
    payload = gateway.get_json(provider, ENRICH_ENDPOINT, path_params={"id": subject_id})
    return _payload_data(provider, payload)


async def afetch(gateway: AsyncGateway, provider: str, subject_id: str) -> Mapping[str, Any]:
    """Async twin of :func:`fetch`."""
    payload = await gateway.get_json(provider, ENRICH_ENDPOINT, path_params={"id": subject_id})
    return _payload_data(provider, payload)


def try_chain(gateway: Gateway, chain: Sequence[str], subject_id: str) -> ChainOutcome:
    """Ask each provider in order until one serves; skip those whose breaker is open."""
    outcome = ChainOutcome()
    for name in chain:
        if not gateway.available(name):
            outcome.attempts.append(Attempt(name, "skipped", "circuit_open"))
            continue
        try:
            outcome.data = fetch(gateway, name, subject_id)
        except (ProviderError, AuthError) as exc:
            outcome.attempts.append(Attempt.from_error(name, exc))
            outcome.errors[name] = exc
            continue
        outcome.attempts.append(Attempt(name, "served"))
        outcome.served_by = name
        break
    return outcome


async def atry_chain(gateway: AsyncGateway, chain: Sequence[str], subject_id: str) -> ChainOutcome:
    """Async twin of :func:`try_chain`."""
    outcome = ChainOutcome()
    for name in chain:
        if not gateway.available(name):
            outcome.attempts.append(Attempt(name, "skipped", "circuit_open"))
            continue
        try:
            outcome.data = await afetch(gateway, name, subject_id)
        except (ProviderError, AuthError) as exc:
            outcome.attempts.append(Attempt.from_error(name, exc))
            outcome.errors[name] = exc
            continue
        outcome.attempts.append(Attempt(name, "served"))
        outcome.served_by = name
        break
    return outcome


@dataclass(frozen=True, slots=True)
class _Stored:
    """What the failure path stored (returned from inside the transaction)."""

    action: FailureAction
    cached: _store.CachedCopy | None
    request_id: int | None
    defect_id: int | None


def store_success(
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


def store_failure(
    session: Session,
    key: SubjectKey,
    *,
    chain: Sequence[str],
    attempts: Sequence[Attempt],
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


def default_auth(settings: Settings, **options: Any) -> Any:
    """The OAuth ``auth=`` factory for gateways the library builds itself, or None.

    Only built when some provider uses OAuth, so token machinery (and its table)
    is not touched otherwise. ``options`` go to ``oauth_auth_factory``.
    """
    if all(p.auth.grant == "none" for p in settings.providers.values()):
        return None
    from ..auth._httpx_auth import oauth_auth_factory

    return oauth_auth_factory(settings, **options)


class _Core:
    """What both drivers share: settings, validation, results, metrics and logs."""

    def __init__(
        self,
        settings: Settings,
        *,
        provider: str | None,
        metrics: Metrics | None,
        clock: Clock | None,
        actor: str,
    ) -> None:
        self.settings = settings
        self.default_chain = provider_chain(settings, provider)
        self.metrics = metrics or get_metrics()
        self.clock: Clock = clock or _UTCNow()
        self.actor = actor

    def prepare(
        self,
        subject_id: str,
        tenant_id: str,
        subject_type: str,
        providers: Sequence[str] | None,
    ) -> tuple[SubjectKey, tuple[str, ...]]:
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

    @staticmethod
    def cache_write_failed(key: SubjectKey, exc: StorageError) -> list[int]:
        """Fresh data is still worth returning when only caching it failed."""
        # Its staleness (if any) stays recorded and any deferred request stays
        # pending, so the worker refreshes and resolves it once the database is back.
        _log.warning(
            "idis.enrichment.cache_write_failed",
            msg="enrichment served but could not be cached; returning it anyway",
            provider=key.provider,
            tenant_id=key.tenant_id,
            subject_id=key.subject_id,
            error=str(exc),
        )
        return []

    def served(
        self, key: SubjectKey, outcome: ChainOutcome, now: datetime, resolved: list[int]
    ) -> EnrichmentResult:
        assert outcome.served_by is not None
        assert outcome.data is not None
        fallback = outcome.served_by != key.provider
        status: ResultStatus = "served_from_fallback" if fallback else "enriched"
        self.metrics.enrichment_requests.labels(provider=key.provider, result=status).inc()
        if fallback:
            _log.warning(
                "idis.enrichment.fallback_served",
                msg=f"{key.provider} could not serve; {outcome.served_by} did",
                provider=key.provider,
                served_by=outcome.served_by,
                tenant_id=key.tenant_id,
                subject_id=key.subject_id,
                attempts=describe_attempts(outcome.attempts),
            )
        if resolved:
            _log.info(
                "idis.enrichment.refreshed",
                msg="stale enrichment refreshed; its defects are resolved",
                provider=key.provider,
                tenant_id=key.tenant_id,
                subject_id=key.subject_id,
                defects_resolved=len(resolved),
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

    def failed(
        self, key: SubjectKey, chain: Sequence[str], outcome: ChainOutcome, stored: _Stored
    ) -> EnrichmentResult:
        """The result for a chain that did not serve, or raise when the decision says so."""
        action = stored.action
        summary = describe_attempts(outcome.attempts)
        if action.kind == "raise":
            error = outcome.error_to_raise(chain)
            result = "error" if action.mark_stale else "rejected"
            self.metrics.enrichment_requests.labels(provider=key.provider, result=result).inc()
            _log.warning(
                "idis.enrichment.failed",
                msg="enrichment failed and is not deferred (ENRICHMENT_DEFER_ON_ERROR=false)"
                if action.mark_stale
                else "enrichment rejected by every provider",
                provider=key.provider,
                tenant_id=key.tenant_id,
                subject_id=key.subject_id,
                attempts=summary,
            )
            raise error
        now = self.clock.now()
        self.metrics.enrichment_requests.labels(provider=key.provider, result=action.kind).inc()
        if action.kind == "cached_stale":
            cached = stored.cached
            assert cached is not None
            age = max(timedelta(0), now - cached.fetched_at)
            _log.warning(
                "idis.enrichment.cached_stale",
                msg="every provider is down; serving the cached enrichment marked stale",
                provider=key.provider,
                tenant_id=key.tenant_id,
                subject_id=key.subject_id,
                age_seconds=round(age.total_seconds(), 3),
                deferred=action.defer,
                attempts=summary,
            )
            return EnrichmentResult(
                status="cached_stale",
                tenant_id=key.tenant_id,
                subject_type=key.subject_type,
                subject_id=key.subject_id,
                primary=key.provider,
                provider=cached.served_by,
                data=cached.data,
                fetched_at=cached.fetched_at,
                age=age,
                stale=True,
                deferred=action.defer,
                request_id=stored.request_id,
                defect_id=stored.defect_id,
                attempts=tuple(outcome.attempts),
            )
        _log.warning(
            "idis.enrichment.deferred",
            msg="every provider is down; enrichment deferred and the subject marked stale",
            provider=key.provider,
            tenant_id=key.tenant_id,
            subject_id=key.subject_id,
            request_id=stored.request_id,
            defect_id=stored.defect_id,
            attempts=summary,
        )
        return EnrichmentResult(
            status="deferred",
            tenant_id=key.tenant_id,
            subject_type=key.subject_type,
            subject_id=key.subject_id,
            primary=key.provider,
            provider=None,
            data=None,
            stale=True,
            deferred=True,
            request_id=stored.request_id,
            defect_id=stored.defect_id,
            attempts=tuple(outcome.attempts),
        )


class Enricher:
    """Enrich subjects (claims) through the gateway, with fallbacks, cache and deferral.

    Thread-safe when the gateway is (``Gateway`` is). Example::

        with Enricher(settings, gateway) as enricher:
            result = enricher.enrich("claim-42", tenant_id="t1")
            if result.stale:
                ...  # show the data (if any) as stale; it refreshes by itself

    Args:
        settings: Library settings (default: from the environment).
        gateway: The sync gateway to call providers through (default: a new one, closed
            with the enricher).
        provider: Primary provider when ``enrich`` names none (default:
            ``IDIS_ENRICHMENT_PROVIDER`` or the first provider of kind enrichment).
        engine: Database engine (default: one on ``settings.database_url``, disposed on close).
        metrics: Metrics to record into.
        clock: Time source (``.now()``); tests pass a manual clock.
        actor: Recorded on audit rows of the defects it opens.

    Raises:
        ConfigError: when no enrichment provider is configured or one is unknown.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        gateway: Gateway | None = None,
        *,
        provider: str | None = None,
        engine: Engine | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        actor: str = "enricher",
    ) -> None:
        settings = settings or (gateway.settings if gateway is not None else Settings.from_env())
        self._core = _Core(settings, provider=provider, metrics=metrics, clock=clock, actor=actor)
        self._owned: list[Callable[[], None]] = []
        if engine is None:
            engine = create_db_engine(settings.database_url)
            self._owned.append(engine.dispose)
        if gateway is None:
            from ..resilience import Gateway

            auth = default_auth(settings, engine=engine)
            if auth is not None:
                self._owned.append(auth.close)
            gateway = Gateway(settings, metrics=self._core.metrics, auth=auth)
            self._owned.append(gateway.close)
        self._gateway = gateway
        self._engine = engine

    @property
    def settings(self) -> Settings:
        """The settings in use."""
        return self._core.settings

    def enrich(
        self,
        subject_id: str,
        *,
        tenant_id: str,
        subject_type: str = "claim",
        providers: Sequence[str] | None = None,
    ) -> EnrichmentResult:
        """Enrich one subject.

        Args:
            subject_id: The subject's id (a claim id).
            tenant_id: Its tenant.
            subject_type: Kind of subject.
            providers: Ordered providers to try instead of the primary and its fallbacks.

        Returns:
            ``enriched``, ``served_from_fallback``, ``cached_stale`` (with ``age``) or
            ``deferred``.

        Raises:
            ProviderError: when no provider served and the result could neither come from
                the cache nor be deferred (``ENRICHMENT_DEFER_ON_ERROR=false``), or every
                provider rejected the request (4xx).
            AuthError: likewise, when the primary's token could not be obtained.
            StorageError: the database is unreachable when no provider served (the request
                cannot be deferred). When a provider served, the data is returned anyway.
            UsageError: a blank or oversized id.
        """
        core = self._core
        key, chain = core.prepare(subject_id, tenant_id, subject_type, providers)
        outcome = try_chain(self._gateway, chain, subject_id)
        now = core.clock.now()
        if outcome.served_by is not None:
            assert outcome.data is not None
            try:
                with session_scope(self._engine) as session:
                    resolved = store_success(
                        session,
                        key,
                        served_by=outcome.served_by,
                        data=outcome.data,
                        now=now,
                        actor=core.actor,
                        metrics=core.metrics,
                        providers=tuple(core.settings.providers),
                    )
            except StorageError as exc:
                resolved = core.cache_write_failed(key, exc)
            return core.served(key, outcome, now, resolved)
        with session_scope(self._engine) as session:
            stored = store_failure(
                session,
                key,
                chain=chain,
                attempts=outcome.attempts,
                settings=core.settings,
                now=now,
                actor=core.actor,
                metrics=core.metrics,
            )
        return core.failed(key, chain, outcome, stored)

    def close(self) -> None:
        """Close the gateway and engine this enricher created (not ones passed in)."""
        for closer in reversed(self._owned):
            closer()
        self._owned.clear()

    def __enter__(self) -> Enricher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEnricher:
    """Async twin of :class:`Enricher` (same decisions, same storage functions).

    Args:
        settings: Library settings (default: from the environment).
        gateway: The async gateway (default: a new one, closed by :meth:`aclose`).
        provider: Primary provider when ``enrich`` names none.
        engine: Async database engine (default: one on ``settings.database_url``).
        metrics: Metrics to record into.
        clock: Time source (``.now()``).
        actor: Recorded on audit rows of the defects it opens.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        gateway: AsyncGateway | None = None,
        *,
        provider: str | None = None,
        engine: AsyncEngine | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        actor: str = "enricher",
    ) -> None:
        settings = settings or (gateway.settings if gateway is not None else Settings.from_env())
        self._core = _Core(settings, provider=provider, metrics=metrics, clock=clock, actor=actor)
        self._owned_gateway = gateway is None
        self._owned_engine = engine is None
        self._engine = engine or create_async_db_engine(settings.database_url)
        self._auth: Any = None
        if gateway is None:
            from ..resilience import AsyncGateway

            self._auth = default_auth(settings, async_engine=self._engine)
            gateway = AsyncGateway(settings, metrics=self._core.metrics, auth=self._auth)
        self._gateway = gateway
        self._sessions = async_sessionmaker(self._engine, expire_on_commit=False)

    @property
    def settings(self) -> Settings:
        """The settings in use."""
        return self._core.settings

    async def enrich(
        self,
        subject_id: str,
        *,
        tenant_id: str,
        subject_type: str = "claim",
        providers: Sequence[str] | None = None,
    ) -> EnrichmentResult:
        """Enrich one subject; see :meth:`Enricher.enrich`."""
        core = self._core
        key, chain = core.prepare(subject_id, tenant_id, subject_type, providers)
        outcome = await atry_chain(self._gateway, chain, subject_id)
        now = core.clock.now()
        if outcome.served_by is not None:
            assert outcome.data is not None
            try:
                with storage_errors():
                    async with self._sessions.begin() as session:
                        resolved = await session.run_sync(
                            store_success,
                            key,
                            served_by=outcome.served_by,
                            data=outcome.data,
                            now=now,
                            actor=core.actor,
                            metrics=core.metrics,
                            providers=tuple(core.settings.providers),
                        )
            except StorageError as exc:
                resolved = core.cache_write_failed(key, exc)
            return core.served(key, outcome, now, resolved)
        with storage_errors():
            async with self._sessions.begin() as session:
                stored = await session.run_sync(
                    store_failure,
                    key,
                    chain=chain,
                    attempts=outcome.attempts,
                    settings=core.settings,
                    now=now,
                    actor=core.actor,
                    metrics=core.metrics,
                )
        return core.failed(key, chain, outcome, stored)

    async def aclose(self) -> None:
        """Close the gateway and engine this enricher created (not ones passed in)."""
        if self._owned_gateway:
            await self._gateway.aclose()
            self._owned_gateway = False
        if self._auth is not None:
            await self._auth.aclose()
            self._auth = None
        if self._owned_engine:
            await self._engine.dispose()
            self._owned_engine = False

    async def __aenter__(self) -> AsyncEnricher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
