"""``idis-integrations outbox work|status|list|purge`` and ``queue-webhook-retries`` (RB-09).

``queue-webhook-retries`` is RB-09 Containment step 4.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from .._audit import cli_actor
from .._signals import stop_on_signals
from .._timeparse import format_duration, parse_duration
from ..config import INT_SETTING_MAX, ProviderSettings
from ..exceptions import ConfigError
from . import main
from ._common import (
    _validate_provider,
    database_engine,
    get_settings,
    handle_errors,
    json_option,
    print_json,
    print_result,
    print_table,
    provider_option,
    since_option,
    stdout,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def _flag(param: click.Parameter) -> str:
    return f"--{param.name.replace('_', '-') if param.name else ''}"


def _duration(_ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value, name=_flag(param))
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _positive(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    duration = _duration(ctx, param, value)
    if duration is not None and duration <= timedelta(0):
        # A zero lease lapses at once and lets every worker send the same message; a zero
        # poll interval turns an idle worker into a busy loop against the database.
        raise click.BadParameter(
            f"{_flag(param)}={value!r} must be positive: expected a duration like 60s"
        )
    return duration


def _max_retries(_ctx: click.Context, _param: click.Parameter, value: int | None) -> int | None:
    from ..outbox._messages import check_max_retries

    if value is None:
        return None
    try:
        return check_max_retries(value, "--max-retries")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _providers(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for name in value:
        _validate_provider(ctx, param, name)
    return value


def _register_status_facts() -> None:
    # `idis-integrations status` shows each provider's queue through the status
    # module's plug point for capability facts.
    from ..ops._status import FACT_SOURCES
    from ..outbox._admin import status_facts

    if status_facts not in FACT_SOURCES:
        FACT_SOURCES.append(status_facts)


_register_status_facts()


@main.group("outbox")
def outbox() -> None:
    """The persistent retry outbox: run workers, inspect the queue, clean up."""


@outbox.command("work")
@click.option(
    "--provider",
    "providers",
    multiple=True,
    callback=_providers,
    help="Serve only this provider (repeatable; default: every configured provider).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=INT_SETTING_MAX),
    default=None,
    help="Messages per lease (default IDIS_OUTBOX_BATCH_SIZE).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=INT_SETTING_MAX),
    default=None,
    help="Messages of a batch delivered at once (default IDIS_OUTBOX_CONCURRENCY).",
)
@click.option(
    "--lease",
    callback=_positive,
    default=None,
    help="Lease length, e.g. 60s (default IDIS_OUTBOX_LEASE).",
)
@click.option(
    "--poll-interval",
    callback=_positive,
    default=None,
    help="Idle wait when nothing is due (default IDIS_OUTBOX_POLL_INTERVAL).",
)
@click.option("--worker-id", default=None, help="Lease owner name (default host:pid:random).")
@click.option("--until-idle", is_flag=True, help="Exit once nothing is due.")
@handle_errors
def work(  # noqa: PLR0917  # click passes every option positionally by name
    providers: tuple[str, ...],
    batch_size: int | None,
    concurrency: int | None,
    lease: timedelta | None,
    poll_interval: timedelta | None,
    worker_id: str | None,
    until_idle: bool,
) -> None:
    """Deliver outbox messages until SIGTERM/SIGINT (or, with --until-idle, until none is due).

    On SIGTERM the delivery in progress finishes and the rest of the batch is
    given back to the queue before exiting. Run several side by side.
    """
    import asyncio

    settings = get_settings()
    served = providers or tuple(settings.providers)
    options: dict[str, Any] = {
        "worker_id": worker_id,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "lease": lease,
        "poll_interval": poll_interval,
    }
    worker_id, total = asyncio.run(_work(settings, served, until_idle, options))
    stdout.print(
        f"outbox worker {worker_id} stopped: {total.delivered} delivered, "
        f"{total.retried} retries scheduled, {total.deferred} deferred, {total.dead} dead, "
        f"{total.released} released",
        markup=False,
    )


async def _work(
    settings: Any, served: tuple[str, ...], until_idle: bool, options: dict[str, Any]
) -> tuple[str, Any]:
    """Run the production worker, ``AsyncOutboxWorker``: the one the example service runs."""
    from ..db._engine import create_async_db_engine
    from ..outbox._worker import AsyncOutboxWorker
    from ..resilience import AsyncGateway

    # Closed in reverse: signal handlers, gateway, token machinery, engine.
    async with AsyncExitStack() as stack:
        engine = create_async_db_engine(settings.database_url)
        stack.push_async_callback(engine.dispose)
        auth = _auth_factory(settings, engine, [settings.provider(p) for p in served])
        if auth is not None:
            stack.push_async_callback(auth.aclose)
        gateway = AsyncGateway(settings, auth=auth)
        stack.push_async_callback(gateway.aclose)
        worker = AsyncOutboxWorker(engine, settings, gateway=gateway, providers=served, **options)
        stack.enter_context(stop_on_signals(worker.stop))
        total = await worker.run(until_idle=until_idle)
    return worker.worker_id, total


def _auth_factory(settings: Any, engine: Any, providers: list[ProviderSettings]) -> Any:
    # Only build token machinery when a served provider actually uses OAuth.
    if all(p.auth.grant == "none" for p in providers):
        return None
    from ..auth._httpx_auth import oauth_auth_factory

    return oauth_auth_factory(settings, async_engine=engine)


@contextmanager
def _session(*, write: bool = False) -> Iterator[Session]:
    """One transaction on the configured database (its engine disposed of afterwards)."""
    from ..db._engine import session_scope

    with database_engine() as engine, session_scope(engine, write=write) as session:
        yield session


@outbox.command("status")
@provider_option(required=False)
@json_option
@handle_errors
def status_cmd(provider: str | None, as_json: bool) -> None:
    """The queue per provider: pending, retrying, in flight, delivered, dead, oldest pending age."""
    from ..outbox._admin import outbox_summary

    names = [provider] if provider else list(get_settings().providers)
    with _session() as session:
        rows = outbox_summary(session, providers=names)
    if as_json:
        print_json([row.as_dict() for row in rows])
        return
    print_table(
        "Outbox",
        ["provider", "pending", "retrying", "in flight", "delivered", "dead", "oldest pending"],
        [
            [
                r.provider,
                r.pending,
                r.retrying,
                r.in_flight,
                r.delivered,
                r.dead,
                format_duration(r.oldest_pending_age) if r.oldest_pending_age is not None else "-",
            ]
            for r in rows
        ],
    )


@outbox.command("list")
@provider_option(required=False)
@click.option(
    "--status",
    type=click.Choice(["pending", "in_flight", "delivered", "dead"]),
    default="dead",
    show_default=True,
    help="Which messages (dead: the dead letters).",
)
@click.option("--limit", type=click.IntRange(min=1, max=10_000), default=50, show_default=True)
@json_option
@handle_errors
def list_cmd(provider: str | None, status: str, limit: int, as_json: bool) -> None:
    """List messages, newest first (dead letters by default). Payloads are not shown."""
    from ..outbox._admin import list_messages

    with _session() as session:
        rows = list_messages(session, provider=provider, status=status, limit=limit)
    if as_json:
        print_json([{k: getattr(r, k) for k in r.__slots__} for r in rows])
        return
    print_table(
        f"Outbox messages ({status})",
        ["id", "provider", "kind", "ordering key", "attempts", "last error", "updated"],
        [
            [
                r.id,
                r.provider,
                r.kind,
                r.ordering_key or "-",
                r.attempts,
                r.last_error or "-",
                r.updated_at.isoformat(timespec="seconds"),
            ]
            for r in rows
        ],
    )


@outbox.command("purge")
@click.option(
    "--older-than",
    required=True,
    callback=_duration,
    help="Delete delivered messages settled longer ago than this (e.g. 7d).",
)
@provider_option(required=False)
@handle_errors
def purge_cmd(older_than: timedelta, provider: str | None) -> None:
    """Delete delivered messages older than --older-than (keeps pending and dead ones)."""
    from ..outbox._admin import purge_delivered

    with _session(write=True) as session:
        removed = purge_delivered(session, older_than, providers=[provider] if provider else None)
    stdout.print(f"purged {removed} delivered outbox message(s)", markup=False)


@main.command("queue-webhook-retries")
@provider_option()
@click.option(
    "--max-retries",
    type=int,
    required=True,
    callback=_max_retries,
    help="Fresh retry budget for each re-queued delivery (>= 0).",
)
@since_option(required=False)
@click.option("--dry-run", is_flag=True, help="Show what would be re-queued; change nothing.")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Only these message kinds (webhook, request); default all.",
)
@json_option
@handle_errors
def queue_webhook_retries_cmd(  # noqa: PLR0917  # click passes every option by name
    provider: str,
    max_retries: int,
    since: datetime | None,
    dry_run: bool,
    kinds: tuple[str, ...],
    as_json: bool,
) -> None:
    """Re-queue a provider's failed and dead-lettered deliveries (RB-09 Containment 4).

    Each gets a fresh budget of --max-retries retries and is due now. Idempotent:
    running it again re-queues nothing new. Audited as outbox.requeued.
    """
    from ..outbox._admin import queue_webhook_retries

    result = queue_webhook_retries(
        provider,
        max_retries,
        since,
        dry_run,
        kinds=kinds or None,
        settings=get_settings(),
        actor=cli_actor(),
    )
    print_result(result, as_json, _print_requeued)


def _print_requeued(result: Any) -> None:
    verb = "would re-queue" if result.dry_run else "re-queued"
    window = f" since {result.since.isoformat()}" if result.since else ""
    stdout.print(
        f"{result.provider}: {verb} {result.total} deliveries{window} "
        f"({result.dead} dead-lettered, {result.failed} failed and waiting) "
        f"with max_retries={result.max_retries}; "
        f"{result.receivers_reactivated} webhook receiver(s) re-activated",
        markup=False,
    )
