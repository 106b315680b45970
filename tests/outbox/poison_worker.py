"""A worker process whose delivery kills it (SIGKILL) on one message.

Run by tests/outbox/test_outbox_poison_crash.py::

    python poison_worker.py <database url> <sends file> <lease seconds> <poison seq>

Delivers ``crm_provider``'s messages (``tests.outbox.conftest.put_messages``'s
shape) one at a time, batches of 20, until nothing is due. Every send is appended
to the sends file (the message's ``seq``) before it is made; the message whose
``seq`` is the poison kills the process, as a crash in a delivery would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from idis.integrations.config import OutboxSettings
from idis.integrations.db._engine import create_async_db_engine
from idis.integrations.observability._metrics import Metrics
from idis.integrations.outbox import AsyncOutboxWorker, OutboxMessage
from idis.integrations.testing import simulator_settings


def main(url: str, sends: Path, lease: float, poison: int) -> None:
    settings = simulator_settings(
        "http://127.0.0.1:9",
        outbox=OutboxSettings(
            max_retries=5,
            batch_size=20,
            concurrency=1,
            lease=timedelta(seconds=lease),
            poll_interval=timedelta(milliseconds=50),
            initial_backoff=timedelta(milliseconds=10),
            max_backoff=timedelta(milliseconds=20),
        ),
    )

    async def deliver(message: OutboxMessage) -> None:
        seq = int(message.payload["json"]["data"]["seq"])
        with sends.open("a") as out:
            out.write(f"{seq}\n")
        if seq == poison:
            os.kill(os.getpid(), signal.SIGKILL)

    async def work() -> None:
        engine = create_async_db_engine(url)
        worker = AsyncOutboxWorker(
            engine,
            settings,
            deliver=deliver,
            providers=["crm_provider"],
            metrics=Metrics(CollectorRegistry()),
        )
        await worker.run(until_idle=True)
        await engine.dispose()

    asyncio.run(work())


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
