"""Who may call the service, and how much it reads: authentication, tenant scope, body limits.

A copy of this service is what a host starts from, so the defaults are closed:

* **Authentication.** Every route needs a :class:`Principal` except ``/healthz``
  (the orchestrator's probe), ``/webhooks/...`` (providers sign their events; the
  library verifies them) and ``/metrics`` while ``IDIS_SERVICE_METRICS=public``.
  The principal comes from an ``authenticate(request) -> Principal | None`` hook:
  :func:`~.app.create_app` takes any such callable (an OIDC/JWT check, mTLS
  headers from a proxy, ...); the default, :class:`BearerTokens`, checks
  ``Authorization: Bearer`` against ``IDIS_SERVICE_API_TOKENS``.
* **Tenant scope.** A principal names the tenants it may see (``"*"``: all). Routes
  that return deals or claims filter by it, and answer 404 for another tenant's
  record, as for a missing one.
* **Operators.** Probing every provider (``/status?probe=true``) costs provider
  calls: only principals with the ``operator`` role may, at most once per
  ``IDIS_SERVICE_PROBE_INTERVAL`` (429 with ``Retry-After`` otherwise).
* **Bodies.** A JSON body larger than ``IDIS_SERVICE_MAX_BODY_BYTES`` is refused
  (413) as soon as its ``Content-Length`` or the bytes received so far exceed it,
  before it is buffered; a body nesting deeper than 64 levels is a 400
  (:func:`idis.integrations.webhooks.parse_json_strict`), never a RecursionError.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from idis.integrations.exceptions import ConfigError, WebhookVerificationError
from idis.integrations.webhooks import parse_json_strict

__all__ = [
    "ROLES",
    "ApiToken",
    "Authenticate",
    "BadRequest",
    "BearerTokens",
    "Guard",
    "Principal",
    "RequestTooLarge",
    "is_loopback",
    "parse_api_tokens",
    "principal_of",
    "read_json",
]

#: Roles a token may carry: ``operator`` (every tenant's data is still scoped by
#: ``tenants``; provider probes), ``metrics`` (``/metrics`` when it needs a token).
ROLES = frozenset({"operator", "metrics"})
#: Shortest token accepted: 128 bits of base64url randomness.
MIN_TOKEN_LENGTH = 22
_VARIABLE = "IDIS_SERVICE_API_TOKENS"


class BadRequest(Exception):
    """A request the service refuses; the message names the bad value and what was expected."""


class RequestTooLarge(Exception):
    """A request body over the service's limit (413)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a subject, the tenants it may see, its roles."""

    subject: str
    #: Tenant ids this principal may read and write; None: every tenant.
    tenants: frozenset[str] | None
    roles: frozenset[str] = frozenset()

    @property
    def operator(self) -> bool:
        """Whether the principal may probe providers."""
        return "operator" in self.roles

    def can_see(self, tenant_id: str) -> bool:
        """Whether ``tenant_id``'s records are visible to this principal."""
        return self.tenants is None or tenant_id in self.tenants


#: The authentication hook: the request's principal, or None (401). May be async.
Authenticate = Callable[[Request], "Principal | Awaitable[Principal | None] | None"]


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One accepted bearer token: its SHA-256 digest (never the token) and its principal."""

    digest: bytes = field(repr=False)
    principal: Principal


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def parse_api_tokens(raw: str) -> tuple[ApiToken, ...]:
    """Parse ``IDIS_SERVICE_API_TOKENS``: a JSON list of token objects.

    ``[{"token": "...", "subject": "analyst-1", "tenants": ["t1"]},
    {"token": "...", "subject": "oncall", "tenants": "*", "roles": ["operator"]}]``

    Raises:
        ConfigError: naming the variable and the entry, never quoting a token.
    """
    if not raw.strip():
        return ()
    try:
        entries = json.loads(raw)
    except ValueError:
        raise ConfigError(
            f"{_VARIABLE} is not valid JSON: expected a list of "
            '{"token", "subject", "tenants", "roles"} objects',
            variable=_VARIABLE,
        ) from None
    if not isinstance(entries, list):
        raise ConfigError(f"{_VARIABLE} must be a JSON list of objects", variable=_VARIABLE)
    tokens: list[ApiToken] = []
    seen: set[bytes] = set()
    for index, entry in enumerate(entries):
        token = _token_entry(entry, index)
        if token.digest in seen:
            raise ConfigError(
                f"{_VARIABLE}[{index}] repeats the token of an earlier entry", variable=_VARIABLE
            )
        seen.add(token.digest)
        tokens.append(token)
    return tuple(tokens)


def _token_entry(entry: object, index: int) -> ApiToken:
    where = f"{_VARIABLE}[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} is not an object", variable=_VARIABLE)
    unknown = sorted(set(entry) - {"token", "subject", "tenants", "roles"})
    if unknown:
        raise ConfigError(
            f"{where} has unknown field(s) {', '.join(unknown)}: "
            "expected token, subject, tenants, roles",
            variable=_VARIABLE,
        )
    token, subject = entry.get("token"), entry.get("subject")
    if (
        not isinstance(token, str)
        or len(token.strip()) < MIN_TOKEN_LENGTH
        or token != token.strip()
    ):
        raise ConfigError(
            f"{where}.token is missing or too short: expected at least {MIN_TOKEN_LENGTH} "
            "characters without spaces "
            "(python -c 'import secrets; print(secrets.token_urlsafe())')",
            variable=_VARIABLE,
        )
    if not isinstance(subject, str) or not subject.strip():
        raise ConfigError(f"{where}.subject must be a non-empty string", variable=_VARIABLE)
    tenants_raw = entry.get("tenants")
    tenants: frozenset[str] | None
    if tenants_raw == "*":
        tenants = None
    elif isinstance(tenants_raw, list) and all(
        isinstance(t, str) and t.strip() for t in tenants_raw
    ):
        tenants = frozenset(tenants_raw)  # [] for a metrics-only token: no tenant's data
    else:
        raise ConfigError(
            f'{where}.tenants must be "*" (every tenant) or a list of tenant ids',
            variable=_VARIABLE,
        )
    roles_raw = entry.get("roles", [])
    if not isinstance(roles_raw, list) or not set(roles_raw) <= ROLES:
        raise ConfigError(
            f"{where}.roles={roles_raw!r} is invalid: "
            f"expected a list of {', '.join(sorted(ROLES))}",
            variable=_VARIABLE,
        )
    return ApiToken(_digest(token), Principal(subject.strip(), tenants, frozenset(roles_raw)))


class BearerTokens:
    """The default hook: ``Authorization: Bearer <token>`` looked up among configured tokens.

    Tokens are kept as SHA-256 digests and looked up by digest: what a lookup's
    timing could reveal is about the digest, from which no token can be rebuilt.
    """

    def __init__(self, tokens: tuple[ApiToken, ...]) -> None:
        self._by_digest = {token.digest: token.principal for token in tokens}

    def __call__(self, request: Request) -> Principal | None:
        """The principal of the request's bearer token, or None."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._by_digest.get(_digest(token.strip()))


#: The principal every caller gets with ``IDIS_SERVICE_AUTH=off`` (loopback only).
LOCAL_OPERATOR = Principal("local (IDIS_SERVICE_AUTH=off)", None, frozenset(ROLES))


def allow_everyone(_request: Request) -> Principal:
    """``IDIS_SERVICE_AUTH=off``: every caller is the local operator."""
    return LOCAL_OPERATOR


async def authenticate(hook: Authenticate, request: Request) -> Principal | None:
    """Run ``hook`` (sync or async) on ``request``."""
    result = hook(request)
    if inspect.isawaitable(result):
        result = await result
    return result


def is_loopback(host: str) -> bool:
    """Whether a listen address can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def read_json(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object body, read within ``limit`` bytes and 64 levels of nesting.

    Raises:
        RequestTooLarge: ``Content-Length`` or the bytes received exceed ``limit``;
            raised as soon as they do, so an endless chunked body is never buffered.
        BadRequest: not one JSON object (the reason names position or key, never the body).
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body of {declared} bytes is over the {limit}-byte limit")
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise RequestTooLarge(f"request body is over the {limit}-byte limit")
    if optional and not bytes(received).strip():
        return {}
    try:
        return parse_json_strict(bytes(received))
    except WebhookVerificationError as exc:
        # The strict parser is the webhook receiver's; its words fit any body.
        raise BadRequest(str(exc).replace("webhook body", "request body", 1)) from None


_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
_ASGI = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


class Guard:
    """ASGI middleware: every HTTP request needs a principal unless its path is public.

    Deny by default: a route added later is protected without a line of its own.
    The principal is stored on the request (``request.state.principal``).
    """

    def __init__(self, app: _ASGI, hook: Authenticate, public: Callable[[str], bool]) -> None:
        self.app = app
        self.hook = hook
        self.public = public

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        """Authenticate, then call the app; 401 without a principal."""
        if scope["type"] != "http" or self.public(str(scope.get("path", ""))):
            await self.app(scope, receive, send)
            return
        principal = await authenticate(self.hook, Request(scope))
        if principal is None:
            body = json.dumps(
                {"error": "authentication required: send Authorization: Bearer <token>"}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer realm="integrations-service"'),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def principal_of(request: Request) -> Principal:
    """The principal :class:`Guard` admitted this request with."""
    principal = request.scope.get("state", {}).get("principal")
    if not isinstance(principal, Principal):
        # Only a public route could get here, and public routes do not ask.
        raise TypeError(f"{request.url.path} ran without authentication")
    return principal
