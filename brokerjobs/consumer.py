"""The consume loop of one queue: decode, run the handler, hand the outcome to settlement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_not_exception_type, stop_after_attempt, wait_fixed

from brokerjobs.app import App, HandlerSpec
from brokerjobs.broker.base import MessageChannel
from brokerjobs.context import JobContext, reset_current, set_current
from brokerjobs.deadlines import DeadlineKeeper
from brokerjobs.envelope import Decoded, Delivery, decode
from brokerjobs.errors import ConnectionLost, PublishError
from brokerjobs.executors import Executors, StillRunning
from brokerjobs.jobs import JobSpec
from brokerjobs.logs import log_event
from brokerjobs.outcomes import PermanentFailure, RetryLater
from brokerjobs.retry import NO_RETRY, Failure, FailureKind, Park, clamp_attempt, describe
from brokerjobs.settings import Settings
from brokerjobs.settlement import Settlement
from brokerjobs.telemetry import Processing, Telemetry

if TYPE_CHECKING:
    from brokerjobs.status import StatusEmitter, StatusReporter

log = logging.getLogger("brokerjobs.consumer")

_SIGNALS = (RetryLater, PermanentFailure, StillRunning)
UNEXPECTED_ERROR = "brokerjobs.unexpected"
# Not the message's fault: the broker requeues or a new session settles it.
_NOT_THE_MESSAGE: tuple[type[BaseException], ...] = (ConnectionLost, PublishError)


def build_consumer(
    app: App,
    queue: str,
    channel: MessageChannel,
    settings: Settings,
    executors: Executors,
    telemetry: Telemetry,
    settlement: Settlement | None = None,
) -> QueueConsumer:
    """A queue's consumer wired as the worker runs it (the in-memory broker reuses this)."""
    return QueueConsumer(
        queue,
        app.handlers(queue),
        settlement or Settlement(channel, queue, telemetry),
        settings,
        executors,
        telemetry,
        _status_emitter(app, channel),
    )


def _status_emitter(app: App, channel: MessageChannel) -> StatusEmitter | None:
    if not app.track_status:
        return None
    from brokerjobs.status import StatusEmitter  # loaded only by apps that track status

    return StatusEmitter(channel, app.exchange)


@dataclass(frozen=True, slots=True)
class Completed:
    result: object


class QueueConsumer:
    """Handles every delivery of one queue; one asyncio task per delivery (aiormq's)."""

    def __init__(
        self,
        queue: str,
        handlers: Mapping[str, HandlerSpec],
        settlement: Settlement,
        settings: Settings,
        executors: Executors,
        telemetry: Telemetry,
        status: StatusEmitter | None = None,
    ) -> None:
        self.queue = queue
        self._status = status
        self._telemetry = telemetry
        self._handlers = handlers
        self._jobs: Mapping[str, JobSpec] = {name: h.job for name, h in handlers.items()}
        self._settlement = settlement
        self._settings = settings
        self._executors = executors
        # Each delivery's task and when it started: the worker's readiness watches for stuck ones.
        self.inflight: dict[asyncio.Task[Any], float] = {}
        self._deadlines = DeadlineKeeper()
        # Set when settling keeps failing: the worker then opens a new session.
        self.needs_new_session: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def oldest_inflight_s(self) -> float:
        """How long the oldest delivery in flight has been held (0 when none)."""
        if not self.inflight:
            return 0.0
        return time.monotonic() - min(self.inflight.values())

    async def on_delivery(self, delivery: Delivery) -> None:
        """The delivery boundary: every delivery ends acked, retried, parked or requeued."""
        task = asyncio.current_task()
        assert task is not None
        self.inflight[task] = time.monotonic()
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            await self._give_back(delivery)
            raise
        except ConnectionLost as exc:
            # The channel died under us: the broker requeues the delivery by itself.
            log.warning("could not settle %s: %s", delivery.message_id, type(exc).__name__)
        except PublishError as exc:
            # The retry or parking copy was not confirmed: a queue gone (unroutable) or a
            # channel the broker keeps nacking (3.10 quorum queues after a leader kill). The
            # original stays unacked; the new session the worker opens requeues it.
            log.warning(
                "could not settle %s (%s): retried in a new session", delivery.message_id, exc
            )
            self._ask_new_session(f"settling failed: {type(exc).__name__}")
        finally:
            self.inflight.pop(task, None)

    def _ask_new_session(self, why: str) -> None:
        if not self.needs_new_session.done():
            self.needs_new_session.set_result(why)

    async def _process(self, delivery: Delivery) -> None:
        with self._telemetry.processing(delivery, self.queue) as record:
            settled = [False]
            try:
                await self._decode_run_settle(delivery, record, settled)
            except asyncio.CancelledError:
                record.settled("requeue")
                raise
            except _NOT_THE_MESSAGE:
                raise
            except Exception as exc:  # a bug in brokerjobs or in what the handler returned
                record.settled("park", UNEXPECTED_ERROR)
                await self._unexpected(delivery, exc, settled[0])

    async def _unexpected(self, delivery: Delivery, exc: Exception, settled: bool) -> None:
        """Park a delivery that met an error nobody expected, instead of holding it forever."""
        what = f"unexpected {describe(exc)} while handling the job"[:1000]
        if settled:  # the ack (or its copy) went out already: nothing left to hold
            log.error("job %s: %s (after settling)", delivery.message_id, what, exc_info=exc)
            return
        log.error("job %s: %s; parking it", delivery.message_id, what, exc_info=exc)
        failure = Failure(FailureKind.POISON, what, None, UNEXPECTED_ERROR, exc)
        try:
            await self._settlement.failed(delivery, NO_RETRY, failure)
        except asyncio.CancelledError:
            raise
        except _NOT_THE_MESSAGE:
            raise
        except Exception as again:
            # Even the parking copy fails (say, a header nothing can re-encode): reject it,
            # and the main queue's dead-letter target (the parking queue) takes it as it is.
            log.error("job %s: parking failed too (%r): rejecting it", delivery.message_id, again)
            await self._settlement.reject(delivery)

    async def _decode_run_settle(
        self, delivery: Delivery, record: Processing, settled: list[bool]
    ) -> None:
        started = time.monotonic()
        s = self._settings
        decoded = decode(
            delivery,
            self._jobs,
            s.max_body_bytes,
            max_depth=s.max_json_depth,
            max_number_digits=s.max_json_number_digits,
        )
        if not isinstance(decoded, Decoded):
            poison = Failure(FailureKind.POISON, decoded.reason, error_type="undecodable")
            await self._settlement.failed(delivery, NO_RETRY, poison)
            settled[0] = True
            record.settled("park", "undecodable")
            log_event(log, logging.WARNING, "parked", delivery, self.queue, started, decoded.reason)
            return
        handler = self._handlers[decoded.spec.name]
        status = self._status.reporter(delivery, handler.job.name) if self._status else None
        outcome = await self._run(handler, decoded.job, delivery, status)
        if isinstance(outcome, Completed):
            if status:
                await status.completed(outcome.result)
            await self._settlement.succeeded(delivery)
            settled[0] = True
            record.settled("ack")
            log_event(log, logging.INFO, "completed", delivery, self.queue, started)
            return
        decision = await self._settlement.failed(delivery, handler.retry, outcome)
        settled[0] = True
        retried = not isinstance(decision, Park)
        record.settled("retry" if retried else "park", outcome.error_type)
        if status:
            await status.failed("retrying" if retried else "parked", outcome.reason)
        action = "retry_scheduled" if retried else "parked"
        log_event(log, logging.WARNING, action, delivery, self.queue, started, outcome.reason)

    async def _run(
        self,
        handler: HandlerSpec,
        job: BaseModel,
        delivery: Delivery,
        status: StatusReporter | None,
    ) -> Failure | Completed:
        context = JobContext(
            job_id=delivery.message_id or f"delivery-{delivery.delivery_tag}",
            job_name=handler.job.name,
            queue=self.queue,
            attempt=clamp_attempt(handler.retry, delivery.attempt),
            redelivered=delivery.redelivered,
        )
        token = set_current(context)
        progress = status.started() if status else None
        try:
            return await self._invoke(handler, job, context.job_id)
        finally:
            reset_current(token)
            if status is not None and progress is not None:
                status.unbind_progress(progress)

    async def _invoke(
        self, handler: HandlerSpec, job: BaseModel, job_id: str
    ) -> Failure | Completed:
        """Run the handler within its timeout; map what it raised to a Failure."""
        limit = handler.timeout or self._settings.job_timeout
        deadline = self._deadlines.start(limit)
        try:
            try:
                if handler.retry.immediate_retries:
                    result = await self._call_with_immediate_retries(handler, job, job_id)
                else:
                    result = await self._call(handler, job, job_id)
            finally:
                timed_out = self._deadlines.finish(deadline)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if timed_out and task is not None and not task.cancelling():  # ours, not a shutdown
                return Failure(FailureKind.TIMEOUT, f"timed out after {limit:g}s", None, "Timeout")
            raise
        except StillRunning as exc:
            return Failure(FailureKind.RETRY_LATER, str(exc), None, "StillRunning")
        except RetryLater as exc:
            return Failure(FailureKind.RETRY_LATER, str(exc), exc.delay, "RetryLater")
        except PermanentFailure as exc:
            return Failure(FailureKind.PERMANENT, str(exc), None, "PermanentFailure")
        except Exception as exc:
            return _error(exc)
        return Completed(result)

    async def _call(self, handler: HandlerSpec, job: BaseModel, job_id: str) -> object:
        if handler.run_in == "loop":
            return await handler.func(job)
        if handler.run_in == "thread":
            return await self._executors.threads.run(job_id, handler.func, job)
        return await self._executors.processes.run(handler.func, job)

    async def _call_with_immediate_retries(
        self, handler: HandlerSpec, job: BaseModel, job_id: str
    ) -> object:
        async for attempt in AsyncRetrying(
            retry=retry_if_not_exception_type(_SIGNALS),
            stop=stop_after_attempt(handler.retry.immediate_retries + 1),
            wait=wait_fixed(handler.retry.immediate_wait),
            reraise=True,
        ):
            with attempt:
                return await self._call(handler, job, job_id)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _give_back(self, delivery: Delivery) -> None:
        with contextlib.suppress(ConnectionLost):  # channel gone: the broker requeues it
            await self._settlement.requeue(delivery)


def _error(exc: Exception) -> Failure:
    return Failure(
        FailureKind.ERROR,
        describe(exc),
        None,
        f"{type(exc).__module__}.{type(exc).__qualname__}",
        exc,
    )
