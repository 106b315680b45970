#!/usr/bin/env python3
"""RB-09 Containment 3: create "stale" defects for claims with stale enrichment.

    python scripts/create_stale_defects.py --provider crm_provider --since "1 hour ago"

A thin wrapper: the work is done by ``idis-integrations create-stale-defects`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

from idis.integrations.cli import run_script

if __name__ == "__main__":
    run_script("create-stale-defects", "scripts/create_stale_defects.py")
