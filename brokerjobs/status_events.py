"""Status events as middleware: active (with progress) before the handler, "completed" before the
ack, "retried" or "parked" once the retry or parking copy is confirmed."""

from __future__ import annotations

import asyncio

from brokerjobs.broker.base import BrokerChannel, BrokerConnection
from brokerjobs.envelope import OutgoingMessage
from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.outcomes import Outcome
from brokerjobs.status import StatusEmitter, StatusReporter


class StatusChannel:
    """The status events' own channel on a worker's connection, opened on first use and again
    after the broker closed it: a publish to a deleted status exchange closes its channel, and
    on a consumer's channel every job in flight would be given back and run again."""

    def __init__(self, connection: BrokerConnection) -> None:
        self._connection = connection
        self._channel: BrokerChannel | None = None
        self._opening = asyncio.Lock()

    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            async with self._opening:
                if self._channel is None or self._channel.is_closed:
                    self._channel = await self._connection.channel(confirms=True)
                channel = self._channel
        await channel.publish(message, exchange, routing_key)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


class StatusEvents(Middleware):
    """Publishes each job's states to ``<exchange>.status`` on the worker's status channel."""

    def __init__(self, channel: StatusChannel, exchange: str) -> None:
        self._emitter = StatusEmitter(channel, exchange)

    async def before_handler(self, run: JobRun) -> None:
        reporter = self._emitter.reporter(run.delivery, run.job_name)
        run.state[self] = (reporter, reporter.started())

    async def after_success(self, run: JobRun) -> None:
        # Before the ack, as always: a crash between the two repeats the event, never loses it.
        self._unbind(run)
        reporter: StatusReporter = run.state[self][0]
        if run.skipped is None:
            await reporter.completed(run.result)
        else:
            await reporter.skipped(run.skipped)

    async def after_failure(self, run: JobRun) -> None:
        self._unbind(run)

    def _unbind(self, run: JobRun) -> None:
        reporter, token = run.state[self]
        if token is not None:
            reporter.unbind_progress(token)
            run.state[self] = (reporter, None)

    async def after_settle(self, run: JobRun) -> None:
        held: tuple[StatusReporter, object] | None = run.state.get(self)
        settled = run.settled
        if held is None or settled is None:
            return  # never reached the handler (undecodable): no job to report on
        self._unbind(run)
        reporter = held[0]
        error = run.failure.reason if run.failure is not None else settled.reason or ""
        if settled.outcome is Outcome.RETRIED:
            await reporter.failed("retried", error)
        elif settled.outcome is Outcome.PARKED:
            await reporter.failed("parked", error)
