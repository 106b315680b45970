"""Reconcile's default provider client takes its tokens from the auth module, in both faces."""

from __future__ import annotations

import asyncio

from idis.integrations.reconciliation import reconcile, reconcile_async
from idis.integrations.testing import RunningSimulator

from .conftest import make_settings

P = "crm_provider"


def test_reconcile_obtains_its_token_through_the_auth_module(
    sim: RunningSimulator, sqlite_url: str, fernet_key: str, mode: str
) -> None:
    settings = make_settings(sim, sqlite_url, fernet_key)
    sim.control.require_auth(P)
    sim.control.emit(P, 3, webhook=False)

    if mode == "sync":
        summary = reconcile(P, "1 hour ago", settings=settings, dry_run=True)
    else:
        summary = asyncio.run(reconcile_async(P, "1 hour ago", settings=settings, dry_run=True))

    assert summary.dry_run
    assert summary.fetched >= 3
