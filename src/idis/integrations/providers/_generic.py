"""The generic pack: the simulator's REST shape (records, a seq-ordered changes feed, replay).

It is the default (``IDIS_PROVIDER_<NAME>_API=generic``) and what the embedded
defaults speak: Standard Webhooks signatures, OAuth client credentials or
refresh tokens, a changes feed whose cursor is its ``seq`` (as text), and a
replay API whose 410/422 refusal may state ``retention_seconds``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import MalformedResponse, ProviderError
from . import AsyncProviderClient, ProviderClient
from ._order import Ordering, ordering_for
from ._pack import Capabilities, PackBase, RateLimitReading, register_pack

if TYPE_CHECKING:
    from ..config import ProviderSettings
    from ..webhooks._verify import VerificationScheme
    from . import ProviderEvent

__all__ = ["GENERIC", "GenericPack"]


def _number(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name, "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


class GenericPack(PackBase):
    """The simulator's shape (and any REST API mapped onto it with ``ENDPOINTS``)."""

    name = "generic"
    summary = "The simulator's REST shape: records with versions, a seq feed, replay."
    capabilities = Capabilities(
        webhooks="Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature)",
        polling="changes feed (GET /changes?after=<seq>)",
        replay="replay API (GET /replay?since=)",
        replay_window="REPLAY_RETENTION (72h by default), or the retention a refusal states",
        resync=True,
        auth=("oauth client_credentials", "oauth refresh_token", "static bearer token"),
        rate_limit_headers=("Retry-After", "X-RateLimit-Remaining", "X-RateLimit-Limit"),
        ordering="version (ORDER_BY=modified for providers without versions)",
        event_identity="the provider's event id (`id`)",
    )
    endpoints: Mapping[str, str] = {
        "records": "/records",
        "record": "/records/{id}",
        "changes": "/changes",
        "replay": "/replay",
        "enrich": "/enrich/{id}",
    }
    client_class = ProviderClient
    async_client_class = AsyncProviderClient

    def ordering(self, settings: ProviderSettings) -> Ordering:
        """``ORDER_BY``: by version (default) or by modification time."""
        return ordering_for(settings.order_by)

    def webhook_scheme(self, settings: ProviderSettings) -> VerificationScheme | None:
        """Standard Webhooks with every configured secret (None without secrets)."""
        if not settings.webhook_secrets:
            return None
        from ..webhooks._verify import StandardWebhooksScheme

        return StandardWebhooksScheme(
            settings.webhook_secrets,
            label=f"IDIS_PROVIDER_{settings.name.upper()}_WEBHOOK_SECRETS",
        )

    def webhook_events(self, body: bytes, provider: str) -> list[ProviderEvent]:
        """One event per delivery: the body is the event object."""
        from ..exceptions import WebhookVerificationError
        from ..webhooks._verify import parse_json_strict
        from . import parse_event

        try:
            payload = parse_json_strict(body)
        except WebhookVerificationError as exc:
            raise MalformedResponse(
                f"{provider}: webhook body is not a JSON object ({type(exc).__name__})",
                provider=provider,
            ) from None
        return [parse_event(payload, provider)]

    def read_rate_limit(
        self, status: int, headers: Mapping[str, str], details: Mapping[str, Any] | None
    ) -> RateLimitReading | None:
        """``X-RateLimit-Remaining``/``-Limit`` and ``Retry-After`` (lower-cased names)."""
        remaining = _number(headers, "x-ratelimit-remaining")
        limit = _number(headers, "x-ratelimit-limit")
        retry = _number(headers, "retry-after")
        if remaining is None and limit is None and retry is None:
            return None
        return RateLimitReading(
            remaining=remaining,
            limit=limit,
            reset_after=None if retry is None else float(retry),
        )

    def map_error(self, exc: ProviderError) -> ProviderError:
        """The gateway's mapping is the generic dialect's."""
        return exc

    def update_call(
        self, settings: ProviderSettings, record_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``PUT record`` with ``{"data": data}`` (what ``ProviderClient.put_record`` sends)."""
        return {
            "endpoint": "record",
            "method": "PUT",
            "path_params": {"id": record_id},
            "json": {"data": dict(data)},
        }


GENERIC = register_pack(GenericPack())
