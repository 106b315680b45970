"""``drill --api``: which provider API (pack) the RB-09 drill rehearses, and what that changes.

The default drill (``--api generic``) runs on the embedded defaults: every
simulated provider speaks the simulator's generic shape. ``--api X`` configures
the provider the drill rehearses with pack ``X`` (``IDIS_PROVIDER_<NAME>_API``)
and talks to the simulator's dialect of that API (``simulator/_dialects.py``,
``simulator/_gdrive.py``). What each API makes different, and why:

* **hubspot**, **salesforce**: the CRM provider speaks the vendor's API. Both
  poll by modification time (CRM search on ``hs_lastmodifieddate``, SOQL on
  ``SystemModstamp``) and serve *current states*, not a log: a record changed
  twice while nobody read it is read once, and a record deleted is never read
  at all. So the drill deletes some deals during the outage: those deletions
  come back only through Recovery 3. Salesforce's ``deleted/`` resource replays
  them; HubSpot has no replay that sees deletions (replay is a search), so
  Recovery 3 runs the pack's fallback, a resync by id (``resync(record_ids=)``:
  a deal HubSpot answers 404 for twice is applied as deleted). The changes-feed
  retention of the generic drill does not apply (there is no feed to expire).
  Salesforce sends no plain webhooks: the drill polls it throughout
  (``CRM_MODE=polling``), and the checks about failover and the return to
  webhooks say that they do not apply.
* **gdrive**: the provider under outage is the *documents* provider
  (``docs_provider``) speaking Drive's API, synced by the sync service. RB-09
  names documents among the providers it covers, and Drive's push channels,
  which expire silently, are exactly the webhook loss RB-09's failover exists
  for; giving Drive's dialect to the CRM provider would rehearse a CRM nobody
  runs. Drive's changes feed is durable (page tokens do not lose changes), so
  after the outage the poller catches up by itself: Recovery 3 runs and must
  find everything applied already, and the drill says that replay was not
  needed rather than pretending it was.
* **pdl**: the CRM stays generic; the *enrichment* provider speaks People Data
  Labs' API with an API key. The outage spends PDL's credits (HTTP 402, what
  PDL answers then) instead of a 503 storm, and a few subjects are unknown to
  PDL: their 404 ``not_found`` is an answer (no deferral, no defect).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["APIS", "DrillApi", "drill_api"]

#: ``--api`` values: the provider packs the drill can rehearse.
APIS = ("generic", "hubspot", "salesforce", "gdrive", "pdl")

#: The PDL API key the drill configures (the simulator does not check it).
_PDL_KEY = "drill-pdl-key"  # a simulator-only placeholder, not a credential


@dataclass(frozen=True, slots=True)
class DrillApi:
    """What ``--api`` changes in the drill."""

    #: The ``--api`` value.
    name: str
    #: The pack of the provider under outage (``generic`` when only enrichment changes).
    sync_api: str
    #: The pack of the enrichment provider.
    enrichment_api: str
    #: Whether the provider under outage delivers changes by webhook in this drill.
    webhooks: bool
    #: Why it does not (shown where a check about webhooks does not apply).
    no_webhooks: str = ""
    #: Whether the sync service can judge the webhooks (fail over to polling and back);
    #: else polling is pinned (``CRM_MODE=polling``), webhooks or not.
    failover: bool = True
    #: Why it cannot (shown where a check about failover does not apply).
    no_failover: str = ""
    #: Drive's data-less push notifications: the drill opens (and renews) a watch
    #: channel and delivers what the simulator would have pushed to the receiver.
    notifications: bool = False
    #: Whether events are counted by the provider's event ids (the generic shape);
    #: else by record state (derived ids: every record's latest state applied once).
    by_event_id: bool = True
    #: Whether the provider's changes feed expires (the generic drill's reason for replay).
    feed_retention: bool = True
    #: Whether some records are deleted during the outage (what polling cannot see).
    deletions: bool = False
    #: How Recovery 3 brings back what polling missed: ``replay``, ``resync`` (by id),
    #: or ``none`` (the feed is durable: reconcile runs and must find nothing to do).
    recovery: str = "replay"
    #: What the drill's facts say about the dialect (None for the default drill).
    about: str | None = None
    #: The simulator's webhook format for the provider (None: Standard Webhooks).
    webhook_format: str | None = None
    #: Ticks Detection may wait beyond the default drill's (the alert can take longer:
    #: HubSpot's search is a POST, which the gateway does not retry, so a poll in the
    #: outage fails once where a GET fails twice, and the error rate is half).
    extra_ticks: int = 0

    @property
    def generic(self) -> bool:
        """The default drill, unchanged."""
        return self.name == "generic"

    def rehearsed(self, provider: str) -> str:
        """The provider under outage: Drive is a documents provider."""
        if self.sync_api == "gdrive" and provider == "crm_provider":
            return "docs_provider"
        return provider

    def configure(self, settings: Settings, provider: str, enrichment: str) -> Settings:
        """``settings`` with the packs applied to the rehearsed and enrichment providers."""
        from ..config import Secret

        if self.generic:
            return settings
        changed = []
        if self.sync_api != "generic":
            current = settings.provider(provider)
            auth = current.auth
            if self.sync_api == "salesforce":
                # Salesforce's token endpoint: its answer's instance_url is the org's API base.
                auth = replace(auth, token_url="/services/oauth2/token")  # noqa: S106  # a path
            changed.append(
                replace(
                    current,
                    api=self.sync_api,
                    auth=auth,
                    webhook_secrets=current.webhook_secrets if self.webhooks else (),
                )
            )
        if self.enrichment_api == "pdl":
            current = settings.provider(enrichment)
            changed.append(
                replace(
                    current,
                    api="pdl",
                    api_token=Secret(_PDL_KEY),
                    # No ENDPOINTS entry for enrich: the pack's own path is called.
                    endpoints={k: v for k, v in current.endpoints.items() if k != "enrich"},
                )
            )
        return settings.with_providers(*changed)


_SF_NO_WEBHOOKS = "Salesforce sends no plain webhooks: the drill polls it throughout"

_APIS = {
    "generic": DrillApi("generic", "generic", "generic", webhooks=True),
    "hubspot": DrillApi(
        "hubspot",
        "hubspot",
        "generic",
        webhooks=True,
        webhook_format="hubspot",
        by_event_id=False,
        feed_retention=False,
        deletions=True,
        recovery="resync",
        extra_ticks=16,
        about=(
            "HubSpot CRM deals: batched v3-signed webhooks and CRM search on "
            "hs_lastmodifieddate (current states); deletions during the outage come back "
            "by resync (HubSpot has no replay that sees them)"
        ),
    ),
    "salesforce": DrillApi(
        "salesforce",
        "salesforce",
        "generic",
        webhooks=False,
        no_webhooks=_SF_NO_WEBHOOKS,
        failover=False,
        no_failover=_SF_NO_WEBHOOKS + " (CRM_MODE=polling)",
        by_event_id=False,
        feed_retention=False,
        deletions=True,
        recovery="replay",
        extra_ticks=16,
        about=(
            "Salesforce Opportunity: SOQL on SystemModstamp (current states); deletions "
            "during the outage come back by the deleted/ replay"
        ),
    ),
    "gdrive": DrillApi(
        "gdrive",
        "gdrive",
        "generic",
        webhooks=True,
        notifications=True,
        by_event_id=False,
        feed_retention=False,
        recovery="none",
        extra_ticks=16,
        about=(
            "Google Drive as the documents provider: changes.watch channels (data-less "
            "notifications, renewed before expiry; they lapse in the outage), changes.list "
            "page tokens (a durable feed); replay by files.list"
        ),
    ),
    "pdl": DrillApi(
        "pdl",
        "generic",
        "pdl",
        webhooks=True,
        about=(
            "People Data Labs as the enrichment provider (API key; 402 credits spent "
            "during the outage; 404 no-match is an answer); the CRM stays generic"
        ),
    ),
}


def drill_api(name: str) -> DrillApi:
    """The plan of ``--api name`` (validated by ``DrillOptions``)."""
    return _APIS[name]
