"""The mode controller: webhook or polling per provider, failing over and back by itself.

The decisions are a pure state machine, :func:`decide`: given the current
:class:`ModeState`, one :class:`Observation` (the clock and what the drivers
saw) and the :class:`ModePolicy` from ``SyncSettings``, it returns the next
state and at most one :class:`Transition`. It does no I/O and reads no clock,
so every threshold is tested by feeding it observations. The drivers
(:mod:`.service`) gather observations, persist the state, and carry out
transitions (:mod:`.state`): audit row, log line, metrics, cursor move.

States and thresholds::

                 breaker open | sentinel lag > lag_threshold   (auto_failover on)
      WEBHOOK  ----------------------------------------------------->  POLLING (automatic)
         ^                                                                 |
         |  healthy for stable_period without interruption, and at least  |
         +-- one webhook arrived during it (sentinel lag <= threshold,  ---+
             breaker closed)

      POLLING (pinned): CRM_MODE=polling, or `sync mode --set polling`.
      No automatic return. Unsetting CRM_MODE (RB-09 Recovery 5) switches
      back to webhook at once; `--set webhook` does too; `--set auto` keeps
      polling and lets the automatic return take over.

Hysteresis: leaving webhook mode needs lag beyond ``lag_threshold`` (or a hard
signal); returning needs ``stable_period`` of uninterrupted health with
evidence (a webhook actually arrived), and any bad observation restarts the
clock. So the controller switches at most twice per ``stable_period`` however
noisy the signals, and never on a single good or bad sample.

Webhook lag is the age of the oldest change newer than the last change the
webhook channel delivered (the sentinel measures it). Isolated lost webhooks
(a hole followed by delivered changes) are not silence: the sentinel applies
them itself and the mode stays.

Bad signatures never switch modes. Anyone can POST a forged request, so a
count of them is an attacker's lever, not evidence that deliveries stopped:
twelve forged POSTs must not move a provider to polling. What fails over is a
missing flow of *valid* deliveries (lag), which forged requests cannot fake.
Signature failures feed ``integration_webhooks_received_total{outcome=
"bad_signature"}`` and the ``IDISIntegrationWebhookSignatureFailures`` alert.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import SyncSettings

__all__ = [
    "Mode",
    "ModeController",
    "ModePolicy",
    "ModeState",
    "Observation",
    "Reason",
    "Transition",
    "decide",
    "initial_state",
    "operator_override",
]


class Mode(StrEnum):
    """How a provider's changes reach us."""

    #: Webhooks push changes; a sentinel checks none is missing.
    WEBHOOK = "webhook"
    #: The poller pulls changes every ``CRM_POLL_INTERVAL``.
    POLLING = "polling"


class Reason(StrEnum):
    """Why the mode is what it is (bounded: a metric label and an audit field)."""

    #: Initial state: webhook mode.
    DEFAULT = "default"
    #: ``CRM_MODE`` pins polling, or stopped pinning it.
    CONFIG = "config"
    #: ``idis-integrations sync mode --set ...``.
    OPERATOR = "operator"
    #: The provider's circuit breaker opened.
    BREAKER_OPEN = "breaker_open"
    #: No longer decided (bad signatures never switch modes); kept so that audit
    #: rows and metrics written by earlier versions still parse.
    SIGNATURE_FAILURES = "signature_failures"
    #: Webhooks fell silent while the provider kept changing.
    WEBHOOK_LAG = "webhook_lag"
    #: Webhooks were healthy for the stable period.
    RECOVERED = "recovered"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModePolicy:
    """The thresholds the controller applies (from ``SyncSettings``)."""

    #: ``CRM_MODE=polling``: polling, no automatic return.
    pinned_polling: bool = False
    #: Fail over by itself (``IDIS_SYNC_AUTO_FAILOVER``).
    auto_failover: bool = True
    #: Webhook lag that fails over.
    lag_threshold: timedelta = timedelta(minutes=2)
    #: Uninterrupted health needed to return to webhook mode.
    stable_period: timedelta = timedelta(minutes=10)

    @classmethod
    def from_settings(cls, sync: SyncSettings) -> ModePolicy:
        """Build from ``Settings.sync``."""
        return cls(
            pinned_polling=sync.crm_mode == "polling",
            auto_failover=sync.auto_failover,
            lag_threshold=sync.lag_threshold,
            stable_period=sync.stable_period,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModeState:
    """What the controller remembers between observations (persisted per provider)."""

    mode: Mode
    reason: Reason
    #: When the mode last changed.
    changed_at: datetime
    #: Operator override: POLLING pins polling, WEBHOOK overrides CRM_MODE=polling.
    override: Mode | None = None
    #: Start of the current uninterrupted healthy stretch (polling mode only).
    healthy_since: datetime | None = None

    def pinned(self, policy: ModePolicy) -> bool:
        """Whether polling is pinned (by the operator or by ``CRM_MODE``)."""
        if self.override is not None:
            return self.override is Mode.POLLING
        return policy.pinned_polling


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What the drivers saw at one instant."""

    #: The clock.
    now: datetime
    #: The provider's breaker: ``closed``, ``half_open``, ``open`` (None: unknown).
    breaker: str | None = None
    #: The sentinel's measured webhook lag; None when no sentinel result this time.
    lag: timedelta | None = None
    #: Whether the sentinel could not check (provider error): health is unknown.
    sentinel_failed: bool = False
    #: When a webhook last delivered a change (any replica).
    last_webhook_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A mode switch the drivers must carry out (audit, log, metrics, cursor)."""

    from_mode: Mode
    to_mode: Mode
    reason: Reason
    at: datetime
    #: One human sentence: what was observed.
    detail: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The next state and the switch to carry out, if any."""

    state: ModeState
    transition: Transition | None = None


def initial_state(policy: ModePolicy, now: datetime) -> ModeState:
    """The state of a provider the controller has never seen."""
    if policy.pinned_polling:
        return ModeState(mode=Mode.POLLING, reason=Reason.CONFIG, changed_at=now)
    return ModeState(mode=Mode.WEBHOOK, reason=Reason.DEFAULT, changed_at=now)


def _switch(state: ModeState, to: Mode, reason: Reason, now: datetime, detail: str) -> Decision:
    new = replace(state, mode=to, reason=reason, changed_at=now, healthy_since=None)
    return Decision(new, Transition(state.mode, to, reason, now, detail))


def _failure(obs: Observation, policy: ModePolicy) -> tuple[Reason, str] | None:
    """The first hard failure signal in ``obs``, as (reason, detail)."""
    if obs.breaker == "open":
        return Reason.BREAKER_OPEN, "the provider's circuit breaker is open"
    # Signature failures are deliberately not a signal (see the module docstring).
    if obs.lag is not None and obs.lag > policy.lag_threshold:
        return (
            Reason.WEBHOOK_LAG,
            f"webhooks lag {obs.lag.total_seconds():.0f} s behind the provider's changes "
            f"(threshold {policy.lag_threshold.total_seconds():.0f} s)",
        )
    return None


def decide(state: ModeState, obs: Observation, policy: ModePolicy) -> Decision:
    """The controller's one step: next state and at most one transition.

    Args:
        state: The current state.
        obs: What was observed now.
        policy: Thresholds.

    Returns:
        The :class:`Decision`.
    """
    now = obs.now
    if state.pinned(policy):
        reason = Reason.OPERATOR if state.override is Mode.POLLING else Reason.CONFIG
        if state.mode is not Mode.POLLING:
            detail = "operator pinned polling" if reason is Reason.OPERATOR else "CRM_MODE=polling"
            return _switch(state, Mode.POLLING, reason, now, detail)
        return Decision(replace(state, reason=reason, healthy_since=None))
    if state.mode is Mode.POLLING and state.reason is Reason.CONFIG:
        # CRM_MODE no longer pins polling (RB-09 Recovery 5: restore normal mode):
        # the operator asked for webhooks; the sentinel still guards them.
        return _switch(state, Mode.WEBHOOK, Reason.CONFIG, now, "CRM_MODE no longer pins polling")
    failure = _failure(obs, policy)
    if state.mode is Mode.WEBHOOK:
        if failure is not None and policy.auto_failover:
            return _switch(state, Mode.POLLING, failure[0], now, failure[1])
        return Decision(replace(state, healthy_since=None) if state.healthy_since else state)
    # Automatic polling: return only after an uninterrupted, evidenced healthy stretch.
    if failure is not None or obs.breaker == "half_open":
        return Decision(replace(state, healthy_since=None))
    if obs.sentinel_failed or obs.lag is None:
        return Decision(state)  # nothing learned about webhook health this time
    since = state.healthy_since or now
    healthy = replace(state, healthy_since=since)
    evidenced = obs.last_webhook_at is not None and obs.last_webhook_at >= since
    if now - since >= policy.stable_period and evidenced:
        return _switch(
            healthy,
            Mode.WEBHOOK,
            Reason.RECOVERED,
            now,
            f"webhooks healthy for {(now - since).total_seconds():.0f} s "
            f"(stable period {policy.stable_period.total_seconds():.0f} s)",
        )
    return Decision(healthy)


def operator_override(state: ModeState, setting: str, now: datetime) -> Decision:
    """Apply ``sync mode --set webhook|polling|auto``.

    ``polling`` pins polling; ``webhook`` switches to webhook now (and overrides
    ``CRM_MODE=polling``), automatic failover still guarding it; ``auto`` removes
    the override and lets the controller decide from here.

    Raises:
        ValueError: for any other setting.
    """
    if setting == "polling":
        pinned = replace(state, override=Mode.POLLING)
        if state.mode is Mode.POLLING:
            return Decision(replace(pinned, reason=Reason.OPERATOR, healthy_since=None))
        return _switch(pinned, Mode.POLLING, Reason.OPERATOR, now, "operator pinned polling")
    if setting == "webhook":
        chosen = replace(state, override=Mode.WEBHOOK)
        if state.mode is Mode.WEBHOOK:
            return Decision(replace(chosen, reason=Reason.OPERATOR))
        return _switch(chosen, Mode.WEBHOOK, Reason.OPERATOR, now, "operator chose webhooks")
    if setting == "auto":
        return Decision(replace(state, override=None))
    raise ValueError(f"mode setting {setting!r} is not one of webhook, polling, auto")


class ModeController:
    """:func:`decide` bound to one policy; stateless and thread-safe.

    Example::

        controller = ModeController(ModePolicy.from_settings(settings.sync))
        decision = controller.decide(state, Observation(now=clock(), lag=lag))
    """

    def __init__(self, policy: ModePolicy) -> None:
        self.policy = policy

    def initial(self, now: datetime) -> ModeState:
        """Initial state (see :func:`initial_state`)."""
        return initial_state(self.policy, now)

    def decide(self, state: ModeState, obs: Observation) -> Decision:
        """One step (see :func:`decide`)."""
        return decide(state, obs, self.policy)
