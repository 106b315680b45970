"""Every Prometheus metric the library exports, defined once.

Labels are bounded: provider and endpoint names come from configuration,
outcomes and error types from fixed vocabularies. Never a URL, id or secret.

``get_metrics()`` returns the process-wide set registered in
``prometheus_client.REGISTRY``; tests build ``Metrics(CollectorRegistry())``
and install it with ``set_default_metrics`` so that each test starts at zero.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY as _DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "INTEGRATION_ERRORS_TOTAL",
    "WEBHOOK_DELIVERY_FAILURES_TOTAL",
    "Metrics",
    "get_metrics",
    "metrics_app",
    "set_default_metrics",
]

#: Name fixed by RB-09 (Detection, Triage 1) and the IDISIntegrationProviderErrors alert.
INTEGRATION_ERRORS_TOTAL = "integration_errors_total"
#: Name fixed by RB-09 (Detection).
WEBHOOK_DELIVERY_FAILURES_TOTAL = "webhook_delivery_failures_total"

#: Latency buckets for provider calls: loopback sub-millisecond up to a 30 s deadline.
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def _strip_total(name: str) -> str:
    # prometheus_client appends _total to counters itself.
    return name.removesuffix("_total")


class Metrics:
    """The library's metrics, registered in one registry.

    Thread-safe: prometheus_client metrics are. Create one per registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else _DEFAULT_REGISTRY
        r = self.registry
        # --- provider calls (resilience pipeline)
        self.requests = Counter(
            "integration_requests",
            "Provider calls by final outcome.",
            ["provider", "endpoint", "outcome"],
            registry=r,
        )
        self.errors = Counter(
            _strip_total(INTEGRATION_ERRORS_TOTAL),
            "Failed provider call attempts, by error type (timeout, server_error, ...).",
            ["provider", "endpoint", "error_type"],
            registry=r,
        )
        self.latency = Histogram(
            "integration_request_duration_seconds",
            "Duration of one provider call attempt.",
            ["provider", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "integration_retries",
            "Retries scheduled, by the error that caused them.",
            ["provider", "endpoint", "error_type"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "integration_retry_budget_exhausted",
            "Retries skipped because the provider's retry budget was spent.",
            ["provider"],
            registry=r,
        )
        self.rate_limited = Counter(
            "integration_rate_limited",
            "Calls answered 429 (source=provider) or held by our own limiter (source=client).",
            ["provider", "endpoint", "source"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "integration_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["provider", "breaker"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "integration_circuit_breaker_transitions",
            "Circuit breaker state changes.",
            ["provider", "breaker", "to_state"],
            registry=r,
        )
        self.in_flight = Gauge(
            "integration_in_flight_requests",
            "Provider calls in flight (bulkhead occupancy).",
            ["provider"],
            registry=r,
        )
        self.bulkhead_rejected = Counter(
            "integration_bulkhead_rejected",
            "Calls refused because the bulkhead was full.",
            ["provider"],
            registry=r,
        )
        self.provider_up = Gauge(
            "integration_provider_up",
            "Last health probe: 1 healthy, 0 unhealthy.",
            ["provider"],
            registry=r,
        )
        # --- outbox and outbound webhooks
        self.webhook_delivery_failures = Counter(
            _strip_total(WEBHOOK_DELIVERY_FAILURES_TOTAL),
            "Failed outbound webhook delivery attempts.",
            ["provider"],
            registry=r,
        )
        self.outbox_messages = Gauge(
            "integration_outbox_messages",
            "Outbox messages by status.",
            ["provider", "status"],
            registry=r,
        )
        self.outbox_oldest_pending_age = Gauge(
            "integration_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox message.",
            ["provider"],
            registry=r,
        )
        self.outbox_deliveries = Counter(
            "integration_outbox_deliveries",
            "Outbox delivery attempts by outcome.",
            ["provider", "kind", "outcome"],
            registry=r,
        )
        self.outbox_dead_letters = Counter(
            "integration_outbox_dead_letters",
            "Messages moved to the dead letter state.",
            ["provider", "kind"],
            registry=r,
        )
        self.outbox_health_probes = Counter(
            "integration_outbox_health_probes",
            "Health probes the outbox worker made to tell a poison message from an outage.",
            ["provider", "result"],
            registry=r,
        )
        # --- inbound webhooks, polling and mode control
        self.webhooks_received = Counter(
            "integration_webhooks_received",
            "Inbound webhooks by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.sync_mode = Gauge(
            "integration_sync_mode",
            "Current sync mode: 0 webhook, 1 polling.",
            ["provider"],
            registry=r,
        )
        self.mode_switches = Counter(
            "integration_sync_mode_switches",
            "Sync mode changes by target mode and reason.",
            ["provider", "to_mode", "reason"],
            registry=r,
        )
        self.polls = Counter(
            "integration_polls", "Poll runs by outcome.", ["provider", "outcome"], registry=r
        )
        self.events_applied = Counter(
            "integration_events_applied",
            "Provider events applied, by the channel that brought them.",
            ["provider", "source"],
            registry=r,
        )
        self.last_webhook_age = Gauge(
            "integration_last_webhook_age_seconds",
            "Seconds since the last accepted webhook.",
            ["provider"],
            registry=r,
        )
        # --- OAuth
        self.token_expiry = Gauge(
            "integration_token_expiry_seconds",
            "Seconds until the provider's access token expires.",
            ["provider"],
            registry=r,
        )
        self.token_refreshes = Counter(
            "integration_token_refreshes",
            "Token refreshes by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.credential_rotations = Counter(
            "integration_credential_rotations",
            "Credential rotations by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.token_reauthorization_required = Gauge(
            "integration_token_reauthorization_required",
            "1 while automatic token refresh is stopped until someone re-authorizes, by reason "
            "(invalid_grant, invalid_client, outcome_unknown).",
            ["provider", "reason"],
            registry=r,
        )
        # --- enrichment and defects
        self.enrichment_requests = Counter(
            "integration_enrichment_requests",
            "Enrichment requests by result.",
            ["provider", "result"],
            registry=r,
        )
        self.enrichment_deferred_pending = Gauge(
            "integration_enrichment_deferred_pending",
            "Deferred enrichments waiting to run.",
            ["provider"],
            registry=r,
        )
        self.defects_open = Gauge(
            "integration_defects_open",
            "Open defects by provider and type.",
            ["provider", "defect_type"],
            registry=r,
        )
        # --- reconciliation
        self.reconcile_events = Counter(
            "integration_reconcile_events",
            "Replayed events by outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.timeline_gap_seconds = Gauge(
            "integration_sync_timeline_gap_seconds",
            "Total uncovered time in the sync timeline over the inspected window.",
            ["provider"],
            registry=r,
        )

    def names(self) -> Iterable[str]:
        """Exported metric family names (counters with their ``_total`` suffix)."""
        for metric in vars(self).values():
            if isinstance(metric, Counter):
                yield f"{metric._name}_total"  # prometheus_client keeps names private
            elif isinstance(metric, Gauge | Histogram):
                yield metric._name  # same


_lock = threading.Lock()
_default: Metrics | None = None


def get_metrics() -> Metrics:
    """Return the process-wide metrics, creating them on first use."""
    global _default  # noqa: PLW0603  # one registry per process is the Prometheus model
    if _default is None:
        with _lock:
            if _default is None:
                _default = Metrics()
    return _default


def set_default_metrics(metrics: Metrics | None) -> Metrics | None:
    """Install ``metrics`` as the process-wide set (tests); return the previous one."""
    global _default  # see get_metrics
    with _lock:
        previous, _default = _default, metrics
    return previous


def metrics_app(registry: CollectorRegistry | None = None) -> Any:
    """Return an ASGI app serving ``/metrics`` in the Prometheus text format.

    Mount it in Starlette/FastAPI (``app.mount("/metrics", metrics_app())``) or
    serve it alone.
    """
    from prometheus_client import make_asgi_app

    return make_asgi_app(registry=registry if registry is not None else get_metrics().registry)
