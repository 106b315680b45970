"""The control API itself: validation, clock, stats, reset, and in-process use."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest

from idis.integrations._http import httpx
from idis.integrations.simulator import SimulatorInputError, SimulatorState, build_app


def test_unknown_control_field_is_400_naming_it_and_changes_nothing(sim, http) -> None:
    """A misspelt field is refused with its name; nothing is emitted."""
    response = http.post("/_control/emit", json={"provider": "crm_provider", "cuont": 5})

    assert 400 == response.status_code
    assert "cuont" == response.json()["parameter"]
    assert 0 == sim.control.stats("crm_provider")["events"]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"count": 0}, "count"),
        ({"tenant_ids": []}, "tenant_ids"),
        ({"record_ids": ["bad id"]}, "record_ids"),
        ({"type": "record.exploded"}, "type"),
    ],
)
def test_bad_emit_raises_naming_the_value(sim, kwargs, named) -> None:
    """The Python client raises SimulatorInputError naming the bad argument."""
    with pytest.raises(SimulatorInputError) as caught:
        sim.control.emit("crm_provider", **kwargs)

    assert named == caught.value.variable


def test_invalid_provider_name_is_refused(sim, http) -> None:
    """A provider name with spaces or slashes is refused, over HTTP and in Python."""
    with pytest.raises(SimulatorInputError, match="provider name"):
        sim.control.emit("bad name")


def test_advance_clock_moves_simulated_time(sim, clock) -> None:
    """advance_clock adds to the injected clock's time."""
    moved = sim.control.advance_clock(90)

    assert clock.now + timedelta(seconds=90) == moved
    assert moved == sim.control.now()


def test_reset_forgets_providers_data_and_clock_offset(sim, clock) -> None:
    """reset() drops every provider and the clock offset."""
    sim.control.emit("crm_provider", 3)
    sim.control.advance_clock(30)

    sim.control.reset()

    assert [] == sim.control.ping()["providers"]
    assert clock.now == sim.control.now()


def test_reset_of_one_provider_keeps_the_others(sim) -> None:
    """reset(provider) drops only that provider."""
    sim.control.emit("crm_provider", 1)
    sim.control.emit("docs_provider", 1)

    sim.control.reset("crm_provider")

    assert ["docs_provider"] == sim.control.ping()["providers"]


def test_declared_provider_settings_show_in_stats(sim) -> None:
    """declare_provider sets retention and require_auth."""
    sim.control.declare_provider("billing", retention_seconds=7200, require_auth=True)

    stats = sim.control.stats("billing")

    assert (7200, True) == (stats["retention_seconds"], stats["require_auth"])


def test_stats_without_provider_lists_all(sim) -> None:
    """stats() with no provider reports every provider."""
    sim.control.emit("crm_provider", 2)
    sim.control.emit("docs_provider", 1)

    stats = sim.control.stats()

    assert {"crm_provider": 2, "docs_provider": 1} == {
        name: s["events"] for name, s in stats["providers"].items()
    }


def test_state_is_usable_in_process(sim) -> None:
    """Changes made on the in-process state are visible through the HTTP API."""
    sim.state.emit("crm_provider", 2, tenant_ids=["t7"])
    sim.state.set_fault("crm_provider", "error", endpoint="changes", count=1)

    with httpx.Client(base_url=sim.url) as client:
        failed = client.get("/p/crm_provider/changes").status_code
        events = client.get("/p/crm_provider/changes").json()["events"]

    assert 503 == failed
    assert ["t7", "t7"] == [e["tenant_id"] for e in events]


def test_app_serves_in_process_over_asgi_transport() -> None:
    """build_app works without a server: an httpx ASGI transport reaches the provider API."""
    now = datetime(2026, 1, 19, 12, 0, tzinfo=UTC)
    state = SimulatorState(clock=lambda: now, seed=1)
    state.emit("crm_provider", 3)

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=build_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            page = (await client.get("/p/crm_provider/changes")).json()
        return [e["seq"] for e in page["events"]]

    assert [1, 2, 3] == asyncio.run(run())


def test_emit_bulk_returns_the_seq_range_only(sim) -> None:
    """emit_bulk makes the changes and returns the first and last sequence numbers."""
    sim.control.emit("crm_provider", 2)

    first, last = sim.control.emit_bulk("crm_provider", 500)

    assert (3, 502) == (first, last)
    assert 502 == sim.control.stats("crm_provider", detail=False)["events"]


def test_stats_without_detail_leave_out_growing_maps(sim, http) -> None:
    """detail=False omits per-record writes and per-key maps but keeps the totals."""
    http.put("/p/crm_provider/records/a", json={"data": {}}, headers={"Idempotency-Key": "k"})
    http.put("/p/crm_provider/records/a", json={"data": {}}, headers={"Idempotency-Key": "k"})

    brief = sim.control.stats("crm_provider", detail=False)

    assert "writes" not in brief
    assert {
        "keys": 1,
        "duplicate_total": 1,
        "received_total": 2,
        "applied_total": 1,
    } == brief["idempotency"]


def test_rejections_never_echo_a_secret(sim, http) -> None:
    """Errors about secrets and credentials name the field, never the secret itself."""
    leaked = "whsec_not*base64*SUPERSECRETVALUE"
    with pytest.raises(SimulatorInputError) as caught:
        sim.control.set_webhook_target("crm_provider", "http://127.0.0.1:1/x", [leaked])
    refused = http.post(
        "/p/crm_provider/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=("idis-local", "SUPERSECRETGUESS"),
    )

    assert "secrets[0]" == caught.value.variable
    assert "SUPERSECRET" not in str(caught.value)
    assert 401 == refused.status_code
    assert "SUPERSECRET" not in refused.text


_GOOD_SECRET = "whsec_c2V0dGVyLWNoZWNrcy1maXJzdC1rZXk="


@pytest.mark.parametrize(
    ("setter", "bad", "named"),
    [
        ("set_webhook_target", {"max_attempts": 0}, "max_attempts"),
        ("set_webhook_target", {"retry_backoff": 61}, "retry_backoff"),
        ("set_webhook_target", {"timeout": 0}, "timeout"),
        ("set_webhook_target", {"format": "xml"}, "format"),
        ("configure_receiver", {"mode": "explode"}, "mode"),
        ("configure_receiver", {"fail_status": 200}, "fail_status"),
        ("configure_receiver", {"fail_ratio": 1.5}, "fail_ratio"),
    ],
)
def test_bad_webhook_setting_is_named_and_nothing_is_applied(sim, setter, bad, named) -> None:
    """A webhook setter checks every argument before it sets any: one value out of range
    is named, and the good values given with it (secrets, URL) are not applied either."""
    provider = sim.state.provider("crm_provider")
    outbound = setter == "set_webhook_target"
    config = provider.webhooks if outbound else provider.receiver
    before = (config.secrets, getattr(config, "url", None))

    call = (
        partial(sim.control.set_webhook_target, "crm_provider", "http://127.0.0.1:9/hook")
        if outbound
        else partial(sim.control.configure_receiver, "crm_provider")
    )

    with pytest.raises(SimulatorInputError) as caught:
        call(secrets=[_GOOD_SECRET], **bad)

    assert named == caught.value.variable
    assert before == (config.secrets, getattr(config, "url", None))


def test_webhook_setters_apply_checked_values_and_leave_the_rest(sim) -> None:
    """Given values are set (numbers as floats); values not given stay as they were."""
    provider = sim.state.provider("crm_provider")
    sim.control.set_webhook_target(
        "crm_provider", "http://127.0.0.1:9/hook", max_attempts=7, retry_backoff=2
    )
    sim.control.configure_receiver("crm_provider", fail_ratio=0, tolerance=-1)

    assert ("http://127.0.0.1:9/hook", 7, 2.0) == (
        provider.webhooks.url,
        provider.webhooks.max_attempts,
        provider.webhooks.retry_backoff,
    )
    assert isinstance(provider.webhooks.retry_backoff, float)
    assert (5.0, "standard") == (provider.webhooks.timeout, provider.webhooks.format)
    assert (0.0, None, "accept") == (
        provider.receiver.fail_ratio,
        provider.receiver.tolerance,
        provider.receiver.mode,
    )


def test_delay_mode_without_a_delay_waits_a_second_and_an_explicit_zero_stays(sim) -> None:
    """``delay`` mode with no delay yet would not delay: it takes 1 s; a given 0 is kept."""
    webhooks = sim.state.provider("crm_provider").webhooks

    sim.control.set_webhook_mode("crm_provider", "delay")
    first = (webhooks.mode, webhooks.delay)
    sim.control.set_webhook_mode("crm_provider", "delay", delay=0, batch=7)

    assert (("delay", 1.0), 0.0, 7) == (first, webhooks.delay, webhooks.reorder_batch)


def test_feed_retention_none_serves_as_far_as_replay_again(sim) -> None:
    """A feed retention set and then cleared (None) is gone from the stats."""
    sim.control.set_feed_retention("crm_provider", 600)
    sim.control.set_feed_retention("crm_provider", None)

    assert sim.control.stats("crm_provider")["feed_retention_seconds"] is None
