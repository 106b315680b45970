"""No secret reaches a log line, an audit row, a defect, a result or CLI output from enrichment."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from click.testing import CliRunner
from structlog.testing import capture_logs

from idis.integrations.auth._httpx_auth import oauth_auth_factory
from idis.integrations.cli import main
from idis.integrations.config import Secret
from idis.integrations.enrichment import AsyncEnricher, Enricher
from idis.integrations.resilience import AsyncGateway, Gateway

PROVIDER = "enrichment_provider"
CLIENT_SECRET = "enrich-client-secret-Q9x7Zt4w"  # a test secret to hunt for


def _enrich(env: Any, settings: Any, mode: str) -> Any:
    """Enrich claim-1 through the ``mode`` face with real OAuth (the token endpoint refuses)."""
    if mode == "sync":
        auth = oauth_auth_factory(settings, engine=env.engine)
        gateway = Gateway(settings, auth=auth, clock=env.clock, sleep=env.clock.sleep)
        try:
            with Enricher(settings, gateway, engine=env.engine) as enricher:
                return enricher.enrich("claim-1", tenant_id="t1")
        finally:
            gateway.close()
            auth.close()

    async def enrich() -> Any:
        auth = oauth_auth_factory(settings, async_engine=env.async_engine)
        gateway = AsyncGateway(settings, auth=auth, clock=env.clock, sleep=env.clock.asleep)
        try:
            async with AsyncEnricher(settings, gateway, engine=env.async_engine) as enricher:
                return await enricher.enrich("claim-1", tenant_id="t1")
        finally:
            await gateway.aclose()
            await auth.aclose()

    return env.run(enrich())


def test_wrong_credentials_defer_without_leaking_the_client_secret(env: Any, mode: str) -> None:
    """A token refused for a bad secret defers the enrichment; the secret appears nowhere."""
    base = env.settings()
    auth_settings = replace(base.provider(PROVIDER).auth, client_secret=Secret(CLIENT_SECRET))
    settings = base.with_providers(replace(base.provider(PROVIDER), auth=auth_settings))
    env.sim.control.require_auth(PROVIDER)
    env.sim.control.set_oauth_client(PROVIDER, "idis-local", "the-provider-expects-this-one")

    with capture_logs() as logs:
        result = _enrich(env, settings, mode)
    cli = CliRunner().invoke(
        main,
        ["enrichment", "defects", "--json"],
        env={"IDIS_DATABASE_URL": env.db_url},
    )

    assert "deferred" == result.status
    assert "auth" == result.attempts[0].error_type
    haystack = "\n".join(
        [
            repr(logs),
            repr(result),
            repr([(a.details, a.message) for a in _audit(env)]),
            repr([(d.details, d.resolution) for d in env.rows(env.Defect)]),
            repr([(r.last_error, r.providers) for r in env.rows(env.Request)]),
            repr([r.last_error for r in env.rows(env.Cache)]),
            cli.output,
        ]
    )
    assert "claim-1" in haystack  # the haystack is the real output, not empty
    assert CLIENT_SECRET not in haystack


def _audit(env: Any) -> list[Any]:
    from idis.integrations._audit import AuditEvent

    return env.rows(AuditEvent)
