"""One flow, two drivers: a request-path operation written once, run sync or async.

A *flow* is a generator that yields *effects*, plain descriptions of the I/O it
needs (a database transaction, an HTTP request, a sleep), and receives each
effect's result, or has the effect's exception thrown into it. A flow does no
I/O itself. :func:`drive` runs a flow with blocking I/O; :func:`adrive` runs the
same flow under asyncio. The drivers only execute effects, so the order of the
steps and the error handling of an operation exist once, in its flow. This is
the shape httpx gives ``Auth.auth_flow`` (one generator, driven by ``Client``
and by ``AsyncClient``).

Each effect knows how to run itself both ways (:meth:`Effect.run` and
:meth:`Effect.arun`) against an *io* object that the sync or async face
supplies: a :class:`SyncIO` or :class:`AsyncIO`, or a richer object of the
capability's own. Writing a new effect means writing those two short methods;
everything else stays in the flow::

    def fetch_flow(key: str) -> Flow[Row | None]:
        row = yield from perform(Transaction(lambda s: s.get(Row, key), write=False))
        if row is None:
            yield from perform(Sleep(0.5))
        return row

    row = drive(fetch_flow("a"), SyncIO(clock=clock, engine=engine))
    row = await adrive(fetch_flow("a"), AsyncIO(clock=clock, engine=async_engine))

``yield from perform(effect)`` gives the result its static type; a bare
``yield effect`` works too (the result is then ``Any``) and is what hot paths use.
Database work inside a flow is written once against a sync ``Session``; the
async driver runs it through ``AsyncSession.run_sync``, so the same statements
execute over the async database driver.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar

from ._clock import Clock, system_clock

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "AsyncIO",
    "Awaited",
    "Effect",
    "Flow",
    "InSession",
    "Sleep",
    "SyncIO",
    "Transaction",
    "adrive",
    "async_face",
    "drive",
    "perform",
    "sync_face",
]

R = TypeVar("R")
T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")


class Effect(Generic[R]):
    """A piece of I/O a flow asks for; subclasses say how to run it both ways."""

    __slots__ = ()

    def run(self, io: Any) -> R:
        """Run with blocking I/O."""
        raise NotImplementedError

    async def arun(self, io: Any) -> R:
        """Run under asyncio."""
        raise NotImplementedError


class Awaited(Effect[R]):
    """An effect that is one call, written once for both faces: :meth:`call` returns the
    result with blocking I/O, or an awaitable of it under asyncio (which ``arun`` awaits)."""

    __slots__ = ()

    def call(self, io: Any) -> Any:
        """The call on ``io``."""
        raise NotImplementedError

    def run(self, io: Any) -> R:
        """The call's result."""
        return self.call(io)  # type: ignore[no-any-return]  # R, as the subclass declares

    async def arun(self, io: Any) -> R:
        """The call's result, awaited."""
        return await self.call(io)  # type: ignore[no-any-return]  # R, as the subclass declares


#: A flow: yields effects, receives their results, returns ``T``.
Flow: TypeAlias = Generator[Effect[Any], Any, T]


def perform(effect: Effect[R]) -> Generator[Effect[R], R, R]:
    """``result = yield from perform(effect)``: yield one effect with a typed result."""
    return (yield effect)


def drive(flow: Flow[T], io: Any) -> T:
    """Run ``flow`` to completion with blocking I/O and return its value.

    An effect that raises has its exception thrown into the flow, which may
    handle it; whatever the flow does not handle propagates to the caller.
    """
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]  # the generator's declared T
        value, error = None, None
        try:
            value = effect.run(io)
        except BaseException as exc:  # noqa: BLE001  # handed to the flow, which decides
            error = exc
        finally:
            del effect


async def adrive(flow: Flow[T], io: Any) -> T:
    """Run ``flow`` to completion under asyncio and return its value (see :func:`drive`).

    Cancellation is thrown into the flow like any other error, so its
    ``finally`` blocks release what it holds before the task ends.
    """
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = flow.send(value) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]  # the generator's declared T
        value, error = None, None
        try:
            value = await effect.arun(io)
        except BaseException as exc:  # noqa: BLE001  # handed to the flow, which decides
            error = exc
        finally:
            del effect


def sync_face(flow: Callable[Concatenate[S, P], Flow[T]]) -> Callable[Concatenate[S, P], T]:
    """A blocking method made from a flow method: ``drive(flow(self, ...), self._io)``.

    A face class lists its public methods as ``name = sync_face(Flows._name)``
    (and its async twin ``name = async_face(Flows._name)``), so each method's
    signature, docstring and steps are written once, on the flow.
    """

    @functools.wraps(flow)
    def method(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return drive(flow(self, *args, **kwargs), self._io)  # type: ignore[attr-defined]

    return _public(method)


def async_face(
    flow: Callable[Concatenate[S, P], Flow[T]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """The coroutine method made from a flow method (see :func:`sync_face`)."""

    @functools.wraps(flow)
    async def method(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await adrive(flow(self, *args, **kwargs), self._io)  # type: ignore[attr-defined]

    return _public(method)


def _public(method: Callable[P, T]) -> Callable[P, T]:
    """Name a face method as it is called (``_request`` becomes ``request``), and have its
    signature say what it returns (``Flow[X]`` becomes ``X``) for ``help()`` and ``inspect``."""
    method.__name__ = method.__name__.lstrip("_")
    method.__qualname__ = method.__name__
    signature = inspect.signature(method)
    returns = signature.return_annotation
    if isinstance(returns, str) and returns.startswith("Flow[") and returns.endswith("]"):
        returns = returns[len("Flow[") : -1]
        method.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
        method.__annotations__ = {**method.__annotations__, "return": returns}
    return method


@dataclass(slots=True)
class SyncIO:
    """What the common effects need from a sync face: a clock and, for transactions, an engine."""

    clock: Clock = system_clock
    engine: Engine | None = None
    #: The caller's own session, for flows that run inside the caller's transaction.
    session: Session | None = None


@dataclass(slots=True)
class AsyncIO:
    """Async twin of :class:`SyncIO`."""

    clock: Clock = system_clock
    engine: AsyncEngine | None = None
    session: AsyncSession | None = None


@dataclass(frozen=True, slots=True)
class Sleep(Effect[None]):
    """Wait ``seconds`` on the io's clock (a manual clock advances instead)."""

    seconds: float

    def run(self, io: Any) -> None:
        """``clock.sleep``."""
        io.clock.sleep(self.seconds)

    async def arun(self, io: Any) -> None:
        """``await clock.asleep``."""
        await io.clock.asleep(self.seconds)


@dataclass(frozen=True, slots=True)
class Transaction(Effect[R]):
    """Run ``work(session)`` in a transaction of its own on the io's engine; commit on success.

    ``write=False`` marks a read: on SQLite it starts a deferred transaction
    that takes no write lock (see ``db/_engine.py``).
    """

    work: Callable[[Session], R]
    write: bool = True

    def run(self, io: Any) -> R:
        """One ``Session`` transaction."""
        from .db._engine import session_scope

        with session_scope(io.engine, write=self.write) as session:
            return self.work(session)

    async def arun(self, io: Any) -> R:
        """One ``AsyncSession`` transaction, the work run through ``run_sync``."""
        from .db._engine import async_session_scope

        async with async_session_scope(io.engine, write=self.write) as session:
            return await session.run_sync(self.work)


@dataclass(frozen=True, slots=True)
class InSession(Effect[R]):
    """Run ``work(session)`` on the caller's session, inside the caller's transaction."""

    work: Callable[[Session], R]

    def run(self, io: Any) -> R:
        """Call ``work`` with the caller's ``Session``."""
        return self.work(io.session)

    async def arun(self, io: Any) -> R:
        """Call ``work`` through the caller's ``AsyncSession.run_sync``."""
        session: AsyncSession = io.session
        return await session.run_sync(self.work)


@dataclass(frozen=True, slots=True)
class Both(Effect[R]):
    """An effect given as a sync callable and its async twin (for one-off I/O)."""

    sync: Callable[[], R]
    asynchronous: Callable[[], Awaitable[R]]

    def run(self, io: Any) -> R:
        """Call the sync callable."""
        return self.sync()

    async def arun(self, io: Any) -> R:
        """Await the async callable."""
        return await self.asynchronous()
