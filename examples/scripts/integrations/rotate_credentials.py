#!/usr/bin/env python3
"""RB-09 Recovery 2: full credential rotation into Vault.

    python scripts/integrations/rotate_credentials.py --provider crm_provider --store-in-vault

A thin wrapper: the work is done by ``idis-integrations rotate-credentials`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

from idis.integrations.cli import run_script

if __name__ == "__main__":
    run_script("rotate-credentials", "scripts/integrations/rotate_credentials.py")
