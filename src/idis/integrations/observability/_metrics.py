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
from functools import partial
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
        #: Children by (metric attribute, label values): see :meth:`child`.
        self._children: dict[tuple[str, ...], Any] = {}
        # Every metric of this set goes in its registry.
        counter = partial(Counter, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)
        # --- provider calls (resilience pipeline)
        self.requests = counter(
            "integration_requests",
            "Provider calls by final outcome.",
            ["provider", "endpoint", "outcome"],
        )
        self.errors = counter(
            _strip_total(INTEGRATION_ERRORS_TOTAL),
            "Failed provider call attempts, by error type (timeout, server_error, ...).",
            ["provider", "endpoint", "error_type"],
        )
        self.latency = Histogram(
            "integration_request_duration_seconds",
            "Duration of one provider call attempt.",
            ["provider", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.retries = counter(
            "integration_retries",
            "Retries scheduled, by the error that caused them.",
            ["provider", "endpoint", "error_type"],
        )
        self.retry_budget_exhausted = counter(
            "integration_retry_budget_exhausted",
            "Retries skipped because the provider's retry budget was spent.",
            ["provider"],
        )
        self.rate_limited = counter(
            "integration_rate_limited",
            "Calls answered 429 (source=provider) or held by our own limiter (source=client).",
            ["provider", "endpoint", "source"],
        )
        self.breaker_state = gauge(
            "integration_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["provider", "breaker"],
        )
        self.breaker_transitions = counter(
            "integration_circuit_breaker_transitions",
            "Circuit breaker state changes.",
            ["provider", "breaker", "to_state"],
        )
        self.in_flight = gauge(
            "integration_in_flight_requests",
            "Provider calls in flight (bulkhead occupancy).",
            ["provider"],
        )
        self.bulkhead_rejected = counter(
            "integration_bulkhead_rejected",
            "Calls refused because the bulkhead was full.",
            ["provider"],
        )
        self.provider_up = gauge(
            "integration_provider_up",
            "Last health probe: 1 healthy, 0 unhealthy.",
            ["provider"],
        )
        # --- outbox and outbound webhooks
        self.webhook_delivery_failures = counter(
            _strip_total(WEBHOOK_DELIVERY_FAILURES_TOTAL),
            "Failed outbound webhook delivery attempts.",
            ["provider"],
        )
        self.outbox_messages = gauge(
            "integration_outbox_messages",
            "Outbox messages by status.",
            ["provider", "status"],
        )
        self.outbox_oldest_pending_age = gauge(
            "integration_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending outbox message.",
            ["provider"],
        )
        self.outbox_deliveries = counter(
            "integration_outbox_deliveries",
            "Outbox delivery attempts by outcome.",
            ["provider", "kind", "outcome"],
        )
        self.outbox_dead_letters = counter(
            "integration_outbox_dead_letters",
            "Messages moved to the dead letter state.",
            ["provider", "kind"],
        )
        self.outbox_health_probes = counter(
            "integration_outbox_health_probes",
            "Health probes the outbox worker made to tell a poison message from an outage.",
            ["provider", "result"],
        )
        # --- inbound webhooks, polling and mode control
        self.webhooks_received = counter(
            "integration_webhooks_received",
            "Inbound webhooks by outcome.",
            ["provider", "outcome"],
        )
        self.sync_mode = gauge(
            "integration_sync_mode",
            "Current sync mode: 0 webhook, 1 polling.",
            ["provider"],
        )
        self.mode_switches = counter(
            "integration_sync_mode_switches",
            "Sync mode changes by target mode and reason.",
            ["provider", "to_mode", "reason"],
        )
        self.polls = counter("integration_polls", "Poll runs by outcome.", ["provider", "outcome"])
        self.events_applied = counter(
            "integration_events_applied",
            "Provider events applied, by the channel that brought them.",
            ["provider", "source"],
        )
        self.last_webhook_age = gauge(
            "integration_last_webhook_age_seconds",
            "Seconds since the last accepted webhook.",
            ["provider"],
        )
        # --- OAuth
        self.token_expiry = gauge(
            "integration_token_expiry_seconds",
            "Seconds until the provider's access token expires.",
            ["provider"],
        )
        self.token_refreshes = counter(
            "integration_token_refreshes",
            "Token refreshes by outcome.",
            ["provider", "outcome"],
        )
        self.credential_rotations = counter(
            "integration_credential_rotations",
            "Credential rotations by outcome.",
            ["provider", "outcome"],
        )
        self.token_reauthorization_required = gauge(
            "integration_token_reauthorization_required",
            "1 while automatic token refresh is stopped until someone re-authorizes, by reason "
            "(invalid_grant, invalid_client, outcome_unknown).",
            ["provider", "reason"],
        )
        # --- enrichment and defects
        self.enrichment_requests = counter(
            "integration_enrichment_requests",
            "Enrichment requests by result.",
            ["provider", "result"],
        )
        self.enrichment_deferred_pending = gauge(
            "integration_enrichment_deferred_pending",
            "Deferred enrichments waiting to run.",
            ["provider"],
        )
        self.defects_open = gauge(
            "integration_defects_open",
            "Open defects by provider and type.",
            ["provider", "defect_type"],
        )
        # --- reconciliation
        self.reconcile_events = counter(
            "integration_reconcile_events",
            "Replayed events by outcome.",
            ["provider", "outcome"],
        )
        self.timeline_gap_seconds = gauge(
            "integration_sync_timeline_gap_seconds",
            "Total uncovered time in the sync timeline over the inspected window.",
            ["provider"],
        )

    def child(self, metric: str, *labels: str) -> Any:
        """``getattr(self, metric).labels(*labels)``, looked up once per label values.

        ``labels()`` validates and takes a lock (about 2 µs) on every call, and the
        child it returns never changes: the hot paths (every provider call, every
        webhook answer) count through this instead.
        """
        key = (metric, *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = getattr(self, metric).labels(*labels)
        return found

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
