"""``python -m integrations_service`` (from ``examples/``): serve the app with uvicorn.

Listens on ``IDIS_SERVICE_HOST``:``IDIS_SERVICE_PORT`` (default 127.0.0.1:8000).
SIGTERM or Ctrl-C stops it gracefully: the background loops finish the item in
hand, then uvicorn re-raises the signal, so a supervisor sees "terminated by
SIGTERM" (exit status 143 in a shell) as it would for any uvicorn app.
"""

from __future__ import annotations

import sys

from idis.integrations.exceptions import ConfigError

from .app import create_app
from .config import ServiceSettings


def main() -> int:
    """Serve the service until SIGTERM/SIGINT.

    Returns:
        2 on a configuration error (named on stderr); otherwise uvicorn's outcome.
    """
    try:
        import uvicorn
    except ModuleNotFoundError:
        print(
            "the service needs uvicorn: pip install 'idis-integrations[simulator]'", file=sys.stderr
        )
        return 2
    try:
        service = ServiceSettings.from_env()
        app = create_app(service=service)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(
        app,
        host=service.host,
        port=service.port,
        # The app logs every request as structured JSON itself (idis.example.request).
        access_log=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
