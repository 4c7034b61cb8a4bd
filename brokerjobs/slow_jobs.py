"""The slow-job alert: a job still running past its threshold is reported while it runs.

Once per attempt: logged at WARNING, counted (``brokerjobs.jobs.slow``) and handed to the
app's callback, if any. Thresholds per job type (``@app.handler(..., slow_after=...)``), else the
app's ``slow_job_after``. One timer per running job, only for jobs that have a threshold.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.telemetry import Telemetry

log = logging.getLogger("brokerjobs.slow_jobs")


@dataclass(frozen=True, slots=True)
class SlowJob:
    """What the slow-job callback is told about a job that is still running."""

    job_id: str
    job_name: str
    queue: str
    attempt: int
    running_for: float  # seconds since its handler started
    threshold: float


SlowJobCallback = Callable[[SlowJob], object]


class SlowJobAlert(Middleware):
    def __init__(
        self,
        thresholds: Mapping[str, float],
        default: float | None = None,
        callback: SlowJobCallback | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._thresholds = dict(thresholds)
        self._default = default
        self._callback = callback
        self._telemetry = telemetry or Telemetry.off()
        self._tasks: set[asyncio.Task[object]] = set()  # strong references to async callbacks
        self.alerts = 0

    async def before_handler(self, run: JobRun) -> None:
        threshold = self._thresholds.get(run.job_name, self._default)
        if threshold is None:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        run.state[self] = loop.call_later(threshold, self._fire, run, threshold, started)

    async def after_success(self, run: JobRun) -> None:
        self._cancel(run)

    async def after_failure(self, run: JobRun) -> None:
        self._cancel(run)

    async def after_settle(self, run: JobRun) -> None:
        self._cancel(run)  # a handler cancelled on shutdown, or an unexpected error

    def _cancel(self, run: JobRun) -> None:
        timer: asyncio.TimerHandle | None = run.state.pop(self, None)
        if timer is not None:
            timer.cancel()

    def _fire(self, run: JobRun, threshold: float, started: float) -> None:
        run.state.pop(self, None)
        running_for = asyncio.get_running_loop().time() - started
        slow = SlowJob(run.job_id, run.job_name, run.queue, run.attempt, running_for, threshold)
        self.alerts += 1
        log.warning(
            "job %s %s (attempt %d) still running after %.1fs (slow after %gs)",
            slow.job_name, slow.job_id, slow.attempt, running_for, threshold,
            extra={"action": "slow", "job": slow.job_name, "message_id": slow.job_id,
                   "queue": slow.queue, "attempt": slow.attempt},
        )  # fmt: skip
        self._telemetry.record_slow(slow.job_name, slow.queue)
        if self._callback is not None:
            self._call(slow)

    def _call(self, slow: SlowJob) -> None:
        assert self._callback is not None
        try:
            result = self._callback(slow)
        except Exception:
            log.exception("the slow-job callback failed for job %s", slow.job_id)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("the slow-job callback failed", exc_info=task.exception())
