"""Checks on the jobs a scheduler published: each carries ``bj-scheduled-for`` (its tick) and a
message id derived from the schedule and the tick."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import pairwise

from brokerjobs.envelope import Delivery
from brokerjobs.scheduler import SCHEDULED_FOR, tick_job_id

SECOND = timedelta(seconds=1)


def tick_of(delivery: Delivery) -> datetime:
    value = delivery.headers[SCHEDULED_FOR]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return datetime.fromisoformat(text)


def assert_consecutive(ticks: list[datetime]) -> None:
    """Every second from the first tick to the last, each once."""
    assert ticks == sorted(set(ticks)), f"duplicates or disorder: {ticks}"
    gaps = [(a, b) for a, b in pairwise(ticks) if b - a != SECOND]
    assert not gaps, f"missing ticks between {gaps}"


def assert_job_ids(deliveries: list[Delivery], exchange: str, schedule: str) -> None:
    for delivery in deliveries:
        assert delivery.message_id == tick_job_id(exchange, schedule, tick_of(delivery))
