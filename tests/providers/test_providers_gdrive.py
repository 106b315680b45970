"""The Google Drive pack against the simulator's Drive dialect: page tokens, channels, limits."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from tests.providers.test_providers_dialects import Polls, _cursor, _settings
from tests.sync.conftest import HostTable, OffsetClock

from idis.integrations.auth._crypto import generate_key
from idis.integrations.auth._httpx_auth import oauth_auth_factory
from idis.integrations.auth._tokens import TokenManager
from idis.integrations.config import Secret
from idis.integrations.db._engine import create_db_engine
from idis.integrations.exceptions import (
    AuthError,
    ProviderRejected,
    RateLimited,
    WebhookVerificationError,
)
from idis.integrations.providers import client_for, pack_for
from idis.integrations.providers._gdrive import CatchUp, ChannelToken, map_error
from idis.integrations.providers._pack import pack_auth
from idis.integrations.resilience import Gateway
from idis.integrations.resilience._errors import rejection_details
from idis.integrations.sync._mode import ModePolicy
from idis.integrations.sync._state import load_state, override_mode
from idis.integrations.testing import RunningSimulator, run_simulator, simulator_settings

P = "crm_provider"
HOOK = "https://hooks.example.com/drive"


@pytest.fixture
def clock() -> OffsetClock:
    return OffsetClock()


@pytest.fixture
def sqlite_host(sqlite_engine: Engine) -> HostTable:
    return HostTable(sqlite_engine)


@pytest.fixture
def sim(clock: OffsetClock) -> object:
    with run_simulator(clock=clock.now) as running:
        yield running


def _notifications(sim: RunningSimulator) -> list[dict[str, str]]:
    answer = httpx.get(f"{sim.url}/p/{P}/drive/_notifications", trust_env=False)
    return list(answer.json()["notifications"])


def test_changes_are_polled_through_opaque_page_tokens(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """12 files in pages of 7, then 3 more: once each; the stored cursor is Drive's token."""
    settings = _settings(sim, "gdrive", str(sqlite_engine.url))
    polls = Polls(settings, str(sqlite_engine.url), sqlite_host, clock)
    try:
        polls.poll()
        clock.advance(1)
        sim.control.emit(P, 12, record_ids=[f"doc_{i}" for i in range(12)], webhook=False)
        clock.advance(5)
        second = polls.poll()
        stored = _cursor(sqlite_engine)
        sim.control.emit(P, 3, record_ids=[f"doc_{i}" for i in range(12, 15)], webhook=False)
        clock.advance(5)
        third = polls.poll()
    finally:
        polls.close()

    assert sorted(f"doc_{i}" for i in range(15)) == sorted(r[1] for r in sqlite_host.rows())
    assert 12 == second.applied
    assert 3 == third.applied
    assert stored is not None
    assert stored.startswith("gd1:")


def test_a_silent_channel_fails_over_to_polling_and_back(
    sim: RunningSimulator, sqlite_engine: Engine, sqlite_host: HostTable, clock: OffsetClock
) -> None:
    """Notifications stop without a word (the channel expired unrenewed): polling from the
    covered moment catches up through files.list, then continues on Drive's page token."""
    settings = _settings(sim, "gdrive", str(sqlite_engine.url))
    policy = ModePolicy.from_settings(settings.sync)
    verifier = ChannelToken(["chan-token"])
    gateway = Gateway(settings, clock=clock)
    polls = Polls(settings, str(sqlite_engine.url), sqlite_host, clock)
    try:
        client = client_for(gateway, P)
        channel = client.watch(HOOK, "chan-token", ttl=timedelta(minutes=10))
        polls.poll()
        clock.advance(1)
        sim.control.emit(P, 2, record_ids=["doc_1", "doc_2"], webhook=False)
        pushed = [verifier.notification(h) for h in _notifications(sim)]
        polls.poll()  # the notification's trigger
        covered = clock.now()
        clock.advance(11 * 60)  # the channel expires: Drive says nothing
        sim.control.emit(P, 3, record_ids=["doc_3", "doc_4", "doc_5"], webhook=False)
        silent = _notifications(sim)
        with Session(sqlite_engine) as session, session.begin():
            row = load_state(session, P, policy, clock.now(), for_update=True)
            row.confirmed_seq, row.confirmed_at = 2, covered  # as the sentinel records it
        with Session(sqlite_engine) as session, session.begin():
            override_mode(session, P, "polling", policy=policy, now=clock.now(), actor="test")
        clock.advance(5)
        caught_up = polls.poll()
        clock.advance(1)
        sim.control.emit(P, 1, record_ids=["doc_6"], webhook=False)
        clock.advance(5)
        after = polls.poll()
        stored = _cursor(sqlite_engine)
        renewed = client.renew(None, HOOK, "chan-token", margin=timedelta(hours=1))
        with Session(sqlite_engine) as session, session.begin():
            back = override_mode(session, P, "webhook", policy=policy, now=clock.now(), actor="t")
    finally:
        polls.close()
        gateway.close()

    assert ["sync", "change"] == [n.state for n in pushed]
    assert {channel.id} == {n.channel_id for n in pushed}
    assert [] == silent
    assert 3 == caught_up.applied
    assert 1 == after.applied
    assert sorted(f"doc_{i}" for i in range(1, 7)) == sorted(r[1] for r in sqlite_host.rows())
    assert stored is not None
    assert stored.startswith("gd1:")
    assert renewed.id != channel.id
    assert "webhook" == back.mode.value


def test_a_channel_is_renewed_before_expiry_and_the_old_one_stopped(
    sim: RunningSimulator, clock: OffsetClock
) -> None:
    gateway = Gateway(_settings(sim, "gdrive"), clock=clock)
    try:
        client = client_for(gateway, P)
        first = client.watch(HOOK, "t1", ttl=timedelta(hours=2))
        kept = client.renew(first, HOOK, "t1", margin=timedelta(minutes=30))
        clock.advance(95 * 60)
        renewed = client.renew(first, HOOK, "t1", margin=timedelta(minutes=30))
        sim.control.emit(P, 1, record_ids=["doc_1"], webhook=False)
        channels = {h["X-Goog-Channel-ID"] for h in _notifications(sim)}
    finally:
        gateway.close()

    assert kept is first
    assert renewed.id != first.id
    assert {renewed.id} == channels  # the old channel was stopped


def test_a_notification_is_verified_by_its_channel_token_and_carries_no_data() -> None:
    verifier = ChannelToken(["new", "old"])
    headers = {
        "X-Goog-Channel-ID": "c1",
        "X-Goog-Channel-Token": "old",
        "X-Goog-Resource-State": "change",
        "X-Goog-Message-Number": "7",
    }
    note = verifier.notification(headers)
    with pytest.raises(WebhookVerificationError) as wrong:
        verifier.notification({**headers, "X-Goog-Channel-Token": "guess"})
    with pytest.raises(WebhookVerificationError):
        verifier.notification({"X-Goog-Channel-ID": "c1"})

    assert (note.channel_id, note.triggers_fetch, note.message_number) == ("c1", True, 7)
    assert "guess" not in str(wrong.value)
    assert [] == pack_for(
        replace(simulator_settings("http://x").provider(P), api="gdrive")
    ).webhook_events(b"", P)
    assert "old" not in repr(verifier)


@pytest.mark.parametrize("reason", ["rateLimitExceeded", "userRateLimitExceeded"])
def test_a_rate_limit_403_backs_off_and_a_permission_403_does_not(reason: str) -> None:
    def refusal(why: str) -> ProviderRejected:
        body = {
            "error": {
                "code": 403,
                "message": "m",
                "errors": [{"domain": "usageLimits", "reason": why}],
            }
        }
        error = ProviderRejected("p e: HTTP 403", provider="p", endpoint="e", status_code=403)
        error.details = rejection_details(json.dumps(body).encode())
        return error

    limited = map_error(refusal(reason))
    denied = map_error(refusal("insufficientFilePermissions"))
    reading = pack_for(
        replace(simulator_settings("http://x").provider(P), api="gdrive")
    ).read_rate_limit(403, {}, refusal(reason).details)

    assert isinstance(limited, RateLimited)
    assert limited.retryable
    assert isinstance(denied, ProviderRejected)
    assert not isinstance(denied, RateLimited)
    assert reading is not None
    assert reading.policy == reason


def test_resync_lists_files_and_reports_trashed_ones_as_deletions(
    sim: RunningSimulator, clock: OffsetClock
) -> None:
    start = clock.now() - timedelta(minutes=1)
    sim.control.emit(P, 3, record_ids=["doc_1", "doc_2", "doc_3"], webhook=False)
    sim.control.emit(P, 1, record_ids=["doc_2"], type="record.deleted", webhook=False)
    gateway = Gateway(_settings(sim, "gdrive"), clock=clock)
    try:
        client = client_for(gateway, P)
        page = client.replay(start)
        found = client.get_record("doc_1")
        missing = client.get_record("nope")
    finally:
        gateway.close()

    kinds = {e.record_id: e.type for e in page.events}
    assert {
        "doc_1": "record.updated",
        "doc_3": "record.updated",
        "doc_2": "record.deleted",
    } == kinds
    assert found is not None
    assert found.id == "doc_1"
    assert missing is None


def test_the_catch_up_cursor_round_trips() -> None:
    cursor = CatchUp(1700000000000, "a:b", "files:token")
    assert cursor == CatchUp.decode(cursor.encode())
    assert CatchUp(1, "9") == CatchUp.decode(CatchUp(1, "9").encode())


def test_a_revoked_refresh_token_means_reauthorization(sqlite_url: str) -> None:
    """Drive's OAuth is the library's: invalid_grant on refresh is ReauthorizationRequired."""
    with run_simulator(seed=14) as sim:
        sim.control.emit(P, 1, record_ids=["doc_1"], webhook=False)
        sim.control.require_auth(P)
        base = simulator_settings(
            sim.url,
            providers=(P,),
            database_url=sqlite_url,
            encryption_keys=(Secret(generate_key()),),
        )
        provider = base.provider(P)
        settings = base.with_providers(
            replace(provider, api="gdrive", auth=replace(provider.auth, grant="refresh_token"))
        )
        engine = create_db_engine(sqlite_url)
        manager = TokenManager(settings, engine=engine)
        gateway = Gateway(settings, auth=pack_auth(oauth_auth_factory(settings, manager=manager)))
        try:
            issued = sim.control.issue_tokens(P)
            manager.import_token(P, {**issued, "expires_in": 3600})
            client = client_for(gateway, P)
            found = client.get_record("doc_1")
            sim.control.expire_tokens(P)
            sim.control.revoke_token(P, issued["refresh_token"])
            with pytest.raises(AuthError) as caught:
                client.get_record("doc_1")
        finally:
            gateway.close()
            manager.close()
            engine.dispose()

    assert found is not None
    assert (
        "ReauthorizationRequired" == type(caught.value).__name__
        or "reauthor" in str(caught.value).lower()
    )
    assert issued["refresh_token"] not in str(caught.value)


def test_the_async_client_renews_a_channel_too(sim: RunningSimulator, clock: OffsetClock) -> None:
    import asyncio

    from idis.integrations.providers import async_client_for
    from idis.integrations.resilience._gateway import AsyncGateway

    async def run() -> tuple[object, object, object]:
        gateway = AsyncGateway(_settings(sim, "gdrive"), clock=clock)
        try:
            client = async_client_for(gateway, P)
            first = await client.watch(HOOK, "t1", ttl=timedelta(hours=1))
            clock.advance(50 * 60)
            renewed = await client.renew(first, HOOK, "t1", margin=timedelta(minutes=15))
            page = await client.changes(after="gd1:" + await client.start_page_token())
            return first, renewed, page
        finally:
            await gateway.aclose()

    first, renewed, page = asyncio.run(run())
    sim.control.emit(P, 1, record_ids=["doc_1"], webhook=False)
    channels = {h["X-Goog-Channel-ID"] for h in _notifications(sim)}

    assert {renewed.id} == channels  # type: ignore[attr-defined]
    assert renewed.id != first.id  # type: ignore[attr-defined]
    assert page.next_cursor.startswith("gd1:")  # type: ignore[attr-defined]


def test_a_simulator_reset_forgets_the_channels(sim: RunningSimulator) -> None:
    gateway = Gateway(_settings(sim, "gdrive"))
    try:
        client_for(gateway, P).watch(HOOK, "t1")
    finally:
        gateway.close()
    sim.control.reset(P)
    sim.control.emit(P, 1, record_ids=["doc_1"], webhook=False)

    assert [] == _notifications(sim)
