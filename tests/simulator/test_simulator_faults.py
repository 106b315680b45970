"""Every fault kind, as a client sees it over real HTTP."""

from __future__ import annotations

import threading
from email.utils import parsedate_to_datetime

import pytest

from idis.integrations._http import httpx
from idis.integrations.simulator import SimulatorInputError
from idis.integrations.testing import run_simulator

CRM = "/p/crm_provider"


def test_error_fault_answers_its_status_on_its_endpoint_only(sim, http) -> None:
    """An endpoint-scoped error fault fails that endpoint and leaves the others alone."""
    sim.control.set_fault("crm_provider", "error", endpoint="changes", status=502)

    failed = http.get(f"{CRM}/changes")
    fine = http.get(f"{CRM}/records")

    assert (502, "simulated_error") == (failed.status_code, failed.json()["error"])
    assert 200 == fine.status_code


def test_provider_wide_error_fault_defaults_to_503_everywhere(sim, http) -> None:
    """Without an endpoint, an error fault hits every endpoint with 503."""
    sim.control.set_fault("crm_provider", "error")

    statuses = {http.get(f"{CRM}/{path}").status_code for path in ("records", "changes", "health")}

    assert {503} == statuses


def _pattern(url: str, count: int) -> list[int]:
    with httpx.Client(base_url=url) as client:
        return [client.get(f"{CRM}/records").status_code for _ in range(count)]


def test_error_ratio_is_partial_and_reproducible_with_the_same_seed() -> None:
    """A 40% failure ratio fails some calls, and the same seed fails the same ones."""
    patterns = []
    for _ in range(2):
        with run_simulator(seed=3) as running:
            running.control.set_fault("crm_provider", "error", ratio=0.4)
            patterns.append(_pattern(running.url, 40))

    assert patterns[0] == patterns[1]
    assert {200, 503} == set(patterns[0])


def test_fault_with_count_applies_to_that_many_requests(sim, http) -> None:
    """count=2 fails the next two requests and then removes itself."""
    sim.control.set_fault("crm_provider", "error", count=2)

    statuses = [http.get(f"{CRM}/records").status_code for _ in range(4)]

    assert [503, 503, 200, 200] == statuses
    assert [] == sim.control.faults("crm_provider")


def test_fault_with_duration_expires_in_simulated_time(sim, http, clock) -> None:
    """A fault with a duration stops once simulated time passes it."""
    sim.control.set_fault("crm_provider", "error", duration=60)
    during = http.get(f"{CRM}/records").status_code
    clock.advance(61)

    after = http.get(f"{CRM}/records").status_code

    assert (503, 200) == (during, after)


def test_latency_fault_makes_a_short_client_timeout_fire(sim, http) -> None:
    """Added latency beyond the client's read timeout surfaces as a read timeout."""
    sim.control.set_fault("crm_provider", "latency", seconds=1.0, endpoint="records")

    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{CRM}/records", timeout=0.2)
    assert 200 == http.get(f"{CRM}/changes", timeout=5.0).status_code


def test_hang_does_not_block_other_requests_and_clear_releases_it(sim, http) -> None:
    """A hanging request leaves the server free, and clearing faults ends it with a 504."""
    sim.control.set_fault("crm_provider", "timeout", endpoint="records", seconds=120)
    result: dict[str, int] = {}

    def hang() -> None:
        with httpx.Client(base_url=sim.url, timeout=60) as client:
            result["status"] = client.get(f"{CRM}/records").status_code

    worker = threading.Thread(target=hang)
    worker.start()
    while sim.control.stats("crm_provider")["requests"].get("records", 0) < 1:
        pass
    other = http.get(f"{CRM}/health")
    still_hanging = worker.is_alive()
    sim.control.clear_faults("crm_provider")
    worker.join(30)

    assert (200, True) == (other.status_code, still_hanging)
    assert {"status": 504} == result


def test_hang_times_out_a_client(sim, http) -> None:
    """A client with a short read timeout gets a timeout from a hanging endpoint."""
    sim.control.set_fault("crm_provider", "timeout")

    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{CRM}/health", timeout=0.2)


def test_dropped_connection_is_a_connection_error_not_a_500(sim, http) -> None:
    """A drop fault closes the connection: the client sees a protocol error, no response."""
    sim.control.set_fault("crm_provider", "drop", endpoint="records", count=1)

    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.get(f"{CRM}/records")
    after = http.get(f"{CRM}/records")
    responses = sim.control.stats("crm_provider")["responses"]

    assert 200 == after.status_code
    assert 1 == responses["records:dropped"]
    assert "records:500" not in responses


def test_rate_limit_sends_retry_after_seconds(sim, http) -> None:
    """A rate_limit fault answers 429 with Retry-After in seconds."""
    sim.control.set_fault("crm_provider", "rate_limit", retry_after=2)

    limited = http.get(f"{CRM}/records")

    assert (429, "2") == (limited.status_code, limited.headers["retry-after"])


def test_rate_limit_sends_retry_after_http_date(sim, http, clock) -> None:
    """retry_after_format=date sends an HTTP-date that many seconds after simulated now."""
    sim.control.set_fault("crm_provider", "rate_limit", retry_after=30, retry_after_format="date")

    limited = http.get(f"{CRM}/records")

    assert 429 == limited.status_code
    assert 30 == (parsedate_to_datetime(limited.headers["retry-after"]) - clock.now).total_seconds()


def test_malformed_fault_is_a_200_with_invalid_json(sim, http) -> None:
    """A malformed fault answers 200 whose body does not parse as JSON."""
    sim.control.set_fault("crm_provider", "malformed", endpoint="records")

    response = http.get(f"{CRM}/records")

    assert 200 == response.status_code
    with pytest.raises(ValueError):
        response.json()


def test_outage_fails_every_endpoint_and_health_until_cleared(sim, http) -> None:
    """An outage makes every endpoint, health and the token endpoint answer 503."""
    sim.control.outage("crm_provider")
    statuses = {
        http.get(f"{CRM}/records").status_code,
        http.get(f"{CRM}/enrich/x").status_code,
        http.post(f"{CRM}/oauth/token", data={"grant_type": "client_credentials"}).status_code,
    }
    health = http.get(f"{CRM}/health")
    sim.control.clear_faults("crm_provider")

    assert {503} == statuses
    assert (503, {"status": "outage"}) == (health.status_code, health.json())
    assert 200 == http.get(f"{CRM}/health").status_code


def test_token_endpoint_fault(sim, http) -> None:
    """A fault on the token endpoint fails token requests only."""
    sim.control.set_fault("crm_provider", "error", endpoint="token", status=500)

    token = http.post(
        f"{CRM}/oauth/token",
        data={"grant_type": "client_credentials"},
        auth=("idis-local", "local-simulator-secret"),
    )

    assert 500 == token.status_code
    assert 200 == http.get(f"{CRM}/records").status_code


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"kind": "explode"}, "kind"),
        ({"kind": "error", "ratio": 1.5}, "ratio"),
        ({"kind": "error", "endpoint": "nowhere"}, "endpoint"),
        ({"kind": "error", "status": 99}, "status"),
        ({"kind": "error", "count": 0}, "count"),
    ],
)
def test_bad_fault_is_rejected_naming_the_value_and_installs_nothing(sim, kwargs, named) -> None:
    """A bad fault definition raises naming the bad field, and no fault is installed."""
    with pytest.raises(SimulatorInputError) as caught:
        sim.control.set_fault("crm_provider", **kwargs)

    assert named == caught.value.variable
    assert str(caught.value).startswith(f"{named}=")
    assert [] == sim.control.faults("crm_provider")


def test_requests_are_counted_per_endpoint_even_when_faulted(sim, http) -> None:
    """Stats count every request by endpoint and every response by status."""
    sim.control.set_fault("crm_provider", "error", count=1)
    http.get(f"{CRM}/records")
    http.get(f"{CRM}/records")
    http.get(f"{CRM}/records/x")

    stats = sim.control.stats("crm_provider")

    assert {"records": 2, "record": 1} == stats["requests"]
    assert {"records:503": 1, "records:200": 1, "record:404": 1} == stats["responses"]
    assert {"error": 1} == stats["faults_fired"]
