"""One replica of the host service, run as a subprocess by test_sync_leader.py.

Ticks the (async) sync service on PostgreSQL (configuration from the environment)
and prints one JSON line per tick: time, leadership, lock attempts, whether it polled.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from idis.integrations.config import Settings
from idis.integrations.observability._logs import configure_logging
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._service import AsyncSyncService


async def main() -> None:
    name = sys.argv[1]
    configure_logging("json", "WARNING", stream=sys.stderr)
    registry = HandlerRegistry()
    registry.register("*", lambda session, event: None)
    settings = Settings.from_env()
    service = AsyncSyncService(settings, registry=registry, receiver=False, replica_id=name)
    provider = service.providers[0]
    while True:
        report = await service.tick(provider)
        line = {
            "replica": name,
            "t": time.time(),
            "leader": report.leader,
            "attempts": service.locks[provider].attempts,
            "polled": report.poll is not None,
            "applied": report.poll.applied if report.poll else 0,
        }
        print(json.dumps(line), flush=True)
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
