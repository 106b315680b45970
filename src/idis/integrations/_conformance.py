"""The adapter conformance kit: what every provider pack must hold, checked from a host's tests.

A host that writes its own pack (see docs/providers/writing-an-adapter.md) runs
:func:`check_adapter` in its own test suite over an :class:`AdapterHarness`: a
fresh adapter per call (a "restart"), a way to make changes at the provider, a
clock, and a way to make the provider refuse. The checks are the guarantees the
library's sync, reconcile and enrichment code rely on:

* ``cursors_survive_restarts``: a cursor is text, handed to a *new* adapter it
  resumes where the old one stopped: every later change arrives, nothing already
  seen comes back under a new event id;
* ``order_holds``: every event carries an order key, and one record's keys never
  go backwards in delivery order;
* ``replay_window_reported``: a replay far in the past either answers or raises
  :class:`ReplayWindowExceeded` naming the resync, and the pack states its window;
* ``errors_classified``: a 5xx is a retryable :class:`ProviderError`, a missing
  record is ``None``, no error message carries a secret;
* ``rate_limits_read``: a 429 with ``Retry-After`` is :class:`RateLimited` with the
  stated delay, and the pack's reading of it is a :class:`RateLimitReading`;
* ``enrichment_answers`` (enrichment packs): a match is data, no match is ``None``.

Checks a pack cannot take (no polling, no replay) are reported as skipped, with why.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._clock import SystemClock
from .exceptions import ProviderError, RateLimited, ReplayWindowExceeded

if TYPE_CHECKING:
    from .providers import ProviderEvent, ProviderPack
    from .testing import RunningSimulator

__all__ = [
    "AdapterHarness",
    "CheckResult",
    "ConformanceReport",
    "check_adapter",
    "simulator_harness",
]

_ids = itertools.count(1)


@dataclass(slots=True)
class AdapterHarness:
    """What the kit needs from the host to exercise one adapter.

    Args:
        pack: The pack under test.
        client: A *new* adapter each call (as after a restart), sharing nothing
            with earlier ones but the provider.
        change: Make the provider change these record ids (create or update, once each).
        now: The provider's current time (what ``since`` is measured on).
        advance: Move every clock involved forward by seconds (polls by modification
            time need time to pass between changes).
        refuse: Make the provider answer the next calls with this HTTP status (and
            ``Retry-After`` seconds when given); ``restore`` undoes it.
        restore: Undo ``refuse``.
        secrets: Values that must never appear in an error message.
        no_match: For enrichment packs: a subject id the provider does not know.
    """

    pack: ProviderPack
    client: Callable[[], Any]
    change: Callable[[Sequence[str]], None]
    now: Callable[[], datetime]
    advance: Callable[[float], None]
    refuse: Callable[[int, float | None], None]
    restore: Callable[[], None]
    secrets: Sequence[str] = ()
    no_match: str = "conformance-no-such-subject"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check: passed, failed (with what was wrong) or skipped (with why)."""

    name: str
    outcome: str  # "passed", "failed", "skipped"
    detail: str = ""


@dataclass(slots=True)
class ConformanceReport:
    """Every check's result for one pack."""

    pack: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckResult]:
        """The failed checks."""
        return [r for r in self.results if r.outcome == "failed"]

    def outcome(self, name: str) -> str:
        """The outcome of the check called ``name``."""
        return next(r.outcome for r in self.results if r.name == name)

    def assert_conformant(self) -> None:
        """Raise AssertionError listing every failed check (for a host's test)."""
        if self.failures:
            lines = "\n".join(f"  {r.name}: {r.detail}" for r in self.failures)
            raise AssertionError(f"pack {self.pack!r} fails the adapter conformance kit:\n{lines}")


class _Failed(Exception):
    pass


def _expect(condition: bool, detail: str) -> None:
    if not condition:
        raise _Failed(detail)


def _drain(client: Any, *, after: str | None, since: datetime | None) -> tuple[list[Any], str]:
    events: list[ProviderEvent] = []
    cursor = after
    for _ in range(100):
        page = client.changes(after=cursor, since=since if cursor is None else None, limit=5)
        events.extend(page.events)
        _expect(
            isinstance(page.next_cursor, str) and bool(page.next_cursor),
            f"changes() returned next_cursor={page.next_cursor!r}: expected non-empty text",
        )
        cursor = page.next_cursor
        if not page.has_more:
            assert cursor is not None
            return events, cursor
    raise _Failed("changes() still had more after 100 pages of 5 for a handful of changes")


def _polls(pack: ProviderPack) -> bool:
    return not pack.capabilities.polling.startswith("none")


def _cursors(h: AdapterHarness, tag: str) -> None:
    start = h.now() - timedelta(seconds=1)
    first = [f"{tag}-a{i}" for i in range(6)]
    h.change(first)
    h.advance(2)
    seen, cursor = _drain(h.client(), after=None, since=start)
    _expect(
        set(first) <= {e.record_id for e in seen},
        f"the first poll missed {sorted(set(first) - {e.record_id for e in seen})}",
    )
    h.advance(2)
    later = [f"{tag}-b{i}" for i in range(4)]
    h.change(later)
    h.advance(2)
    resumed, _ = _drain(h.client(), after=cursor, since=None)
    got = {e.record_id for e in resumed}
    _expect(
        set(later) <= got,
        f"a new adapter resumed from {cursor[:40]!r} and missed {sorted(set(later) - got)}",
    )
    old_ids = {e.id for e in seen}
    renamed = [e.id for e in resumed if e.record_id in set(first) and e.id not in old_ids]
    _expect(not renamed, f"unchanged records came back under new event ids: {renamed[:3]}")


def _order(h: AdapterHarness, tag: str) -> None:
    start = h.now() - timedelta(seconds=1)
    record = f"{tag}-o"
    for _ in range(3):
        h.change([record])
        h.advance(2)
    events, _ = _drain(h.client(), after=None, since=start)
    keys = [e.order for e in events if e.record_id == record]
    _expect(bool(keys), f"no event for {record} after changing it three times")
    _expect(all(k is not None for k in keys), "an event has no order key")
    _expect(keys == sorted(keys), f"order keys of one record go backwards: {keys}")
    current = h.client().get_record(record)
    _expect(current is not None, f"get_record({record!r}) is None right after changes")
    last = keys[-1]
    ordering = getattr(h.client(), "ordering", None)
    same = ordering is not None and ordering.same_state(last, current.order)
    _expect(
        current.order is not None and (same or current.order > last),
        f"the record's order key {current.order} is older than its last event's {last}",
    )


def _replay(h: AdapterHarness, tag: str) -> None:
    caps = h.pack.capabilities
    _expect(
        caps.replay_window is not None and bool(caps.replay_window.strip()),
        "the pack has a replay source but states no replay_window",
    )
    client = h.client()
    try:
        client.replay(h.now() - timedelta(days=3650), limit=5)
    except ReplayWindowExceeded as exc:
        _expect("--resync" in str(exc), f"ReplayWindowExceeded does not name the resync: {exc}")


def _errors(h: AdapterHarness, tag: str) -> None:
    _expect(h.client().get_record(f"{tag}-missing") is None, "a missing record is not None")
    h.refuse(503, None)
    try:
        with contextlib.suppress(ProviderError):
            _call_one(h)
            raise _Failed("a 503 from the provider raised nothing")
        try:
            _call_one(h)
        except ProviderError as exc:
            _expect(exc.retryable, f"a 503 raised {type(exc).__name__}, which is not retryable")
            _no_secret(h, exc)
    finally:
        h.restore()


def _call_one(h: AdapterHarness) -> Any:
    client = h.client()
    if _polls(h.pack):
        return client.changes(since=h.now() - timedelta(seconds=5), limit=5)
    return client.enrich(h.no_match)


def _no_secret(h: AdapterHarness, exc: BaseException) -> None:
    text = f"{exc} {exc!r}"
    leaked = [s for s in h.secrets if s and s in text]
    _expect(not leaked, f"an error message carries a secret ({type(exc).__name__})")


def _rate_limits(h: AdapterHarness, tag: str) -> None:
    h.refuse(429, 7)
    try:
        try:
            _call_one(h)
        except RateLimited as exc:
            _expect(
                exc.retry_after is not None and abs(exc.retry_after - 7) < 1,
                f"a 429 with Retry-After: 7 gave retry_after={exc.retry_after}",
            )
            _no_secret(h, exc)
        except ProviderError as exc:
            raise _Failed(f"a 429 raised {type(exc).__name__}, expected RateLimited") from None
        else:
            raise _Failed("a 429 from the provider raised nothing")
    finally:
        h.restore()
    reading = h.pack.read_rate_limit(429, {"retry-after": "7"}, None)
    from .providers import RateLimitReading

    _expect(
        reading is None or isinstance(reading, RateLimitReading),
        f"read_rate_limit returned {type(reading).__name__}",
    )


def _enrichment(h: AdapterHarness, tag: str) -> None:
    subject = f"{tag}-p"
    h.change([subject])
    client = h.client()
    found = client.enrich(subject)
    _expect(isinstance(found, dict) and bool(found), f"enrich({subject!r}) gave {found!r}")
    _expect(client.enrich(h.no_match) is None, "no match is not None")


def check_adapter(harness: AdapterHarness) -> ConformanceReport:
    """Run every check over ``harness``; see the module docstring."""
    pack = harness.pack
    report = ConformanceReport(pack.name)
    tag = f"k{next(_ids)}"
    polls = _polls(pack)
    checks: list[tuple[str, Callable[[AdapterHarness, str], None], str | None]] = [
        ("cursors_survive_restarts", _cursors, None if polls else "the pack does not poll"),
        ("order_holds", _order, None if polls else "the pack has no events"),
        (
            "replay_window_reported",
            _replay,
            None if pack.capabilities.replay else "the pack has no replay (reconcile resyncs)",
        ),
        ("errors_classified", _errors if polls else _errors_enrich, None),
        ("rate_limits_read", _rate_limits, None),
        ("enrichment_answers", _enrichment, None if not polls else "the pack does not enrich"),
    ]
    for name, check, skip in checks:
        if skip is not None:
            report.results.append(CheckResult(name, "skipped", skip))
            continue
        try:
            check(harness, f"{tag}{name[:3]}")
        except _Failed as exc:
            report.results.append(CheckResult(name, "failed", str(exc)))
        except Exception as exc:  # noqa: BLE001  # a crash is a failed check, reported
            report.results.append(
                CheckResult(name, "failed", f"raised {type(exc).__name__}: {str(exc)[:200]}")
            )
        else:
            report.results.append(CheckResult(name, "passed"))
    return report


def _errors_enrich(h: AdapterHarness, tag: str) -> None:
    h.refuse(503, None)
    try:
        try:
            h.client().enrich(f"{tag}-x")
        except ProviderError as exc:
            _expect(exc.retryable, f"a 503 raised {type(exc).__name__}, which is not retryable")
            _no_secret(h, exc)
        else:
            raise _Failed("a 503 from the provider raised nothing")
    finally:
        h.restore()


@contextlib.contextmanager
def simulator_harness(
    sim: RunningSimulator, api: str, *, provider: str = "crm_provider", **settings: Any
) -> Iterator[AdapterHarness]:
    """A harness for a pack over the library's simulator (its dialect of ``api``).

    ``settings`` are ``simulator_settings`` overrides (``endpoints=`` for a pack
    whose logical endpoints the simulator does not know by default).
    """
    from .config import RetryPolicy
    from .providers import client_for, pack_for
    from .resilience import Gateway
    from .testing import simulator_settings

    built = simulator_settings(
        sim.url, providers=(provider,), api=api, retry=RetryPolicy(max_attempts=1), **settings
    )
    built = built.with_providers(replace(built.provider(provider), api=api))
    gateways: list[Gateway] = []

    def client() -> Any:
        from .providers._pack import pack_auth

        gateway = Gateway(built, clock=_SimClock(sim), auth=pack_auth())
        gateways.append(gateway)
        return client_for(gateway, provider)

    def refuse(status: int, retry_after: float | None) -> None:
        if status == 429:
            sim.control.set_fault(provider, "rate_limit", retry_after=retry_after)
        else:
            sim.control.set_fault(provider, "error", status=status)

    def change(ids: Sequence[str]) -> None:
        sim.control.emit(provider, len(ids), record_ids=list(ids), webhook=False)

    def advance(seconds: float) -> None:
        sim.control.advance_clock(seconds)

    def restore() -> None:
        sim.control.clear_faults(provider)

    token = built.provider(provider).api_token
    try:
        yield AdapterHarness(
            pack=pack_for(built.provider(provider)),
            client=client,
            change=change,
            now=sim.control.now,
            advance=advance,
            refuse=refuse,
            restore=restore,
            secrets=() if token is None else (token.get_secret_value(),),
        )
    finally:
        for gateway in gateways:
            gateway.close()


class _SimClock(SystemClock):
    """Real time shifted by the simulator's offset (the kit advances the simulator)."""

    def __init__(self, sim: RunningSimulator) -> None:
        self._sim = sim

    def time(self) -> float:
        """Seconds since the epoch on the simulator's clock."""
        return self.now().timestamp()

    def now(self) -> datetime:
        """The simulator's now."""
        return self._sim.state.now()
