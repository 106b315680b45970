"""OAuth for httpx: a bearer token on every request, refreshed ahead of expiry and once on a 401.

The Gateway takes ``auth=`` a callable returning an ``httpx.Auth`` per
provider; :func:`oauth_auth_factory` is that callable::

    auth = oauth_auth_factory(settings)
    gateway = Gateway(settings, auth=auth)        # or AsyncGateway(settings, auth=auth)
    ...
    gateway.close(); auth.close()                 # await auth.aclose() for asyncio

One :class:`OAuth2Auth` serves both httpx clients. Its decisions (bearer
header, one newer token and one retry after a 401) are written once, in
:meth:`OAuth2Auth.bearer_flow`; ``sync_auth_flow`` runs it on the factory's
:class:`TokenManager`, ``async_auth_flow`` on its :class:`AsyncTokenManager`
(each created on first use). A token whose response named an ``instance_url``
(Salesforce) sends the provider's calls there instead of ``BASE_URL`` (the path
under ``BASE_URL`` kept), so ``BASE_URL`` may be the login host. httpx's own
split: one ``auth_flow``, and separate sync and async bodies only where the flow
needs I/O of its own.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any

from .._http import httpx
from ..config import ProviderSettings, Settings
from ..observability._logs import get_logger
from ._tokens import AsyncTokenManager, TokenManager

__all__ = ["OAuth2Auth", "OAuthAuthFactory", "oauth_auth_factory"]

_log = get_logger()
#: Manager options that only make sense for the sync manager.
_SYNC_ONLY = frozenset({"engine", "transport"})


class OAuth2Auth(httpx.Auth):
    """Bearer-token auth for one provider (httpx sync and async clients alike).

    On a 401 it asks the manager for a newer token (another caller may have
    refreshed already; otherwise it refreshes once) and sends the request one
    more time; a second 401 is returned to the caller as it is.
    """

    # A retried request must be sent again with the same body.
    requires_request_body = True

    def __init__(
        self,
        provider: str,
        *,
        manager: Callable[[], TokenManager] | None = None,
        async_manager: Callable[[], AsyncTokenManager] | None = None,
        base_url: str | None = None,
    ) -> None:
        self.provider = provider
        self._manager = manager
        self._async_manager = async_manager
        #: The provider's ``BASE_URL``: replaced by a token's ``instance_url`` when it has one.
        self.base_url = base_url.rstrip("/") if base_url else None

    def _to_instance(self, request: httpx.Request, original: str, token: Any) -> None:
        """Send ``request`` to the token's ``instance_url`` (Salesforce: the org's API base)
        instead of ``BASE_URL``, when the token names one and the request is under ``BASE_URL``."""
        instance = getattr(token, "instance_url", None)
        base = self.base_url
        if not instance or base is None or instance == base:
            return
        if original == base or original.startswith((base + "/", base + "?")):
            request.url = httpx.URL(instance + original[len(base) :])

    def __repr__(self) -> str:
        return f"OAuth2Auth(provider={self.provider!r})"

    def bearer_flow(self, request: httpx.Request) -> Generator[Any, Any, None]:
        """The auth decisions, once for both clients: yields token needs and requests.

        Yields ``("get_token", provider)`` for the current token,
        ``("token_rejected", provider, token)`` after a 401 (a newer token,
        refreshed once if needed): a manager method and its arguments; and
        requests to send. Receives tokens and responses. A second 401 is
        returned as it is.
        """
        original = str(request.url)
        token = yield ("get_token", self.provider)
        request.headers["Authorization"] = token.authorization
        self._to_instance(request, original, token)
        response = yield request
        if response.status_code != 401:
            return
        _log.info(
            "idis.auth.unauthorized_retry",
            msg="provider answered 401; retrying once with a newer token",
            provider=self.provider,
            generation=token.generation,
        )
        newer = yield ("token_rejected", self.provider, token)
        request.headers["Authorization"] = newer.authorization
        self._to_instance(request, original, newer)
        yield request

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """Run :meth:`bearer_flow` on the sync :class:`TokenManager`."""
        if self._manager is None:
            raise TypeError("this OAuth2Auth has no TokenManager: use it with an AsyncClient")
        manager = self._manager()
        flow = self.bearer_flow(request)
        sent: Any = None
        while True:
            try:
                step = flow.send(sent)
            except StopIteration:
                return
            if isinstance(step, httpx.Request):
                sent = yield step
            else:
                sent = getattr(manager, step[0])(*step[1:])

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Run :meth:`bearer_flow` on the :class:`AsyncTokenManager`."""
        if self._async_manager is None:
            raise TypeError("this OAuth2Auth has no AsyncTokenManager: use it with a Client")
        manager = self._async_manager()
        flow = self.bearer_flow(request)
        sent: Any = None
        while True:
            try:
                step = flow.send(sent)
            except StopIteration:
                return
            if isinstance(step, httpx.Request):
                sent = yield step
            else:
                sent = await getattr(manager, step[0])(*step[1:])


class OAuthAuthFactory:
    """Builds one :class:`OAuth2Auth` per OAuth provider, sharing one manager of each kind.

    The ``auth=`` callable for :class:`~idis.integrations.resilience.Gateway`: call it
    with a provider's settings (the Gateway does); it returns an ``httpx.Auth``, or None
    for providers whose grant is ``none``. Thread-safe; close it at shutdown.

    Args:
        settings: Library settings (the same the Gateway gets).
        manager: A sync :class:`TokenManager` to share (default: created on first sync use).
        async_manager: An :class:`AsyncTokenManager` to share (default: created on first
            async use).
        manager_options: Passed to managers the factory creates (``metrics``, ``clock``,
            ``vault``, ``seed``; ``engine`` and ``transport`` for the sync manager, ``async_engine``
            and ``async_transport`` for the async one).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        manager: TokenManager | None = None,
        async_manager: AsyncTokenManager | None = None,
        **manager_options: Any,
    ) -> None:
        self.settings = settings
        self._manager = manager
        self._async_manager = async_manager
        self._owned: list[Any] = []
        self._options = manager_options
        self._lock = threading.Lock()

    def __call__(self, provider: ProviderSettings) -> httpx.Auth | None:
        if provider.auth.grant == "none":
            return None
        return OAuth2Auth(
            provider.name,
            manager=self.manager,
            async_manager=self.async_manager,
            base_url=provider.base_url,
        )

    def manager(self) -> TokenManager:
        """The shared sync token manager."""
        with self._lock:
            if self._manager is None:
                options = {k: v for k, v in self._options.items() if not k.startswith("async_")}
                self._manager = TokenManager(self.settings, **options)
                self._owned.append(self._manager)
            return self._manager

    def async_manager(self) -> AsyncTokenManager:
        """The shared async token manager."""
        with self._lock:
            if self._async_manager is None:
                # Sync-only options stay out; async_<name> becomes <name> (and wins over it).
                options = {k: v for k, v in self._options.items() if k not in _SYNC_ONLY}
                options = {k: v for k, v in options.items() if f"async_{k}" not in options}
                options = {k.removeprefix("async_"): v for k, v in options.items()}
                self._async_manager = AsyncTokenManager(self.settings, **options)
                self._owned.append(self._async_manager)
            return self._async_manager

    def close(self) -> None:
        """Close the sync manager this factory created."""
        for owned in list(self._owned):
            if isinstance(owned, TokenManager):
                owned.close()
                self._owned.remove(owned)

    async def aclose(self) -> None:
        """Close every manager this factory created."""
        self.close()  # takes the sync managers: the async ones are left
        for owned in list(self._owned):
            assert isinstance(owned, AsyncTokenManager)
            await owned.aclose()
            self._owned.remove(owned)


#: The ``auth=`` callable for :class:`~idis.integrations.resilience.Gateway`: the factory's
#: constructor under the name the docs and RB-09 use (``oauth_auth_factory(settings)``).
oauth_auth_factory = OAuthAuthFactory
