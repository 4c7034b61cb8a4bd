"""What a handler can say besides returning: retry me later, or give up for good."""

from __future__ import annotations


class RetryLater(Exception):
    """Ask brokerjobs to run the job again later, after at least ``delay`` seconds.

    The delay is rounded up to the next retry tier; the attempt still counts.
    """

    def __init__(
        self, reason: str = "retry requested by the handler", *, delay: float | None = None
    ):
        super().__init__(reason)
        self.delay = delay


class PermanentFailure(Exception):
    """Retrying cannot help: park the job at once with this reason."""


class SkipJob(Exception):
    """Settle the delivery as completed without running the handler (a duplicate of a job that
    is already done, say): what a middleware's ``before_handler`` raises to skip a job. The
    reason goes with the outcome (``Settled.reason``) into the log line."""
