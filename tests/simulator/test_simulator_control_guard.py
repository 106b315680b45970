"""The control API refuses what a web page could send it (issue 17 item 11), over real HTTP.

A browser can POST ``text/plain`` or a form to any origin without a CORS
preflight, and DNS rebinding makes it send a foreign ``Host``. The control
API reconfigures the simulator and can make it POST anywhere, so it only
answers JSON requests addressed to a loopback name, from no other origin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from idis.integrations._http import httpx
from idis.integrations.cli import main
from idis.integrations.simulator import SimulatorState, build_app
from idis.integrations.simulator._control import CONTROL_ACTIONS
from idis.integrations.testing import serve_asgi

TARGET = {"provider": "crm_provider", "url": "http://127.0.0.1:1/steal"}


def _target(sim) -> str | None:
    return sim.control.stats("crm_provider")["webhooks"]["url"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_a_post_that_is_not_json_is_refused_and_changes_nothing(sim, http, content_type) -> None:
    """A body a cross-site form could send (no preflight) gets 415; no webhook target is set."""
    sim.control.declare_provider("crm_provider")
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"provider":"crm_provider","url":"http://127.0.0.1:1/steal"}'

    response = http.post("/_control/webhooks/target", content=body, headers=headers)

    assert 415 == response.status_code
    assert "application/json" in response.json()["detail"]
    assert _target(sim) is None


def test_json_with_a_charset_is_accepted(sim, http) -> None:
    """``application/json; charset=utf-8`` is JSON."""
    response = http.post(
        "/_control/webhooks/target",
        content=b'{"provider":"crm_provider","url":"http://127.0.0.1:1/x"}',
        headers={"content-type": "application/json; charset=utf-8"},
    )

    assert 200 == response.status_code
    assert "http://127.0.0.1:1/x" == _target(sim)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:3000"])
def test_a_foreign_origin_is_refused(sim, http, origin) -> None:
    """A JSON request from another origin (even another local port) gets 403 and changes nothing."""
    sim.control.declare_provider("crm_provider")

    response = http.post("/_control/webhooks/target", json=TARGET, headers={"origin": origin})

    assert 403 == response.status_code
    assert "Origin" in response.json()["detail"]
    assert _target(sim) is None


def test_the_simulators_own_origin_is_accepted(sim, http) -> None:
    """A page served by the simulator itself (same origin) may use the API."""
    response = http.post("/_control/webhooks/target", json=TARGET, headers={"origin": sim.url})

    assert 200 == response.status_code


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "10.0.0.5", "0.0.0.0"])
def test_a_foreign_host_is_refused_for_reads_and_writes(sim, http, host) -> None:
    """DNS rebinding (a foreign Host) gets 403 on a POST and on a GET of the stats."""
    sim.control.declare_provider("crm_provider")

    post = http.post("/_control/webhooks/target", json=TARGET, headers={"host": host})
    get = http.get("/_control/stats", headers={"host": host})

    assert (403, 403) == (post.status_code, get.status_code)
    assert "not loopback" in post.json()["detail"]
    assert _target(sim) is None


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "[::1]", "app.localhost"])
def test_loopback_hosts_are_accepted(sim, http, host) -> None:
    """Every name that can only mean this machine is accepted, with or without a port."""
    port = sim.port

    bare = http.get("/_control/ping", headers={"host": host})
    with_port = http.get("/_control/ping", headers={"host": f"{host}:{port}"})

    assert (200, 200) == (bare.status_code, with_port.status_code)


def test_every_action_is_guarded(sim, http) -> None:
    """Each row of the table refuses a foreign Host, and each POST row refuses text/plain."""
    for action in CONTROL_ACTIONS:
        foreign = http.request(
            action.method, action.path, json={}, headers={"host": "attacker.example"}
        )
        assert 403 == foreign.status_code, action.path
        if action.method == "POST":
            plain = http.post(action.path, content=b"{}", headers={"content-type": "text/plain"})
            assert 415 == plain.status_code, action.path


def test_every_action_checks_its_schema(sim, http) -> None:
    """Each row refuses an unknown field with 400 naming it, before its handler runs."""
    for action in CONTROL_ACTIONS:
        if action.method == "GET":
            response = http.get(action.path, params={"bogus_field": "1"})
        else:
            response = http.post(action.path, json={"bogus_field": 1})
        assert 400 == response.status_code, action.path
        assert "bogus_field" == response.json()["parameter"], action.path


def test_required_fields_are_named(sim, http) -> None:
    """A missing required field is a 400 naming it."""
    response = http.post("/_control/oauth/client", json={"provider": "crm_provider"})

    assert 400 == response.status_code
    assert "client_id" == response.json()["parameter"]


@pytest.fixture
def named_simulator() -> Iterator[str]:
    """A simulator whose control API also accepts the Host name ``simulator``."""
    with serve_asgi(build_app(SimulatorState(), control_hosts=["simulator"])) as url:
        yield url


def test_an_allowed_host_name_is_accepted(named_simulator: str) -> None:
    """control_hosts admits a name (another container reaching the simulator by name)."""
    with httpx.Client(base_url=named_simulator) as client:
        named = client.get("/_control/ping", headers={"host": "simulator:8765"})
        other = client.get("/_control/ping", headers={"host": "elsewhere:8765"})

    assert (200, 403) == (named.status_code, other.status_code)


def test_control_host_needs_allow_remote() -> None:
    """``simulate --control-host`` alone is refused (exit 2): it opens the API to other hosts."""
    result = CliRunner().invoke(main, ["simulate", "--control-host", "simulator"])

    assert 2 == result.exit_code
    assert "--allow-remote" in result.output
