"""The effects sync and reconciliation flows yield (see ``_flow.py``), and their io objects.

Each effect runs itself with blocking I/O (:meth:`run`) or under asyncio
(:meth:`arun`), so the inbox's apply, the poller and reconcile are written
once, as flows, and driven by ``drive`` or ``adrive``:

* :class:`Savepoint` / :class:`EndSavepoint`: a nested transaction in the io's session;
* :class:`CallHandlers`: the host's handlers for applied events (async ones awaited,
  sync ones called, or run through ``AsyncSession.run_sync`` on the async side);
* :class:`TransactionFlow`: a sub-flow run in a transaction of its own on the io's
  engine (commit on success), with the io's session set to it;
* :class:`ClientCall`: a method of the io's provider adapter (awaited on the async side).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._flow import AsyncIO, Awaited, Effect, Flow, SyncIO, adrive, drive
from ..exceptions import UsageError

if TYPE_CHECKING:
    from ._inbox import AsyncHandler, Handler

__all__ = [
    "AsyncFace",
    "CallHandlers",
    "ClientCall",
    "EndSavepoint",
    "HandlerFailed",
    "Savepoint",
    "SyncFace",
    "TransactionFlow",
]


@dataclass(slots=True)
class SyncFace(SyncIO):
    """A sync face's io: clock, engine or session, and the provider adapter."""

    client: Any = None


@dataclass(slots=True)
class AsyncFace(AsyncIO):
    """An async face's io: clock, ``AsyncEngine`` or ``AsyncSession``, and the async adapter."""

    client: Any = None


@dataclass(frozen=True, slots=True)
class Savepoint(Awaited[Any]):
    """Begin a nested transaction (SAVEPOINT) in the io's session; returns its handle."""

    def call(self, io: Any) -> Any:
        """``session.begin_nested()`` (awaited on an ``AsyncSession``)."""
        return io.session.begin_nested()


@dataclass(frozen=True, slots=True)
class EndSavepoint(Awaited[None]):
    """Release (``commit=True``) or roll back a savepoint from :class:`Savepoint`."""

    handle: Any
    commit: bool

    def call(self, io: Any) -> Any:
        """Commit or roll back the nested transaction (awaited when async)."""
        return self.handle.commit() if self.commit else self.handle.rollback()


class HandlerFailed(Exception):
    """A host handler raised; ``error`` is what it raised, ``event`` the event it had."""

    def __init__(self, event: Any, error: BaseException) -> None:
        super().__init__(f"handler for {event.type} failed on event {event.id}")
        self.event = event
        self.error = error


@dataclass(frozen=True, slots=True)
class CallHandlers(Effect[None]):
    """Call each event's handler with the io's session, in order.

    ``calls`` holds ``(sync handler, async handler, event)``; either handler may
    be None. The sync face needs the sync one.

    Raises:
        HandlerFailed: wrapping the first handler's exception.
        UsageError: (sync face) an event type has only an async handler.
    """

    calls: Sequence[tuple[Handler | None, AsyncHandler | None, Any]]

    def run(self, io: Any) -> None:
        """Call the sync handlers."""
        session = io.session
        for sync_handler, _async_handler, event in self.calls:
            if sync_handler is None:
                raise UsageError(
                    f"event type {event.type!r} has only an async handler: use the async face "
                    "(apply_event_async, reconcile_async)"
                )
            try:
                sync_handler(session, event)
            except Exception as exc:
                raise HandlerFailed(event, exc) from exc

    async def arun(self, io: Any) -> None:
        """Await async handlers; run sync ones on the session's sync facade."""
        session = io.session
        for sync_handler, async_handler, event in self.calls:
            try:
                if async_handler is not None:
                    await async_handler(session, event)
                else:
                    assert sync_handler is not None
                    await session.run_sync(sync_handler, event)
            except Exception as exc:
                raise HandlerFailed(event, exc) from exc


@dataclass(frozen=True, slots=True)
class TransactionFlow(Effect[Any]):
    """Run ``flow`` in a transaction of its own on the io's engine; commit when it returns.

    The sub-flow's io is the same io with ``session`` set to the new session,
    so it can yield :class:`~idis.integrations._flow.InSession`,
    :class:`Savepoint` and :class:`CallHandlers`. ``write=False`` marks a read
    (no SQLite write lock).
    """

    flow: Flow[Any]
    write: bool = True

    def run(self, io: Any) -> Any:
        """One ``Session`` transaction around ``drive``."""
        from ..db._engine import session_scope

        with session_scope(io.engine, write=self.write) as session:
            return drive(self.flow, dataclasses.replace(io, session=session))

    async def arun(self, io: Any) -> Any:
        """One ``AsyncSession`` transaction around ``adrive``."""
        from ..db._engine import async_session_scope

        async with async_session_scope(io.engine, write=self.write) as session:
            return await adrive(self.flow, dataclasses.replace(io, session=session))


@dataclass(frozen=True, slots=True)
class ClientCall(Awaited[Any]):
    """Call ``method`` of the io's provider adapter with ``kwargs`` (awaited when async)."""

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def call(self, io: Any) -> Any:
        """``client.method(...)`` (awaited when async)."""
        return getattr(io.client, self.method)(*self.args, **self.kwargs)
