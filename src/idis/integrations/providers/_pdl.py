"""The People Data Labs pack (enrichment): person enrichment by API key.

What comes from where (vendor pages):

* Endpoint and answers: https://docs.peopledatalabs.com/docs/enrichment-api-deprecated
  and https://docs.peopledatalabs.com/docs/errors (``GET /v5/person/enrich`` with
  an identifier such as ``pdl_id``, ``email`` or ``profile``; ``200`` with
  ``{"status", "likelihood", "data"}`` for a match, ``404`` ``not_found`` when
  nothing matches; any other 4xx is a problem with the request, 5xx PDL's own;
  errors are ``{"status", "error": {"type", "message"}}``).
* No match is an answer: https://docs.peopledatalabs.com/support/troubleshooting/no-results-found
  (not a system error, not billed): the enrichment core treats a 404 as final
  (no breaker count, no deferral, no defect).
* Credits: https://docs.peopledatalabs.com/support/troubleshooting/out-of-credits
  (``402`` ``payment_required`` until the account has credits again;
  ``x-totallimit-remaining`` states what is left): unavailability, so the chain
  falls back, serves a stale copy and defers with a defect.
* Rate limits: https://docs.peopledatalabs.com/docs/usage-limits and
  https://docs.peopledatalabs.com/support/troubleshooting/rate-limit-errors
  (per key and endpoint, fixed window; ``x-ratelimit-remaining``,
  ``x-ratelimit-reset``, ``x-ratelimit-limit``; ``429`` ``rate_limit_error``).
* Auth: https://docs.peopledatalabs.com/docs/authentication (``X-Api-Key`` header;
  ``IDIS_PROVIDER_<NAME>_API_TOKEN``).

PDL has no records feed, webhooks or replay: the pack serves enrichment only.
The identifier the subject id is sent as is the ``enrich`` endpoint's query
(``/v5/person/enrich?pdl_id={id}`` by default; ``ENDPOINTS=enrich=/v5/person/
enrich?email={id}`` for hosts keyed by e-mail).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .._flow import Flow, async_face, sync_face
from .._http import httpx
from ..exceptions import MalformedResponse, ProviderError, ProviderRejected, QuotaExhausted
from ._client import Call, ClientFlows
from ._pack import Capabilities, NoWebhooks, RateLimitReading, register_pack

if TYPE_CHECKING:
    from ..config import ProviderSettings
    from ..resilience._gateway import AsyncGateway, Gateway

__all__ = ["PDL", "PDL_ENRICH", "ApiKey", "AsyncPDLClient", "PDLClient", "PDLPack"]

#: The person-enrichment path; ``{id}`` is the subject id (percent-encoded by the gateway).
PDL_ENRICH = "/v5/person/enrich?pdl_id={id}"


class ApiKey(httpx.Auth):
    """PDL's ``X-Api-Key`` header; the key is never shown."""

    def __init__(self, key: str) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "ApiKey(***)"

    def auth_flow(self, request: httpx.Request) -> Any:
        """Set ``X-Api-Key``."""
        request.headers["X-Api-Key"] = self._key
        yield request


def _window(value: str) -> int | None:
    """A header that is a number or a JSON object of windows (``{"minute": 99}``): the least."""
    text = value.strip()
    if text.isdigit() and len(text) < 19:
        return int(text)
    try:
        decoded = json.loads(text)
    except ValueError:
        return None
    if isinstance(decoded, dict):
        numbers = [
            int(v) for v in decoded.values() if isinstance(v, int) and not isinstance(v, bool)
        ]
        return min(numbers) if numbers else None
    return None


def read_rate_limit(
    status: int, headers: Mapping[str, str], details: Mapping[str, Any] | None
) -> RateLimitReading | None:
    """``x-ratelimit-*`` (per minute) and, on a 402, the spent credits."""
    lower = {k.lower(): v for k, v in headers.items()}
    credits = _window(lower.get("x-totallimit-remaining", ""))
    if status == 402 or credits == 0:
        return RateLimitReading(remaining=0, policy="credits", exhausted=True)
    remaining = _window(lower.get("x-ratelimit-remaining", ""))
    limit = _window(lower.get("x-ratelimit-limit", ""))
    if status != 429 and remaining is None and limit is None:
        return None
    return RateLimitReading(
        remaining=0 if status == 429 else remaining,
        limit=limit,
        policy="rate_limit_error" if status == 429 else None,
    )


def map_error(exc: ProviderError) -> ProviderError:
    """A 402 is :class:`QuotaExhausted`: PDL serves again only once credits are bought."""
    if isinstance(exc, ProviderRejected) and exc.status_code == 402:
        error = QuotaExhausted(
            f"{exc.provider} {exc.endpoint}: People Data Labs credits are exhausted (HTTP 402 "
            "payment_required); enrichment falls back and defers until credits are restored",
            provider=exc.provider,
            endpoint=exc.endpoint,
            status_code=exc.status_code,
        )
        error.details = exc.details
        return error
    return exc


def _data(body: Any, provider: str) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        raise MalformedResponse(f"{provider}: PDL answer has no 'data' object", provider=provider)
    return dict(body["data"])


class _PDLFlows(ClientFlows):
    """PDL's client methods, each written once as a flow."""

    def _enrich(self, subject_id: str) -> Flow[dict[str, Any] | None]:
        """The person's data; None when PDL finds no match (an answer, not a failure).

        Raises:
            QuotaExhausted: credits are spent (402).
            RateLimited: 429.
        """
        try:
            response = yield Call("enrich", {"path_params": {"id": subject_id}}, raw=True)
        except ProviderError as exc:
            self.rate_limit = read_rate_limit(exc.status_code or 0, {}, exc.details)
            if isinstance(exc, ProviderRejected) and exc.status_code == 404:
                return None
            raise map_error(exc) from exc
        self.rate_limit = read_rate_limit(response.status_code, response.headers, None)
        return _data(response.json(), self.name)


class PDLClient(_PDLFlows):
    """Sync PDL adapter: ``enrich`` answers the person's data, or None for no match."""

    gateway: Gateway

    enrich = sync_face(_PDLFlows._enrich)
    health = sync_face(_PDLFlows._health)


class AsyncPDLClient(_PDLFlows):
    """Async twin of :class:`PDLClient`."""

    gateway: AsyncGateway

    enrich = async_face(_PDLFlows._enrich)
    health = async_face(_PDLFlows._health)


class PDLPack(NoWebhooks):
    """People Data Labs person enrichment."""

    name = "pdl"
    summary = "People Data Labs person enrichment: X-Api-Key, 404 no match, 402 credits."
    capabilities = Capabilities(
        webhooks=None,
        polling="none (enrichment only)",
        replay=None,
        replay_window=None,
        resync=False,
        auth=("API key (X-Api-Key, API_TOKEN)",),
        rate_limit_headers=(
            "x-ratelimit-remaining",
            "x-ratelimit-limit",
            "x-ratelimit-reset",
            "x-totallimit-remaining",
        ),
        ordering="none (enrichment answers are current states)",
        event_identity="none (no events)",
    )
    endpoints: Mapping[str, str] = {"enrich": PDL_ENRICH}
    client_class = PDLClient
    async_client_class = AsyncPDLClient

    def auth(self, settings: ProviderSettings, oauth: Callable[[Any], Any] | None) -> Any:
        """``X-Api-Key`` from ``API_TOKEN`` (None without one)."""
        if settings.api_token is None:
            return None
        return ApiKey(settings.api_token.get_secret_value())

    read_rate_limit = staticmethod(read_rate_limit)
    map_error = staticmethod(map_error)

    def update_call(
        self, settings: ProviderSettings, record_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """PDL is read-only.

        Raises:
            UsageError: always (an outbox push to PDL is a configuration mistake).
        """
        from ..exceptions import UsageError

        raise UsageError(
            f"{settings.name} uses the pdl pack (People Data Labs), which is read-only: "
            "expected an outbox push to a CRM or documents provider"
        )


PDL = register_pack(PDLPack())
