"""The two faces of enrichment: :class:`Enricher` (sync) and :class:`AsyncEnricher`.

Both run the same flow (:meth:`~._flow.EnrichCore.enrich_flow`), the sync face
with ``drive`` over a ``Gateway`` and an ``Engine``, the async face with
``adrive`` over an ``AsyncGateway`` and an ``AsyncEngine``. Everything that
decides (which providers, what their answers mean, cache or defer or raise)
lives in the flow and in ``_decisions.py``; a face only validates, picks its
I/O and closes what it created.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from .._clock import Clock
from .._flow import Flow, async_face, sync_face
from ..config import Settings
from ..db._engine import create_async_db_engine, create_db_engine
from ..observability._metrics import Metrics, get_metrics
from ._decisions import EnrichmentResult
from ._flow import EnrichCore, FlowIO

if TYPE_CHECKING:
    from ..resilience import AsyncGateway, Gateway

__all__ = ["AsyncEnricher", "Enricher", "async_parts", "default_auth"]


def default_auth(settings: Settings, **options: Any) -> Any:
    """The OAuth ``auth=`` factory for gateways the library builds itself, or None.

    Only built when some provider uses OAuth, so token machinery (and its table)
    is not touched otherwise. ``options`` go to ``oauth_auth_factory``.
    """
    if all(p.auth.grant == "none" for p in settings.providers.values()):
        return None
    from ..auth._httpx_auth import oauth_auth_factory

    return oauth_auth_factory(settings, **options)


def async_parts(
    settings: Settings,
    gateway: AsyncGateway | None,
    engine: AsyncEngine | None,
    metrics: Metrics,
) -> tuple[AsyncGateway, AsyncEngine, list[Callable[[], Awaitable[Any]]]]:
    """The async gateway and engine to use, building the missing ones.

    Returns:
        The gateway, the engine and the closers of what was built (in build
        order; close in reverse), shared by :class:`AsyncEnricher` and the worker.
    """
    closers: list[Callable[[], Awaitable[Any]]] = []
    if engine is None:
        engine = create_async_db_engine(settings.database_url)
        closers.append(engine.dispose)
    if gateway is None:
        from ..resilience import AsyncGateway

        auth = default_auth(settings, async_engine=engine)
        if auth is not None:
            closers.append(auth.aclose)
        gateway = AsyncGateway(settings, metrics=metrics, auth=auth)
        closers.append(gateway.aclose)
    return gateway, engine, closers


def _core(
    settings: Settings | None,
    gateway: Gateway | AsyncGateway | None,
    *,
    provider: str | None,
    metrics: Metrics | None,
    clock: Clock | None,
    actor: str,
) -> EnrichCore:
    """The shared part of a face; settings default to the gateway's, else the environment's."""
    settings = settings or (gateway.settings if gateway is not None else Settings.from_env())
    return EnrichCore(
        settings, provider=provider, metrics=metrics or get_metrics(), clock=clock, actor=actor
    )


class _EnricherFace:
    """What both enrichers share: the core, and ``enrich`` written once as a flow."""

    _core: EnrichCore
    _io: FlowIO

    @property
    def settings(self) -> Settings:
        """The settings in use."""
        return self._core.settings

    def _enrich(
        self,
        subject_id: str,
        *,
        tenant_id: str,
        subject_type: str = "claim",
        providers: Sequence[str] | None = None,
    ) -> Flow[EnrichmentResult]:
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
            ProviderRejected: every provider answered without data (404/410 no match,
                400/422 invalid); nothing is recorded.
            ProviderError: when no provider served and the result could neither come from
                the cache nor be deferred (``ENRICHMENT_DEFER_ON_ERROR=false``); the
                primary's error, the subject recorded as stale.
            AuthError: likewise, when the primary's token could not be obtained.
            StorageError: the database is unreachable when no provider served (the request
                cannot be deferred). When a provider served, the data is returned anyway.
            UsageError: a blank or oversized id.
        """
        key, chain = self._core.prepare(subject_id, tenant_id, subject_type, providers)
        return (yield from self._core.enrich_flow(key, chain))


class Enricher(_EnricherFace):
    """Enrich subjects (claims) through the gateway, with fallbacks, cache and deferral.

    Thread-safe when the gateway is (``Gateway`` is). Example::

        with Enricher(settings, gateway) as enricher:
            result = enricher.enrich("claim-42", tenant_id="t1")
            if result.stale:
                ...  # show the data (if any) as stale; it refreshes by itself

    Args:
        settings: Library settings (default: the gateway's, else from the environment).
        gateway: The sync gateway to call providers through (default: a new one, closed
            with the enricher).
        provider: Primary provider when ``enrich`` names none (default:
            ``IDIS_ENRICHMENT_PROVIDER`` or the first provider of kind enrichment).
        engine: Database engine (default: one on ``settings.database_url``, disposed on close).
        metrics: Metrics to record into.
        clock: Time source; tests pass a ``ManualClock``.
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
        self._core = _core(
            settings, gateway, provider=provider, metrics=metrics, clock=clock, actor=actor
        )
        settings = self._core.settings
        self._closers: list[Callable[[], Any]] = []
        if engine is None:
            engine = create_db_engine(settings.database_url)
            self._closers.append(engine.dispose)
        if gateway is None:
            from ..resilience import Gateway

            auth = default_auth(settings, engine=engine)
            if auth is not None:
                self._closers.append(auth.close)
            gateway = Gateway(settings, metrics=self._core.metrics, auth=auth)
            self._closers.append(gateway.close)
        self._io = FlowIO(gateway, engine, self._core.clock)

    enrich = sync_face(_EnricherFace._enrich)

    def close(self) -> None:
        """Close the gateway and engine this enricher created (not ones passed in)."""
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> Enricher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEnricher(_EnricherFace):
    """Async face of :class:`Enricher`: the same flow, driven under asyncio.

    Safe to share between the tasks of one event loop. Takes the same arguments
    as :class:`Enricher`, with an ``AsyncGateway`` and an ``AsyncEngine`` (the ones
    it builds itself are closed by :meth:`aclose`). Example::

        async with AsyncEnricher(settings, async_gateway) as enricher:
            result = await enricher.enrich("claim-42", tenant_id="t1")
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
        self._core = _core(
            settings, gateway, provider=provider, metrics=metrics, clock=clock, actor=actor
        )
        gateway, engine, self._closers = async_parts(
            self._core.settings, gateway, engine, self._core.metrics
        )
        self._io = FlowIO(gateway, engine, self._core.clock)

    enrich = async_face(_EnricherFace._enrich)

    async def aclose(self) -> None:
        """Close the gateway and engine this enricher created (not ones passed in)."""
        while self._closers:
            await self._closers.pop()()

    async def __aenter__(self) -> AsyncEnricher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
