#!/usr/bin/env python3
"""RB-09 Recovery 3: reconcile missed events through the provider's replay API.

    python scripts/integrations/reconcile.py --provider crm_provider --since "2 hours ago"

A thin wrapper: the work is done by ``idis-integrations reconcile`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

from idis.integrations.cli import run_script

if __name__ == "__main__":
    run_script("reconcile", "scripts/integrations/reconcile.py")
