"""A deferred-enrichment worker process whose refresh of one subject kills it (SIGKILL).

Run by tests/enrichment/test_enrichment_poison_crash.py::

    python poison_worker.py <database url> <asks file> <lease seconds> <poison subject>

Serves ``enrichment_provider`` itself, on a loopback HTTP server in this very
process (a thread, as a native client library or an answer parser would run
beside the worker): every ``GET /p/enrichment_provider/enrich/<id>`` is
appended to the asks file before it is answered, and the ask for the poison
subject kills the process while the worker waits for the answer, as a native
crash or the kernel's OOM killer on a huge answer would. Then runs
``run_deferred(once=True)`` (``enrichment run-deferred --once``), unmodified, and
prints its counts as JSON.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from idis.integrations.config import AuthSettings, EnrichmentSettings, RetryPolicy, TimeoutPolicy
from idis.integrations.enrichment import run_deferred
from idis.integrations.observability._metrics import Metrics
from idis.integrations.testing import serve_asgi, simulator_settings

PREFIX = "/p/enrichment_provider/enrich/"


def provider(asks: Path, poison: str) -> Any:
    """An ASGI app answering the enrich endpoint; the poison subject's ask kills the process."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        status, body = 404, {"error": "not_found"}
        if path.startswith(PREFIX):
            subject = path[len(PREFIX) :]
            with asks.open("a") as out:
                out.write(f"{subject}\n")
            if subject == poison:
                os.kill(os.getpid(), signal.SIGKILL)
            status, body = 200, {"data": {"subject": subject, "source": "poison-test"}}
        raw = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(raw))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": raw})

    return app


def main(url: str, asks: Path, lease: float, poison: str) -> None:
    with serve_asgi(provider(asks, poison), name="poison-provider") as base:
        settings = simulator_settings(
            base,
            providers=("enrichment_provider",),
            database_url=url,
            auth=AuthSettings(),
            retry=RetryPolicy(max_attempts=1),
            # A refresh's call deadline within half the lease: the worker leases for
            # IDIS_ENRICHMENT_LEASE itself, not for twice a 30 s default deadline.
            timeouts=TimeoutPolicy(deadline=lease / 2),
            enrichment=EnrichmentSettings(
                defer_on_error=True,
                batch_size=4,
                lease=timedelta(seconds=lease),
                poll_interval=timedelta(milliseconds=50),
                batch_interval=timedelta(milliseconds=5),
            ),
        )
        stats = run_deferred(settings, once=True, metrics=Metrics(CollectorRegistry()))
    print(json.dumps(stats.as_dict()))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
