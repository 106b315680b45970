"""The simulator's OAuth 2 server: token endpoint, revocation, and credential rotation.

Per provider, under ``/p/{provider}/oauth/``:

* ``POST token`` (form-encoded): ``grant_type=client_credentials`` (client
  authentication by form fields or HTTP Basic) and ``grant_type=refresh_token``
  with refresh-token *rotation*: every refresh issues a new refresh token and
  invalidates the old one; sending an old one again is ``400 invalid_grant``
  and is counted as reuse.
* ``POST revoke`` (RFC 7009): revokes a refresh or access token.
* ``POST rotate``: authenticated with the current client credentials, returns
  a new ``client_secret``; the old one keeps working for a grace period (and
  optionally a number of uses) and then stops.

Every provider starts with the client ``idis-local`` / ``local-simulator-secret``,
the credentials the embedded default settings use. Times come from the
simulator's clock, so short token lifetimes can be tested without sleeping.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._state import SimulatorInputError, SimulatorState, _apply, _given, _integer, _number

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "OAuthClient",
    "OAuthError",
    "OAuthState",
    "revoke_endpoint",
    "rotate_endpoint",
    "token_endpoint",
    "token_fingerprint",
]

DEFAULT_CLIENT_ID = "idis-local"
DEFAULT_CLIENT_SECRET = "local-simulator-secret"  # noqa: S105  # public simulator default
DEFAULT_SCOPES: tuple[str, ...] = ("records:read", "records:write", "enrich:read")
OAUTH_COUNTERS = (
    *("tokens_issued", "client_credentials_grants", "refreshes", "refresh_failures"),
    *("reuse_detected", "invalid_client", "revocations", "rotations"),
)


class OAuthError(Exception):  # an OAuth error response, named as RFC 6749 does
    """An OAuth error response (RFC 6749 section 5.2)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(slots=True)
class _OldSecret:
    secret: str
    valid_until: datetime | None
    uses_left: int | None


@dataclass(slots=True)
class OAuthClient:
    """A registered client and the secrets it may authenticate with."""

    client_id: str
    secret: str
    #: Scopes this client may be granted; None allows any.
    allowed_scopes: tuple[str, ...] | None = None
    previous: list[_OldSecret] = field(default_factory=list)


@dataclass(slots=True)
class _AccessToken:
    client_id: str
    scopes: tuple[str, ...]
    expires_at: datetime
    revoked: bool = False


@dataclass(slots=True)
class _RefreshToken:
    client_id: str
    scopes: tuple[str, ...]
    family: int
    #: "active", "rotated" (used once already) or "revoked".
    status: str = "active"
    requests: int = 0


def token_fingerprint(token: str) -> str:
    """A short, stable stand-in for a token in stats: ``sha256:`` and 12 hex digits.

    Stats are printed, logged and pasted into bug reports; a live refresh token
    there could be replayed. The fingerprint still tells tokens apart and lets a
    test match the token it holds (``token_fingerprint(token)``).
    """
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def _scope_names(scopes: Sequence[str] | None) -> tuple[str, ...] | None:
    """``scopes`` checked (a list of scope names), or None when not given."""
    if scopes is not None and (
        isinstance(scopes, str) or not all(isinstance(s, str) and s for s in scopes)
    ):
        raise SimulatorInputError(
            f"scopes={scopes!r} must be a list of scope names", variable="scopes"
        )
    return None if scopes is None else tuple(scopes)


class OAuthState:
    """Clients, issued tokens, settings and counters of one provider's OAuth server."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.clients: dict[str, OAuthClient] = {
            DEFAULT_CLIENT_ID: OAuthClient(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
        }
        self.access_tokens: dict[str, _AccessToken] = {}
        self.refresh_tokens: dict[str, _RefreshToken] = {}
        #: Seconds an access token lives.
        self.access_token_lifetime = 3600.0
        #: Scopes granted when the request names none.
        self.default_scopes: tuple[str, ...] = DEFAULT_SCOPES
        #: Whether the client-credentials grant also returns a refresh token.
        self.issue_refresh_token = True
        #: Seconds the previous client secret keeps working after a rotation.
        self.rotation_grace_seconds = 300.0
        #: Successful uses the previous secret gets after a rotation (None: unlimited).
        self.rotation_grace_uses: int | None = None
        #: Reusing a rotated refresh token revokes every token of its family (OAuth 2.1).
        self.revoke_family_on_reuse = False
        self._families = 0
        #: What happened, by :data:`OAUTH_COUNTERS` name (each shown in the stats, 0 included).
        self.counts: Counter[str] = Counter(dict.fromkeys(OAUTH_COUNTERS, 0))
        #: Refresh-grant requests per refresh token sent, keyed by :func:`token_fingerprint`.
        self.refresh_requests: Counter[str] = Counter()

    # ------------------------------------------------------------------ settings

    def configure(
        self,
        *,
        access_token_lifetime: float | None = None,
        scopes: Sequence[str] | None = None,
        issue_refresh_token: bool | None = None,
        rotation_grace_seconds: float | None = None,
        rotation_grace_uses: int | None = None,
        revoke_family_on_reuse: bool | None = None,
    ) -> None:
        """Change OAuth settings; ``None`` leaves a value unchanged.

        ``rotation_grace_uses=-1`` removes the limit on uses of the previous secret.

        Raises:
            SimulatorInputError: naming the bad argument.
        """
        lifetime = _given(_number, access_token_lifetime, "access_token_lifetime", minimum=0.0)
        if lifetime == 0:
            raise SimulatorInputError(
                "access_token_lifetime=0 must be a positive number",
                variable="access_token_lifetime",
            )
        changes = {
            "access_token_lifetime": lifetime,
            "default_scopes": _scope_names(scopes),
            "issue_refresh_token": None
            if issue_refresh_token is None
            else bool(issue_refresh_token),
            "rotation_grace_seconds": _given(
                _number, rotation_grace_seconds, "rotation_grace_seconds", minimum=0.0
            ),
            "rotation_grace_uses": _given(
                _integer, rotation_grace_uses, "rotation_grace_uses", minimum=-1
            ),
            "revoke_family_on_reuse": (
                None if revoke_family_on_reuse is None else bool(revoke_family_on_reuse)
            ),
        }
        _apply(self, changes)
        if rotation_grace_uses == -1:
            self.rotation_grace_uses = None

    def set_client(
        self, client_id: str, client_secret: str, scopes: Sequence[str] | None = None
    ) -> OAuthClient:
        """Register or replace a client (its old secrets stop working at once)."""
        if not (isinstance(client_id, str) and client_id) or not (
            isinstance(client_secret, str) and client_secret
        ):
            raise ValueError("client_id and client_secret must be non-empty strings")
        client = OAuthClient(client_id, client_secret, _scope_names(scopes))
        self.clients[client_id] = client
        return client

    # ------------------------------------------------------------------ grants

    def authenticate(
        self, client_id: str | None, client_secret: str | None, now: datetime
    ) -> OAuthClient:
        """The client these credentials belong to.

        Raises:
            OAuthError: ``invalid_client`` (401).
        """
        client = self.clients.get(client_id or "")
        if client is not None and client_secret:
            if hmac.compare_digest(client.secret.encode(), client_secret.encode()):
                return client
            for old in client.previous:
                if not hmac.compare_digest(old.secret.encode(), client_secret.encode()):
                    continue
                expired = old.valid_until is not None and now >= old.valid_until
                if expired or old.uses_left == 0:
                    break
                if old.uses_left is not None:
                    old.uses_left -= 1
                return client
        self.counts["invalid_client"] += 1
        raise OAuthError("invalid_client", "client authentication failed", 401)

    def _scopes(self, client: OAuthClient, requested: str | None) -> tuple[str, ...]:
        if not requested:
            wanted = self.default_scopes
        else:
            wanted = tuple(s for s in requested.split(" ") if s)
        if client.allowed_scopes is not None:
            extra = [s for s in wanted if s not in client.allowed_scopes]
            if extra:
                raise OAuthError("invalid_scope", f"scope not allowed: {' '.join(extra)}")
        return wanted

    def _issue(
        self,
        client_id: str,
        scopes: tuple[str, ...],
        now: datetime,
        *,
        refresh: bool,
        family: int | None,
    ) -> dict[str, Any]:
        access = "at_" + secrets.token_urlsafe(24)
        self.access_tokens[access] = _AccessToken(
            client_id, scopes, now + timedelta(seconds=self.access_token_lifetime)
        )
        self.counts["tokens_issued"] += 1
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": int(self.access_token_lifetime)
            if self.access_token_lifetime == int(self.access_token_lifetime)
            else self.access_token_lifetime,
            "scope": " ".join(scopes),
        }
        if refresh:
            if family is None:
                self._families += 1
                family = self._families
            token = "rt_" + secrets.token_urlsafe(32)
            self.refresh_tokens[token] = _RefreshToken(client_id, scopes, family)
            body["refresh_token"] = token
        return body

    def client_credentials(
        self, client_id: str | None, client_secret: str | None, scope: str | None, now: datetime
    ) -> dict[str, Any]:
        """The client-credentials grant.

        Raises:
            OAuthError: invalid_client or invalid_scope.
        """
        client = self.authenticate(client_id, client_secret, now)
        scopes = self._scopes(client, scope)
        self.counts["client_credentials_grants"] += 1
        return self._issue(
            client.client_id, scopes, now, refresh=self.issue_refresh_token, family=None
        )

    def issue(self, client_id: str, scope: str | None, now: datetime) -> dict[str, Any]:
        """Mint a token pair as if an authorization-code flow had just completed."""
        client = self.clients.get(client_id)
        if client is None:
            raise ValueError(f"client_id={client_id!r} is not a registered client")
        return self._issue(
            client.client_id, self._scopes(client, scope), now, refresh=True, family=None
        )

    def refresh(
        self,
        refresh_token: str | None,
        client_id: str | None,
        client_secret: str | None,
        scope: str | None,
        now: datetime,
    ) -> dict[str, Any]:
        """The refresh-token grant with rotation.

        Raises:
            OAuthError: invalid_request, invalid_client or invalid_grant.
        """
        if not refresh_token:
            raise OAuthError("invalid_request", "refresh_token is required")
        self.refresh_requests[token_fingerprint(refresh_token)] += 1
        # Confidential clients authenticate; a public client sends only its id.
        owner = client_id
        if client_secret is not None:
            owner = self.authenticate(client_id, client_secret, now).client_id
        stored = self.refresh_tokens.get(refresh_token)
        if stored is None:
            self.counts["refresh_failures"] += 1
            raise OAuthError("invalid_grant", "refresh token is unknown")
        stored.requests += 1
        if stored.status == "rotated":
            self.counts["reuse_detected"] += 1
            self.counts["refresh_failures"] += 1
            if self.revoke_family_on_reuse:
                self._revoke_family(stored.family)
            raise OAuthError("invalid_grant", "refresh token was already used")
        if stored.status != "active":
            self.counts["refresh_failures"] += 1
            raise OAuthError("invalid_grant", "refresh token was revoked")
        if owner and owner != stored.client_id:
            self.counts["refresh_failures"] += 1
            raise OAuthError("invalid_grant", "refresh token belongs to another client")
        scopes = stored.scopes
        if scope:
            narrowed = tuple(s for s in scope.split(" ") if s)
            if any(s not in stored.scopes for s in narrowed):
                self.counts["refresh_failures"] += 1
                raise OAuthError("invalid_scope", "refresh cannot widen the granted scope")
            scopes = narrowed
        stored.status = "rotated"
        self.counts["refreshes"] += 1
        return self._issue(stored.client_id, scopes, now, refresh=True, family=stored.family)

    def grant(
        self,
        grant_type: str | None,
        form: dict[str, str],
        client_id: str | None,
        client_secret: str | None,
        now: datetime,
    ) -> dict[str, Any]:
        """Dispatch a token request by ``grant_type``.

        Raises:
            OAuthError: for a missing or unsupported grant type, or the grant's own errors.
        """
        if grant_type == "client_credentials":
            return self.client_credentials(client_id, client_secret, form.get("scope"), now)
        if grant_type == "refresh_token":
            return self.refresh(
                form.get("refresh_token"), client_id, client_secret, form.get("scope"), now
            )
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")

    def _revoke_family(self, family: int) -> None:
        for token in self.refresh_tokens.values():
            if token.family == family:
                token.status = "revoked"

    def revoke(self, token: str) -> bool:
        """Revoke a refresh or access token; True if it existed."""
        if token in self.refresh_tokens:
            self.refresh_tokens[token].status = "revoked"
        elif token in self.access_tokens:
            self.access_tokens[token].revoked = True
        else:
            return False
        self.counts["revocations"] += 1
        return True

    def expire_access_tokens(self, now: datetime) -> int:
        """Make every issued access token expired now; return how many."""
        for token in self.access_tokens.values():
            token.expires_at = min(token.expires_at, now)
        return len(self.access_tokens)

    def rotate(
        self, client_id: str | None, client_secret: str | None, now: datetime
    ) -> dict[str, Any]:
        """Issue a new client secret; the old one stays valid for the grace period.

        Raises:
            OAuthError: invalid_client.
        """
        client = self.authenticate(client_id, client_secret, now)
        old = _OldSecret(
            client.secret,
            now + timedelta(seconds=self.rotation_grace_seconds),
            self.rotation_grace_uses,
        )
        client.previous = [old]
        client.secret = "cs_" + secrets.token_urlsafe(24)
        self.counts["rotations"] += 1
        return {
            "client_id": client.client_id,
            "client_secret": client.secret,
            "previous_secret_valid_until": (
                old.valid_until.isoformat().replace("+00:00", "Z") if old.valid_until else None
            ),
            "previous_secret_uses": old.uses_left,
        }

    def validate_bearer(self, token: str, now: datetime) -> bool:
        """True for an issued, unrevoked, unexpired access token."""
        stored = self.access_tokens.get(token)
        return stored is not None and not stored.revoked and now < stored.expires_at

    def stats(self) -> dict[str, Any]:
        """Counters for the stats API."""
        return dict(self.counts) | {
            "refresh_requests": dict(self.refresh_requests),
            "access_token_lifetime": self.access_token_lifetime,
        }


# --------------------------------------------------------------------------- HTTP


def _form(body: bytes) -> dict[str, str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OAuthError("invalid_request", "body is not UTF-8 form data") from None
    return dict(parse_qsl(text, keep_blank_values=True))


def _required(form: dict[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise OAuthError("invalid_request", f"{name} is required")
    return value


def _basic(request: Request) -> tuple[str | None, str | None]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None, None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "malformed Basic credentials", 401) from None
    user, sep, password = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials", 401)
    # RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote(user.replace("+", " ")), unquote(password.replace("+", " "))


def _credentials(request: Request, form: dict[str, str]) -> tuple[str | None, str | None]:
    user, password = _basic(request)
    if user is not None:
        return user, password
    return form.get("client_id"), form.get("client_secret")


def _error(exc: OAuthError) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="simulator"'
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers=headers,
    )


def _sim(request: Request) -> SimulatorState:
    return request.app.state.sim  # type: ignore[no-any-return]  # Starlette's app.state is untyped


async def token_endpoint(request: Request) -> Response:
    """``POST /p/{provider}/oauth/token``."""
    sim = _sim(request)
    body = await request.body()
    try:
        form = _form(body)
        client_id, client_secret = _credentials(request, form)
        grant = form.get("grant_type")
        with sim.lock:
            oauth = sim.provider(request.path_params["provider"]).oauth
            result = oauth.grant(grant, form, client_id, client_secret, sim.now())
    except OAuthError as exc:
        return _error(exc)
    return JSONResponse(result, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def salesforce_token_endpoint(request: Request) -> Response:
    """``POST /p/{provider}/services/oauth2/token`` (and ``/p/{provider}/login/...``, the
    login host): the token answer with Salesforce's ``instance_url``, the org's API base
    (``/p/{provider}`` on this simulator).
    """
    response = await token_endpoint(request)
    if response.status_code != 200:
        return response
    body = json.loads(bytes(response.body))
    origin = f"{request.url.scheme}://{request.url.netloc}"
    body["instance_url"] = f"{origin}/p/{request.path_params['provider']}"
    return JSONResponse(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def revoke_endpoint(request: Request) -> Response:
    """``POST /p/{provider}/oauth/revoke`` (RFC 7009: 200 even for unknown tokens)."""
    sim = _sim(request)
    try:
        form = _form(await request.body())
        client_id, client_secret = _credentials(request, form)
        with sim.lock:
            oauth = sim.provider(request.path_params["provider"]).oauth
            oauth.authenticate(client_id, client_secret, sim.now())
            oauth.revoke(_required(form, "token"))
    except OAuthError as exc:
        return _error(exc)
    return Response(status_code=200)


async def rotate_endpoint(request: Request) -> Response:
    """``POST /p/{provider}/oauth/rotate``: returns a new client secret."""
    sim = _sim(request)
    try:
        raw = await request.body()
        form: dict[str, str] = {}
        if request.headers.get("content-type", "").startswith("application/json") and raw:
            import json

            try:
                parsed = json.loads(raw)
            except ValueError:
                raise OAuthError("invalid_request", "body is not JSON") from None
            if isinstance(parsed, dict):
                form = {k: str(v) for k, v in parsed.items()}
        elif raw:
            form = _form(raw)
        client_id, client_secret = _credentials(request, form)
        with sim.lock:
            oauth = sim.provider(request.path_params["provider"]).oauth
            result = oauth.rotate(client_id, client_secret, sim.now())
    except OAuthError as exc:
        return _error(exc)
    return JSONResponse(result, headers={"Cache-Control": "no-store"})
