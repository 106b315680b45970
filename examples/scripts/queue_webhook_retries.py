#!/usr/bin/env python3
"""RB-09 Containment 4: queue failed webhooks for retry.

    python scripts/queue_webhook_retries.py --provider affected_provider --max-retries 10

A thin wrapper: the work is done by ``idis-integrations queue-webhook-retries`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

from idis.integrations.cli import run_script

if __name__ == "__main__":
    run_script("queue-webhook-retries", "scripts/queue_webhook_retries.py")
