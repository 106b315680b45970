"""Provider packs: what one real API brings (auth, endpoints, webhooks, limits, polling, replay).

A provider speaks one API, chosen by ``IDIS_PROVIDER_<NAME>_API`` (default
``generic``, the simulator's shape). The API's pack is the one place that knows
that API's dialect:

* **auth**: how a request is authenticated (OAuth through the token manager,
  or a static bearer token such as a HubSpot private-app token);
* **endpoints**: the logical endpoint names mapped to the API's paths;
* **webhooks**: the verification scheme of its inbound webhooks, and how a
  (possibly batched) body becomes events;
* **rate limits**: what its rate-limit headers and refusals say (remaining
  quota, reset, whether a 429 is worth retrying at all);
* **polling**: the adapter's ``changes`` (a feed, a search on a modification
  time...), with an opaque text cursor;
* **replay or resync**: a replay API with its window, or none (``resync``);
* **errors**: its error bodies mapped onto the :class:`ProviderError` tree.

Packs register themselves by name (:func:`register_pack`); :func:`pack_for`
resolves a provider's pack and names the setting when it is unknown.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .._http import httpx
from ..exceptions import ConfigError, MalformedResponse, ProviderError

if TYPE_CHECKING:
    from ..config import ProviderSettings
    from ..resilience._gateway import AsyncGateway, Gateway
    from ..webhooks._verify import VerificationScheme
    from . import ProviderEvent
    from ._order import Ordering

__all__ = [
    "BearerToken",
    "Capabilities",
    "ProviderPack",
    "RateLimitReading",
    "known_packs",
    "pack_for",
    "register_pack",
]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a pack supports, as ``idis-integrations providers`` lists it."""

    #: Inbound webhooks, and how they are signed (``None``: no webhooks).
    webhooks: str | None
    #: How changes are polled (``changes feed``, ``CRM search``...).
    polling: str
    #: The replay source (``None``: no replay API, reconcile resyncs).
    replay: str | None
    #: How far back replay reaches, as the vendor documents it (text for people).
    replay_window: str | None
    #: Whether a full resync (list every record, compare) is possible.
    resync: bool
    #: Authentication styles.
    auth: tuple[str, ...]
    #: Rate-limit headers the pack reads.
    rate_limit_headers: tuple[str, ...]
    #: Record ordering rule (``version``, ``modified``).
    ordering: str
    #: Where the event id comes from (the provider's, or derived: documented per pack).
    event_identity: str


@dataclass(frozen=True, slots=True)
class RateLimitReading:
    """What a response's rate-limit headers (or a refusal's body) say."""

    #: Requests left in the window the provider reported (None: not stated).
    remaining: int | None = None
    #: The window's allowance (None: not stated).
    limit: int | None = None
    #: Seconds until the window resets (None: not stated).
    reset_after: float | None = None
    #: The provider's name for the limit that applies (``DAILY``, ``TEN_SECONDLY_ROLLING``...).
    policy: str | None = None
    #: Whether retrying before the reset is pointless (a daily quota is spent):
    #: callers pause until ``reset_after`` instead of backing off.
    exhausted: bool = False


class PackBase:
    """What most packs share: ordered by modification time, authenticated by
    :func:`token_or_oauth`, their two clients named by ``client_class`` and
    ``async_client_class``. A pack overrides what its API does otherwise."""

    name: str
    #: The sync adapter's class (records, changes, replay), built over a :class:`Gateway`.
    client_class: Callable[[Gateway, str], Any]
    #: The async adapter's class, built over an :class:`AsyncGateway`.
    async_client_class: Callable[[AsyncGateway, str], Any]

    def ordering(self, settings: ProviderSettings) -> Ordering:
        """By modification time."""
        from ._order import BY_MODIFIED

        return BY_MODIFIED

    def auth(self, settings: ProviderSettings, oauth: Callable[[Any], Any] | None) -> Any:
        """A static token when set, else OAuth when a grant is configured."""
        return token_or_oauth(settings, oauth)

    def client(self, gateway: Gateway, provider: str) -> Any:
        """The sync adapter over ``gateway``."""
        return self.client_class(gateway, provider)

    def async_client(self, gateway: AsyncGateway, provider: str) -> Any:
        """The async adapter over ``gateway``."""
        return self.async_client_class(gateway, provider)


class NoWebhooks(PackBase):
    """For a pack whose provider sends no webhooks (it is polled, or only asked)."""

    def webhook_scheme(self, settings: ProviderSettings) -> VerificationScheme | None:
        """None: the provider sends no webhooks."""
        return None

    def webhook_events(self, body: bytes, provider: str) -> list[ProviderEvent]:
        """Never called (no webhooks).

        Raises:
            MalformedResponse: always.
        """
        raise MalformedResponse(
            f"{provider}: the {self.name} pack receives no webhooks", provider=provider
        )


class BearerToken(httpx.Auth):
    """A static bearer token (a HubSpot private-app token); the value is never shown."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def __repr__(self) -> str:
        return "BearerToken(***)"

    def auth_flow(self, request: httpx.Request) -> Any:
        """Set the Authorization header."""
        request.headers["Authorization"] = self._header
        yield request


def token_or_oauth(settings: ProviderSettings, oauth: Callable[[Any], Any] | None) -> Any:
    """The bearer auth most packs use: ``API_TOKEN`` when set, else OAuth when a grant is set.

    None when neither is configured (the provider is called without credentials).
    """
    if settings.api_token is not None:
        return BearerToken(settings.api_token.get_secret_value())
    if settings.auth.grant != "none" and oauth is not None:
        return oauth(settings)
    return None


@runtime_checkable
class ProviderPack(Protocol):
    """One provider API's dialect (see the module docstring)."""

    #: ``IDIS_PROVIDER_<NAME>_API`` value.
    name: str
    #: One line for the ``providers`` listing.
    summary: str
    capabilities: Capabilities
    #: Logical endpoint name → path template, merged under the provider's ``ENDPOINTS``.
    endpoints: Mapping[str, str]

    def ordering(self, settings: ProviderSettings) -> Ordering:
        """The rule the provider's events and records are ordered by."""

    def auth(self, settings: ProviderSettings, oauth: Callable[[Any], Any] | None) -> Any:
        """The ``httpx.Auth`` for the provider's calls (None: unauthenticated).

        ``oauth`` is the OAuth factory (``oauth_auth_factory``) when the host has one.
        """

    def webhook_scheme(self, settings: ProviderSettings) -> VerificationScheme | None:
        """How the provider's inbound webhooks are verified (None: it sends none)."""

    def webhook_events(self, body: bytes, provider: str) -> list[ProviderEvent]:
        """The events of one verified webhook body (a batch for some APIs).

        Raises:
            MalformedResponse: the body is not the API's webhook shape.
        """

    # Optional (not part of the protocol check): ``webhook_triggers_fetch(headers) -> bool``
    # for APIs whose notifications carry no data (Google Drive): the receiver then ignores
    # the body and, when it returns True, fetches the changes feed (see webhooks/_receiver.py).

    def read_rate_limit(
        self, status: int, headers: Mapping[str, str], details: Mapping[str, Any] | None
    ) -> RateLimitReading | None:
        """What the response says about the provider's rate limit (None: nothing)."""

    def map_error(self, exc: ProviderError) -> ProviderError:
        """The library's error for a provider error in this API's dialect (or ``exc``)."""

    # Optional (not part of the protocol check): ``error_hook(settings, clock) ->
    # (ProviderError -> ProviderError)``, the gateway's response hook for one provider when
    # the mapping needs its settings or the time (HubSpot: a DAILY 429 pauses until the
    # next midnight in QUOTA_TIMEZONE); without it the gateway calls ``map_error``.

    def update_call(
        self, settings: ProviderSettings, record_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The call that updates a record in this API: keyword arguments for
        ``NewMessage.request(provider, idempotency_key=..., **call)`` (an outbox push)."""

    def client(self, gateway: Gateway, provider: str) -> Any:
        """The sync adapter (records, changes, replay) over ``gateway``."""

    def async_client(self, gateway: AsyncGateway, provider: str) -> Any:
        """The async adapter over ``gateway``."""


_LOCK = threading.Lock()
_PACKS: dict[str, ProviderPack] = {}
#: Packs shipped with the library, imported on first use.
_BUILTIN: dict[str, str] = {
    "generic": "._generic",
    "hubspot": "._hubspot",
    "salesforce": "._salesforce",
    "gdrive": "._gdrive",
    "pdl": "._pdl",
}


def register_pack(pack: ProviderPack, *, replace: bool = False) -> ProviderPack:
    """Make ``pack`` selectable as ``IDIS_PROVIDER_<NAME>_API=<pack.name>``.

    Raises:
        ConfigError: another pack has that name already (and ``replace`` is false).
    """
    with _LOCK:
        if not replace and pack.name in _PACKS and _PACKS[pack.name] is not pack:
            raise ConfigError(
                f"provider pack {pack.name!r} is registered already; pass replace=True to "
                "override it",
                variable="IDIS_PROVIDER_<NAME>_API",
            )
        _PACKS[pack.name] = pack
    return pack


def _load(name: str) -> ProviderPack | None:
    with _LOCK:
        found = _PACKS.get(name)
    if found is not None:
        return found
    module = _BUILTIN.get(name)
    if module is None:
        return None
    importlib.import_module(module, __package__)  # registers itself
    with _LOCK:
        return _PACKS.get(name)


def known_packs() -> Sequence[ProviderPack]:
    """Every pack: the library's own first, then registered ones, by name."""
    for name in _BUILTIN:
        _load(name)
    with _LOCK:
        return [_PACKS[name] for name in sorted(_PACKS)]


def pack_for(settings: ProviderSettings) -> ProviderPack:
    """The pack of a provider's ``api`` setting.

    Raises:
        ConfigError: no pack has that name (naming the variable and the known packs).
    """
    pack = _load(settings.api)
    if pack is None:
        names = ", ".join(p.name for p in known_packs())
        variable = f"IDIS_PROVIDER_{settings.name.upper()}_API"
        raise ConfigError(
            f"{variable}={settings.api!r} names no provider pack: expected one of {names}",
            variable=variable,
        )
    return pack


def endpoint(settings: ProviderSettings, name: str, template: str) -> str:
    """The endpoint to call: the logical ``name`` when ``ENDPOINTS`` declares it, else
    the pack's path ``template`` (which is then also the endpoint's metric label)."""
    return name if name in settings.endpoints else template


def pack_auth(oauth: Callable[[Any], Any] | None = None) -> Callable[[Any], Any]:
    """The gateway's ``auth=`` factory: each provider's pack decides (static token or OAuth).

    Args:
        oauth: The OAuth factory (``oauth_auth_factory(...)``) for providers with a grant.
    """

    def factory(settings: ProviderSettings) -> Any:
        return pack_for(settings).auth(settings, oauth)

    return factory
