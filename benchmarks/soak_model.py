"""The fault soak's reference model, shared by ``python -m benchmarks.soak`` and tests/soak.

Three parts:

* :class:`ProviderFaults`: an ASGI wrapper around the simulator's app that injects what the
  simulator's own fault layer cannot (it runs *before* routing): a 5xx or a timeout *after*
  the provider applied a ``PUT``, a slow send, poison records the provider always refuses,
  and providers that send no record version (``version`` stripped from ``/changes`` and
  ``/replay``). It also logs every ``PUT`` as received, so stale re-sends are visible.
* :class:`HostTable`: the host's handler, one row per event the library applied.
* :func:`check_outbox` / :func:`check_inbound`: what should have happened against what
  the provider applied (read from the simulator's side) and what the host applied.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

__all__ = [
    "HostTable",
    "InboundFigures",
    "OutboxFigures",
    "ProviderFaults",
    "check_inbound",
    "check_outbox",
    "serve_simulator",
]

_PUT = re.compile(r"^/p/(?P<provider>[^/]+)/records/(?P<record>[^/]+)$")
_FEED = re.compile(r"^/p/(?P<provider>[^/]+)/(?:changes|replay)$")

#: What a PUT may meet: refused (poison), applied then 503, applied then no answer in time,
#: or slowed down before it is applied.
FAULT_KINDS = ("error_after", "timeout_after", "slow")


@dataclass
class ProviderFaults:
    """Faults the wrapper injects, armed one by one (tests) or drawn at random (the soak).

    Thread-safe: the server's loop reads it while the driver arms it.
    """

    seed: int = 0
    #: Probability per PUT of each kind in :data:`FAULT_KINDS` (the soak's random faults).
    ratios: dict[str, float] = field(default_factory=dict)
    #: Seconds a ``timeout_after`` answer is held (longer than the client's read timeout).
    hang: float = 1.0
    #: Seconds a ``slow`` send waits before it is applied.
    slow: float = 0.5
    #: Record ids every PUT to which is refused with 503 (poison messages).
    poison: set[str] = field(default_factory=set)
    #: Providers whose feeds lose the ``version`` field (version-less providers).
    versionless: set[str] = field(default_factory=set)
    #: Every PUT as received: (provider, record id, idempotency key, status the provider
    #: answered before any fault, fault or "").
    log: list[tuple[str, str, str, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self._armed: dict[str, list[str]] = defaultdict(list)

    def arm(self, provider: str, kind: str, count: int = 1) -> None:
        """Make the next ``count`` PUTs to ``provider`` meet ``kind``."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r} is unknown: expected one of {FAULT_KINDS}")
        with self._lock:
            self._armed[provider].extend([kind] * count)

    def disarm(self) -> None:
        """Drop armed faults and random ratios (the provider is healthy again)."""
        with self._lock:
            self._armed.clear()
            self.ratios = {}

    def _draw(self, provider: str) -> str:
        with self._lock:
            armed = self._armed.get(provider)
            if armed:
                return armed.pop(0)
            for kind in FAULT_KINDS:
                ratio = self.ratios.get(kind, 0.0)
                if ratio and self._rng.random() < ratio:
                    return kind
        return ""

    def _note(self, entry: tuple[str, str, str, int, str]) -> None:
        with self._lock:
            self.log.append(entry)

    def wrap(self, app: Callable[..., Any]) -> Callable[..., Any]:
        """The simulator's ASGI ``app`` behind these faults."""

        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            put = _PUT.match(path) if scope.get("method") == "PUT" else None
            if put is not None:
                await self._put(app, scope, receive, send, put["provider"], put["record"])
                return
            feed = _FEED.match(path) if scope.get("method") == "GET" else None
            if feed is not None and feed["provider"] in self.versionless:
                await self._strip_versions(app, scope, receive, send)
                return
            await app(scope, receive, send)

        return wrapped

    async def _put(
        self, app: Any, scope: dict[str, Any], receive: Any, send: Any, provider: str, record: str
    ) -> None:
        key = dict(scope.get("headers") or []).get(b"idempotency-key", b"").decode()
        if record in self.poison:
            self._note((provider, record, key, 0, "poison"))
            await _json(send, 503, {"error": "poison"})
            return
        kind = self._draw(provider)
        if kind == "slow":
            await asyncio.sleep(self.slow)
        captured: list[dict[str, Any]] = []

        async def capture(message: dict[str, Any]) -> None:
            captured.append(message)

        try:
            await app(scope, receive, capture)
        except Exception as exc:
            if type(exc).__name__ != "ClientDisconnect":
                raise
            # The client went away before its body was read (a SIGKILLed worker): not applied.
            self._note((provider, record, key, 0, "disconnected"))
            return
        status = next((m["status"] for m in captured if m["type"] == "http.response.start"), 0)
        self._note((provider, record, key, status, kind))
        if kind == "error_after":
            await _json(send, 503, {"error": "applied_then_failed"})
            return
        if kind == "timeout_after":
            await asyncio.sleep(self.hang)
            await _json(send, 504, {"error": "applied_then_timed_out"})
            return
        for message in captured:
            await send(message)

    async def _strip_versions(
        self, app: Any, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        captured: list[dict[str, Any]] = []

        async def capture(message: dict[str, Any]) -> None:
            captured.append(message)

        await app(scope, receive, capture)
        start = next(m for m in captured if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in captured if m["type"] == "http.response.body")
        if start["status"] == 200:
            doc = json.loads(body)
            for event in doc.get("events", []):
                event.pop("version", None)
            await _json(send, 200, doc)
            return
        for message in captured:
            await send(message)


async def _json(send: Any, status: int, doc: Mapping[str, Any]) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serve_simulator(state: Any, faults: ProviderFaults, port: int | None = None) -> Iterator[str]:
    """Serve the simulator over ``state`` behind ``faults`` on 127.0.0.1; yield its URL."""
    import uvicorn

    from idis.integrations.simulator import build_app
    from idis.integrations.testing import serve_asgi

    config = uvicorn.Config(
        faults.wrap(build_app(state)),
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)

    def release_hangs() -> None:
        state.closing = True
        state.hang_generation += 1

    with serve_asgi(
        None, port=port, name="soak-simulator", server=server, before_stop=release_hangs
    ) as url:
        yield url


# --------------------------------------------------------------------------- host


class HostTable:
    """The host's side of inbound sync: the handler writes one row per applied event.

    The row is written in the inbox's transaction, so its id orders the applications of
    one record (the inbox holds that record's ledger row while it applies).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        serial = (
            "BIGSERIAL PRIMARY KEY"
            if engine.dialect.name == "postgresql"
            else "INTEGER PRIMARY KEY AUTOINCREMENT"
        )
        with engine.begin() as conn:
            conn.execute(
                text(
                    f"CREATE TABLE IF NOT EXISTS soak_applied (id {serial},"
                    " provider VARCHAR(64) NOT NULL, event_id VARCHAR(64) NOT NULL,"
                    " record_id VARCHAR(128) NOT NULL, seq BIGINT)"
                )
            )

    def registry(self, provider: str | None = None) -> Any:
        """A handler registry recording ``provider``'s events, for every event type.

        Without ``provider``, it is the record id's part before ``:`` (the soak names its
        records ``<provider>:r<n>``), so one registry serves a receiver of several providers.
        """
        from idis.integrations.sync import HandlerRegistry

        def handler(session: Session, event: Any) -> None:
            session.execute(
                text(
                    "INSERT INTO soak_applied (provider, event_id, record_id, seq)"
                    " VALUES (:p, :e, :r, :s)"
                ),
                {
                    "p": provider or event.record_id.split(":")[0],
                    "e": event.id,
                    "r": event.record_id,
                    "s": event.seq,
                },
            )

        registry = HandlerRegistry()
        registry.register("*", handler)
        return registry

    def rows(self, provider: str) -> list[tuple[str, str, int]]:
        """(event id, record id, seq) the host applied for ``provider``, in order."""
        with self.engine.connect() as conn:
            return [
                (r[0], r[1], int(r[2]))
                for r in conn.execute(
                    text(
                        "SELECT event_id, record_id, seq FROM soak_applied"
                        " WHERE provider = :p ORDER BY id"
                    ),
                    {"p": provider},
                )
            ]


# --------------------------------------------------------------------------- checks


@dataclass
class OutboxFigures:
    """What the outbox did, against the model."""

    messages: int = 0
    applied: int = 0
    #: Not applied by the provider, and the outbox holds it delivered or dead (not poison).
    lost: int = 0
    #: Messages the provider applied more than once.
    applied_twice: int = 0
    #: Applications that came after a later message of the same ordering key.
    out_of_order: int = 0
    #: Not applied and still pending at the end.
    pending: int = 0
    poison: int = 0
    poison_dead: int = 0
    #: Sends of a message that arrived after a later message of its key was applied
    #: (the provider's idempotency made them harmless).
    stale_sends: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.applied_twice or self.out_of_order)


def check_outbox(
    expected: Mapping[str, list[str]],
    poison: Iterable[str],
    writes: Mapping[str, Sequence[Mapping[str, Any]]],
    statuses: Mapping[str, str],
    received: Iterable[tuple[str, str, str, int, str]] = (),
) -> OutboxFigures:
    """Compare what was enqueued with what the provider applied.

    Args:
        expected: Record id (the ordering key) -> idempotency keys in enqueue order.
        poison: Idempotency keys of messages the provider always refuses.
        writes: The simulator's ``stats()["writes"]``: record id -> applications in order.
        statuses: Idempotency key -> the outbox's status (``pending``/``delivered``/``dead``).
        received: :attr:`ProviderFaults.log`, for stale sends.
    """
    poison = set(poison)
    figures = OutboxFigures()
    applied: Counter[str] = Counter()
    for record_id, keys in expected.items():
        rank = {key: i for i, key in enumerate(keys)}
        figures.messages += len(keys)
        highest = -1
        for write in writes.get(record_id, []):
            key = write.get("idempotency_key")
            if key not in rank:
                continue
            applied[key] += 1
            if rank[key] < highest:
                figures.out_of_order += 1
                if len(figures.examples) < 10:
                    figures.examples.append(f"out of order: {record_id} {key} after #{highest}")
            highest = max(highest, rank[key])
        for key in keys:
            count = applied[key]
            if key in poison:
                figures.poison += 1
                figures.poison_dead += statuses.get(key) == "dead"
                continue
            if count:
                figures.applied += 1
            if count > 1:
                figures.applied_twice += 1
                if len(figures.examples) < 10:
                    figures.examples.append(f"applied {count} times: {key}")
            if count == 0:
                if statuses.get(key, "pending") == "pending":
                    figures.pending += 1
                else:
                    figures.lost += 1
                    if len(figures.examples) < 10:
                        figures.examples.append(f"lost ({statuses.get(key)}): {key}")
    ranks = {key: (rec, i) for rec, keys in expected.items() for i, key in enumerate(keys)}
    done: dict[str, int] = {}
    for _provider, _record, key, status, _kind in received:
        if key not in ranks or not 200 <= status < 300:
            continue
        rec, i = ranks[key]
        if done.get(rec, -1) > i:
            figures.stale_sends += 1
        done[rec] = max(done.get(rec, -1), i)
    return figures


@dataclass
class InboundFigures:
    """What the host applied, against the provider's events."""

    events: int = 0
    records: int = 0
    applications: int = 0
    #: Records whose last applied event is not the provider's last event for them.
    lost: int = 0
    #: Events applied more than once.
    applied_twice: int = 0
    #: Applications of an event older than one already applied to the same record.
    out_of_order: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.applied_twice or self.out_of_order)


def check_inbound(
    events: Iterable[Mapping[str, Any]],
    applied: Iterable[tuple[str, str, int]],
    *,
    final: bool = True,
) -> InboundFigures:
    """Compare the provider's events with the host's applications.

    Args:
        events: The provider's events (``id``, ``seq``, ``record_id``).
        applied: :meth:`HostTable.rows` for that provider.
        final: Everything has been caught up: count records whose last event is missing.
    """
    figures = InboundFigures()
    last: dict[str, int] = {}
    for event in events:
        figures.events += 1
        last[event["record_id"]] = max(last.get(event["record_id"], 0), int(event["seq"]))
    figures.records = len(last)
    seen: Counter[str] = Counter()
    newest: dict[str, int] = {}
    for event_id, record_id, seq in applied:
        figures.applications += 1
        seen[event_id] += 1
        if seen[event_id] == 2:
            figures.applied_twice += 1
            if len(figures.examples) < 10:
                figures.examples.append(f"applied twice: {event_id}")
        if seq <= newest.get(record_id, 0):
            figures.out_of_order += 1
            if len(figures.examples) < 10:
                figures.examples.append(
                    f"out of order: {record_id} seq {seq} after {newest[record_id]}"
                )
        newest[record_id] = max(newest.get(record_id, 0), seq)
    if final:
        for record_id, seq in last.items():
            if newest.get(record_id) != seq:
                figures.lost += 1
                if len(figures.examples) < 10:
                    figures.examples.append(
                        f"lost: {record_id} last event seq {seq}, host has {newest.get(record_id)}"
                    )
    return figures


def provider_events(state: Any, provider: str) -> list[dict[str, Any]]:
    """Every event ``provider`` emitted, read from the simulator's own feed (no faults)."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        with state.lock:
            page = state.provider(provider).changes(after=after, since=None, limit=1000)
        out.extend(page["events"])
        if not page["has_more"]:
            return out
        after = page["next_after"]
