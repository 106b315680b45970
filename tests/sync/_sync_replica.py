"""One replica of the host service, run as a subprocess by test_sync_leader.py.

Ticks a SyncService on PostgreSQL (configuration from the environment) and
prints one JSON line per tick: time, leadership, lock attempts, whether it polled.
"""

from __future__ import annotations

import json
import sys
import time

from idis.integrations.config import Settings
from idis.integrations.observability._logs import configure_logging
from idis.integrations.sync._inbox import HandlerRegistry
from idis.integrations.sync._service import SyncService


def main() -> None:
    name = sys.argv[1]
    configure_logging("json", "WARNING", stream=sys.stderr)
    registry = HandlerRegistry()
    registry.register("*", lambda session, event: None)
    settings = Settings.from_env()
    service = SyncService(settings, registry=registry, receiver=False, replica_id=name)
    provider = service.providers[0]
    while True:
        report = service.tick(provider)
        line = {
            "replica": name,
            "t": time.time(),
            "leader": report.leader,
            "attempts": service.locks[provider].attempts,
            "polled": report.poll is not None,
            "applied": report.poll.applied if report.poll else 0,
        }
        print(json.dumps(line), flush=True)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
