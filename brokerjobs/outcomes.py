"""How a delivery ended: one vocabulary for settlement, telemetry, status, logs and tests."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    COMPLETED = "completed"  # the handler returned; the delivery is acked
    RETRIED = "retried"  # a copy waits in a retry tier (confirmed), then the original is acked
    PARKED = "parked"  # a copy is in the parking queue (confirmed), or the delivery dead-lettered
    REQUEUED = "requeued"  # given back untouched (shutdown, a lost channel): no attempt used


@dataclass(frozen=True, slots=True)
class Settled:
    """The outcome of one delivery, with what explains it."""

    outcome: Outcome
    error_type: str | None = None  # the failure's type (retried, parked)
    reason: str | None = None  # the failure (retried), the park reason (parked), why skipped
    retry_delay: float | None = None  # the tier a retried job waits in


COMPLETED = Settled(Outcome.COMPLETED)
REQUEUED = Settled(Outcome.REQUEUED)
