#!/usr/bin/env python3
"""RB-09 Containment 3: create "stale" defects for claims with stale enrichment.

    python scripts/create_stale_defects.py --provider crm_provider --since "1 hour ago"

A thin wrapper: the work is done by ``idis-integrations create-stale-defects`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

import sys

from idis.integrations.cli import main

if __name__ == "__main__":
    main(["create-stale-defects", *sys.argv[1:]], prog_name="scripts/create_stale_defects.py")
