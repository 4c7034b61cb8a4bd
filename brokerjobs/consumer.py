"""The consume loop of one queue: decode, run the handler, hand the outcome to settlement."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from tenacity import AsyncRetrying, retry_if_not_exception_type, stop_after_attempt, wait_fixed

from brokerjobs.app import App, HandlerSpec
from brokerjobs.context import JobContext, reset_current, set_current
from brokerjobs.envelope import Decoded, Delivery, decode
from brokerjobs.errors import PublishError
from brokerjobs.jobs import JobSpec
from brokerjobs.logs import log_event
from brokerjobs.outcomes import PermanentFailure, RetryLater
from brokerjobs.retry import NO_RETRY, Failure, FailureKind, Park
from brokerjobs.settings import Settings
from brokerjobs.settlement import Settlement
from brokerjobs.telemetry import Processing, Telemetry
from brokerjobs.transport import CONNECTION_ERRORS, MessageChannel

if TYPE_CHECKING:
    from brokerjobs.status import StatusEmitter, StatusReporter

log = logging.getLogger("brokerjobs.consumer")

_SIGNALS = (RetryLater, PermanentFailure)


class Executors:
    """Where sync handlers run: a thread pool, and a process pool made on first use."""

    def __init__(self, threads: Executor, processes: Executor | None = None) -> None:
        self.threads = threads
        self._processes = processes

    def for_mode(self, mode: str) -> Executor:
        if mode == "process":
            if self._processes is None:
                from concurrent.futures import ProcessPoolExecutor

                self._processes = ProcessPoolExecutor()
            return self._processes
        return self.threads

    def shutdown(self) -> None:
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)


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
        self.inflight: set[asyncio.Task[Any]] = set()
        # Set when settling keeps failing: the worker then opens a new session.
        self.needs_new_session: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        try:
            await self._process(delivery)
        except asyncio.CancelledError:
            await self._give_back(delivery)
            raise
        except CONNECTION_ERRORS as exc:
            # The channel died under us: the broker requeues the delivery by itself.
            log.warning("could not settle %s: %s", delivery.message_id, type(exc).__name__)
        except PublishError as exc:
            # The retry or parking copy was not confirmed: a queue gone (unroutable) or a
            # channel the broker keeps nacking (3.10 quorum queues after a leader kill). The
            # original stays unacked; the new session the worker opens requeues it.
            log.warning(
                "could not settle %s (%s): retried in a new session", delivery.message_id, exc
            )
            if not self.needs_new_session.done():
                self.needs_new_session.set_result(f"settling failed: {type(exc).__name__}")
        finally:
            self.inflight.discard(task)

    async def _process(self, delivery: Delivery) -> None:
        with self._telemetry.processing(delivery, self.queue) as record:
            try:
                await self._decode_run_settle(delivery, record)
            except asyncio.CancelledError:
                record.settled("requeue")
                raise

    async def _decode_run_settle(self, delivery: Delivery, record: Processing) -> None:
        started = time.monotonic()
        decoded = decode(delivery, self._jobs, self._settings.max_body_bytes)
        if not isinstance(decoded, Decoded):
            poison = Failure(FailureKind.POISON, decoded.reason, error_type="undecodable")
            await self._settlement.failed(delivery, NO_RETRY, poison)
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
            record.settled("ack")
            log_event(log, logging.INFO, "completed", delivery, self.queue, started)
            return
        decision = await self._settlement.failed(delivery, handler.retry, outcome)
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
            job_id=delivery.message_id or "",
            job_name=handler.job.name,
            queue=self.queue,
            attempt=delivery.attempt,
            redelivered=delivery.redelivered,
        )
        token = set_current(context)
        progress = status.started() if status else None
        limit = handler.timeout or self._settings.job_timeout
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                if handler.retry.immediate_retries:
                    result = await self._call_with_immediate_retries(handler, job)
                else:
                    result = await self._call(handler, job)
        except RetryLater as exc:
            return Failure(FailureKind.RETRY_LATER, str(exc), exc.delay, "RetryLater")
        except PermanentFailure as exc:
            return Failure(FailureKind.PERMANENT, str(exc), None, "PermanentFailure")
        except TimeoutError as exc:
            if not deadline.expired():  # the handler's own timeout, not ours
                return _error(exc)
            return Failure(FailureKind.TIMEOUT, f"timed out after {limit:g}s", None, "Timeout")
        except Exception as exc:
            return _error(exc)
        finally:
            reset_current(token)
            if status is not None and progress is not None:
                status.unbind_progress(progress)
        return Completed(result)

    async def _call(self, handler: HandlerSpec, job: BaseModel) -> object:
        if handler.run_in == "loop":
            return await handler.func(job)
        loop = asyncio.get_running_loop()
        executor = self._executors.for_mode(handler.run_in)
        if handler.run_in == "thread":
            # Like asyncio.to_thread: the handler sees current_job() in its thread.
            ctx = contextvars.copy_context()
            return await loop.run_in_executor(executor, ctx.run, handler.func, job)
        return await loop.run_in_executor(executor, handler.func, job)

    async def _call_with_immediate_retries(self, handler: HandlerSpec, job: BaseModel) -> object:
        async for attempt in AsyncRetrying(
            retry=retry_if_not_exception_type(_SIGNALS),
            stop=stop_after_attempt(handler.retry.immediate_retries + 1),
            wait=wait_fixed(handler.retry.immediate_wait),
            reraise=True,
        ):
            with attempt:
                return await self._call(handler, job)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _give_back(self, delivery: Delivery) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):  # channel gone: the broker requeues it
            await self._settlement.requeue(delivery)


def _error(exc: Exception) -> Failure:
    return Failure(
        FailureKind.ERROR,
        f"{type(exc).__name__}: {exc}",
        None,
        f"{type(exc).__module__}.{type(exc).__qualname__}",
        exc,
    )
