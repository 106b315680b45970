"""``idis-integrations simulate``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from click.testing import CliRunner

from idis.integrations._http import httpx
from idis.integrations.cli import main


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_simulate_refuses_a_non_loopback_host() -> None:
    """A public --host without --allow-remote exits 2 and says why."""
    result = CliRunner().invoke(main, ["simulate", "--host", "0.0.0.0"])

    assert 2 == result.exit_code
    assert "--allow-remote" in result.output


def test_simulate_serves_until_sigterm() -> None:
    """The command serves the simulator and exits 0 on SIGTERM."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDIS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "idis.integrations", "simulate", "--port", str(port), "--seed", "4"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        status = None
        for _ in range(400):
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/p/crm_provider/health").status_code
                break
            except httpx.ConnectError:
                time.sleep(0.025)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert 200 == status
    assert 0 == process.returncode
    assert f"http://127.0.0.1:{port}" in out.decode()
