"""Telemetry as middleware: a CONSUMER span and the consume metrics around each delivery."""

from __future__ import annotations

from contextlib import AbstractContextManager

from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.telemetry import Processing, Telemetry


class TelemetryMiddleware(Middleware):
    """Opens the span when a delivery arrives (first in the pipeline, so every later hook and
    the handler run inside it) and records the outcome when it is settled."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    async def received(self, run: JobRun) -> None:
        scope = self._telemetry.processing(run.delivery, run.queue)
        run.state[self] = (scope, scope.__enter__())

    async def after_settle(self, run: JobRun) -> None:
        held: tuple[AbstractContextManager[Processing], Processing] = run.state.pop(self)
        scope, record = held
        settled = run.settled
        if settled is not None:
            record.settled(settled.outcome.value, settled.error_type)
        scope.__exit__(None, None, None)
