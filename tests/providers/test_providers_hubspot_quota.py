"""HubSpot's daily quota resets at midnight in the account's time zone (``QUOTA_TIMEZONE``).

The reset arithmetic (pure, DST days included), the setting's validation, and a
``DAILY`` 429 from the simulator's HubSpot dialect pausing the provider until
the zone's next midnight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from idis.integrations._clock import ManualClock
from idis.integrations.config import Settings
from idis.integrations.exceptions import ConfigError, QuotaExhausted, RateLimited
from idis.integrations.providers import client_for
from idis.integrations.providers._hubspot import (
    _ACCOUNT_RETRY_AT,
    _ACCOUNT_ZONES,
    account_zone,
    map_error,
    quota_zone,
    read_rate_limit,
    seconds_to_local_midnight,
)
from idis.integrations.resilience import Gateway
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"
HOUR = 3600.0


@pytest.mark.parametrize(
    ("zone", "now", "hours"),
    [
        ("UTC", datetime(2026, 12, 6, 23, 0, tzinfo=UTC), 1.0),
        # 01:30 IST on 7 December; midnight there is 18:30 UTC.
        ("Asia/Kolkata", datetime(2026, 12, 6, 20, 0, tzinfo=UTC), 22.5),
        # Winter: New York is UTC-5, its midnight 05:00 UTC.
        ("America/New_York", datetime(2026, 12, 6, 12, 0, tzinfo=UTC), 17.0),
        # DST starts 8 March 2026 at 07:00 UTC: midnight of the 9th is 04:00 UTC (EDT).
        ("US/Eastern", datetime(2026, 3, 8, 12, 0, tzinfo=UTC), 16.0),
        # Before the change, that same day: the day is 23 hours long.
        ("US/Eastern", datetime(2026, 3, 8, 5, 0, tzinfo=UTC), 23.0),
        # DST ends 1 November 2026 at 06:00 UTC: midnight of the 2nd is 05:00 UTC (EST).
        ("US/Eastern", datetime(2026, 11, 1, 4, 0, tzinfo=UTC), 25.0),
        # Berlin springs forward 29 March 2026 at 01:00 UTC: a 23-hour day.
        ("Europe/Berlin", datetime(2026, 3, 28, 23, 0, tzinfo=UTC), 23.0),
        # Santiago's DST skips midnight itself (6 September 2026, 00:00 -> 01:00 local):
        # the day starts at the change, 04:00 UTC.
        ("America/Santiago", datetime(2026, 9, 5, 12, 0, tzinfo=UTC), 16.0),
    ],
)
def test_the_reset_is_the_next_midnight_in_the_zone(zone: str, now: datetime, hours: float) -> None:
    assert hours * HOUR == seconds_to_local_midnight(now, ZoneInfo(zone))


def test_the_reset_does_not_depend_on_the_zone_of_now() -> None:
    now = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
    zone = ZoneInfo("US/Eastern")

    assert seconds_to_local_midnight(now, zone) == seconds_to_local_midnight(
        now.astimezone(ZoneInfo("Asia/Tokyo")), zone
    )


def test_exactly_at_midnight_the_pause_is_a_whole_day() -> None:
    zone = ZoneInfo("US/Eastern")
    midnight = datetime(2026, 12, 7, 0, 0, tzinfo=zone)

    assert 24 * HOUR == seconds_to_local_midnight(midnight, zone)


def test_a_daily_429_pauses_until_midnight_in_the_zone() -> None:
    daily = RateLimited("crm search: rate limit (HTTP 429)", provider="crm", endpoint="search")
    daily.details = {"policyName": "DAILY"}
    now = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)  # 18:00 in New York

    mapped = map_error(daily, now=now, zone=ZoneInfo("America/New_York"))
    reading = read_rate_limit(429, {}, {"policyName": "DAILY"}, now=now, zone=ZoneInfo("UTC"))

    assert isinstance(mapped, QuotaExhausted)
    assert 6 * HOUR == mapped.retry_after
    assert reading is not None
    assert 1 * HOUR == reading.reset_after


def _env(zone: str) -> dict[str, str]:
    return {
        "IDIS_PROVIDERS": "crm",
        "IDIS_PROVIDER_CRM_KIND": "crm",
        "IDIS_PROVIDER_CRM_API": "hubspot",
        "IDIS_PROVIDER_CRM_BASE_URL": "https://api.hubapi.com",
        "IDIS_PROVIDER_CRM_QUOTA_TIMEZONE": zone,
    }


def test_the_quota_time_zone_is_read_from_the_environment() -> None:
    settings = Settings.from_env(_env("US/Eastern")).provider("crm")

    assert "US/Eastern" == settings.quota_timezone
    assert ZoneInfo("US/Eastern") == quota_zone(settings)


def test_unset_the_quota_time_zone_is_utc_until_account_info_says() -> None:
    env = _env("x")
    del env["IDIS_PROVIDER_CRM_QUOTA_TIMEZONE"]
    settings = Settings.from_env(env).provider("crm")

    assert "" == settings.quota_timezone
    assert UTC == quota_zone(settings)


@pytest.mark.parametrize("bad", ["Mars/Olympus_Mons", "America", "../etc/passwd", "+05:00"])
def test_a_bad_time_zone_is_refused_at_startup(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(_env(bad))

    message = str(info.value)
    assert "IDIS_PROVIDER_CRM_QUOTA_TIMEZONE" in message
    assert repr(bad) in message
    assert "IANA" in message


@pytest.fixture
def sim() -> Iterator[RunningSimulator]:
    with run_simulator() as running:
        # The account's zone is learnt once per process, by provider and base URL. A port
        # an earlier simulator of this worker process used comes back now and then, and
        # its zone would be taken as this one's: each test starts without it.
        for cache in (_ACCOUNT_ZONES, _ACCOUNT_RETRY_AT):
            for key in [key for key in cache if key[1].startswith(running.url)]:
                del cache[key]
        running.control.emit(P, 1, record_ids=["deal_1"], webhook=False)
        yield running


@pytest.mark.parametrize(("zone", "hours"), [("UTC", 12.0), ("US/Eastern", 16.0)])
def test_a_daily_429_from_hubspot_pauses_the_provider_until_the_zones_midnight(
    sim: RunningSimulator, zone: str, hours: float
) -> None:
    # Noon UTC on the day New York springs forward: its next midnight is 04:00 UTC.
    clock = ManualClock(datetime(2026, 3, 8, 12, 0, tzinfo=UTC))
    base = simulator_settings(sim.url, providers=(P,), api="hubspot")
    settings = replace(
        base,
        providers={P: replace(base.provider(P), quota_timezone=zone)},
    )
    sim.control.set_fault(P, "rate_limit", endpoint="record", count=1, policy="DAILY")

    with Gateway(settings, clock=clock) as gateway:
        with pytest.raises(QuotaExhausted) as caught:
            client_for(gateway, P).get_record("deal_1")
        snapshot = gateway.snapshot(P)
        available = gateway.available(P)

    assert (429, 1) == (caught.value.status_code, caught.value.sent)
    assert hours * HOUR == caught.value.retry_after
    assert hours * HOUR == snapshot["paused_for"]
    assert not available


def test_account_info_names_the_zone() -> None:
    assert ZoneInfo("US/Eastern") == account_zone({"portalId": 1, "timeZone": "US/Eastern"})
    assert account_zone({"timeZone": "Mars/Olympus_Mons"}) is None
    assert account_zone({"timeZone": ""}) is None
    assert account_zone({"portalId": 1}) is None
    assert account_zone(["US/Eastern"]) is None


def _daily_429(sim: RunningSimulator, settings: Settings, clock: ManualClock) -> QuotaExhausted:
    """Read a deal (asks account-info first), then meet a DAILY 429 on the next read."""
    with Gateway(settings, clock=clock) as gateway:
        client = client_for(gateway, P)
        assert client.get_record("deal_1") is not None
        sim.control.set_fault(P, "rate_limit", endpoint="record", count=1, policy="DAILY")
        with pytest.raises(QuotaExhausted) as caught:
            client.get_record("deal_1")
        paused = gateway.snapshot(P)["paused_for"]  # rounded to the millisecond
        assert pytest.approx(caught.value.retry_after, abs=0.001) == paused
    return caught.value


def test_without_a_setting_the_zone_comes_from_account_info_once(sim: RunningSimulator) -> None:
    clock = ManualClock(datetime(2026, 3, 8, 12, 0, tzinfo=UTC))
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")

    error = _daily_429(sim, settings, clock)
    again = _daily_429(sim, settings, clock)  # a second gateway in the same process

    assert 16 * HOUR == error.retry_after  # midnight in US/Eastern, the simulated account's zone
    assert 16 * HOUR == again.retry_after
    assert 1 == sim.control.stats(P)["requests"]["account_info"]  # asked once
    assert ZoneInfo("US/Eastern") == quota_zone(settings.provider(P))


def test_when_account_info_is_refused_the_zone_is_utc_said_once(
    sim: RunningSimulator, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock(datetime(2026, 3, 8, 12, 0, tzinfo=UTC))
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")
    # A token without the scope: HubSpot answers 403.
    sim.control.set_fault(P, "error", endpoint="account_info", status=403)

    error = _daily_429(sim, settings, clock)
    again = _daily_429(sim, settings, clock)

    assert 12 * HOUR == error.retry_after  # midnight UTC
    assert 12 * HOUR == again.retry_after
    assert 1 == sim.control.stats(P)["requests"]["account_info"]
    out = capsys.readouterr().out
    assert 1 == out.count("idis.hubspot.quota_timezone_unknown")
    assert "IDIS_PROVIDER_CRM_PROVIDER_QUOTA_TIMEZONE" in out


def test_when_account_info_fails_the_zone_is_utc_for_an_hour_then_asked_again(
    sim: RunningSimulator, capsys: pytest.CaptureFixture[str]
) -> None:
    """A provider down when first asked must not pin UTC for the life of the process."""
    clock = ManualClock(datetime(2026, 3, 8, 12, 0, tzinfo=UTC))
    settings = simulator_settings(sim.url, providers=(P,), api="hubspot")
    sim.control.set_fault(P, "error", endpoint="account_info", status=503)

    during = _daily_429(sim, settings, clock)
    asked_during = sim.control.stats(P)["requests"]["account_info"]
    clock.advance(30 * 60)
    within_the_hour = _daily_429(sim, settings, clock)  # not asked again yet
    sim.control.clear_faults(P)
    clock.advance(31 * 60)
    after = _daily_429(sim, settings, clock)

    # (The manual clock also moved by the retries' short sleeps.)
    assert pytest.approx(12 * HOUR, abs=1) == during.retry_after  # midnight UTC meanwhile
    assert pytest.approx(11.5 * HOUR, abs=1) == within_the_hour.retry_after
    assert asked_during == sim.control.stats(P)["requests"]["account_info"] - 1
    eastern = seconds_to_local_midnight(clock.now(), ZoneInfo("US/Eastern"))
    assert pytest.approx(eastern, abs=1) == after.retry_after
    assert ZoneInfo("US/Eastern") == quota_zone(settings.provider(P))
    assert 1 == capsys.readouterr().out.count("idis.hubspot.quota_timezone_unknown")
