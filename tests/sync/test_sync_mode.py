"""The mode controller's pure state machine: failover, return, pins, overrides, hysteresis."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idis.integrations.config import Settings
from idis.integrations.sync._mode import (
    Mode,
    ModeController,
    ModePolicy,
    ModeState,
    Observation,
    Reason,
    Transition,
    decide,
    initial_state,
    operator_override,
)

from .conftest import T0

POLICY = ModePolicy(
    lag_threshold=timedelta(seconds=120),
    stable_period=timedelta(seconds=600),
)
WEBHOOK = initial_state(POLICY, T0)
S = timedelta(seconds=1)


def _failed_over(at: datetime = T0) -> ModeState:
    return ModeState(mode=Mode.POLLING, reason=Reason.WEBHOOK_LAG, changed_at=at)


def _healthy(now: datetime) -> Observation:
    return Observation(now=now, breaker="closed", lag=timedelta(0), last_webhook_at=now)


def test_policy_comes_from_settings() -> None:
    """ModePolicy.from_settings maps CRM_MODE and the IDIS_SYNC_* thresholds."""
    settings = Settings.from_env(
        {"CRM_MODE": "polling", "IDIS_SYNC_LAG_THRESHOLD": "30s", "IDIS_SYNC_AUTO_FAILOVER": "no"}
    )

    policy = ModePolicy.from_settings(settings.sync)

    assert policy.pinned_polling
    assert not policy.auto_failover
    assert timedelta(seconds=30) == policy.lag_threshold


def test_initial_state_follows_crm_mode() -> None:
    """Webhook by default; CRM_MODE=polling starts pinned in polling."""
    assert (Mode.WEBHOOK, Reason.DEFAULT) == (WEBHOOK.mode, WEBHOOK.reason)
    pinned = initial_state(replace(POLICY, pinned_polling=True), T0)
    assert (Mode.POLLING, Reason.CONFIG) == (pinned.mode, pinned.reason)


@pytest.mark.parametrize(
    ("obs", "reason"),
    [
        (Observation(now=T0, breaker="open"), Reason.BREAKER_OPEN),
        (Observation(now=T0, lag=timedelta(seconds=121)), Reason.WEBHOOK_LAG),
    ],
)
def test_each_failure_signal_fails_over(obs: Observation, reason: Reason) -> None:
    """Breaker open or lag over the threshold fail over (bad signatures never do)."""
    decision = decide(WEBHOOK, obs, POLICY)

    assert Transition(Mode.WEBHOOK, Mode.POLLING, reason, T0, decision.transition.detail) == (  # type: ignore[union-attr]
        decision.transition
    )
    assert Mode.POLLING == decision.state.mode


@pytest.mark.parametrize(
    "obs",
    [
        Observation(now=T0, breaker="half_open"),
        Observation(now=T0, lag=timedelta(seconds=120)),
        Observation(now=T0, sentinel_failed=True),
    ],
)
def test_below_the_thresholds_nothing_changes(obs: Observation) -> None:
    """At or under every threshold the controller stays in webhook mode."""
    decision = decide(WEBHOOK, obs, POLICY)

    assert decision.transition is None
    assert Mode.WEBHOOK == decision.state.mode


def test_auto_failover_off_keeps_webhooks() -> None:
    """With auto_failover off, even a long lag does not switch."""
    decision = decide(
        WEBHOOK, Observation(now=T0, lag=timedelta(hours=1)), replace(POLICY, auto_failover=False)
    )

    assert decision.transition is None


def test_returns_after_the_stable_period_of_evidenced_health() -> None:
    """Healthy observations for exactly stable_period (with webhooks arriving) return to webhook."""
    state = _failed_over()
    transitions = []
    for second in range(0, 601, 30):
        decision = decide(state, _healthy(T0 + second * S), POLICY)
        state = decision.state
        if decision.transition:
            transitions.append((second, decision.transition.to_mode, decision.transition.reason))

    assert [(600, Mode.WEBHOOK, Reason.RECOVERED)] == transitions


def test_no_return_without_a_webhook_during_the_healthy_stretch() -> None:
    """A quiet provider gives no evidence: the controller keeps polling."""
    state = _failed_over()
    for second in range(0, 1201, 60):
        obs = Observation(now=T0 + second * S, lag=timedelta(0), last_webhook_at=T0 - 10 * S)
        decision = decide(state, obs, POLICY)
        state = decision.state

        assert decision.transition is None


def test_one_bad_observation_restarts_the_stable_clock() -> None:
    """Lag or a half-open breaker during the stretch restart it."""
    for bad in (
        Observation(now=T0 + 300 * S, lag=timedelta(seconds=200)),
        Observation(now=T0 + 300 * S, breaker="half_open"),
    ):
        state = decide(_failed_over(), _healthy(T0), POLICY).state
        state = decide(state, bad, POLICY).state
        assert state.healthy_since is None
        state = decide(state, _healthy(T0 + 301 * S), POLICY).state

        assert decide(state, _healthy(T0 + 900 * S), POLICY).transition is None
        assert decide(state, _healthy(T0 + 901 * S), POLICY).transition is not None


def test_unknown_health_neither_starts_nor_breaks_the_stretch() -> None:
    """Ticks without a sentinel result keep healthy_since as it was."""
    state = decide(_failed_over(), _healthy(T0), POLICY).state
    state = decide(state, Observation(now=T0 + 100 * S, sentinel_failed=True), POLICY).state
    state = decide(state, Observation(now=T0 + 200 * S), POLICY).state

    assert T0 == state.healthy_since


def test_crm_mode_polling_pins_polling_with_no_automatic_return() -> None:
    """CRM_MODE=polling: healthy webhooks for hours never switch back."""
    policy = replace(POLICY, pinned_polling=True)
    state = initial_state(policy, T0)
    for minute in range(0, 240, 5):
        decision = decide(state, _healthy(T0 + timedelta(minutes=minute)), policy)
        state = decision.state

        assert decision.transition is None
    assert Mode.POLLING == state.mode


def test_crm_mode_polling_applied_to_a_webhook_provider_switches_at_once() -> None:
    """CRM_MODE=polling on a running provider switches it to polling (RB-09 Containment 1)."""
    decision = decide(WEBHOOK, _healthy(T0), replace(POLICY, pinned_polling=True))

    assert decision.transition is not None
    assert (Mode.POLLING, Reason.CONFIG) == (decision.state.mode, decision.transition.reason)


def test_unsetting_crm_mode_restores_webhooks() -> None:
    """A provider pinned by CRM_MODE returns to webhook once the variable is gone (Recovery 5)."""
    pinned = initial_state(replace(POLICY, pinned_polling=True), T0)

    decision = decide(pinned, Observation(now=T0 + S), POLICY)

    assert decision.transition is not None
    assert (Mode.WEBHOOK, Reason.CONFIG) == (decision.state.mode, decision.transition.reason)


def test_operator_overrides() -> None:
    """--set polling pins; --set webhook switches back (beating CRM_MODE); --set auto unpins."""
    pinned = operator_override(WEBHOOK, "polling", T0)
    assert pinned.transition is not None
    assert (Mode.POLLING, Mode.POLLING) == (pinned.state.mode, pinned.state.override)
    # Pinned by the operator: no return however healthy.
    assert decide(pinned.state, _healthy(T0 + timedelta(hours=2)), POLICY).transition is None

    auto = operator_override(pinned.state, "auto", T0 + S)
    assert auto.transition is None
    state = auto.state
    for second in (2, 700):
        decision = decide(state, _healthy(T0 + second * S), POLICY)
        state = decision.state
    assert decision.transition is not None
    assert Reason.RECOVERED == decision.transition.reason

    config_pinned = replace(POLICY, pinned_polling=True)
    forced = operator_override(initial_state(config_pinned, T0), "webhook", T0)
    assert forced.transition is not None
    assert Mode.WEBHOOK == forced.state.mode
    assert decide(forced.state, _healthy(T0 + S), config_pinned).transition is None
    with pytest.raises(ValueError, match="sometimes"):
        operator_override(WEBHOOK, "sometimes", T0)


def test_controller_wraps_the_policy() -> None:
    """ModeController.decide is decide() with its policy."""
    controller = ModeController(POLICY)

    assert controller.initial(T0) == WEBHOOK
    assert (
        controller.decide(WEBHOOK, Observation(now=T0, breaker="open")).state.mode is Mode.POLLING
    )


_observations = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=90),  # seconds since the previous observation
        st.sampled_from(["closed", "closed", "closed", "half_open", "open", None]),
        st.one_of(st.none(), st.integers(min_value=0, max_value=300)),  # lag seconds
        st.booleans(),  # a webhook arrived just now
    ),
    max_size=200,
)


def _bad(obs: Observation) -> bool:
    return obs.breaker in ("open", "half_open") or (
        obs.lag is not None and obs.lag > POLICY.lag_threshold
    )


@settings(max_examples=300, deadline=None)
@given(_observations)
def test_hysteresis_never_flaps(steps: list[tuple[int, str | None, int | None, bool]]) -> None:
    """For any observation sequence: a return follows stable_period without a bad sample, and
    the controller switches at most twice in any stable_period."""
    state = WEBHOOK
    now = T0
    last_webhook: datetime | None = None
    last_bad: datetime | None = None
    switches: list[Transition] = []
    for gap, breaker, lag, webhook in steps:
        now += gap * S
        if webhook:
            last_webhook = now
        obs = Observation(
            now=now,
            breaker=breaker,
            lag=None if lag is None else lag * S,
            last_webhook_at=last_webhook,
        )
        decision = decide(state, obs, POLICY)
        if _bad(obs):
            last_bad = now
        if decision.transition is not None:
            switches.append(decision.transition)
            if decision.transition.to_mode is Mode.WEBHOOK:
                assert last_bad is None or now - last_bad > POLICY.stable_period
                assert last_webhook is not None
        state = decision.state

    for index, switch in enumerate(switches):
        within = [s for s in switches[index:] if s.at - switch.at < POLICY.stable_period]
        assert len(within) <= 2
