"""``idis-integrations sync status|poll|run|mode``: inbound sync, webhook/polling (RB-09 C1, R5).

RB-09 Containment 1 (``CRM_MODE=polling``) and Recovery 5 (back to webhooks)
are what the mode controller does by itself; ``sync mode --set`` is the
operator's override when a human wants to decide, and every use is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import Any

import click

from .._audit import cli_actor
from .._signals import stop_on_signals
from .._timeparse import format_duration, utcnow
from . import main
from ._common import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    database_engine,
    fail,
    get_settings,
    handle_errors,
    handler_registry,
    handlers_option,
    json_option,
    print_json,
    print_table,
    provider_option,
    stdout,
)


def _register_status_facts() -> None:
    # `idis-integrations status` shows each provider's sync mode through the
    # status module's plug point for capability facts.
    from ..ops._status import FACT_SOURCES
    from ..sync._state import status_facts

    if status_facts not in FACT_SOURCES:
        FACT_SOURCES.append(status_facts)


_register_status_facts()


def _age(value: Any) -> str:
    if value is None:
        return "-"
    return format_duration(max(0.0, (utcnow() - value).total_seconds())) + " ago"


@main.group("sync")
def sync() -> None:
    """Inbound sync: webhook/polling mode per provider, the poller, the sync state."""


@sync.command("status")
@provider_option(required=False)
@json_option
@handle_errors
def status(provider: str | None, as_json: bool) -> None:
    """Mode, reason, webhook health and poller position of each synced provider."""
    from sqlalchemy.orm import Session

    from ..db._engine import read_only
    from ..sync._service import default_providers
    from ..sync._state import sync_summary

    settings = get_settings()
    names = [provider] if provider else None
    with database_engine() as engine, Session(read_only(engine)) as session:
        rows = sync_summary(session, names)
        if not rows and names is None:
            rows = sync_summary(session, default_providers(settings))
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    stable = settings.sync.stable_period
    table = []
    for row in rows:
        returning = "-"
        if row.mode == "polling" and row.healthy_since is not None:
            left = stable - (utcnow() - row.healthy_since)
            returning = f"in {format_duration(max(0.0, left.total_seconds()))}"
        table.append(
            (
                row.provider,
                row.mode,
                row.reason,
                _age(row.since),
                row.override or "-",
                _age(row.last_webhook_at),
                "-" if row.lag_seconds is None else format_duration(row.lag_seconds),
                returning,
                _age(row.polled_at),
                "-" if row.cursor_seq is None else row.cursor_seq,
                row.leader or "-",
            )
        )
    print_table(
        "Sync",
        [
            "provider",
            "mode",
            "reason",
            "since",
            "override",
            "last webhook",
            "webhook lag",
            "back to webhook",
            "last poll",
            "cursor",
            "leader",
        ],
        table,
    )


@sync.command("poll")
@provider_option()
@click.option("--once", is_flag=True, help="Poll once now and exit (whatever the mode).")
@json_option
@handle_errors
def poll(provider: str, once: bool, as_json: bool) -> None:
    """Run the poller for PROVIDER: every CRM_POLL_INTERVAL until SIGTERM, or --once.

    It takes the provider's leadership first (the advisory lock on PostgreSQL,
    the lease on SQLite), so it never polls beside another replica's poller:
    without --once it stands by until that one stops; --once fails (exit 3)
    while another replica leads.
    """
    settings = get_settings()
    asyncio.run(_poll(settings, provider, once=once, as_json=as_json))


async def _poll(settings: Any, provider: str, *, once: bool, as_json: bool) -> None:
    from ..exceptions import AuthError, ProviderError
    from ..sync._inbox import get_registry
    from ..sync._poller import Poller, error_type
    from ..sync._state import Fenced

    async with AsyncExitStack() as stack:
        poller, lock = await _poller_and_lock(settings, provider, stack, Poller, get_registry())
        if once:
            epoch = await lock.acquire()
            if epoch is None:
                fail(
                    f"{provider}: another replica leads its sync and polls it; "
                    "run `sync status` to see which",
                    EXIT_UNAVAILABLE,
                )
            try:
                result = await poller.poll_once(epoch=epoch)
            except (ProviderError, AuthError) as exc:
                fail(
                    f"{provider}: poll failed ({error_type(exc)}): {exc}",
                    EXIT_UNAVAILABLE if exc.retryable else EXIT_USAGE,
                )
            _print_poll(result, as_json)
            return
        stop = asyncio.Event()
        stack.enter_context(stop_on_signals(stop.set))
        interval = settings.sync.crm_poll_interval.total_seconds()
        retry = settings.sync.lock_timeout.total_seconds() / 3
        standing_by = False
        while not stop.is_set():
            epoch = await lock.acquire()
            if epoch is None:
                if not standing_by:
                    stdout.print(f"{provider}: another replica polls; standing by", markup=False)
                    standing_by = True
                await _wait(stop, retry)
                continue
            standing_by = False
            try:
                _print_poll(await poller.poll_once(epoch=epoch), as_json)
            except (ProviderError, AuthError) as exc:
                stdout.print(f"{provider}: poll failed ({error_type(exc)}); retrying", markup=False)
            except Fenced:
                lock.deposed()
                stdout.print(f"{provider}: another replica took over; standing by", markup=False)
            await _wait(stop, interval)


async def _poller_and_lock(
    settings: Any, provider: str, stack: AsyncExitStack, poller_class: Any, registry: Any
) -> tuple[Any, Any]:
    from ..db._engine import async_session_factory, create_async_db_engine
    from ..reconciliation._db import default_async_client
    from ..sync._leader import LeaderLock
    from ..sync._mode import ModePolicy
    from ..sync._service import default_replica_id

    engine = create_async_db_engine(settings.database_url)
    stack.push_async_callback(engine.dispose)
    client = await default_async_client(settings, provider, stack, engine)
    sessions = async_session_factory(engine)
    poller = poller_class(client, sessions, settings, provider, registry=registry)
    lock = LeaderLock(
        settings.database_url,
        provider,
        sessions=sessions,
        replica=default_replica_id(),
        lock_timeout=settings.sync.lock_timeout,
        policy=ModePolicy.from_settings(settings.sync),
    )
    stack.push_async_callback(lock.aclose)
    return poller, lock


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


@sync.command("run")
@click.option(
    "--provider",
    "providers",
    multiple=True,
    help="Provider to sync (repeatable; default: every provider of kind crm).",
)
@handlers_option
@handle_errors
def run(providers: tuple[str, ...], handlers: str | None) -> None:
    """Run the sync worker (sentinel, mode controller, poller) until SIGTERM.

    What the service runs in its event loop, as a process of its own: it leads
    the providers no other replica leads and stands by for the others.
    Webhooks are not received here (mount the receiver in the service).
    """
    settings = get_settings()
    for name in providers:
        settings.provider(name)
    registry = handler_registry(handlers)
    asyncio.run(_run_service(settings, list(providers) or None, registry))


async def _run_service(settings: Any, providers: list[str] | None, registry: Any) -> None:
    from ..sync._service import AsyncSyncService

    service = AsyncSyncService(settings, registry=registry, providers=providers, receiver=False)
    stop = asyncio.Event()
    try:
        with stop_on_signals(stop.set):
            stdout.print(f"syncing {', '.join(service.providers)}; SIGTERM stops", markup=False)
            while not stop.is_set():
                # The service's own wait: it backs off while every tick fails (a down database).
                await _wait(stop, service.pause_after(await service.tick_all()))
    finally:
        await service.aclose()


def _print_poll(result: Any, as_json: bool) -> None:
    if as_json:
        hidden = ("window_start", "feed_gap_until")
        shown = {k: v for k, v in asdict(result).items() if k not in hidden}
        print_json(shown | {"after_seq": result.after_seq})
        return
    stdout.print(
        f"{result.provider}: fetched {result.fetched}, applied {result.applied}, "
        f"already had {result.duplicates}, superseded {result.superseded}, "
        f"ignored {result.ignored} ({result.pages} page(s), cursor {result.position})",
        markup=False,
    )


@sync.command("mode")
@provider_option()
@click.option(
    "--set",
    "setting",
    type=click.Choice(["webhook", "polling", "auto"]),
    default=None,
    help="polling: pin polling; webhook: switch to webhooks now (overrides CRM_MODE=polling); "
    "auto: remove the override and let the controller decide.",
)
@json_option
@handle_errors
def mode(provider: str, setting: str | None, as_json: bool) -> None:
    """Show PROVIDER's sync mode, or override it (audited as sync.mode_changed/override)."""
    from sqlalchemy.orm import Session, sessionmaker

    from ..db._engine import read_only
    from ..sync._mode import ModePolicy
    from ..sync._state import check_mode_target, override_mode, sync_summary

    settings = get_settings()
    with database_engine() as engine:
        if setting is not None:
            with Session(read_only(engine)) as session:
                check_mode_target(session, settings, provider, setting)
            with sessionmaker(engine).begin() as session:
                override_mode(
                    session,
                    provider,
                    setting,
                    policy=ModePolicy.from_settings(settings.sync),
                    now=utcnow(),
                    actor=cli_actor(),
                )
        with Session(read_only(engine)) as session:
            (row,) = sync_summary(session, [provider])
    if as_json:
        print_json(row.as_dict())
        return
    override = f", override {row.override}" if row.override else ""
    stdout.print(
        f"{provider}: {row.mode} ({row.reason}{override}, since {_age(row.since)})", markup=False
    )
