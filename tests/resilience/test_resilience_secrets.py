"""No secret leaks from a failing provider call: not in logs, exception text or metric labels."""

from __future__ import annotations

import uuid
from collections.abc import Generator
from typing import Any

import pytest
from prometheus_client import generate_latest

from idis.integrations._http import httpx
from idis.integrations.config import AuthSettings, BreakerPolicy, RetryPolicy, Secret
from idis.integrations.exceptions import ProviderError
from idis.integrations.observability._logs import get_logger


class BearerAuth(httpx.Auth):
    """What the OAuth module's factory hands the gateway: a bearer token on every request."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def test_failures_never_leak_the_client_secret_or_the_bearer_token(
    make_harness: Any, helpers: Any, logs: Any, metrics: Any
) -> None:
    """Every failure kind, with a provider echoing our credentials back, logs and raises none.

    Even the chained httpx exceptions (whose text here carries the header) are
    scrubbed when an application logs our errors with their traceback.
    """
    client_secret = f"cs-{uuid.uuid4().hex}"
    token = f"at-{uuid.uuid4().hex}"
    provider = helpers.provider_settings(
        auth=AuthSettings(
            grant="client_credentials", client_id="idis", client_secret=Secret(client_secret)
        ),
        retry=RetryPolicy(max_attempts=2, budget_min_retries=100),
        breaker=BreakerPolicy(failure_threshold=100, minimum_calls=1000),
    )
    seen_auth: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        seen_auth.append(auth)
        echo = {"error": "nope", "you_sent": auth, "secret": client_secret}
        kind = request.url.params.get("fail")
        # The token in the other shapes a provider or a proxy may echo it in.
        as_url = httpx.URL("https://x.example.com/", params={"access_token": token})
        shapes = (
            f'{{"access_token": "{token}"}} https://idis:{token}@api.example.com/cb?'
            f"access_token={token} {as_url}"
        )
        if kind == "timeout":
            raise httpx.ReadTimeout(f"timed out sending {auth} {shapes}", request=request)
        if kind == "refused":
            raise httpx.ConnectError(f"refused {auth} {client_secret} {shapes}", request=request)
        if kind == "malformed":
            return httpx.Response(200, content=f"<html>{auth} {client_secret}".encode())
        status = {"server": 503, "rate": 429, "auth": 401, "missing": 404}[kind or "server"]
        headers = {"Retry-After": "1", "WWW-Authenticate": f"Bearer {token}"}
        return httpx.Response(status, json=echo, headers=headers)

    h = make_harness(
        helpers.settings_for(provider), handler, auth=lambda _settings: BearerAuth(token)
    )
    raised: list[ProviderError] = []
    for kind in ("server", "rate", "auth", "missing", "timeout", "refused", "malformed"):
        with pytest.raises(ProviderError) as info:
            h.get_json("crm", "records", params={"fail": kind})
        raised.append(info.value)

    library_lines = logs.text  # before the application logs anything itself
    for exc in raised:  # an application logging our errors with their traceback and cause
        get_logger().error("app.provider_call_failed", exc_info=exc)
    tracebacks = logs.text[len(library_lines) :]
    exception_text = "\n".join(f"{e!s} {e!r}" for e in raised)
    exposition = generate_latest(metrics.registry).decode()
    assert all(a == f"Bearer {token}" for a in seen_auth)
    assert len(seen_auth) >= 7
    assert library_lines.count("\n") >= 7  # the failures were logged: there was something to leak
    assert "[REDACTED]" in tracebacks  # the chained httpx messages carried the header
    for haystack in (library_lines, tracebacks, exception_text, exposition):
        assert token not in haystack
        assert client_secret not in haystack
    for haystack in (library_lines, exception_text, exposition):  # tracebacks quote source code
        assert "bearer" not in haystack.lower()
