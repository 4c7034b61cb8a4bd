"""Job timeouts with one sweeping timer per consumer instead of a timer per job.

``asyncio.timeout`` schedules and cancels a timer for every delivery; at thousands of jobs a
second that is measurable. Job timeouts are seconds long, so a sweep every ``RESOLUTION_S``
that cancels overdue handlers keeps their meaning (a handler is stopped at most one resolution
late) for the cost of a dict entry per job.
"""

from __future__ import annotations

import asyncio

RESOLUTION_S = 0.05


class Deadline:
    __slots__ = ("at", "expired", "seconds", "task")

    def __init__(self, task: asyncio.Task[object], at: float, seconds: float) -> None:
        self.task = task
        self.at = at
        self.seconds = seconds
        self.expired = False


class DeadlineKeeper:
    """Cancels each registered task once its deadline has passed; ``expired`` says it was us."""

    def __init__(self, resolution: float = RESOLUTION_S) -> None:
        self._resolution = resolution
        self._running: set[Deadline] = set()
        self._sweep: asyncio.TimerHandle | None = None

    def start(self, seconds: float) -> Deadline:
        """A deadline for the current task, ``seconds`` from now."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = Deadline(task, loop.time() + seconds, seconds)
        self._running.add(deadline)
        if self._sweep is None:
            self._sweep = loop.call_later(self._resolution, self._expire_overdue)
        return deadline

    def finish(self, deadline: Deadline) -> bool:
        """Forget the deadline; True if it expired (its cancellation is then taken back)."""
        self._running.discard(deadline)
        if deadline.expired:
            deadline.task.uncancel()
        return deadline.expired

    def _expire_overdue(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for deadline in [d for d in self._running if d.at <= now]:
            self._running.discard(deadline)
            deadline.expired = True
            deadline.task.cancel()
        self._sweep = (
            loop.call_later(self._resolution, self._expire_overdue) if self._running else None
        )
