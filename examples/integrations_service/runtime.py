"""Everything the service runs, built and started in the app's lifespan.

One :class:`Runtime` per running app holds:

* one async engine on ``IDIS_DATABASE_URL`` (the library's tables and the
  service's, in one database);
* one shared :class:`~idis.integrations.resilience.AsyncGateway`, with OAuth
  (:func:`~idis.integrations.oauth_auth_factory`) when a provider uses it,
  and a :class:`~idis.integrations.resilience.HealthSampler` hooked to
  its breakers and sampling it, so ``idis-integrations status`` and
  ``postmortem`` (other processes) see what this one saw;
* the background loops: the sync service (sentinel, mode controller, poller),
  the outbox worker and the deferred-enrichment worker (which copies refreshed
  enrichments onto claims through its ``on_refreshed`` callback).

Start order: schema, engine, gateway, then the loops that use them. Every part
registers its own cleanup as it is created, so :meth:`Runtime.stop` undoes
exactly what started, in reverse order, even after a failed start; each loop
finishes the item in hand before it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio.to_thread
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from idis.integrations import oauth_auth_factory
from idis.integrations.config import Settings
from idis.integrations.db._engine import aread_only, create_async_db_engine, create_db_engine
from idis.integrations.db._migrate import upgrade
from idis.integrations.enrichment import AsyncDeferredEnrichmentWorker, AsyncEnricher
from idis.integrations.enrichment._decisions import default_primary
from idis.integrations.exceptions import ConfigError
from idis.integrations.observability._logs import get_logger
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox import AsyncOutboxWorker
from idis.integrations.providers import pack_auth
from idis.integrations.resilience import AsyncGateway, HealthSampler
from idis.integrations.sync import AsyncSyncService
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._service import default_providers

from .claims import claim_refresher, refresh_stale_claims
from .config import ServiceSettings
from .delivery import deal_push_delivery
from .handlers import register
from .models import host_metadata

__all__ = ["Runtime", "prepare_database"]

_log = get_logger()


def prepare_database(url: str) -> tuple[str, ...]:
    """Bring the library's schema up to date and create the service's tables (blocking).

    The library's tables come from its migrations (``idis-integrations db upgrade``);
    the service's from its own metadata.

    Returns:
        The library's revisions after the upgrade.
    """
    revisions = upgrade(url)
    engine = create_db_engine(url)
    try:
        host_metadata.create_all(engine)
    finally:
        engine.dispose()
    return revisions


class Runtime:
    """The running parts of one service instance (see the module docstring).

    Args:
        settings: The library's settings.
        service: The service's own settings.
        metrics: Where every component records its metrics.
    """

    def __init__(self, settings: Settings, service: ServiceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.service = service
        self.metrics = metrics
        #: The CRM deals are pushed to (the first provider of kind ``crm``), if any.
        self.crm_provider: str | None = None
        #: Primary enrichment provider, if one is configured.
        self.enrichment_provider: str | None = None
        self.enricher: AsyncEnricher | None = None
        self.started = False
        self._engine: AsyncEngine | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._reads: async_sessionmaker[AsyncSession] | None = None
        self._gateway: AsyncGateway | None = None
        self._sync: AsyncSyncService | None = None
        self._webhooks: Any = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._outbox: AsyncOutboxWorker | None = None
        self._exit = contextlib.AsyncExitStack()

    @property
    def engine(self) -> AsyncEngine:
        """The async engine (library and service tables)."""
        if self._engine is None:
            raise RuntimeError("the service has not started")
        return self._engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """Session factory on :attr:`engine`."""
        if self._sessions is None:
            raise RuntimeError("the service has not started")
        return self._sessions

    @property
    def reads(self) -> async_sessionmaker[AsyncSession]:
        """Session factory for read-only work (no write lock on SQLite)."""
        if self._reads is None:
            raise RuntimeError("the service has not started")
        return self._reads

    @property
    def gateway(self) -> AsyncGateway:
        """The gateway every provider call of this service goes through."""
        if self._gateway is None:
            raise RuntimeError("the service has not started")
        return self._gateway

    @property
    def sync(self) -> AsyncSyncService:
        """The sync service (its receiver answers ``/webhooks/{provider}``)."""
        if self._sync is None:
            raise RuntimeError("the service has not started")
        return self._sync

    @property
    def webhooks(self) -> Any:
        """The webhook receiver's ASGI app (``POST /{provider}``)."""
        if self._webhooks is None:
            raise RuntimeError("the service has not started")
        return self._webhooks

    async def start(self) -> None:
        """Prepare the database, build the shared parts, start every background loop.

        Raises:
            Exception: whatever failed; what had started is stopped again first.
        """
        try:
            await self._start()
        except BaseException:
            await self._exit.aclose()
            raise
        self.started = True

    async def _start(self) -> None:
        settings = self.settings
        revisions = await anyio.to_thread.run_sync(prepare_database, settings.database_url)
        engine = self._engine = create_async_db_engine(settings.database_url)
        self._exit.push_async_callback(engine.dispose)
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Page views only read: without a write lock they never queue behind the outbox.
        self._reads = async_sessionmaker(aread_only(engine), expire_on_commit=False)
        oauth = None
        if any(p.auth.grant != "none" for p in settings.providers.values()):
            oauth = oauth_auth_factory(settings, async_engine=engine, metrics=self.metrics)
            self._exit.push_async_callback(oauth.aclose)
        # Each provider's pack decides: its API token or key (PDL), else OAuth.
        auth = pack_auth(oauth)
        sampler = HealthSampler(
            engine=engine, interval=self.service.sample_interval.total_seconds()
        )
        gateway = self._gateway = AsyncGateway(
            settings, metrics=self.metrics, auth=auth, on_transition=[sampler.on_transition]
        )
        self._exit.push_async_callback(gateway.aclose)
        # Stopped after the loops below: their last transitions are written too.
        self._spawn("health-sampler", sampler.run(gateway.snapshot, settings.providers))

        crm = default_providers(settings)
        self.crm_provider = crm[0] if crm else None
        sync = self._sync = AsyncSyncService(
            settings,
            engine=engine,
            gateway=gateway,
            registry=register(HandlerRegistry()),
            metrics=self.metrics,
        )
        # Gives up poller leadership and closes the leader locks' connections.
        self._exit.push_async_callback(sync.aclose)
        self._webhooks = sync.asgi_app()
        # AsyncSyncService.start() keeps its task to itself; running its public
        # run() as our own task lets /healthz see whether the loop is alive.
        self._spawn("sync", sync.run())

        outbox = AsyncOutboxWorker(
            engine,
            settings,
            deliver=deal_push_delivery(gateway, settings, engine),
            gateway=gateway,
            metrics=self.metrics,
        )
        self._adopt("outbox", outbox.start(), outbox.stop)
        self._outbox = outbox

        try:
            self.enrichment_provider = default_primary(settings)
        except ConfigError:
            self.enrichment_provider = None
        if self.enrichment_provider is not None:
            self.enricher = AsyncEnricher(settings, gateway, engine=engine, metrics=self.metrics)
            # Refreshed claims arrive through the worker's callback; the catch-up
            # covers refreshes committed while no callback could run (see claims.py).
            async with self._sessions.begin() as session:
                await refresh_stale_claims(session)
            deferred = AsyncDeferredEnrichmentWorker(
                settings,
                gateway,
                engine=engine,
                metrics=self.metrics,
                on_refreshed=[claim_refresher(self._sessions)],
            )
            self._adopt("deferred_enrichment", deferred.start(), deferred.stop)
        _log.info(
            "idis.example.started",
            msg="integrations service started",
            revisions=list(revisions),
            crm_provider=self.crm_provider,
            enrichment_provider=self.enrichment_provider,
            sync_providers=sync.providers,
            webhook_providers=sorted(sync.receiver.schemes),
        )

    def _spawn(self, name: str, coroutine: Awaitable[Any]) -> None:
        """Run ``coroutine`` as a task that stop() cancels."""
        task = asyncio.ensure_future(coroutine)
        task.set_name(f"idis-example-{name}")
        self._adopt(name, task, None)

    def _adopt(self, name: str, task: asyncio.Task[Any], stop: Callable[[], Any] | None) -> None:
        """Track ``task``; at shutdown call ``stop`` (a graceful stop) or cancel it."""
        self._tasks[name] = task

        async def finish() -> None:
            try:
                if stop is None:
                    task.cancel()
                else:
                    outcome = stop()
                    if asyncio.iscoroutine(outcome):
                        await outcome
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # noqa: BLE001  # a crashed loop must not stop the shutdown
                _log.error("idis.example.loop_failed", loop=name, error_type=type(exc).__name__)

        self._exit.push_async_callback(finish)

    def health(self) -> dict[str, str]:
        """Each background loop: ``running``, ``stopped``, ``failed: <error type>``, or for the
        outbox ``configuration error (<provider>): <message>`` while our configuration stops
        its deliveries."""
        states: dict[str, str] = {}
        for name, task in self._tasks.items():
            if not task.done():
                states[name] = "running"
            elif task.cancelled() or task.exception() is None:
                states[name] = "stopped"
            else:
                states[name] = f"failed: {type(task.exception()).__name__}"
        outbox = self._outbox
        if outbox is not None and states.get("outbox") == "running":
            # Our configuration stops deliveries (missing Vault variables, no
            # webhook secret): the loop runs, but the service is not healthy.
            for provider, error in sorted(outbox.config_errors.items()):
                states["outbox"] = f"configuration error ({provider}): {error}"
                break
        return states

    def configuration_notes(self) -> list[str]:
        """One line per provider whose outbox deliveries our configuration stops."""
        if self._outbox is None:
            return []
        return [
            f"outbox deliveries to {provider} stopped by our configuration: {error}"
            for provider, error in sorted(self._outbox.config_errors.items())
        ]

    async def stop(self) -> None:
        """Stop every loop (each finishes the item in hand), then close the shared parts."""
        if not self.started:
            return
        self.started = False
        await self._exit.aclose()
        _log.info("idis.example.stopped", msg="integrations service stopped")
