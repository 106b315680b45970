"""RB-09 Recovery 2 as written, against a real OpenBao, while the example service runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from tests.auth.conftest import OpenBao, openbao, vault_prefix  # noqa: F401  # fixtures
from tests.conftest import opened
from tests.examples.conftest import (
    CLIENT_SECRET,
    CRM,
    run_script,
    script_env,
    service_env,
    wait_for,
)

from idis.integrations.auth._vault import VaultStore
from idis.integrations.simulator._state import DEFAULT_WEBHOOK_SECRET
from idis.integrations.testing import RunningSimulator

pytestmark = pytest.mark.vault

ROTATE = (
    "python scripts/integrations/rotate_credentials.py --provider crm_provider --store-in-vault"
)
REFRESH_TOKENS = "python scripts/integrations/refresh_tokens.py --provider crm_provider"


def test_rotated_credentials_land_in_vault_and_every_process_switches_to_them(
    sim: RunningSimulator,
    sqlite_url: str,
    start_service: Callable[..., Any],
    openbao: OpenBao,  # noqa: F811  # the fixture imported above
    vault_prefix: str,  # noqa: F811
) -> None:
    """rotate_credentials.py stores the new secret in Vault; the script and the service use it."""
    vault = {
        "VAULT_ADDR": openbao.addr,
        "VAULT_TOKEN": openbao.root_token,
        "IDIS_VAULT_PATH_PREFIX": vault_prefix,
    }
    sim.control.declare_provider(CRM, require_auth=True)
    sim.control.configure_oauth(CRM, rotation_grace_seconds=0)  # the old secret dies at once
    with start_service(service_env(sim, sqlite_url, **vault)) as svc:
        sim.control.set_webhook_target(CRM, f"{svc.url}/webhooks/{CRM}", [DEFAULT_WEBHOOK_SECRET])
        svc.post("/deals", {"id": "v1", "tenant_id": "t1", "name": "Before"})
        wait_for(lambda: svc.deal_status("v1") == "SYNCED", "v1 SYNCED")
        ops = script_env(sim, sqlite_url, **vault)

        rotated = run_script(ROTATE, ops)
        refreshed = run_script(REFRESH_TOKENS, ops)
        # The service's token dies too: its next call gets a 401 and refreshes.
        sim.state.provider(CRM).oauth.expire_access_tokens(sim.state.now())
        svc.post("/deals", {"id": "v2", "tenant_id": "t1", "name": "After"})
        after = wait_for(
            lambda: (d := svc.deal("v2")) and d["crm_sync_status"] == "SYNCED" and d,
            "v2 SYNCED with the rotated credentials",
        )

    issued = sim.state.provider(CRM).oauth.clients["idis-local"].secret
    stored = opened(VaultStore(openbao.settings(path_prefix=vault_prefix))).read_credentials(CRM)
    assert 0 == rotated.returncode, rotated.stdout + rotated.stderr
    assert "stored in Vault" in rotated.stdout
    assert 0 == refreshed.returncode, refreshed.stdout + refreshed.stderr
    assert issued != CLIENT_SECRET
    assert issued == stored.client_secret.get_secret_value()
    assert 1 == sim.control.stats(CRM)["oauth"]["rotations"]
    assert "SYNCED" == after["crm_sync_status"]
    assert "idis.auth.unauthorized_retry" in [e["event"] for e in svc.log_events()]
    outputs = rotated.stdout + rotated.stderr + refreshed.stdout + refreshed.stderr
    assert issued not in outputs
    assert issued not in svc.logs.getvalue()
