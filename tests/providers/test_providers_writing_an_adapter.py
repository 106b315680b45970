"""docs/providers/writing-an-adapter.md, followed: a host's own pack in well under 300 lines,
over the simulator's REST shape, passing the conformance kit as the library's packs do."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import pytest

from idis.integrations.exceptions import MalformedResponse, ProviderError, ProviderRejected
from idis.integrations.providers import (
    BY_VERSION,
    BearerToken,
    Capabilities,
    ChangesPage,
    ProviderEvent,
    ProviderRecord,
    RateLimitReading,
    RecordPage,
    ReplayPage,
    check_replay_window,
    register_pack,
)
from idis.integrations.resilience import Gateway
from idis.integrations.testing import (
    RunningSimulator,
    check_adapter,
    run_simulator,
    simulator_harness,
)

# ---------------------------------------------------------------- the host's adapter (begin)


def _event(raw: Mapping[str, Any]) -> ProviderEvent:
    at = datetime.fromisoformat(str(raw["occurred_at"]).replace("Z", "+00:00"))
    return ProviderEvent(
        id=f"acme:{raw['id']}",
        seq=int(raw["seq"]),
        type=str(raw["type"]),
        record_id=str(raw["record_id"]),
        tenant_id=raw.get("tenant_id"),
        version=int(raw["version"]),
        occurred_at=at,
        data=dict(raw.get("data") or {}),
        order=BY_VERSION.event_key(
            event_id=str(raw["id"]),
            seq=int(raw["seq"]),
            version=int(raw["version"]),
            occurred_at=at,
        ),
    )


def _record(raw: Mapping[str, Any]) -> ProviderRecord:
    at = datetime.fromisoformat(str(raw["updated_at"]).replace("Z", "+00:00"))
    return ProviderRecord(
        id=str(raw["id"]),
        tenant_id=raw.get("tenant_id"),
        version=int(raw["version"]),
        updated_at=at,
        data=dict(raw.get("data") or {}),
    )


class AcmeClient:
    """Acme's feed: ``GET /changes?after=<seq>``; our cursor is ``acme1:<seq>``."""

    def __init__(self, gateway: Gateway, provider: str) -> None:
        self.gateway, self.name = gateway, provider
        self.settings = gateway.settings.provider(provider)
        self.ordering = BY_VERSION
        self.rate_limit: RateLimitReading | None = None

    @staticmethod
    def accepts_cursor(position: str) -> bool:
        return position.startswith("acme1:")

    def changes(
        self, *, after: str | int | None = None, since: datetime | None = None, limit: int = 100
    ) -> ChangesPage:
        params: dict[str, Any] = {"limit": limit}
        if isinstance(after, str) and self.accepts_cursor(after):
            params["after"] = int(after[6:])
        elif since is not None:
            params["since"] = since.isoformat()
        body = self.gateway.get_json(self.name, "changes", params=params)
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            raise MalformedResponse(f"{self.name}: no events list", provider=self.name)
        events = [_event(e) for e in body["events"]]
        cursor = f"acme1:{body['next_after']}"
        return ChangesPage(events, None, bool(body.get("has_more")), next_cursor=cursor)

    def get_record(self, record_id: str) -> ProviderRecord | None:
        try:
            return _record(
                self.gateway.get_json(self.name, "record", path_params={"id": record_id})
            )
        except ProviderRejected as exc:
            if exc.status_code == 404:
                return None
            raise

    def list_records(
        self, *, updated_since: datetime | None = None, cursor: str | None = None, limit: int = 100
    ) -> RecordPage:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        body = self.gateway.get_json(self.name, "records", params=params)
        return RecordPage([_record(r) for r in body["items"]], body.get("next_cursor"))

    def replay(self, since: datetime, *, cursor: str | None = None, limit: int = 100) -> ReplayPage:
        retention = self.settings.replay_retention.total_seconds()
        check_replay_window(self.name, since, retention, now=self.gateway.clock.now())
        params = {
            "since": since.isoformat(),
            "limit": limit,
            **({"cursor": cursor} if cursor else {}),
        }
        body = self.gateway.get_json(self.name, "replay", params=params)
        return ReplayPage([_event(e) for e in body["events"]], body.get("next_cursor"))

    def health(self) -> bool:
        return self.gateway.health(self.name).ok


class AcmePack:
    name = "acme"
    summary = "Acme CRM (a host's own pack, from writing-an-adapter.md)."
    capabilities = Capabilities(
        webhooks=None,
        polling="changes feed (GET /changes?after=<seq>)",
        replay="replay API (GET /replay?since=)",
        replay_window="REPLAY_RETENTION",
        resync=True,
        auth=("static bearer token",),
        rate_limit_headers=("Retry-After",),
        ordering="version",
        event_identity="acme:<provider event id>",
    )
    endpoints: Mapping[str, str] = {}

    def ordering(self, settings: Any) -> Any:
        return BY_VERSION

    def auth(self, settings: Any, oauth: Callable[[Any], Any] | None) -> Any:
        token = settings.api_token
        return None if token is None else BearerToken(token.get_secret_value())

    def webhook_scheme(self, settings: Any) -> None:
        return None

    def webhook_events(self, body: bytes, provider: str) -> list[ProviderEvent]:
        raise MalformedResponse(f"{provider}: Acme sends no webhooks", provider=provider)

    def read_rate_limit(
        self, status: int, headers: Mapping[str, str], details: Mapping[str, Any] | None
    ) -> RateLimitReading | None:
        retry = headers.get("retry-after", "")
        return RateLimitReading(reset_after=float(retry)) if retry.isdigit() else None

    def map_error(self, exc: ProviderError) -> ProviderError:
        return exc

    def update_call(self, settings: Any, record_id: str, data: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "endpoint": "record",
            "method": "PUT",
            "path_params": {"id": record_id},
            "json": {"data": dict(data)},
        }

    def client(self, gateway: Any, provider: str) -> AcmeClient:
        return AcmeClient(gateway, provider)

    def async_client(self, gateway: Any, provider: str) -> Any:
        raise NotImplementedError("sync only in this example")


# ---------------------------------------------------------------- the host's adapter (end)


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningSimulator]:
    from idis.integrations.providers import _pack

    register_pack(AcmePack(), replace=True)
    try:
        with run_simulator(seed=31) as running:
            yield running
    finally:
        with _pack._LOCK:  # other tests list the library's packs only
            _pack._PACKS.pop("acme", None)


def test_a_host_pack_written_from_the_guide_passes_the_kit(sim: RunningSimulator) -> None:
    with simulator_harness(sim, "acme") as harness:
        report = check_adapter(harness)

    report.assert_conformant()
    assert ["passed"] * 5 + ["skipped"] == [r.outcome for r in report.results]


def test_the_example_adapter_is_under_300_lines() -> None:
    with open(__file__, encoding="utf-8") as source:
        lines = source.read().splitlines()
    begin = next(i for i, line in enumerate(lines) if "the host's adapter (begin)" in line)
    end = next(i for i, line in enumerate(lines) if "the host's adapter (end)" in line)
    assert end - begin < 300
