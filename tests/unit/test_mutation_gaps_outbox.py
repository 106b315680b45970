"""Cases `make mutate` found missing for the outbox's decisions (docs/testing.md).

Each test kills mutants of ``outbox/_policy.py`` that survived every listed test.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import OperationalError

from idis.integrations.config import OutboxSettings
from idis.integrations.exceptions import ProviderUnavailable
from idis.integrations.outbox._policy import Action, decide, describe_error

NOW = datetime(2026, 1, 19, 9, 0, tzinfo=UTC)
SETTINGS = OutboxSettings(
    max_retries=10, initial_backoff=timedelta(seconds=1), max_backoff=timedelta(seconds=60)
)
PAYLOAD = "card=4111111111111111"


def test_a_database_error_keeps_the_drivers_first_line_and_never_the_statement() -> None:
    """``last_error`` of a driver error is its first line: no SQL, no bound parameters.

    Kills ``splitlines()[0]`` → ``[1]`` and ``orig is None`` → ``orig is not None``.
    """
    driver = RuntimeError(f"deadlock detected\nDETAIL: while inserting {PAYLOAD}")
    error = OperationalError("INSERT INTO deals VALUES (%(v)s)", {"v": PAYLOAD}, driver)

    text = describe_error(error)

    assert "OperationalError: deadlock detected" == text


def test_a_database_error_without_a_driver_error_says_only_its_type() -> None:
    """A driver error with no original exception keeps nothing of its text (SQL, parameters)."""
    error = OperationalError("INSERT INTO deals VALUES (%(v)s)", {"v": PAYLOAD}, None)  # type: ignore[arg-type]

    text = describe_error(error)

    assert "OperationalError" == text


def test_a_failure_that_leaves_the_provider_down_is_due_again_later_not_now() -> None:
    """The outage's deferral is due after the backoff (at most its cap), never in the past.

    Kills ``now + max(backoff, DEFER_DELAY)`` → ``now - ...`` and → ``None``.
    """
    for attempts in (1, 3, 6):
        disposition = decide(
            ProviderUnavailable("HTTP 503", status_code=503),
            kind="request",
            attempts=attempts,
            max_retries=10,
            provider_available=False,
            now=NOW,
            settings=SETTINGS,
            rng=random.Random(attempts),
        )
        cap = timedelta(seconds=min(60, 2 ** (attempts - 1)))

        assert Action.DEFER == disposition.action
        assert disposition.next_attempt_at is not None
        assert NOW < disposition.next_attempt_at <= NOW + cap
        assert disposition.error == "ProviderUnavailable (HTTP 503): HTTP 503"
