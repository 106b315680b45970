#!/usr/bin/env python3
"""RB-09 Recovery 1: refresh OAuth tokens.

    python scripts/integrations/refresh_tokens.py --provider crm_provider

A thin wrapper: the work is done by ``idis-integrations refresh-tokens`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

from idis.integrations.cli import run_script

if __name__ == "__main__":
    run_script("refresh-tokens", "scripts/integrations/refresh_tokens.py")
