"""Pure retry policy: (attempt, failure) -> retry after a tier's delay, or park.

Nothing here does I/O; ``settlement`` carries the decision out.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum

DEFAULT_DELAYS: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)


class FailureKind(Enum):
    ERROR = "error"  # an exception from the handler: follow the policy
    TIMEOUT = "timeout"  # the handler ran past the job timeout: follow the policy
    RETRY_LATER = "retry_later"  # the handler asked for a later retry
    PERMANENT = "permanent"  # the handler said retrying cannot help
    POISON = "poison"  # undecodable, invalid or unknown: retrying cannot help


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how often a failed job is tried again.

    ``delays`` are the delay tiers, one retry queue each; attempt n (1-based) that fails is
    retried after ``delays[n-1]`` (the last tier repeats). ``max_attempts`` counts every run of
    the handler across deliveries; ``immediate_retries`` are quick in-process retries inside one
    attempt, for blips such as a dropped database connection.
    """

    delays: tuple[float, ...] = DEFAULT_DELAYS
    max_attempts: int = len(DEFAULT_DELAYS) + 1
    immediate_retries: int = 0
    immediate_wait: float = 0.05

    def __post_init__(self) -> None:
        if not self.delays or any(d <= 0 for d in self.delays):
            raise ValueError("retry delays must be a non-empty list of positive seconds")
        if list(self.delays) != sorted(set(self.delays)):
            raise ValueError("retry delays must be strictly increasing")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.immediate_retries < 0 or self.immediate_wait < 0:
            raise ValueError("immediate_retries and immediate_wait must not be negative")


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(delays=(1.0,), max_attempts=1)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, even one whose ``__str__`` itself raises."""
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    reason: str
    requested_delay: float | None = None
    error_type: str | None = None
    # The exception itself, formatted only if the job is parked (retries do not carry it).
    exception: BaseException | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Retry:
    delay: float  # always one of the policy's tiers


@dataclass(frozen=True, slots=True)
class Park:
    reason: str


Decision = Retry | Park


def tier_for(delays: tuple[float, ...], wanted: float) -> float:
    """The smallest tier that waits at least ``wanted`` seconds (the largest if none does)."""
    index = bisect.bisect_left(delays, wanted)
    return delays[min(index, len(delays) - 1)]


def clamp_attempt(policy: RetryPolicy, attempt: int) -> int:
    """The attempt number within ``1..max_attempts``: headers are input, not to be trusted."""
    return min(max(attempt, 1), policy.max_attempts)


def decide(policy: RetryPolicy, attempt: int, failure: Failure) -> Decision:
    """Decide what happens to a job whose ``attempt``-th run failed."""
    attempt = clamp_attempt(policy, attempt)
    if failure.kind in (FailureKind.POISON, FailureKind.PERMANENT):
        return Park(failure.reason)
    if attempt >= policy.max_attempts:
        return Park(f"gave up after {attempt} attempts: {failure.reason}")
    if failure.kind is FailureKind.RETRY_LATER and failure.requested_delay is not None:
        return Retry(tier_for(policy.delays, failure.requested_delay))
    return Retry(policy.delays[min(attempt, len(policy.delays)) - 1])


def tier_label(delay: float) -> str:
    """A short, stable queue-name suffix for a delay: 500ms, 5s, 2m, 1h."""
    millis = round(delay * 1000)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if millis % size == 0:
            return f"{millis // size}{unit}"
    return f"{millis}ms"
