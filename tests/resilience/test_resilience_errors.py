"""httpx failures and HTTP statuses become the library's exception tree, and nothing is missed."""

from __future__ import annotations

import inspect

import pytest

from idis.integrations._http import httpx
from idis.integrations.exceptions import (
    IntegrationError,
    MalformedResponse,
    ProviderConnectionError,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UsageError,
)
from idis.integrations.resilience._errors import HTTPX_MAPPING, error_for_status, map_httpx_errors


def _httpx_exception_classes() -> set[type[BaseException]]:
    """Every exception class httpx exports, plus any subclass of them defined inside httpx."""
    found: set[type[BaseException]] = {
        obj
        for obj in vars(httpx).values()
        if inspect.isclass(obj) and issubclass(obj, BaseException)
    }
    stack = list(found)
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub.__module__.startswith("httpx") and sub not in found:
                found.add(sub)
                stack.append(sub)
    return found


HTTPX_EXCEPTIONS = sorted(_httpx_exception_classes(), key=lambda c: c.__name__)


def _instance(cls: type[BaseException]) -> BaseException:
    request = httpx.Request("GET", "https://crm.test/records?token=abc")
    if issubclass(cls, httpx.HTTPStatusError):
        return cls("boom", request=request, response=httpx.Response(500, request=request))
    if not inspect.signature(cls.__init__).parameters.keys() - {"self"}:
        return cls()
    if issubclass(cls, httpx.RequestError):
        return cls("boom", request=request)
    return cls("boom")


def test_httpx_has_the_exceptions_we_expect() -> None:
    """The enumeration sees httpx's whole tree (guards the completeness test against a no-op)."""
    names = {c.__name__ for c in HTTPX_EXCEPTIONS}

    assert {"HTTPError", "ConnectTimeout", "RemoteProtocolError", "StreamConsumed"} <= names
    assert len(HTTPX_EXCEPTIONS) >= 28


@pytest.mark.parametrize("cls", HTTPX_EXCEPTIONS, ids=lambda c: c.__name__)
def test_every_httpx_exception_has_its_own_mapping(cls: type[BaseException]) -> None:
    """Each httpx exception class is listed in HTTPX_MAPPING (fails when httpx adds one)."""
    assert cls in {source for source, _ in HTTPX_MAPPING}


@pytest.mark.parametrize("cls", HTTPX_EXCEPTIONS, ids=lambda c: c.__name__)
def test_mapping_is_most_specific_first(cls: type[BaseException]) -> None:
    """The first entry an exception matches is its own class: no parent shadows a child."""
    first = next(source for source, _ in HTTPX_MAPPING if issubclass(cls, source))

    assert cls is first


@pytest.mark.parametrize("cls", HTTPX_EXCEPTIONS, ids=lambda c: c.__name__)
def test_map_httpx_errors_translates_and_chains(cls: type[BaseException]) -> None:
    """Raised inside map_httpx_errors, every httpx exception becomes its mapped library error."""
    target = dict(HTTPX_MAPPING)[cls]  # type: ignore[index]  # keys are Exception classes
    original = _instance(cls)

    with pytest.raises(IntegrationError) as info, map_httpx_errors("crm", "records"):
        raise original

    assert target is type(info.value)
    assert original is info.value.__cause__
    assert "token=abc" not in str(info.value)
    if isinstance(info.value, ProviderError):
        assert ("crm", "records") == (info.value.provider, info.value.endpoint)


@pytest.mark.parametrize(
    ("cls", "expected", "text"),
    [
        (httpx.ConnectTimeout, ProviderTimeout, "crm records: connect timeout"),
        (httpx.ReadTimeout, ProviderTimeout, "crm records: read timeout"),
        (httpx.PoolTimeout, ProviderTimeout, "crm records: pool timeout (no free connection)"),
        (httpx.ConnectError, ProviderConnectionError, "crm records: ConnectError"),
        (httpx.RemoteProtocolError, ProviderConnectionError, "crm records: RemoteProtocolError"),
        (httpx.DecodingError, MalformedResponse, "crm records: DecodingError"),
        (httpx.LocalProtocolError, UsageError, "crm records: LocalProtocolError"),
    ],
)
def test_translated_messages_name_the_failure(
    cls: type[httpx.RequestError], expected: type[Exception], text: str
) -> None:
    """Messages say provider, endpoint and what failed (timeouts say which timeout)."""
    with pytest.raises(expected) as info, map_httpx_errors("crm", "records"):
        raise cls("low-level detail", request=httpx.Request("GET", "https://crm.test/"))

    assert text == str(info.value)


def test_other_exceptions_pass_through() -> None:
    """Non-httpx exceptions (our own bugs) are not disguised as provider errors."""
    with pytest.raises(KeyError), map_httpx_errors("crm", "records"):
        raise KeyError("x")


@pytest.mark.parametrize(
    ("status", "expected", "error_type"),
    [
        (500, ProviderUnavailable, "server_error"),
        (502, ProviderUnavailable, "server_error"),
        (503, ProviderUnavailable, "server_error"),
        (429, RateLimited, "rate_limited"),
        (408, ProviderTimeout, "timeout"),
        (400, ProviderRejected, "client_error"),
        (401, ProviderRejected, "client_error"),
        (404, ProviderRejected, "client_error"),
        (422, ProviderRejected, "client_error"),
    ],
)
def test_error_for_status(status: int, expected: type[ProviderError], error_type: str) -> None:
    """Each error status maps to one class with a bounded error_type and the status code."""
    error = error_for_status(status, "crm", "records")

    assert expected is type(error)
    assert error is not None
    assert error_type == error.error_type
    assert status == error.status_code
    assert f"HTTP {status}" in str(error)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 304])
def test_success_statuses_are_not_errors(status: int) -> None:
    """1xx-3xx mean success (redirects are not followed, so 3xx is the caller's to read)."""
    assert None is error_for_status(status, "crm", "records")


def test_rate_limited_message_says_rate_limit_and_429() -> None:
    """A 429's message contains 'rate limit' and '429' and the Retry-After it carried."""
    error = error_for_status(429, "crm", "records", retry_after=2.0)

    assert isinstance(error, RateLimited)
    assert 2.0 == error.retry_after
    assert "crm records: rate limit exceeded (HTTP 429); retry after 2s" == str(error)


def test_a_5xx_keeps_its_retry_after() -> None:
    """A 503 with Retry-After keeps it, so the gateway can pause the provider."""
    error = error_for_status(503, "crm", "records", retry_after=4.0)

    assert isinstance(error, ProviderUnavailable)
    assert 4.0 == error.retry_after


def test_4xx_is_not_a_provider_fault_and_not_retryable() -> None:
    """A rejected request never counts against the breaker and is never retried."""
    error = error_for_status(400, "crm", "records")

    assert error is not None
    assert (False, False) == (error.provider_fault, error.retryable)
