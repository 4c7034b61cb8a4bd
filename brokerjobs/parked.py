"""A parked message read as a job (its failure envelope), which ones an operation selects, and
the copy that a replay sends back to work. Pure: no broker I/O.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from brokerjobs import envelope as wire
from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.validation import header_text

_FAILURE_HEADERS = (
    wire.ERROR_TYPE, wire.ERROR_MESSAGE, wire.ERROR_TRACEBACK, wire.PARK_REASON,
    wire.PARKED_AT, wire.LAST_FAILED_AT, wire.WORKER,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ParkedJob:
    """A parked message with its failure envelope read out."""

    delivery: Delivery

    @property
    def job_id(self) -> str:
        return self.delivery.message_id or ""

    @property
    def job_name(self) -> str:
        return self.delivery.job_name or str(
            self.delivery.headers.get(wire.ORIGIN_ROUTING_KEY, "?")
        )

    @property
    def error(self) -> str:
        headers = self.delivery.headers
        if wire.PARK_REASON in headers:
            return str(headers[wire.PARK_REASON])
        death = _first_death(headers)
        if death:
            return f"dead-lettered by the broker: {death.get('reason', '?')}"
        return "unknown (no failure envelope)"

    @property
    def error_type(self) -> str:
        return str(self.delivery.headers.get(wire.ERROR_TYPE, "broker"))

    @property
    def attempts(self) -> int:
        return self.delivery.attempt

    @property
    def replays(self) -> int:
        return wire.header_int(self.delivery.headers, wire.REPLAYS, 0)

    @property
    def parked_at(self) -> datetime | None:
        # Ours is always an ISO time in UTC; a broker's dead letter keeps a producer's value.
        value = header_text(self.delivery.headers, wire.PARKED_AT, max_chars=64)
        if value is not None:
            with contextlib.suppress(ValueError, OverflowError):
                parsed = datetime.fromisoformat(value)
                return parsed.replace(tzinfo=parsed.tzinfo or UTC).astimezone(UTC)
        death_time = (_first_death(self.delivery.headers) or {}).get("time")
        if isinstance(death_time, datetime):
            return death_time.replace(tzinfo=death_time.tzinfo or UTC)
        return None

    def summary(self) -> dict[str, Any]:
        parked_at = self.parked_at
        return {
            "id": self.job_id,
            "job": self.job_name,
            "error": self.error,
            "error_type": self.error_type,
            "attempts": self.attempts,
            "replays": self.replays,
            "parked_at": parked_at.isoformat() if parked_at else None,
        }


def _first_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which parked jobs an operation applies to; empty fields match everything."""

    ids: frozenset[str] = frozenset()
    job_names: frozenset[str] = frozenset()
    error_contains: str | None = None
    error_regex: re.Pattern[str] | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    limit: int | None = None

    def matches(self, job: ParkedJob, now: datetime) -> bool:
        if self.ids and job.job_id not in self.ids:
            return False
        if self.job_names and job.job_name not in self.job_names:
            return False
        text = f"{job.error_type}: {job.error}"
        if self.error_contains and self.error_contains.lower() not in text.lower():
            return False
        if self.error_regex and not self.error_regex.search(text):
            return False
        return self._age_matches(job, now)

    def _age_matches(self, job: ParkedJob, now: datetime) -> bool:
        if self.older_than is None and self.newer_than is None:
            return True
        parked_at = job.parked_at
        if parked_at is None:
            return False
        age = now - parked_at
        if self.older_than is not None and age < self.older_than:
            return False
        return not (self.newer_than is not None and age > self.newer_than)


EVERYTHING = Selection()


def replay_message(job: ParkedJob) -> OutgoingMessage:
    """The copy that goes back to work: attempt 1, one more replay, no broker death headers."""
    source = job.delivery
    drop = {*wire.BROKER_DEATH_HEADERS, *_FAILURE_HEADERS, wire.REPLAY_SCAN}
    headers = {k: v for k, v in source.headers.items() if k not in drop}
    headers[wire.ATTEMPT] = 1
    headers[wire.REPLAYS] = job.replays + 1
    if "traceparent" in source.headers:
        headers.setdefault(wire.ORIGINAL_TRACEPARENT, source.headers["traceparent"])
    return wire.copy_of(source, headers)
