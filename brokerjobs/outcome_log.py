"""One structured log line per settled delivery, as middleware (the worker always adds it)."""

from __future__ import annotations

import logging

from brokerjobs.logs import log_event
from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.outcomes import Outcome

log = logging.getLogger("brokerjobs.consumer")

_LEVELS = {
    Outcome.COMPLETED: logging.INFO,
    Outcome.RETRIED: logging.WARNING,
    Outcome.PARKED: logging.WARNING,
    Outcome.REQUEUED: logging.INFO,
}


class LogOutcomes(Middleware):
    async def after_settle(self, run: JobRun) -> None:
        settled = run.settled
        if settled is None:
            return
        level = _LEVELS[settled.outcome]
        if log.isEnabledFor(level):
            # A completed job's reason (why it was skipped) is not an error.
            field = "reason" if settled.outcome is Outcome.COMPLETED else "error"
            log_event(
                log, level, settled.outcome.value, run.delivery, run.queue, run.started_at,
                settled.reason, field=field,
            )  # fmt: skip
