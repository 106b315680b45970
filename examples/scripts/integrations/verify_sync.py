#!/usr/bin/env python3
"""RB-09 Verification 3: compare local and remote data for sample records.

    python scripts/integrations/verify_sync.py --provider crm_provider --sample-size 20

A thin wrapper: the work is done by ``idis-integrations verify-sync`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

from idis.integrations.cli import run_script

if __name__ == "__main__":
    run_script("verify-sync", "scripts/integrations/verify_sync.py")
