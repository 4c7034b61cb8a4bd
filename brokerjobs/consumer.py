"""The consume loop of one queue: decode, run the handler, hand the outcome to settlement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from brokerjobs.app import App, HandlerSpec
from brokerjobs.broker.base import MessageChannel
from brokerjobs.context import JobContext, reset_current, set_current
from brokerjobs.deadlines import DeadlineKeeper
from brokerjobs.envelope import Decoded, Delivery, decode
from brokerjobs.errors import ConnectionLost, PublishError
from brokerjobs.executors import Executors, StillRunning
from brokerjobs.jobs import JobSpec
from brokerjobs.middleware import ANSWERS, JobRun, Middleware, Pipeline
from brokerjobs.outcome_log import LogOutcomes
from brokerjobs.outcomes import COMPLETED, REQUEUED, Outcome, Settled
from brokerjobs.retry import (
    NO_RETRY,
    Decision,
    Failure,
    FailureKind,
    Retry,
    clamp_attempt,
    describe,
)
from brokerjobs.settings import Settings
from brokerjobs.settlement import Settlement
from brokerjobs.signals import PermanentFailure, RetryLater, SkipJob
from brokerjobs.telemetry import Telemetry

if TYPE_CHECKING:
    from brokerjobs.status_events import StatusChannel

log = logging.getLogger("brokerjobs.consumer")

_SIGNALS = (RetryLater, PermanentFailure, SkipJob, StillRunning)
UNEXPECTED_ERROR = "brokerjobs.unexpected"
# Not the message's fault: the broker requeues or a new session settles it.
_NOT_THE_MESSAGE: tuple[type[BaseException], ...] = (ConnectionLost, PublishError)
_GIVEN_BACK: tuple[type[BaseException], ...] = (asyncio.CancelledError, *_NOT_THE_MESSAGE)


def build_consumer(
    app: App,
    queue: str,
    channel: MessageChannel,
    settings: Settings,
    executors: Executors,
    telemetry: Telemetry,
    extra: Sequence[Middleware] = (),
    status: StatusChannel | None = None,
) -> QueueConsumer:
    """A queue's consumer as the worker runs it, with its pipeline of middleware (status events
    go out on ``status``, given where the app tracks status)."""
    return QueueConsumer(
        queue,
        app.handlers(queue),
        Settlement(channel, queue, telemetry),
        settings,
        executors,
        delivery_pipeline(app, status, telemetry, extra),
    )


def delivery_pipeline(
    app: App,
    status: StatusChannel | None,
    telemetry: Telemetry,
    extra: Sequence[Middleware] = (),
) -> Pipeline:
    """Telemetry first (its span holds every later hook), then status events, the app's
    middleware, the given ones, and the outcome log line last."""
    built_in: list[Middleware] = []
    if telemetry.enabled:
        from brokerjobs.telemetry.middleware import TelemetryMiddleware

        built_in.append(TelemetryMiddleware(telemetry))
    if app.track_status:
        from brokerjobs.status_events import StatusEvents  # loaded only by apps that track status

        if status is None:
            raise ValueError(f"app {app.name!r} tracks status: its consumers need a StatusChannel")
        built_in.append(StatusEvents(status, app.exchange))
    watch = _slow_job_alert(app, telemetry)
    return Pipeline([*built_in, *app.middleware, *extra, *watch, LogOutcomes()])


def _slow_job_alert(app: App, telemetry: Telemetry) -> list[Middleware]:
    thresholds = app.slow_thresholds()
    if not thresholds and app.slow_job_after is None:
        return []
    from brokerjobs.slow_jobs import SlowJobAlert

    return [SlowJobAlert(thresholds, app.slow_job_after, app.on_slow_job, telemetry)]


@dataclass(frozen=True, slots=True)
class Completed:
    result: object
    skipped: str | None = None  # why the handler did not run (a middleware's SkipJob)


class QueueConsumer:
    """Handles every delivery of one queue; one asyncio task per delivery (the broker's)."""

    def __init__(
        self,
        queue: str,
        handlers: Mapping[str, HandlerSpec],
        settlement: Settlement,
        settings: Settings,
        executors: Executors,
        pipeline: Pipeline,
    ) -> None:
        self.queue = queue
        self._handlers = handlers
        self._jobs: Mapping[str, JobSpec] = {name: h.job for name, h in handlers.items()}
        self._settlement = settlement
        self._settings = settings
        self._executors = executors
        self._pipeline = pipeline
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
            log.warning("could not settle %s: %s", delivery.message_id, exc)
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
        pipeline = self._pipeline
        run = JobRun(delivery, self.queue) if pipeline.watches_deliveries else None
        done: list[Settled] = []  # set once settled: an error after that must not settle again
        try:
            if run is not None and pipeline.received:
                await pipeline.run(pipeline.received, run)
            await self._decode_run_settle(delivery, run, done)
        except _GIVEN_BACK as exc:
            done.append(Settled(Outcome.REQUEUED, reason=type(exc).__name__))
            raise
        except Exception as exc:  # a bug in brokerjobs or in what the handler returned
            await self._unexpected(delivery, exc, done)
        finally:
            if run is not None and pipeline.after_settle:
                run.settled = done[0] if done else REQUEUED
                await pipeline.run_all(pipeline.after_settle, run)

    async def _unexpected(self, delivery: Delivery, exc: Exception, done: list[Settled]) -> None:
        """Park a delivery that met an error nobody expected, instead of holding it forever."""
        what = f"unexpected {describe(exc)} while handling the job"[:1000]
        if done:  # the ack (or its copy) went out already: nothing left to hold
            log.error("job %s: %s (after settling)", delivery.message_id, what, exc_info=exc)
            return
        log.error("job %s: %s; parking it", delivery.message_id, what, exc_info=exc)
        failure = Failure(FailureKind.POISON, what, None, UNEXPECTED_ERROR, exc)
        try:
            await self._settlement.failed(delivery, NO_RETRY, failure)
        except asyncio.CancelledError:
            raise
        except _NOT_THE_MESSAGE:
            raise  # not settled: the outcome stays "requeued"
        except Exception as again:
            # Even the parking copy fails (say, a header nothing can re-encode): reject it,
            # and the main queue's dead-letter target (the parking queue) takes it as it is.
            log.error("job %s: parking failed too (%r): rejecting it", delivery.message_id, again)
            await self._settlement.reject(delivery)
        done.append(Settled(Outcome.PARKED, UNEXPECTED_ERROR, what))

    async def _decode_run_settle(
        self, delivery: Delivery, run: JobRun | None, done: list[Settled]
    ) -> None:
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
            decision = await self._settlement.failed(delivery, NO_RETRY, poison)
            done.append(settled_by(poison, decision))
            return
        handler = self._handlers[decoded.spec.name]
        context = self._context(delivery, handler)
        outcome = await self._run(handler, decoded.job, context, run)
        pipeline = self._pipeline
        if isinstance(outcome, Completed):
            if run is not None:
                run.result, run.skipped = outcome.result, outcome.skipped
                await pipeline.run(pipeline.unwinding("after_success", run), run)
            await self._settlement.succeeded(delivery)
            done.append(COMPLETED if outcome.skipped is None else _skipped(outcome.skipped))
            return
        decision = self._settlement.decide(delivery, handler.retry, outcome)
        if run is not None:
            run.failure, run.decision = outcome, decision
            await pipeline.run(pipeline.unwinding("after_failure", run), run)
        decision = await self._settlement.carry_out(delivery, handler.retry, outcome, decision)
        if run is not None:
            run.decision = decision  # parked instead when its retry copy could not be sent
        done.append(settled_by(outcome, decision))

    def _context(self, delivery: Delivery, handler: HandlerSpec) -> JobContext:
        return JobContext(
            job_id=delivery.message_id or f"delivery-{delivery.delivery_tag}",
            job_name=handler.job.name,
            queue=self.queue,
            attempt=clamp_attempt(handler.retry, delivery.attempt),
            redelivered=delivery.redelivered,
        )

    async def _run(
        self, handler: HandlerSpec, job: BaseModel, context: JobContext, run: JobRun | None
    ) -> Failure | Completed:
        token = set_current(context)
        try:
            if run is not None:
                run.job, run.job_name, run.context = job, handler.job.name, context
                await self._pipeline.run(self._pipeline.decoded, run)
                if self._pipeline.before_handler:
                    try:
                        await self._pipeline.before_handler_hooks(run)
                    except ANSWERS as answer:
                        return _answered(answer)  # the handler does not run
            return await self._invoke(handler, job, context.job_id)
        finally:
            reset_current(token)

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
        except ANSWERS as exc:
            return _answered(exc)
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
        from tenacity import (  # loaded only by apps that use immediate retries
            AsyncRetrying,
            retry_if_not_exception_type,
            stop_after_attempt,
            wait_fixed,
        )

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


def settled_by(failure: Failure, decision: Decision) -> Settled:
    if isinstance(decision, Retry):
        return Settled(Outcome.RETRIED, failure.error_type, failure.reason, decision.delay)
    return Settled(Outcome.PARKED, failure.error_type, decision.reason)


def _answered(signal: Exception) -> Failure | Completed:
    """What a handler's (or a before-handler hook's) signal asks for."""
    if isinstance(signal, RetryLater):
        return Failure(FailureKind.RETRY_LATER, str(signal), signal.delay, "RetryLater")
    if isinstance(signal, PermanentFailure):
        return Failure(FailureKind.PERMANENT, str(signal), None, "PermanentFailure")
    return Completed(None, skipped=str(signal) or "no reason given")  # a SkipJob


def _skipped(reason: str) -> Settled:
    return Settled(Outcome.COMPLETED, reason=f"skipped: {reason}")


def _error(exc: Exception) -> Failure:
    return Failure(
        FailureKind.ERROR,
        describe(exc),
        None,
        f"{type(exc).__module__}.{type(exc).__qualname__}",
        exc,
    )
