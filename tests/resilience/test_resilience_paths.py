"""Path parameters can never move a request out of its endpoint's path (issue 17, item 2).

``{"id": ".."}`` used to make ``PUT /api/v1/records/..`` into ``PUT /api/v1``
(httpx removes dot segments, RFC 3986 section 5.2.4), with the bearer token.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from idis.integrations._http import httpx
from idis.integrations.exceptions import UsageError
from idis.integrations.resilience import Gateway, ManualClock

#: Any text, with the dot-segment and separator shapes mixed in (plain text rarely hits them).
_VALUES = st.one_of(
    st.text(),
    st.sampled_from(["", ".", "..", "...", "./", "../", "%2e%2e", "a/..", "?", "#"]),
)
ENDPOINTS = {"record": "/api/v1/records/{id}", "note": "/api/v1/records/{id}/notes/{note}"}


def _provider(helpers: Any) -> Any:
    return helpers.provider_settings(base_url="http://crm.test", endpoints=ENDPOINTS)


@pytest.mark.parametrize("value", ["..", ".", "", None])
def test_dot_segments_and_empty_values_are_refused_before_sending(
    make_harness: Any, helpers: Any, value: Any
) -> None:
    """`..`, `.`, an empty value or None: UsageError naming endpoint and value; nothing sent."""
    h = make_harness(helpers.settings_for(_provider(helpers)), lambda r: httpx.Response(200))

    with pytest.raises(UsageError) as info:
        h.request("crm", "record", method="PUT", path_params={"id": value}, json={})

    assert "endpoint 'record'" in str(info.value)
    assert f"'id'={value!r}" in str(info.value)
    assert [] == h.requests


def test_a_dot_segment_in_a_later_parameter_is_refused_too(make_harness: Any, helpers: Any) -> None:
    """Every parameter is checked, not only the first."""
    h = make_harness(helpers.settings_for(_provider(helpers)), lambda r: httpx.Response(200))

    with pytest.raises(UsageError, match=r"'note'='\.\.'"):
        h.get_json("crm", "note", path_params={"id": "42", "note": ".."})

    assert [] == h.requests


def test_dots_inside_a_value_are_kept_in_their_segment(make_harness: Any, helpers: Any) -> None:
    """`...`, `a..b` and `../x` are ordinary values: encoded, one segment each."""
    h = make_harness(
        helpers.settings_for(_provider(helpers)), lambda r: httpx.Response(200, json={})
    )

    for value in ("...", "a..b", "../x", "%2e%2e"):
        h.get_json("crm", "record", path_params={"id": value})

    assert [
        "/api/v1/records/...",
        "/api/v1/records/a..b",
        "/api/v1/records/..%2Fx",
        "/api/v1/records/%252e%252e",
    ] == [r.url.raw_path.decode() for r in h.requests]


@settings(
    max_examples=300,
    deadline=None,
    # `helpers` only hands out module functions: nothing in it changes between examples.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(value=_VALUES, note=_VALUES)
@example(value="..", note="n-1")
@example(value="42", note=".")
def test_no_value_escapes_its_path_segment(helpers: Any, value: str, note: str) -> None:
    """For any strings, the request path is the template with each value as one whole segment
    (or the call is refused with nothing sent)."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    with Gateway(
        helpers.settings_for(_provider(helpers)),
        clock=ManualClock(),
        transport=httpx.MockTransport(handler),
    ) as gateway:
        try:
            gateway.get_json("crm", "note", path_params={"id": value, "note": note})
        except UsageError:
            assert value in ("", ".", "..") or note in ("", ".", "..")
            assert [] == sent
            return

    [request] = sent
    path = request.url.raw_path.decode("ascii").split("?", 1)[0]
    segments = path.split("/")
    assert ["", "api", "v1", "records", segments[4], "notes", segments[6]] == segments
    assert (value, note) == (unquote(segments[4]), unquote(segments[6]))
    assert "crm.test" == request.url.host
