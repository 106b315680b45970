"""Cases `make mutate` found missing for the backoff policy and duration formatting.

Each test kills mutants of ``_backoff.py`` or ``_timeparse.py`` that survived every listed test
(docs/testing.md, "Mutation testing").
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from idis.integrations._backoff import Backoff
from idis.integrations._timeparse import format_duration


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(milliseconds=250), "250ms"),
        (45, "45s"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (timedelta(days=2, hours=3), "2d3h"),
        (0, "0s"),
    ],
)
def test_format_duration_renders_compact_lowercase_units(value: timedelta | int, text: str) -> None:
    """What an operator reads: ``1h30m``, not ``5400000ms`` nor ``1H30M``.

    The round-trip test cannot see these (parse_duration lower-cases and accepts ms): kills
    ``seconds < 1 and seconds > 0`` → ``or`` and the upper-cased unit letters.
    """
    assert text == format_duration(value)


def test_full_jitter_spreads_delays_over_the_whole_cap() -> None:
    """The default jitter draws from [0, cap]: some delays fall in the lower half.

    Kills ``jitter == "full"`` → never true, which silently waited the whole cap every time.
    """
    policy = Backoff(initial=8.0, maximum=8.0)
    rng = random.Random(5)

    delays = [policy.delay(1, rng) for _ in range(200)]

    assert min(delays) < 2.0
    assert max(delays) > 6.0
