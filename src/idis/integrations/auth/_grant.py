"""The token logic as pure code: build grant requests, read token responses, decide what to do.

No I/O and no sleeping here; time is passed in. The sync and async token
managers (``tokens.py``) drive these functions, so every decision exists once.

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
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Literal
from urllib.parse import quote

from ..config import ProviderSettings, RetryPolicy
from ..exceptions import (
    AuthError,
    MalformedResponse,
    ProviderError,
    ReauthorizationRequired,
)
from ..observability._logs import redact_text
from ._vault import ClientCredentials

__all__ = [
    "AccessToken",
    "Action",
    "CredentialsRejected",
    "Decision",
    "IssuedToken",
    "Mode",
    "PreparedTokenRequest",
    "TokenRequestRejected",
    "basic_authorization",
    "build_token_request",
    "decide",
    "failure_backoff",
    "parse_token_response",
    "resolve_url",
]

#: The logical endpoint name token calls are counted under.
TOKEN_ENDPOINT = "token"  # noqa: S105  # an endpoint label, not a password
#: Longest pause between automatic refresh attempts after repeated failures, in seconds.
MAX_FAILURE_BACKOFF = 300.0
#: First pause after a failed refresh, in seconds.
FIRST_FAILURE_BACKOFF = 5.0
_DESCRIPTION_LIMIT = 200

#: Why a token is being asked for.
#: ``ensure``: a caller needs a usable token (refresh if due);
#: ``rejected``: the provider answered 401 to the token of ``rejected_generation``;
#: ``force``: an operator asked for a refresh now (ignores backoff and reauthorization state).
Mode = Literal["ensure", "rejected", "force"]


class CredentialsRejected(ReauthorizationRequired):
    """The token endpoint rejected the client credentials (invalid_client).

    Check CLIENT_ID / CLIENT_SECRET (or the Vault secret), or rotate them with
    ``idis-integrations rotate-credentials``.
    """


class TokenRequestRejected(AuthError):
    """The token endpoint refused the request for a reason retrying will not fix (4xx)."""

    retryable = False


@dataclass(frozen=True, slots=True, eq=False)
class AccessToken:
    """A usable access token; ``repr`` and ``str`` never show the secrets.

    Thread-safe (immutable). ``generation`` grows with every new token of the
    provider, across processes, so "has someone refreshed since?" needs no secret.
    """

    #: Provider name.
    provider: str
    #: The bearer token itself.
    access_token: str
    #: ``Bearer`` unless the provider said otherwise.
    token_type: str
    #: When it expires (aware UTC), or None if the provider did not say.
    expires_at: datetime | None
    #: Granted scopes.
    scopes: tuple[str, ...]
    #: Per-provider counter of issued tokens (from the database row).
    generation: int
    #: The refresh token that came with it, if any.
    refresh_token: str | None = None

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

    def __repr__(self) -> str:
        expires = self.expires_at.isoformat() if self.expires_at else None
        return (
            f"AccessToken(provider={self.provider!r}, token_type={self.token_type!r}, "
            f"expires_at={expires!r}, scopes={self.scopes!r}, generation={self.generation})"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True, eq=False)
class IssuedToken:
    """A successful token response, parsed; ``repr`` hides the tokens."""

    access_token: str
    token_type: str
    expires_at: datetime | None
    refresh_token: str | None
    scopes: tuple[str, ...]
    issued_at: datetime

    def __repr__(self) -> str:
        return f"IssuedToken(token_type={self.token_type!r}, expires_at={self.expires_at!r})"


@dataclass(frozen=True, slots=True)
class PreparedTokenRequest:
    """A token request ready to send (the body holds secrets: never log it)."""

    url: str
    headers: dict[str, str]
    body: str

    def __repr__(self) -> str:
        return f"PreparedTokenRequest(url={self.url!r})"


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


def _json_object(content: bytes) -> dict[str, Any] | None:
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

    document = _json_object(content)
    if 200 <= status < 300:
        if document is None or not isinstance(document.get("access_token"), str):
            raise MalformedResponse(
                f"{provider} token endpoint answered {status} without an access_token",
                provider=provider,
                endpoint=TOKEN_ENDPOINT,
                status_code=status,
            )
        params = dict(document)
        expires_in = params.get("expires_in")
        # authlib would compute expires_at from time.time(); give it our clock's.
        params.pop("expires_at", None)
        if expires_in is not None:
            try:
                params["expires_at"] = int(now.timestamp() + float(expires_in))
            except (TypeError, ValueError):
                raise MalformedResponse(
                    f"{provider} token endpoint sent expires_in={expires_in!r}: "
                    "expected a number of seconds",
                    provider=provider,
                    endpoint=TOKEN_ENDPOINT,
                    status_code=status,
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
        raise MalformedResponse(
            f"{provider} token endpoint answered HTTP {status}",
            provider=provider,
            endpoint=TOKEN_ENDPOINT,
            status_code=status,
        )
    if not error.retryable or not error.provider_fault:
        raise TokenRequestRejected(
            f"{provider} token endpoint refused the request (HTTP {status})", provider=provider
        )
    raise error


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed token request may be sent again (network, timeout, 5xx, 429, malformed)."""
    return isinstance(exc, ProviderError) and exc.retryable and exc.provider_fault


def retry_wait(
    policy: RetryPolicy, retry_number: int, exc: BaseException, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry ``retry_number`` of a token request."""
    from ..resilience._policy import backoff_cap, full_jitter

    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float):
        return min(float(retry_after), policy.retry_after_cap)
    return full_jitter(backoff_cap(policy, retry_number), rng)


def failure_backoff(consecutive_failures: int) -> float:
    """Seconds before the next automatic attempt after ``consecutive_failures`` failed refreshes.

    Shared by every caller and replica (stored in the row), so a token endpoint
    outage costs one attempt per interval, not one per provider call.
    """
    exponent = min(max(consecutive_failures - 1, 0), 16)
    return float(min(MAX_FAILURE_BACKOFF, FIRST_FAILURE_BACKOFF * 2**exponent))


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
    """
    if mode == "force":
        return Decision(Action.REFRESH)
    if stored_state == "reauthorization_required":
        return Decision(Action.REAUTHORIZE)
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
        if mode == "ensure" and candidate is not None and not candidate.is_expired(now):
            return Decision(Action.USE, retry_in=waiting)
        return Decision(Action.BACKOFF, retry_in=waiting)
    return Decision(Action.REFRESH)
