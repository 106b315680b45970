"""``idis-integrations simulate``: serve the provider simulator until Ctrl-C or SIGTERM."""

from __future__ import annotations

import ipaddress
import signal
from types import FrameType

import click

from . import main
from ._common import EXIT_UNAVAILABLE, fail, stdout

__all__ = ["simulate"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@main.command("simulate")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="TCP port (the embedded default settings expect 8765).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every random choice.")
@click.option(
    "--allow-remote",
    is_flag=True,
    help="Allow a non-loopback --host; the control API has no authentication.",
)
@click.option(
    "--control-host",
    "control_hosts",
    multiple=True,
    metavar="NAME",
    help="A Host name the control API accepts besides loopback ones (repeatable); "
    "only with --allow-remote.",
)
def simulate(
    host: str, port: int, seed: int, allow_remote: bool, control_hosts: tuple[str, ...]
) -> None:
    """Serve the provider simulator (providers under /p/NAME, control API under /_control)."""
    if not _is_loopback(host) and not allow_remote:
        fail(
            f"--host {host!r} is not a loopback address: anyone who reaches it can break the "
            "simulator through its unauthenticated control API; pass --allow-remote to insist"
        )
    if control_hosts and not allow_remote:
        fail("--control-host opens the control API to other machines: pass --allow-remote too")
    try:
        from ..testing import make_server
    except ModuleNotFoundError as exc:
        fail(str(exc))
    from ..simulator._state import SimulatorState

    try:
        server = make_server(
            SimulatorState(seed=seed), log_level="warning", control_hosts=control_hosts
        )
    except ModuleNotFoundError as exc:
        fail(str(exc))
    server.config.host = host
    server.config.port = port
    stdout.print(
        f"provider simulator on http://{host}:{port} (providers: /p/<name>, control: /_control); "
        "Ctrl-C stops it",
        markup=False,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the
    # signal against the handlers it found: make those a no-op, so Ctrl-C ends
    # with exit 0 and no KeyboardInterrupt traceback.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        fail(f"the simulator could not listen on {host}:{port}", EXIT_UNAVAILABLE)
    stdout.print("provider simulator stopped", markup=False)


def _ignore(_sig: int, _frame: FrameType | None) -> None:
    """Swallow the signal uvicorn re-raises after its graceful shutdown."""
