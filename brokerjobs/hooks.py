"""Lifecycle hooks for metrics and alerts: ``app.on("start" | "complete" | "fail", callback)``.

- ``start``: the handler is about to run;
- ``complete``: the job succeeded and is acked (not a job a middleware skipped);
- ``fail``: the handler failed; ``run.failure`` says why and ``run.decision`` what follows
  (``Retry(delay)`` or ``Park(reason)``).

A callback takes the ``JobRun`` and may be sync or async; what it raises is logged (it cannot
answer for the handler: that is a ``Middleware.before_handler``'s).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Literal, get_args

from brokerjobs.errors import ConfigError
from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.outcomes import Outcome

log = logging.getLogger("brokerjobs.hooks")

HookEvent = Literal["start", "complete", "fail"]
HookCallback = Callable[[JobRun], object]


class LifecycleHooks(Middleware):
    def __init__(self) -> None:
        self._callbacks: dict[str, list[HookCallback]] = {e: [] for e in get_args(HookEvent)}

    def add(self, event: str, callback: HookCallback) -> None:
        if event not in self._callbacks:
            raise ConfigError(f"unknown hook event {event!r}: use one of {list(self._callbacks)}")
        self._callbacks[event].append(callback)

    async def before_handler(self, run: JobRun) -> None:
        await _call_each(self._callbacks["start"], run)

    async def after_failure(self, run: JobRun) -> None:
        await _call_each(self._callbacks["fail"], run)

    async def after_settle(self, run: JobRun) -> None:
        settled = run.settled
        if settled is not None and settled.outcome is Outcome.COMPLETED and run.skipped is None:
            await _call_each(self._callbacks["complete"], run)


async def _call_each(callbacks: list[HookCallback], run: JobRun) -> None:
    for callback in callbacks:
        try:
            result = callback(run)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("hook %r failed on job %s", callback, run.job_id)
