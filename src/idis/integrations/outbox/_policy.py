"""The outbox's decisions, as pure code: no I/O, no sleeping, time passed in.

Both workers (sync and asyncio) drive these. Given how one delivery attempt
ended, :func:`decide` says what happens to the message:

===================================  ==========================================
attempt ended with                   the message
===================================  ==========================================
success                              ``delivered``
not attempted (breaker open,         back to ``pending``; the attempt is given
bulkhead full, worker stopping)      back, so waiting never burns the budget
provider fault while the provider    back to ``pending``, attempt given back: the
is now unavailable (the failure      failure is the outage's, not the message's;
opened its breaker or a 429 pause)   the delay grows with each such failure, so
                                     the next half-open trial is another message
the same, but the provider served    counted like any other failure: the message
other messages since this one last   is poison, not the provider down, so it is
failed, or its health endpoint       retried and dead-lettered in the end (the
answered healthy after the failure   probe is the evidence when nothing else is
                                     left to deliver to the provider)
our configuration is wrong           back to ``pending``, attempt given back, due
(``ConfigError``: no webhook secret, again after a pause: not the message's fault
missing Vault variables, ...)        (the worker reports itself unhealthy)
410 Gone on a webhook                ``dead``; the receiver is marked gone
other 4xx (except 408/409/425/429)   ``dead`` at once: resending cannot succeed
a caller bug (UsageError, ...)       ``dead`` at once
any other failure                    retry after jittered backoff, ``dead``
                                     once ``max_retries`` retries are spent
===================================  ==========================================
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.exc import DBAPIError

from ..config import OutboxSettings
from ..exceptions import (
    AuthError,
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    IntegrationError,
    ProviderError,
    ProviderRejected,
    RateLimited,
    ReauthorizationRequired,
)
from ..observability._logs import redact_text

__all__ = [
    "Action",
    "Disposition",
    "backoff_delay",
    "decide",
    "describe_error",
    "probe_decides",
]

#: 4xx answers that may succeed later (timeout, conflict, too early, rate limited).
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})
#: Longest ``last_error`` kept; longer messages are cut.
MAX_ERROR_LENGTH = 500
#: Delay before a message whose attempt was given back is due again, when the
#: error says nothing better. The lease query also skips unavailable providers,
#: so this only bounds how soon a recovered provider is tried.
DEFER_DELAY = timedelta(milliseconds=100)
#: Pause before a message that met a configuration error is tried again: long
#: enough not to flood the log, short enough to resume soon after the fix.
CONFIG_ERROR_DELAY = timedelta(seconds=30)


class Action(enum.Enum):
    """What happens to a message after an attempt."""

    #: The provider accepted it.
    DELIVERED = "delivered"
    #: Try again at ``Disposition.next_attempt_at``; the attempt counts.
    RETRY = "retry"
    #: Back to pending without counting the attempt (not the message's fault).
    DEFER = "deferred"
    #: Give up: dead letter.
    DEAD = "dead"
    #: Webhook receiver answered 410: dead letter and stop delivering to it.
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Disposition:
    """The outcome of one attempt, ready to be written."""

    action: Action
    #: When the message is due again (RETRY and DEFER).
    next_attempt_at: datetime | None = None
    #: Redacted error summary for ``last_error``.
    error: str | None = None

    @property
    def attempted(self) -> bool:
        """Whether the attempt reached (or may have reached) the provider."""
        return self.action is not Action.DEFER


def backoff_delay(
    settings: OutboxSettings, attempts: int, rng: random.Random | None = None
) -> timedelta:
    """Delay before the next attempt after ``attempts`` failed ones: full jitter.

    Uniform in ``[0, min(max_backoff, initial_backoff * 2 ** (attempts - 1))]``,
    so workers that failed together spread out instead of retrying in lockstep.
    """
    initial = settings.initial_backoff.total_seconds()
    cap = min(settings.max_backoff.total_seconds(), initial * 2.0 ** min(max(attempts - 1, 0), 60))
    return timedelta(seconds=(rng or random).uniform(0.0, cap))


def describe_error(exc: BaseException) -> str:
    """One redacted line for ``last_error``: type, status code, message; never a secret."""
    status = getattr(exc, "status_code", None)
    head = type(exc).__name__ + (f" (HTTP {status})" if status else "")
    # A driver error's text carries the SQL and its parameters (payloads):
    # keep only the driver's own first line.
    orig = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else None
    raw = str(orig).strip().splitlines()[0] if orig is not None and str(orig).strip() else str(exc)
    if isinstance(exc, DBAPIError) and orig is None:
        raw = ""
    text = redact_text(" ".join(raw.split()))
    summary = f"{head}: {text}" if text else head
    return summary[:MAX_ERROR_LENGTH]


def _wants_evidence(
    error: BaseException | None, provider_available: bool, served_others: bool
) -> bool:
    """A provider fault that left the provider unavailable, and nothing says it works."""
    return (
        isinstance(error, ProviderError)
        and error.provider_fault
        and error.retryable
        and not provider_available
        and not served_others
    )


def probe_decides(
    error: BaseException | None, *, provider_available: bool, served_others: bool
) -> bool:
    """Whether a health probe of the provider is the evidence this failure lacks.

    True for a provider fault (5xx, timeout, dropped connection, malformed
    answer) that left the provider unavailable while no other message got
    through since: :func:`decide` gives such an attempt back as the outage's,
    unless a probe made after the failure finds the provider healthy
    (``provider_healthy``), in which case the failure is the message's own and
    counts. Never for a 429: a rate limit is provider-wide by nature, and a
    healthy health endpoint says nothing against it.
    """
    return _wants_evidence(error, provider_available, served_others) and not isinstance(
        error, RateLimited
    )


def decide(
    error: BaseException | None,
    *,
    kind: str,
    attempts: int,
    max_retries: int,
    provider_available: bool,
    now: datetime,
    settings: OutboxSettings,
    rng: random.Random | None = None,
    served_others: bool = False,
    provider_healthy: bool = False,
    excused: int = 0,
) -> Disposition:
    """Decide what happens to a message after one attempt.

    Args:
        error: What the attempt raised, or None when the provider accepted it.
        kind: The message kind (``webhook`` messages honour 410 Gone).
        attempts: Attempts counted so far, this one included.
        max_retries: Retries allowed after the first attempt.
        provider_available: Whether the provider accepts calls *now* (breaker
            not open, no 429 pause): False means the failure is the outage's.
        now: Current time.
        settings: Backoff settings.
        rng: Random source for the jitter (tests pass a seeded one).
        served_others: The provider accepted other messages since this one's
            last failure: a failure that leaves it unavailable is this
            message's own (poison), and counts.
        provider_healthy: A health probe of the provider, made after this
            failure, answered healthy: the same evidence as ``served_others``
            when nothing else is left to deliver (only poison remains). False
            when the probe failed, was unhealthy, or was not made.
        excused: Earlier failures of this message given back as the outage's;
            each one doubles the delay before it is due again.

    Returns:
        The disposition to write.
    """
    if error is None:
        return Disposition(Action.DELIVERED)
    summary = describe_error(error)
    if isinstance(error, CircuitOpen | BulkheadFull):
        # Never attempted: the message waits for the provider, its budget intact.
        wait = timedelta(seconds=getattr(error, "retry_in", None) or 0.0)
        return Disposition(Action.DEFER, now + max(wait, DEFER_DELAY), summary)
    if isinstance(error, ConfigError):
        # Our configuration, not the message: it waits for the fix (the worker
        # reports it), its budget intact, and is never dead-lettered for it.
        return Disposition(
            Action.DEFER, now + min(CONFIG_ERROR_DELAY, settings.max_backoff), summary
        )
    if isinstance(error, AuthError):
        # A token we cannot get is not the message's fault: the token endpoint is
        # down (the provider's outage) or a person must re-authorize. The message
        # waits with its budget intact, like an outage's; the token state, its
        # metric and alert tell the operator. Counting these attempts dead-lettered
        # every push of an outage that took the token endpoint down too.
        if isinstance(error, ReauthorizationRequired):
            delay = min(CONFIG_ERROR_DELAY, settings.max_backoff)
        else:
            delay = max(backoff_delay(settings, excused + 1, rng), DEFER_DELAY)
        return Disposition(Action.DEFER, now + delay, summary)
    if isinstance(error, ProviderRejected):
        if kind == "webhook" and error.status_code == 410:
            return Disposition(Action.GONE, None, summary)
        if error.status_code not in _RETRYABLE_4XX:
            return Disposition(Action.DEAD, None, summary)
    elif isinstance(error, IntegrationError) and not error.retryable:
        # A caller bug or an answer that resending cannot change.
        return Disposition(Action.DEAD, None, summary)
    # A healthy probe never excuses a 429's (see probe_decides).
    healthy = provider_healthy and not isinstance(error, RateLimited)
    outage = _wants_evidence(error, provider_available, served_others) and not healthy
    if outage:
        # The attempt failed *and* the provider is now unavailable (this failure
        # opened its breaker, or a 429 paused it), and nothing says it works
        # (no other message got through, no healthy probe since): the outage's
        # fault, so the attempt is given back. The delay
        # grows with each such failure, so the message that failed the last
        # half-open trial is not the next trial too.
        backoff = backoff_delay(settings, attempts + excused, rng)
        return Disposition(Action.DEFER, now + max(backoff, DEFER_DELAY), summary)
    backoff = backoff_delay(settings, attempts, rng)
    if attempts > max_retries:
        return Disposition(Action.DEAD, None, summary)
    return Disposition(Action.RETRY, now + backoff, summary)
