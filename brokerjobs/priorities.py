"""Which job priorities a queue honours, by queue kind and RabbitMQ version: a pure rule.

- classic: strict, 0..``x-max-priority``; a higher priority is delivered as the maximum. A classic
  queue gets ``x-max-priority`` only when it asks for one or a job on it declares a priority, and
  then the fewest levels that serve (RabbitMQ advises few: each level costs broker CPU per message).
- quorum on RabbitMQ 3.x: no priorities at all.
- quorum on 4.0-4.2: two levels, 0-4 normal and 5+ high, and high is not strictly first: the queue
  delivers about two high jobs per normal one while both wait.
- quorum on 4.3+: strict, 0-31; a higher priority counts as 31.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]

QUORUM_TWO_LEVELS_SINCE = (4, 0)
QUORUM_STRICT_SINCE = (4, 3)
QUORUM_HIGH = 5  # 4.0-4.2: priority 5 and above is "high"
QUORUM_MAX = 31  # 4.3+


@dataclass(frozen=True, slots=True)
class PriorityFinding:
    """A priority that the queue will not honour as written, in words an operator can act on."""

    queue: str
    severity: Severity
    message: str


def classic_max_priority(asked: int | None, job_priorities: Iterable[int]) -> int | None:
    """``x-max-priority`` for a classic queue: what it asks for, else the highest priority of its
    jobs, else none (a plain FIFO queue, the cheapest kind for the broker)."""
    if asked is not None:
        return asked
    highest = max((p for p in job_priorities if p > 0), default=0)
    return highest or None


def check_queue(
    queue: str,
    kind: Literal["classic", "quorum"],
    max_priority: int | None,
    jobs: Mapping[str, int],
    version: tuple[int, ...],
) -> list[PriorityFinding]:
    """Findings for the jobs (name -> declared priority) handled on ``queue``.

    ``max_priority`` is the classic queue's ``x-max-priority`` (None: not a priority queue);
    ``version`` is the broker's, e.g. (4, 0, 5), or () when unknown (quorum rules then skipped).
    """
    ranked = {name: p for name, p in sorted(jobs.items()) if p > 0}
    if not ranked:
        return []
    if kind == "classic":
        return _classic(queue, max_priority, ranked)
    if not version:
        return []
    if version < QUORUM_TWO_LEVELS_SINCE:
        return [_quorum_none(queue, ranked, version)]
    if version < QUORUM_STRICT_SINCE:
        return [_quorum_two_levels(queue, ranked, version)]
    over = {name: p for name, p in ranked.items() if p > QUORUM_MAX}
    if not over:
        return []
    return [
        PriorityFinding(
            queue,
            "warning",
            f"quorum queue {queue!r} on RabbitMQ {_v(version)} honours priorities 0-{QUORUM_MAX}: "
            f"{_jobs(over)} run as priority {QUORUM_MAX}, level with any job at {QUORUM_MAX}; "
            f"lower them to {QUORUM_MAX} or less",
        )
    ]


def _classic(
    queue: str, max_priority: int | None, ranked: Mapping[str, int]
) -> list[PriorityFinding]:
    limit = max_priority or 0
    over = {name: p for name, p in ranked.items() if p > limit}
    if not over:
        return []
    if not limit:
        what = "is not a priority queue, so their priority is ignored"
    else:
        what = f"holds priorities 0-{limit} (x-max-priority), so they run as priority {limit}"
    return [
        PriorityFinding(
            queue,
            "warning",
            f"jobs {_jobs(over)} set a priority but classic queue {queue!r} {what}: raise "
            f"max_priority in app.queue({queue!r}, ...) or drop it to let brokerjobs size it",
        )
    ]


def _quorum_none(
    queue: str, ranked: Mapping[str, int], version: tuple[int, ...]
) -> PriorityFinding:
    return PriorityFinding(
        queue,
        "error",
        f"queue {queue!r} is a quorum queue but jobs {_jobs(ranked)} set a priority, which "
        f"RabbitMQ {_v(version)} ignores on quorum queues (4.0-4.2 honour two levels, 4.3+ "
        "0-31): use a classic queue for them, drop the priority, or upgrade",
    )


def _quorum_two_levels(
    queue: str, ranked: Mapping[str, int], version: tuple[int, ...]
) -> PriorityFinding:
    normal = {name: p for name, p in ranked.items() if p < QUORUM_HIGH}
    high = {name: p for name, p in ranked.items() if p >= QUORUM_HIGH}
    parts = [
        f"quorum queue {queue!r} on RabbitMQ {_v(version)} has two priority levels only: "
        f"0-{QUORUM_HIGH - 1} normal and {QUORUM_HIGH}+ high"
    ]
    if normal:
        parts.append(f"{_jobs(normal)} run as normal, the same as no priority")
    if high:
        parts.append(
            f"{_jobs(high)} run as high, about two for every normal job, not strictly first"
        )
    parts.append("use a classic queue for strict priorities, or RabbitMQ 4.3+ (0-31)")
    return PriorityFinding(queue, "warning", "; ".join(parts))


def _jobs(ranked: Mapping[str, int]) -> str:
    return ", ".join(f"{name!r} ({p})" for name, p in ranked.items())


def _v(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))
