"""What every pack's sync and async clients share: one flow per method, two faces.

A pack writes each client method once, as a flow on a ``ClientFlows`` subclass
that yields :class:`Call` (a gateway call) and :data:`HEALTH`; its sync client
lists the methods as ``name = sync_face(Flows._name)`` over a :class:`Gateway`,
its async client as ``name = async_face(Flows._name)`` over an
:class:`AsyncGateway` (see :mod:`idis.integrations._flow`). The order of the
calls, the 404-means-absent rules and the error mapping exist once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .._flow import Awaited, Flow
from ..exceptions import MalformedResponse
from ._order import BY_MODIFIED, Ordering

if TYPE_CHECKING:
    from . import ReplayPage
    from ._pack import RateLimitReading

__all__ = ["HEALTH", "AsyncReplayPages", "Call", "ClientFlows", "ReplayPages", "provider_time"]


def provider_time(value: Any, what: str, provider: str, form: str = "an ISO-8601 time") -> datetime:
    """A time a provider stated (``Z`` or an offset; none means UTC), else MalformedResponse."""
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise MalformedResponse(
            f"{provider}: {what} is not {form}: {str(value)[:40]!r}", provider=provider
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Call(Awaited[Any]):
    """``gateway.get_json`` (or, ``raw``, ``gateway.request``) of the client's provider."""

    endpoint: str
    options: dict[str, Any] = field(default_factory=dict)
    raw: bool = False

    def call(self, io: ClientFlows) -> Any:
        """Through the client's gateway (sync, or async and awaited)."""
        send = io.gateway.request if self.raw else io.gateway.get_json
        return send(io.name, self.endpoint, **self.options)


@dataclass(frozen=True, slots=True)
class _Health(Awaited[Any]):
    def call(self, io: ClientFlows) -> Any:
        return io.gateway.health(io.name)


#: The provider's health report (``ok``: its health endpoint answered 2xx).
HEALTH = _Health()


class ClientFlows:
    """A client's state (gateway, provider name, settings) and the flows every pack has."""

    #: A :class:`Gateway` for the sync client, an :class:`AsyncGateway` for the async one.
    gateway: Any
    #: How the provider's events and records are ordered: by modification time for the
    #: packs; the generic shape reads its ``order_by`` setting.
    ordering: Ordering = BY_MODIFIED
    #: What the provider last said about its limits (HubSpot's ``X-HubSpot-RateLimit-*``
    #: headers, Salesforce's ``Sforce-Limit-Info``, a refusal from Drive or PDL); None until
    #: it said anything.
    rate_limit: RateLimitReading | None = None

    def __init__(self, gateway: Any, provider: str) -> None:
        self.gateway = gateway
        self.name = provider
        self.settings = gateway.settings.provider(provider)

    @property
    def _io(self) -> ClientFlows:
        """The flows' effects run against the client itself (its gateway and name)."""
        return self

    def _health(self) -> Flow[bool]:
        """Whether the provider's health endpoint answers 2xx."""
        report = yield HEALTH
        return bool(report.ok)


class ReplayPages:
    """``iter_replay`` for a sync client: its ``replay`` pages, following each cursor."""

    replay: Any

    def iter_replay(self, since: datetime, *, limit: int = 500) -> Iterator[ReplayPage]:
        """Every page of the replay since ``since``."""
        page = self.replay(since, limit=limit)
        yield page
        while page.next_cursor:
            page = self.replay(since, cursor=page.next_cursor, limit=limit)
            yield page


class AsyncReplayPages:
    """``iter_replay`` for an async client (see :class:`ReplayPages`)."""

    replay: Any

    async def iter_replay(self, since: datetime, *, limit: int = 500) -> AsyncIterator[ReplayPage]:
        """Every page of the replay since ``since``."""
        page = await self.replay(since, limit=limit)
        yield page
        while page.next_cursor:
            page = await self.replay(since, cursor=page.next_cursor, limit=limit)
            yield page
