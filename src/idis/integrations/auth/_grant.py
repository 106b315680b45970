"""The token logic as pure code: build grant requests, read token responses, decide what to do.

No I/O and no sleeping here; time is passed in. The token flow (``_flow.py``),
which both token managers drive, calls these functions, so every decision
exists once.

Requests and responses follow RFC 6749 through authlib's own helpers
(``prepare_token_request``, ``ClientAuth``, ``OAuth2Token``); authlib's HTTP
clients are not used (they refresh only before a request, never on a 401,
and hold no lock across threads or processes).
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Literal
from urllib.parse import quote

from .._backoff import Backoff
from ..config import ProviderSettings, RetryPolicy
from ..exceptions import (
    ConfigError,
    CredentialsRejected,
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    ReauthorizationRequired,
    TokenRequestRejected,
)
from ..observability._logs import redact_text
from ._vault import ClientCredentials

__all__ = [
    "REFRESH_FAILURE_BACKOFF",
    "AccessToken",
    "Action",
    "Decision",
    "IssuedToken",
    "Mode",
    "PreparedTokenRequest",
    "basic_authorization",
    "build_token_request",
    "decide",
    "lost_answer",
    "parse_imported_token",
    "parse_token_response",
    "request_backoff",
    "resolve_url",
    "retry_wait",
]

#: The logical endpoint name token calls are counted under.
TOKEN_ENDPOINT = "token"  # noqa: S105  # an endpoint label, not a password
#: Pause before the next automatic refresh after ``n`` failed refreshes in a row
#: (stored in the row, so shared by every caller and replica: a token endpoint
#: outage costs one attempt per interval, not one per provider call). Equal
#: jitter keeps at least half of each step, so a held refresh is never retried
#: at once, while replicas that failed together spread out.
REFRESH_FAILURE_BACKOFF = Backoff(initial=5.0, maximum=300.0, multiplier=2.0, jitter="equal")
_DESCRIPTION_LIMIT = 200

#: Why a token is being asked for.
#: ``ensure``: a caller needs a usable token (refresh if due);
#: ``rejected``: the provider answered 401 to the token of ``rejected_generation``;
#: ``force``: an operator asked for a refresh now (ignores backoff and reauthorization state).
Mode = Literal["ensure", "rejected", "force"]


@dataclass(frozen=True, slots=True, eq=False)
class AccessToken:
    """A usable access token; ``repr`` and ``str`` never show the secrets.

    Thread-safe (immutable). ``generation`` grows with every new token of the
    provider, across processes, so "has someone refreshed since?" needs no secret.
    """

    #: Provider name.
    provider: str
    #: The bearer token itself (like the refresh token, never in ``repr``).
    access_token: str = field(repr=False)
    #: ``Bearer`` unless the provider said otherwise.
    token_type: str
    #: When it expires (aware UTC), or None if the provider did not say.
    expires_at: datetime | None
    #: Granted scopes.
    scopes: tuple[str, ...]
    #: Per-provider counter of issued tokens (from the database row).
    generation: int
    #: The refresh token that came with it, if any.
    refresh_token: str | None = field(default=None, repr=False)
    #: The API base the token is for, when the token response named one (Salesforce's
    #: ``instance_url``): calls to the provider's ``BASE_URL`` go there instead. Not a secret,
    #: but not in ``repr`` either (an org's host names the customer).
    instance_url: str | None = field(default=None, repr=False)

    def seconds_left(self, now: datetime) -> float | None:
        """Seconds until expiry at ``now`` (negative once expired), None if unknown."""
        return None if self.expires_at is None else (self.expires_at - now).total_seconds()

    def is_expired(self, now: datetime) -> bool:
        """Whether the token has expired at ``now``."""
        return self.expires_at is not None and self.expires_at <= now

    def is_fresh(self, now: datetime, margin: float) -> bool:
        """Whether it stays valid for more than ``margin`` seconds."""
        return self.expires_at is None or (self.expires_at - now).total_seconds() > margin

    @property
    def authorization(self) -> str:
        """The ``Authorization`` header value."""
        kind = "Bearer" if self.token_type.lower() == "bearer" else self.token_type
        return f"{kind} {self.access_token}"


@dataclass(frozen=True, slots=True, eq=False)
class IssuedToken:
    """A successful token response, parsed; ``repr`` hides the tokens."""

    access_token: str = field(repr=False)
    token_type: str
    expires_at: datetime | None
    refresh_token: str | None = field(repr=False)
    scopes: tuple[str, ...]
    issued_at: datetime
    #: ``instance_url`` of the token response (Salesforce), when it is an http(s) origin
    #: (not in ``repr``, like the tokens: an org's host names the customer).
    instance_url: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class PreparedTokenRequest:
    """A token request ready to send (the body holds secrets: never log it)."""

    url: str
    headers: dict[str, str] = field(repr=False)
    body: str = field(repr=False)


def instance_url(value: object) -> str | None:
    """A token response's ``instance_url`` (Salesforce: the org's API base), or None.

    Only an http(s) URL without query, fragment or credentials is taken; anything else
    is ignored (the provider's ``BASE_URL`` stays the API base). Salesforce's token
    response names the org's server instance, the base of its REST calls:
    https://developer.salesforce.com/docs/atlas.en-us.chatterapi.meta/chatterapi/quickstart_connecting.htm
    """
    from urllib.parse import urlsplit

    if not isinstance(value, str) or len(value) > 255:
        return None
    parts = urlsplit(value.strip())
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        return None
    return value.strip().rstrip("/")


def resolve_url(base_url: str, url: str) -> str:
    """An absolute URL, or a path appended to the provider's base URL (keeping its path)."""
    if url.startswith(("http://", "https://")):
        return url
    return base_url.rstrip("/") + "/" + url.lstrip("/")


def build_token_request(
    provider: ProviderSettings,
    credentials: ClientCredentials | None,
    grant_type: Literal["client_credentials", "refresh_token"],
    *,
    refresh_token: str | None = None,
) -> PreparedTokenRequest:
    """Build an RFC 6749 token request with authlib's helpers.

    Args:
        provider: The provider's settings (token URL, scopes, client auth method).
        credentials: Client credentials; None (or an empty secret) authenticates
            as a public client (``client_id`` in the body).
        grant_type: ``client_credentials`` or ``refresh_token``.
        refresh_token: Required for the ``refresh_token`` grant.
    """
    from authlib.oauth2.auth import ClientAuth
    from authlib.oauth2.rfc6749.parameters import prepare_token_request

    params: dict[str, Any] = {}
    if grant_type == "refresh_token":
        if not refresh_token:
            raise ReauthorizationRequired(
                f"provider {provider.name!r} has no refresh token: re-authorize and import the "
                f"token with `idis-integrations import-token --provider {provider.name}`",
                provider=provider.name,
            )
        params["refresh_token"] = refresh_token
    elif provider.auth.scopes:
        params["scope"] = list(provider.auth.scopes)
    body = prepare_token_request(grant_type, **params)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Accept": "application/json",
    }
    url = resolve_url(provider.base_url, provider.auth.token_url)
    client_id = credentials.client_id if credentials else provider.auth.client_id
    secret = credentials.client_secret.get_secret_value() if credentials else ""
    method = provider.auth.client_auth if secret else "none"
    if client_id and method == "client_secret_basic":
        headers["Authorization"] = basic_authorization(client_id, secret)
    elif client_id:
        url, headers, body = ClientAuth(client_id, secret, method).prepare(
            "POST", url, headers, body
        )
    return PreparedTokenRequest(url=url, headers=dict(headers), body=body)


def basic_authorization(client_id: str, secret: str) -> str:
    """HTTP Basic client authentication as RFC 6749 section 2.3.1 specifies it.

    Both parts are form-urlencoded before base64 (authlib's client helper skips
    that step, which breaks secrets containing ``:``, ``%`` or ``+``).
    """
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _description(document: Mapping[str, Any]) -> str:
    text = document.get("error_description")
    if not isinstance(text, str) or not text.strip():
        return ""
    text = redact_text(" ".join(text.split()))
    return ": " + (text[:_DESCRIPTION_LIMIT] + "..." if len(text) > _DESCRIPTION_LIMIT else text)


def json_object(content: bytes) -> dict[str, Any] | None:
    """``content`` as a JSON object; None when it is not one (or not JSON at all)."""
    try:
        document = json.loads(content or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None


def parse_token_response(
    provider: str,
    status: int,
    content: bytes,
    *,
    now: datetime,
    grant_type: str,
    requested_scopes: Sequence[str],
    retry_after: float | None = None,
) -> IssuedToken:
    """Read a token endpoint's answer, or raise what it means.

    Raises:
        ReauthorizationRequired: ``invalid_grant``; a human must re-authorize.
        CredentialsRejected: ``invalid_client`` / ``unauthorized_client`` (or a bare 401).
        TokenRequestRejected: any other 4xx (never retried).
        ProviderError: a retryable fault (429 ``RateLimited``, 5xx, 408, malformed 2xx).
    """
    from authlib.oauth2.rfc6749 import OAuth2Token, scope_to_list

    from ..resilience._errors import error_for_status

    def malformed(what: str) -> MalformedResponse:
        return MalformedResponse(
            f"{provider} token endpoint {what}",
            provider=provider,
            endpoint=TOKEN_ENDPOINT,
            status_code=status,
        )

    document = json_object(content)
    if 200 <= status < 300:
        if document is None or not isinstance(document.get("access_token"), str):
            raise malformed(f"answered {status} without an access_token")
        params = dict(document)
        expires_in = params.get("expires_in")
        # authlib would compute expires_at from time.time(); give it our clock's.
        params.pop("expires_at", None)
        if expires_in is not None:
            try:
                params["expires_at"] = int(now.timestamp() + float(expires_in))
            except (TypeError, ValueError):
                raise malformed(
                    f"sent expires_in={expires_in!r}: expected a number of seconds"
                ) from None
        token = OAuth2Token(params)
        expires_at = now + timedelta(seconds=float(expires_in)) if expires_in is not None else None
        scope = token.get("scope")
        scopes = tuple(scope_to_list(scope) or ()) if scope else tuple(requested_scopes)
        refresh = token.get("refresh_token")
        return IssuedToken(
            access_token=str(token["access_token"]),
            token_type=str(token.get("token_type") or "Bearer"),
            expires_at=expires_at,
            refresh_token=str(refresh) if isinstance(refresh, str) and refresh else None,
            scopes=scopes,
            issued_at=now,
            instance_url=instance_url(document.get("instance_url")),
        )
    code = document.get("error") if document else None
    if isinstance(code, str) and 400 <= status < 500 and status not in (408, 429):
        detail = _description(document or {})
        if code == "invalid_grant":
            what = "refresh token" if grant_type == "refresh_token" else "grant"
            raise ReauthorizationRequired(
                f"{provider} token endpoint refused the {what} (invalid_grant{detail}): "
                "re-authorize, then `idis-integrations import-token --provider "
                f"{provider}`",
                provider=provider,
            )
        if code in ("invalid_client", "unauthorized_client"):
            raise CredentialsRejected(
                f"{provider} token endpoint rejected the client credentials ({code}{detail}): "
                "check the client id and secret, or rotate them with "
                f"`idis-integrations rotate-credentials --provider {provider}`",
                provider=provider,
            )
        raise TokenRequestRejected(
            f"{provider} token endpoint refused the request (HTTP {status}, {code}{detail})",
            provider=provider,
        )
    if status == 401:
        raise CredentialsRejected(
            f"{provider} token endpoint answered 401: the client credentials were not "
            f"accepted; check them or run `idis-integrations rotate-credentials --provider "
            f"{provider}`",
            provider=provider,
        )
    error = error_for_status(status, provider, TOKEN_ENDPOINT, retry_after=retry_after)
    if error is None:  # 1xx/3xx: redirects are not followed for token requests
        raise malformed(f"answered HTTP {status}")
    if not error.retryable or not error.provider_fault:
        raise TokenRequestRejected(
            f"{provider} token endpoint refused the request (HTTP {status})", provider=provider
        )
    raise error


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed token request may be sent again (network, timeout, 5xx, 429, malformed)."""
    return isinstance(exc, ProviderError) and exc.retryable and exc.provider_fault


def request_backoff(policy: RetryPolicy) -> Backoff:
    """The backoff between token requests of one refresh: the provider's retry policy's shape."""
    return Backoff(
        initial=policy.initial_backoff, maximum=policy.max_backoff, multiplier=policy.multiplier
    )


def retry_wait(
    policy: RetryPolicy,
    retry_number: int,
    exc: BaseException,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry ``retry_number`` of a token request.

    A ``Retry-After`` the endpoint sent wins (capped by ``retry_after_cap``);
    otherwise the provider's backoff, with full jitter (drawn from ``rng``, default
    the ``random`` module).
    """
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float):
        return min(float(retry_after), policy.retry_after_cap)
    return request_backoff(policy).delay(retry_number, rng)


def lost_answer(exc: BaseException) -> str | None:
    """Why a token request's outcome is unknown, or None when the server surely did not act on it.

    The request may have been processed (and a refresh token rotated) when it
    was sent completely and the answer was lost or useless: a read timeout, a
    connection dropped before or during the answer, a 5xx (the server, or a
    proxy in front of it, failed after receiving it), or a 2xx we could not
    read. Faults before the request was complete (connect errors and
    timeouts, pool timeouts, write errors and timeouts), 408, 429 and
    redirects mean the server did not act on it.
    """
    from .._http import httpx

    if isinstance(exc, MalformedResponse):
        # A 1xx/3xx answer (redirects are not followed) was not acted on; a 2xx (or a
        # body that could not be decoded) was.
        status = exc.status_code
        return "malformed_response" if status is None or 200 <= status < 300 else None
    if isinstance(exc, ProviderUnavailable):
        return "server_error"
    if not isinstance(exc, ProviderTimeout | ProviderConnectionError):
        return None
    if exc.status_code is not None:  # 408: the server says it did not get the whole request
        return None
    never_sent = (
        httpx.ConnectTimeout,
        httpx.ConnectError,
        httpx.PoolTimeout,
        httpx.WriteTimeout,
        httpx.WriteError,
        httpx.ProxyError,
    )
    if isinstance(exc.__cause__, never_sent):
        return None
    return "timeout" if isinstance(exc, ProviderTimeout) else "connection"


class Action(Enum):
    """What the token manager does next."""

    #: Hand out the candidate token.
    USE = "use"
    #: Ask the token endpoint for a new token.
    REFRESH = "refresh"
    #: A refresh is due but failures put it on hold, and no usable token is left.
    BACKOFF = "backoff"
    #: Automatic refreshes stopped: a human must re-authorize.
    REAUTHORIZE = "reauthorize"
    #: The last refresh's answer was lost and its refresh token may be spent: re-authorize.
    OUTCOME_UNKNOWN = "outcome_unknown"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`."""

    action: Action
    #: Seconds until the next automatic attempt is allowed (BACKOFF / USE-while-failing).
    retry_in: float = 0.0


def decide(
    *,
    mode: Mode,
    candidate: AccessToken | None,
    stored_state: str,
    next_attempt_at: datetime | None,
    now: datetime,
    margin: float,
    rejected_generation: int | None = None,
    reuse_until: datetime | None = None,
) -> Decision:
    """Decide between using the best known token, refreshing, or failing fast.

    Args:
        mode: Why a token is needed (see :data:`Mode`).
        candidate: The newest token known (memory or database), if any.
        stored_state: ``oauth_tokens.state``.
        next_attempt_at: No automatic attempt before this time (failure backoff).
        now: Current time.
        margin: Refresh this many seconds before expiry.
        rejected_generation: With ``mode="rejected"``, the generation the provider refused.
        reuse_until: In state ``refresh_outcome_unknown``, until when the provider still
            accepts the refresh token that was sent (its reuse grace); None: never.
    """
    # A still-valid token keeps plain callers going in every stopped state: the
    # provider answers 401 if it revoked it, and the state alerts meanwhile.
    usable = mode == "ensure" and candidate is not None and not candidate.is_expired(now)
    if stored_state == "refresh_outcome_unknown":
        if reuse_until is not None and now < reuse_until:
            return Decision(Action.REFRESH)
        # Even an operator's forced refresh would resend a possibly spent refresh token.
        return Decision(Action.USE) if usable else Decision(Action.OUTCOME_UNKNOWN)
    if mode == "force":
        return Decision(Action.REFRESH)
    if stored_state == "reauthorization_required":
        return Decision(Action.USE) if usable else Decision(Action.REAUTHORIZE)
    if mode == "rejected":
        newer = (
            candidate is not None
            and rejected_generation is not None
            and candidate.generation > rejected_generation
            and not candidate.is_expired(now)
        )
        if newer:
            return Decision(Action.USE)
    elif candidate is not None and candidate.is_fresh(now, margin):
        return Decision(Action.USE)
    waiting = (next_attempt_at - now).total_seconds() if next_attempt_at else 0.0
    if waiting > 0:
        # Failures put refreshes on hold; a still-valid token keeps callers going meanwhile
        # (except a token the provider just refused).
        if usable:
            return Decision(Action.USE, retry_in=waiting)
        return Decision(Action.BACKOFF, retry_in=waiting)
    return Decision(Action.REFRESH)


def _absolute_expiry(raw: object, now: datetime) -> datetime | None:
    if isinstance(raw, bool):
        return None
    try:
        if isinstance(raw, int | float):
            return datetime.fromtimestamp(float(raw), now.tzinfo)
        parsed = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return parsed if parsed.tzinfo is not None else None


def _relative_expiry(raw: object, now: datetime) -> datetime | None:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        return None
    try:
        return now + timedelta(seconds=float(raw))
    except (ValueError, OverflowError):
        return None


def parse_imported_token(
    document: Mapping[str, Any], *, now: datetime, default_scopes: tuple[str, ...] = ()
) -> IssuedToken:
    """Validate a token document given by an operator (``import-token``).

    Raises:
        ConfigError: naming the field that is missing or malformed (never its value).
    """
    if not isinstance(document, Mapping):
        raise ConfigError("the token must be a JSON object (a token endpoint response)")
    access = document.get("access_token")
    refresh = document.get("refresh_token")
    for name, value in (("access_token", access), ("refresh_token", refresh)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"token field {name!r} must be a non-empty string", variable=name)
    if not access and not refresh:
        raise ConfigError(
            "the token has neither 'access_token' nor 'refresh_token': expected a token "
            "endpoint response (RFC 6749 section 5.1)",
            variable="access_token",
        )
    expires_at: datetime | None = None
    if document.get("expires_at") is not None:
        expires_at = _absolute_expiry(document["expires_at"], now)
        if expires_at is None:
            raise ConfigError(
                "token field 'expires_at' must be epoch seconds or an ISO-8601 time with an "
                "offset (e.g. 2026-01-19T10:00:00Z)",
                variable="expires_at",
            )
    elif document.get("expires_in") is not None:
        expires_at = _relative_expiry(document["expires_in"], now)
        if expires_at is None:
            raise ConfigError(
                "token field 'expires_in' must be a number of seconds", variable="expires_in"
            )
    scope = document.get("scope", document.get("scopes"))
    if scope is None:
        scopes = tuple(default_scopes)
    elif isinstance(scope, str):
        scopes = tuple(scope.split())
    elif isinstance(scope, list | tuple) and all(isinstance(s, str) for s in scope):
        scopes = tuple(scope)
    else:
        raise ConfigError(
            "token field 'scope' must be a space-separated string or a list of strings",
            variable="scope",
        )
    token_type = document.get("token_type") or "Bearer"
    if not isinstance(token_type, str):
        raise ConfigError("token field 'token_type' must be a string", variable="token_type")
    return IssuedToken(
        access_token=str(access or ""),
        token_type=token_type,
        expires_at=expires_at,
        refresh_token=str(refresh) if refresh else None,
        scopes=scopes,
        issued_at=now,
        instance_url=instance_url(document.get("instance_url")),
    )
