"""The HubSpot pack: CRM objects (deals by default), webhooks v3, CRM search polling.

What comes from where (vendor pages):

* Webhook signatures: https://developers.hubspot.com/docs/api/webhooks/validating-requests
  (and, for apps on the new developer platform, the same scheme at
  https://developers.hubspot.com/docs/apps/developer-platform/build-apps/authentication/request-validation;
  HubSpot publishes worked examples for v1 and v2 only, which are this pack's
  test vectors; v3 is tested against the simulator's independent signer)
  (v3: base64 HMAC-SHA256 over ``method + URI + body + timestamp`` keyed by the
  app's client secret, ``X-HubSpot-Request-Timestamp`` in milliseconds, refused
  when older than 5 minutes; v1: hex SHA-256 of ``secret + body``; v2: hex
  SHA-256 of ``secret + method + URI + body``, both for legacy apps).
* Webhook bodies are JSON arrays of events (``eventId``, ``subscriptionType``
  such as ``deal.propertyChange``, ``objectId``, ``occurredAt`` in epoch ms,
  ``attemptNumber``...), up to 100 per request: same page.
* Polling: https://developers.hubspot.com/docs/api/crm/search (POST
  ``/crm/v3/objects/{object}/search``, filter and sort on
  ``hs_lastmodifieddate``, ``paging.next.after``; one query returns at most
  10,000 results, so the poller re-anchors its watermark before reaching it).
* Rate limits: https://developers.hubspot.com/docs/api/usage-details
  (``X-HubSpot-RateLimit-Daily``/``-Daily-Remaining``,
  ``-Interval-Milliseconds``/``-Max``/``-Remaining``; a 429 body names its
  ``policyName``: ``DAILY`` means the day's quota is spent and retrying before
  the reset is pointless, ``TEN_SECONDLY_ROLLING`` means back off).
* Auth: OAuth 2 refresh tokens (https://developers.hubspot.com/docs/api/oauth-quickstart-guide,
  token endpoint ``/oauth/v1/token``) or a private-app access token
  (``IDIS_PROVIDER_<NAME>_API_TOKEN``), sent as a bearer token.

Event identity: HubSpot documents ``eventId`` as not guaranteed unique, so an
event's id is derived from what it carries: ``hs:<subscriptionType>:<objectId>:
<occurredAt ms>[:<propertyName>]`` (a redelivery, ``attemptNumber`` > 0, gets
the same id). A polled record's id is ``hs:<object>.poll:<id>:<hs_lastmodifieddate
ms>``. Ordering: by modification time (``hs_lastmodifieddate`` /
``occurredAt``), ties by event id.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .._flow import Flow, async_face, sync_face
from .._timeparse import utcnow
from ..exceptions import (
    MalformedResponse,
    ProviderError,
    ProviderRejected,
    QuotaExhausted,
    RateLimited,
    WebhookVerificationError,
)
from ._client import AsyncReplayPages, Call, ClientFlows, ReplayPages
from ._order import BY_MODIFIED, Ordering, micros
from ._pack import Capabilities, PackBase, RateLimitReading, endpoint, register_pack

if TYPE_CHECKING:
    from .._clock import Clock
    from ..config import ProviderSettings, Secret
    from ..resilience._gateway import AsyncGateway, Gateway
    from ..webhooks._verify import InboundRequest
    from . import ChangesPage, ProviderEvent, ProviderRecord, RecordPage, ReplayPage

__all__ = [
    "HUBSPOT",
    "SEARCH_RESULT_LIMIT",
    "AsyncHubSpotClient",
    "HubSpotClient",
    "HubSpotPack",
    "HubSpotSignature",
    "SearchCursor",
    "account_zone",
    "quota_zone",
    "seconds_to_local_midnight",
    "sign_v1",
    "sign_v2",
    "sign_v3",
]

#: Results one search query can page through (vendor limit); past it HubSpot answers 400.
SEARCH_RESULT_LIMIT = 10_000
#: Largest search page.
SEARCH_PAGE_LIMIT = 200
#: ``hs_lastmodifieddate``: the property every CRM object carries.
MODIFIED = "hs_lastmodifieddate"
_V3_TOLERANCE = timedelta(minutes=5)
# Characters HubSpot decodes in the URI before signing (v3 docs).
_DECODED = ("%3A", "%2F", "%3F", "%40", "%21", "%24", "%27", "%28", "%29", "%2A", "%2C", "%3B")


# --------------------------------------------------------------------------- signatures


def _v3_uri(uri: str) -> str:
    for code in _DECODED:
        uri = uri.replace(code, unquote(code)).replace(code.lower(), unquote(code))
    return uri


def sign_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """``X-HubSpot-Signature-v3`` for a request (``uri``: the full URL HubSpot called)."""
    source = method.upper().encode() + _v3_uri(uri).encode() + body + timestamp.encode()
    digest = hmac.new(secret.encode(), source, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def sign_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    """Legacy v2 ``X-HubSpot-Signature``: hex SHA-256 of secret + method + URI + body."""
    source = secret.encode() + method.upper().encode() + uri.encode() + body
    return hashlib.sha256(source).hexdigest()


def sign_v1(secret: str, body: bytes) -> str:
    """Legacy v1 ``X-HubSpot-Signature``: hex SHA-256 of secret + body."""
    return hashlib.sha256(secret.encode() + body).hexdigest()


class HubSpotSignature:
    """HubSpot's webhook verification: v3, else (``legacy``) v2 and v1.

    Args:
        secrets: The app's client secret(s) (several during rotation).
        public_url: Scheme and host HubSpot calls (``https://hooks.example.com``);
            the signed URI is ``public_url`` + the path and query received. None:
            ``https://`` + the request's Host header.
        legacy: Accept v1/v2 signatures when a request has no v3 header. They carry
            no timestamp, so a captured delivery can be replayed; the inbox then
            ignores it (its event ids are applied already), but turn this off for
            apps that HubSpot signs with v3.
        tolerance: Largest accepted age of ``X-HubSpot-Request-Timestamp``.
    """

    name = "hubspot"

    def __init__(
        self,
        secrets: Sequence[str | Secret],
        *,
        public_url: str | None = None,
        legacy: bool = True,
        tolerance: timedelta = _V3_TOLERANCE,
        label: str = "hubspot client secret",
    ) -> None:
        from ..exceptions import ConfigError

        if not secrets:
            raise ConfigError(f"{label}: no HubSpot client secret configured", variable=label)
        self._secrets = tuple(s if isinstance(s, str) else s.get_secret_value() for s in secrets)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.legacy = legacy
        self.tolerance = tolerance

    def __repr__(self) -> str:
        return f"HubSpotSignature(secrets={len(self._secrets)}, legacy={self.legacy})"

    def _url(self, request: InboundRequest) -> str:
        if self.public_url is not None:
            return self.public_url + request.uri
        host = request.headers.get("host", "")
        proto = request.headers.get("x-forwarded-proto", "https")
        return f"{proto}://{host}{request.uri}"

    def verify(self, request: InboundRequest, now: datetime) -> str | None:
        """Check v3 (or a legacy signature); HubSpot sends no delivery id."""
        signature = request.headers.get("x-hubspot-signature-v3", "").strip()
        if signature:
            self._verify_v3(request, signature, now)
            return None
        legacy = request.headers.get("x-hubspot-signature", "").strip()
        if not legacy:
            raise WebhookVerificationError(
                "webhook request has no X-HubSpot-Signature-v3 header", reason="missing_headers"
            )
        if not self.legacy:
            raise WebhookVerificationError(
                "webhook request carries only a legacy (v1/v2) HubSpot signature, and legacy "
                "signatures are off",
                reason="bad_signature",
            )
        version = request.headers.get("x-hubspot-signature-version", "v1").strip().lower()
        url = self._url(request)
        for secret in self._secrets:
            expected = (
                sign_v2(secret, request.method, url, request.body)
                if version == "v2"
                else sign_v1(secret, request.body)
            )
            if hmac.compare_digest(expected, legacy.lower()):
                return None
        raise WebhookVerificationError(
            f"HubSpot {version} signature does not match any configured secret",
            reason="bad_signature",
        )

    def _verify_v3(self, request: InboundRequest, signature: str, now: datetime) -> None:
        stamp = request.headers.get("x-hubspot-request-timestamp", "").strip()
        if not stamp:
            raise WebhookVerificationError(
                "webhook request has no X-HubSpot-Request-Timestamp header",
                reason="missing_headers",
            )
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 15):
            raise WebhookVerificationError(
                "X-HubSpot-Request-Timestamp is not integer epoch milliseconds",
                reason="bad_timestamp",
            )
        age = now.timestamp() * 1000 - int(stamp)
        # Older than the window is what HubSpot's docs refuse; a stamp far in the
        # future is as suspicious (a pre-signed request held back).
        if abs(age) > self.tolerance.total_seconds() * 1000:
            raise WebhookVerificationError(
                f"X-HubSpot-Request-Timestamp is {abs(age) / 1000:.0f} s away from our clock; "
                f"the tolerance is {self.tolerance.total_seconds():.0f} s",
                reason="stale_timestamp",
            )
        url = self._url(request)
        for secret in self._secrets:
            expected = sign_v3(secret, request.method, url, request.body, stamp)
            if hmac.compare_digest(expected, signature):
                return
        raise WebhookVerificationError(
            "HubSpot v3 signature does not match any configured secret", reason="bad_signature"
        )


# --------------------------------------------------------------------------- events


_ACTIONS = {
    "creation": "record.created",
    "propertyChange": "record.updated",
    "deletion": "record.deleted",
    "restore": "record.updated",
    "merge": "record.updated",
}


def _event_type(subscription: str) -> str:
    _, _, action = subscription.partition(".")
    return _ACTIONS.get(action, f"hubspot.{subscription}")


#: Most events one delivery may carry (HubSpot sends up to 100; a little headroom).
MAX_BATCH_EVENTS = 1000
_MAX_ID = 255


def _bad(provider: str, where: str, what: str) -> MalformedResponse:
    return MalformedResponse(f"{provider}: HubSpot webhook {where}: {what}", provider=provider)


def _field_text(raw: Mapping[str, Any], key: str, provider: str, where: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _bad(provider, where, f"{key} must be a string or an integer")
    text = str(value)
    if not text or len(text) > 128 or not text.isprintable():
        raise _bad(provider, where, f"{key} must be 1 to 128 printable characters")
    return text


def webhook_event(
    raw: Any, provider: str, ordering: Ordering = BY_MODIFIED, *, index: int = 0
) -> ProviderEvent:
    """One HubSpot webhook event (an element of the batch) as a :class:`ProviderEvent`.

    Raises:
        MalformedResponse: naming the element (``event 3``) and the field that is wrong.
    """
    from . import ProviderEvent

    where = f"event {index}"
    if not isinstance(raw, dict):
        raise _bad(provider, where, f"is a JSON {type(raw).__name__}, expected an object")
    subscription = _field_text(raw, "subscriptionType", provider, where)
    object_id = _field_text(raw, "objectId", provider, where)
    for key, value in (("subscriptionType", subscription), ("objectId", object_id)):
        if value is None:
            raise _bad(provider, where, f"{key} is missing")
    assert subscription is not None
    assert object_id is not None
    stamp = raw.get("occurredAt")
    if stamp is None:
        raise _bad(provider, where, "occurredAt is missing")
    if isinstance(stamp, bool) or not isinstance(stamp, int) or not 0 <= stamp < 2**53:
        raise _bad(provider, where, "occurredAt must be integer epoch milliseconds")
    prop = _field_text(raw, "propertyName", provider, where)
    portal = _field_text(raw, "portalId", provider, where)
    try:
        occurred = datetime.fromtimestamp(stamp / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise _bad(provider, where, "occurredAt is out of range") from None
    event_id = f"hs:{subscription}:{object_id}:{stamp}" + (f":{prop}" if prop else "")
    if len(event_id) > _MAX_ID:
        raise _bad(provider, where, f"its derived event id is longer than {_MAX_ID} characters")
    data: dict[str, Any] = {}
    if prop:
        data[prop] = raw.get("propertyValue")
    return ProviderEvent(
        id=event_id,
        seq=0,
        type=_event_type(subscription),
        record_id=object_id,
        tenant_id=portal,
        version=0,
        occurred_at=occurred,
        data=data,
        order=ordering.event_key(event_id=event_id, seq=None, version=None, occurred_at=occurred),
    )


def batch_events(payload: Any, provider: str) -> list[ProviderEvent]:
    """The events of an already parsed HubSpot webhook body (a JSON array).

    Raises:
        MalformedResponse: the body is not a non-empty array of events, or an
            element is not an event (the message names the element and the field).
    """
    if not isinstance(payload, list):
        raise MalformedResponse(
            f"{provider}: HubSpot webhook body is a JSON {type(payload).__name__}, expected an "
            "array of events",
            provider=provider,
        )
    if not payload:
        raise MalformedResponse(
            f"{provider}: HubSpot webhook body is an empty array", provider=provider
        )
    if len(payload) > MAX_BATCH_EVENTS:
        raise MalformedResponse(
            f"{provider}: HubSpot webhook body has {len(payload)} events, more than "
            f"{MAX_BATCH_EVENTS}",
            provider=provider,
        )
    return [webhook_event(item, provider, index=i) for i, item in enumerate(payload)]


def webhook_events(body: bytes, provider: str) -> list[ProviderEvent]:
    """The events of one HubSpot webhook request (a JSON array of up to 100).

    Raises:
        MalformedResponse: see :func:`batch_events`.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        raise MalformedResponse(
            f"{provider}: HubSpot webhook body is not JSON", provider=provider
        ) from None
    return batch_events(payload, provider)


# --------------------------------------------------------------------------- search cursor


@dataclass(frozen=True, slots=True)
class SearchCursor:
    """Where a CRM-search poll stands: the query's anchor and its paging token.

    Stored as text (``hs1:<anchor ms>:<after>``): the query is "modified at or
    after ``anchor``, ascending", ``after`` is HubSpot's paging token within it,
    and ``seen`` counts results this query has paged through (HubSpot stops a
    query at 10,000 results, so the poller re-anchors before that).
    """

    anchor_ms: int
    after: str | None = None
    seen: int = 0

    def encode(self) -> str:
        """The opaque text the poller stores."""
        return f"hs1:{self.anchor_ms}:{self.seen}:{self.after or ''}"

    @classmethod
    def decode(cls, text: str) -> SearchCursor:
        """Parse :meth:`encode`'s text.

        Raises:
            MalformedResponse: it is not a HubSpot search cursor.
        """
        parts = text.split(":", 3)
        if len(parts) != 4 or parts[0] != "hs1" or not parts[1].isdigit() or not parts[2].isdigit():
            raise MalformedResponse(
                f"cursor {text[:40]!r} is not a HubSpot search cursor (hs1:<ms>:<n>:<after>)"
            )
        return cls(int(parts[1]), parts[3] or None, int(parts[2]))


def _ms(moment: datetime) -> int:
    return micros(moment) // 1000


def _modified(raw: Mapping[str, Any], provider: str) -> datetime:
    props = raw.get("properties") or {}
    value = props.get(MODIFIED) or raw.get("updatedAt")
    if value is None:
        raise MalformedResponse(f"{provider}: search result has no {MODIFIED}", provider=provider)
    text = str(value)
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedResponse(
            f"{provider}: {MODIFIED} is not a time: {text[:40]!r}", provider=provider
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_object(raw: Any, provider: str) -> ProviderRecord:
    """A CRM object (``{"id", "properties", "updatedAt", "archived"}``) as a record."""
    from . import ProviderRecord

    try:
        modified = _modified(raw, provider)
        return ProviderRecord(
            id=str(raw["id"]),
            tenant_id=None,
            version=0,
            updated_at=modified,
            data=dict(raw.get("properties") or {}),
            order=BY_MODIFIED.record_key(version=None, updated_at=modified),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedResponse(
            f"{provider}: malformed HubSpot object ({type(exc).__name__})", provider=provider
        ) from None


def _poll_event(record: ProviderRecord, object_type: str) -> ProviderEvent:
    from . import ProviderEvent

    event_id = f"hs:{object_type}.poll:{record.id}:{_ms(record.updated_at)}"
    return ProviderEvent(
        id=event_id,
        seq=0,
        type="record.updated",
        record_id=record.id,
        tenant_id=None,
        version=0,
        occurred_at=record.updated_at,
        data=dict(record.data),
        order=BY_MODIFIED.event_key(
            event_id=event_id, seq=None, version=None, occurred_at=record.updated_at
        ),
    )


def search_body(cursor: SearchCursor, limit: int) -> dict[str, Any]:
    """The CRM search request for a cursor (ascending on ``hs_lastmodifieddate``)."""
    body: dict[str, Any] = {
        "filterGroups": [
            {"filters": [{"propertyName": MODIFIED, "operator": "GTE", "value": cursor.anchor_ms}]}
        ],
        "sorts": [{"propertyName": MODIFIED, "direction": "ASCENDING"}],
        "limit": max(1, min(limit, SEARCH_PAGE_LIMIT)),
    }
    if cursor.after:
        body["after"] = cursor.after
    return body


def next_cursor(
    cursor: SearchCursor, records: Sequence[ProviderRecord], after: str | None
) -> tuple[SearchCursor, bool]:
    """The cursor after a page, and whether more pages follow (pure).

    Within a query the paging token moves on; before the query would pass
    HubSpot's 10,000 results (or at its end) a new query starts at the newest
    modification time seen (``GTE``: records stamped in that millisecond are
    read again, and the inbox finds them applied already).
    """
    seen = cursor.seen + len(records)
    newest = max((_ms(r.updated_at) for r in records), default=cursor.anchor_ms)
    if after is None:
        return SearchCursor(max(newest, cursor.anchor_ms)), False
    if seen + SEARCH_PAGE_LIMIT > SEARCH_RESULT_LIMIT:
        if newest <= cursor.anchor_ms:
            # 10,000 records in one millisecond: re-anchoring cannot move on. Keep
            # paging until HubSpot refuses, rather than loop on the same page.
            return SearchCursor(cursor.anchor_ms, after, seen), True
        return SearchCursor(newest), True
    return SearchCursor(cursor.anchor_ms, after, seen), True


# --------------------------------------------------------------------------- rate limits


def _int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name, "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 19 else None


def seconds_to_local_midnight(now: datetime, zone: tzinfo = UTC) -> float:
    """Seconds from ``now`` (aware) until the next midnight in ``zone``.

    HubSpot resets the daily quota at midnight in the account's time zone. The
    arithmetic is done in UTC, so a day of 23 or 25 hours (a DST change) counts
    the hours that really pass; where a DST change skips midnight itself, the day
    starts at the change (the first instant of the new date).
    """
    local = now.astimezone(zone)
    tomorrow = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), zone)
    return (tomorrow.astimezone(UTC) - now.astimezone(UTC)).total_seconds()


@functools.lru_cache(maxsize=64)
def _zone(name: str) -> tzinfo:
    return UTC if name == "UTC" else ZoneInfo(name)


#: The account's time zone, per (provider, base URL), as account-info said (UTC when it
#: answered without one, or refused: a token without the scope): asked once per process,
#: by the first call of a client.
_ACCOUNT_ZONES: dict[tuple[str, str], tzinfo] = {}
#: When to ask again after account-info failed (outage, timeout, 429): a provider down at
#: start-up must not pin UTC for the life of the process, nor be asked before every call.
_ACCOUNT_RETRY_AT: dict[tuple[str, str], datetime] = {}
_ACCOUNT_RETRY = timedelta(hours=1)
_ACCOUNT_LOCK = threading.Lock()


def _account_key(settings: ProviderSettings) -> tuple[str, str]:
    return settings.name, settings.base_url


def quota_zone(settings: ProviderSettings) -> tzinfo:
    """The time zone of the provider's daily quota: ``QUOTA_TIMEZONE`` when set, else the
    account's ``timeZone`` from account-info once a client has asked, else UTC."""
    if settings.quota_timezone:
        return _zone(settings.quota_timezone)
    return _ACCOUNT_ZONES.get(_account_key(settings), UTC)


def account_zone(body: Any) -> tzinfo | None:
    """The ``timeZone`` of an account-info answer (``GET /account-info/v3/details``), when
    ``zoneinfo`` knows it (HubSpot sends names such as ``US/Eastern``); else None."""
    name = body.get("timeZone") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name.strip():
        return None
    try:
        return _zone(name.strip())
    except (ValueError, OSError, ZoneInfoNotFoundError):
        return None


def read_rate_limit(
    status: int,
    headers: Mapping[str, str],
    details: Mapping[str, Any] | None,
    *,
    now: datetime | None = None,
    zone: tzinfo = UTC,
) -> RateLimitReading | None:
    """What HubSpot's ``X-HubSpot-RateLimit-*`` headers and a 429's ``policyName`` say
    (a spent daily quota resets at the next midnight in ``zone``)."""
    lower = {k.lower(): v for k, v in headers.items()}
    policy = None
    if details and isinstance(details.get("policyName"), str):
        policy = str(details["policyName"])
    daily_left = _int(lower, "x-hubspot-ratelimit-daily-remaining")
    interval_left = _int(lower, "x-hubspot-ratelimit-remaining")
    interval_ms = _int(lower, "x-hubspot-ratelimit-interval-milliseconds")
    if (status == 429 and policy == "DAILY") or daily_left == 0:
        return RateLimitReading(
            remaining=0,
            limit=_int(lower, "x-hubspot-ratelimit-daily"),
            reset_after=seconds_to_local_midnight(now or utcnow(), zone),
            policy="DAILY",
            exhausted=True,
        )
    if status != 429 and daily_left is None and interval_left is None:
        return None
    return RateLimitReading(
        remaining=interval_left,
        limit=_int(lower, "x-hubspot-ratelimit-max"),
        reset_after=None if interval_ms is None else interval_ms / 1000,
        policy=policy or ("TEN_SECONDLY_ROLLING" if status == 429 else None),
    )


def map_error(
    exc: ProviderError, *, now: datetime | None = None, zone: tzinfo = UTC
) -> ProviderError:
    """A 429 whose policy is ``DAILY``: a rate limit that lasts until the reset (the next
    midnight in the account's time zone ``zone``), not retried.

    Idempotent: the gateway maps a refusal first (its response hook), the client again.
    """
    if isinstance(exc, RateLimited) and not isinstance(exc, QuotaExhausted):
        reading = read_rate_limit(429, {}, exc.details, now=now, zone=zone)
        if reading is not None and reading.exhausted:
            error = QuotaExhausted(
                f"{exc.provider} {exc.endpoint}: rate limit (HTTP 429): HubSpot's daily quota "
                f"is spent; paused until the reset in {reading.reset_after:.0f} s, not retried",
                provider=exc.provider,
                endpoint=exc.endpoint,
                retry_after=reading.reset_after,
            )
            error.details = exc.details
            return error
    return exc


# --------------------------------------------------------------------------- clients


class _HubSpotFlows(ClientFlows):
    """HubSpot's client methods, each written once as a flow."""

    def __init__(self, gateway: Any, provider: str) -> None:
        super().__init__(gateway, provider)
        self.object_type = "deals"

    @staticmethod
    def accepts_cursor(position: str) -> bool:
        """Whether ``position`` is this API's cursor (``hs1:...``)."""
        return position.startswith("hs1:")

    def _path(self, name: str, tail: str = "") -> str:
        """The endpoint ``ENDPOINTS`` names ``name``, else the object type's CRM v3 path."""
        return endpoint(self.settings, name, f"/crm/v3/objects/{self.object_type}{tail}")

    def _start(self, after: str | int | None, since: datetime | None) -> SearchCursor:
        if after is not None and not isinstance(after, int):
            return SearchCursor.decode(after)
        moment = since if since is not None else utcnow()
        return SearchCursor(_ms(moment))

    def _read(self, response: Any) -> Any:
        self.rate_limit = read_rate_limit(
            response.status_code, response.headers, None, zone=quota_zone(self.settings)
        )
        try:
            return response.json()
        except ValueError:
            raise MalformedResponse(
                f"{self.name}: HubSpot response is not JSON", provider=self.name
            ) from None

    def _results(self, body: Any, what: str) -> tuple[list[ProviderRecord], str | None]:
        """A search or list answer's objects and its paging token (None on the last page)."""
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise MalformedResponse(
                f"{self.name}: HubSpot {what} answer has no 'results' list", provider=self.name
            )
        after = ((body.get("paging") or {}).get("next") or {}).get("after")
        records = [parse_object(r, self.name) for r in body["results"]]
        return records, None if after is None else str(after)

    def _call(self, endpoint_name: str, **kwargs: Any) -> Flow[Any]:
        if self._quota_zone_unknown():
            yield from self._learn_quota_zone()
        try:
            response = yield Call(endpoint_name, kwargs, raw=True)
        except ProviderError as exc:
            raise map_error(
                exc, now=self.gateway.clock.now(), zone=quota_zone(self.settings)
            ) from exc
        return self._read(response)

    def _quota_zone_unknown(self) -> bool:
        """Whether to ask account-info now: no ``QUOTA_TIMEZONE``, no answer yet, and no
        failed ask within the last hour."""
        if self.settings.quota_timezone:
            return False
        key = _account_key(self.settings)
        if key in _ACCOUNT_ZONES:
            return False
        retry_at = _ACCOUNT_RETRY_AT.get(key)
        return retry_at is None or self.gateway.clock.now() >= retry_at

    def _learn_quota_zone(self) -> Flow[None]:
        """Ask account-info for the account's time zone, once per process (no
        ``QUOTA_TIMEZONE`` set). An answer without a zone, or a refusal (a token
        without the scope), settles on UTC; a failure (outage, timeout, 429) means
        UTC for now and another ask an hour later. Either is said once in the log."""
        settings = self.settings
        key = _account_key(settings)
        zone: tzinfo | None = None
        answered = True
        reason = "its answer names no time zone that zoneinfo knows"
        try:
            body = yield Call(endpoint(settings, "account_info", "/account-info/v3/details"))
        except ProviderRejected as exc:
            reason = str(exc)
        except ProviderError as exc:
            reason, answered = f"{exc}; asked again in an hour", False
        else:
            zone = account_zone(body)
        with _ACCOUNT_LOCK:
            first = key not in _ACCOUNT_ZONES and key not in _ACCOUNT_RETRY_AT
            if answered:
                _ACCOUNT_ZONES[key] = zone or UTC
                _ACCOUNT_RETRY_AT.pop(key, None)
            else:
                _ACCOUNT_RETRY_AT[key] = self.gateway.clock.now() + _ACCOUNT_RETRY
        if zone is None and first:
            from ..observability._logs import get_logger

            variable = f"IDIS_PROVIDER_{self.name.upper()}_QUOTA_TIMEZONE"
            get_logger().warning(
                "idis.hubspot.quota_timezone_unknown",
                msg=(
                    f"{self.name}: HubSpot's account-info did not give the account's time zone "
                    f"({reason}); the daily quota is taken to reset at midnight UTC. Set "
                    f"{variable} to the account's time zone (an IANA name such as US/Eastern)"
                ),
                provider=self.name,
            )

    def _get_record(self, record_id: str) -> Flow[ProviderRecord | None]:
        """The object, or None when HubSpot answers 404."""
        try:
            body = yield from self._call(
                self._path("deal", "/{id}"),
                path_params={"id": record_id},
                params={"properties": MODIFIED},
                not_found_ok=True,
            )
        except ProviderRejected as exc:
            if exc.status_code == 404:
                return None
            raise
        return parse_object(body, self.name)

    def _list_records(
        self, *, updated_since: datetime | None = None, cursor: str | None = None, limit: int = 100
    ) -> Flow[RecordPage]:
        """One page of every object (``updated_since`` is served by :meth:`changes`)."""
        params: dict[str, Any] = {"limit": min(limit, 100), "properties": MODIFIED}
        if cursor:
            params["after"] = cursor
        from . import RecordPage

        body = yield from self._call(self._path("deals"), params=params)
        return RecordPage(*self._results(body, "list"))

    def _changes(
        self, *, after: str | int | None = None, since: datetime | None = None, limit: int = 100
    ) -> Flow[ChangesPage]:
        """One CRM-search page after the opaque cursor ``after`` (or modified since ``since``)."""
        from . import ChangesPage

        cursor = self._start(after, since)
        # A search is a read sent as a POST: safe to repeat, so the gateway retries it.
        body = yield from self._call(
            self._path("deals_search", "/search"),
            method="POST",
            json=search_body(cursor, limit),
            idempotent=True,
        )
        records, token = self._results(body, "search")
        moved, more = next_cursor(cursor, records, token)
        events = [_poll_event(r, self.object_type) for r in records]
        return ChangesPage(events, None, more, next_cursor=moved.encode())

    def _replay(
        self, since: datetime, *, cursor: str | None = None, limit: int = 100
    ) -> Flow[ReplayPage]:
        """Objects modified since ``since`` (current states): HubSpot's replay by search."""
        from . import ReplayPage

        page = yield from self._changes(after=cursor, since=since, limit=limit)
        return ReplayPage(page.events, page.next_cursor if page.has_more else None)


class HubSpotClient(_HubSpotFlows, ReplayPages):
    """Sync HubSpot adapter: deals by CRM search (polling, replay) and by id (resync, verify)."""

    gateway: Gateway

    get_record = sync_face(_HubSpotFlows._get_record)
    list_records = sync_face(_HubSpotFlows._list_records)
    changes = sync_face(_HubSpotFlows._changes)
    replay = sync_face(_HubSpotFlows._replay)
    health = sync_face(_HubSpotFlows._health)


class AsyncHubSpotClient(_HubSpotFlows, AsyncReplayPages):
    """Async twin of :class:`HubSpotClient`."""

    gateway: AsyncGateway

    get_record = async_face(_HubSpotFlows._get_record)
    list_records = async_face(_HubSpotFlows._list_records)
    changes = async_face(_HubSpotFlows._changes)
    replay = async_face(_HubSpotFlows._replay)
    health = async_face(_HubSpotFlows._health)


# --------------------------------------------------------------------------- the pack


class HubSpotPack(PackBase):
    """HubSpot CRM (deals)."""

    name = "hubspot"
    summary = "HubSpot CRM deals: webhooks v3 (batched), CRM search polling, OAuth or app token."
    capabilities = Capabilities(
        webhooks="X-HubSpot-Signature-v3 (5-minute window); v1/v2 for legacy apps; batched",
        polling="CRM search on hs_lastmodifieddate (re-anchored before 10,000 results)",
        replay="CRM search since the window start (current states, not each change)",
        replay_window="unbounded for current states; deletions only by webhook or resync",
        resync=True,
        auth=("oauth refresh_token", "private-app token (API_TOKEN)"),
        rate_limit_headers=(
            "X-HubSpot-RateLimit-Daily",
            "X-HubSpot-RateLimit-Daily-Remaining",
            "X-HubSpot-RateLimit-Interval-Milliseconds",
            "X-HubSpot-RateLimit-Max",
            "X-HubSpot-RateLimit-Remaining",
        ),
        ordering="modified (hs_lastmodifieddate / occurredAt), ties by event id",
        event_identity="derived: subscriptionType, objectId, occurredAt, propertyName",
    )
    endpoints: Mapping[str, str] = {}
    client_class = HubSpotClient
    async_client_class = AsyncHubSpotClient

    def webhook_scheme(self, settings: ProviderSettings) -> HubSpotSignature | None:
        """v3 signatures keyed by ``WEBHOOK_SECRETS``, else the app's ``CLIENT_SECRET``."""
        secrets: tuple[Secret, ...] = settings.webhook_secrets or (
            (settings.auth.client_secret,) if settings.auth.client_secret else ()
        )
        if not secrets:
            return None
        return HubSpotSignature(
            secrets,
            public_url=settings.webhook_public_url or None,
            label=f"IDIS_PROVIDER_{settings.name.upper()}_WEBHOOK_SECRETS",
        )

    webhook_events = staticmethod(webhook_events)
    read_rate_limit = staticmethod(read_rate_limit)
    # Without settings here, a DAILY 429's reset is midnight UTC (see error_hook).
    map_error = staticmethod(map_error)

    def error_hook(
        self, settings: ProviderSettings, clock: Clock
    ) -> Callable[[ProviderError], ProviderError]:
        """The gateway's response hook for one provider: :meth:`map_error` with the time of
        the gateway's clock and the quota's time zone (``QUOTA_TIMEZONE``), so a ``DAILY``
        429 pauses the provider until the next midnight there."""

        def hook(exc: ProviderError) -> ProviderError:
            # Read at each refusal: account-info may answer after the hook is made.
            return map_error(exc, now=clock.now(), zone=quota_zone(settings))

        return hook

    def update_call(
        self, settings: ProviderSettings, record_id: str, data: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``PATCH /crm/v3/objects/deals/{id}`` with ``{"properties": data}`` (property values
        as HubSpot stores them: text)."""
        return {
            "endpoint": endpoint(settings, "deal", "/crm/v3/objects/deals/{id}"),
            "method": "PATCH",
            "path_params": {"id": record_id},
            "json": {"properties": {k: None if v is None else str(v) for k, v in data.items()}},
        }


HUBSPOT = register_pack(HubSpotPack())
