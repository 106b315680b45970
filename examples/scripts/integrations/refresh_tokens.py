#!/usr/bin/env python3
"""RB-09 Recovery 1: refresh OAuth tokens.

    python scripts/integrations/refresh_tokens.py --provider crm_provider

A thin wrapper: the work is done by ``idis-integrations refresh-tokens`` (same flags,
same exit codes; ``--help`` lists them). Configuration comes from the
environment (IDIS_DATABASE_URL, providers, Vault), as for the service.
"""

from __future__ import annotations

import sys

from idis.integrations.cli import main

if __name__ == "__main__":
    main(["refresh-tokens", *sys.argv[1:]], prog_name="scripts/integrations/refresh_tokens.py")
