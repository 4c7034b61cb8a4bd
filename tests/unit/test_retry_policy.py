"""The retry policy is a pure function: a table of (attempt, failure) -> decision."""

from __future__ import annotations

import pytest

from brokerjobs.retry import (
    Failure,
    FailureKind,
    Park,
    Retry,
    RetryPolicy,
    decide,
    tier_for,
    tier_label,
)

POLICY = RetryPolicy(delays=(1.0, 5.0, 30.0), max_attempts=4)
ERROR = Failure(FailureKind.ERROR, "boom")


@pytest.mark.parametrize(
    ("attempt", "failure", "expected"),
    [
        (1, ERROR, Retry(1.0)),
        (2, ERROR, Retry(5.0)),
        (3, ERROR, Retry(30.0)),
        (4, ERROR, Park("gave up after 4 attempts: boom")),
        # Attempts come from a header: out-of-range values are clamped to 1..max_attempts.
        (9, ERROR, Park("gave up after 4 attempts: boom")),
        (10**30, ERROR, Park("gave up after 4 attempts: boom")),
        (0, ERROR, Retry(1.0)),
        (-5, ERROR, Retry(1.0)),
        (1, Failure(FailureKind.TIMEOUT, "slow"), Retry(1.0)),
        (1, Failure(FailureKind.POISON, "bad json"), Park("bad json")),
        (1, Failure(FailureKind.PERMANENT, "no such user"), Park("no such user")),
        (1, Failure(FailureKind.RETRY_LATER, "later", 3.0), Retry(5.0)),
        (1, Failure(FailureKind.RETRY_LATER, "later", 999.0), Retry(30.0)),
        (1, Failure(FailureKind.RETRY_LATER, "later", None), Retry(1.0)),
        (
            4,
            Failure(FailureKind.RETRY_LATER, "later", 1.0),
            Park("gave up after 4 attempts: later"),
        ),
    ],
)
def test_decide(attempt: int, failure: Failure, expected: Retry | Park) -> None:
    assert decide(POLICY, attempt, failure) == expected


def test_the_last_tier_repeats_when_attempts_outnumber_tiers() -> None:
    policy = RetryPolicy(delays=(1.0, 2.0), max_attempts=10)
    assert [decide(policy, n, ERROR) for n in range(1, 5)] == [
        Retry(1.0),
        Retry(2.0),
        Retry(2.0),
        Retry(2.0),
    ]


@pytest.mark.parametrize(
    ("wanted", "tier"), [(0.1, 1.0), (1.0, 1.0), (1.01, 5.0), (30.0, 30.0), (31.0, 30.0)]
)
def test_tier_for_rounds_up(wanted: float, tier: float) -> None:
    assert tier_for((1.0, 5.0, 30.0), wanted) == tier


@pytest.mark.parametrize(
    ("delay", "label"), [(0.5, "500ms"), (1, "1s"), (90, "90s"), (120, "2m"), (3600, "1h")]
)
def test_tier_labels(delay: float, label: str) -> None:
    assert tier_label(delay) == label


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delays": ()},
        {"delays": (5.0, 1.0)},
        {"delays": (0.0,)},
        {"max_attempts": 0},
        {"immediate_retries": -1},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
