"""Job status and progress as events on the app's status exchange, and a tracker that keeps them.

Why events on RabbitMQ rather than a database: the worker already holds a channel, producers
already talk to the broker, and every API instance can keep its own view by binding a queue to
``<exchange>.status`` (routing key ``<job name>.<state>``). The store behind a tracker is
pluggable (``StatusStore``): memory by default, anything async (Redis, SQL) by protocol.
Progress events are best effort; a job's final state (completed/parked) is published before the
job is acked or right after it is parked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import AbstractEventLoop
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field
from pydantic_core import PydanticSerializationError, to_jsonable_python

from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker
from brokerjobs.broker.base import BrokerChannel as Channel
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.envelope import REPLAYS, Delivery, OutgoingMessage, header_int, new_job_id
from brokerjobs.errors import (
    BrokerJobsError,
    BrokerUnreachable,
    ConnectionLost,
    TopologyError,
    UnroutableJob,
)
from brokerjobs.sessions import SessionSupervisor
from brokerjobs.settings import Settings
from brokerjobs.topology import status_exchange_name

log = logging.getLogger("brokerjobs.status")

State = Literal["waiting", "active", "retried", "completed", "parked"]
REBIND_INTERVAL_S = 10.0
FINAL_STATES = frozenset({"completed", "parked"})
_RANK = {"waiting": 0, "active": 1, "retried": 2, "completed": 3, "parked": 3}


class JobStatus(BaseModel):
    job_id: str
    job: str
    state: State
    attempt: int = 1
    replays: int = 0
    progress: float | None = Field(default=None, ge=0, le=100)
    message: str | None = None
    result: Any = None
    error: str | None = None
    skipped: bool = False  # completed without running (SkipJob): ``message`` says why
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def supersedes(self, other: JobStatus) -> bool:
        """Events can arrive out of order: later replays, attempts and states win; a skip (a
        duplicate of a job already done, say) never replaces a final state."""
        if self.skipped and other.final:
            return False
        mine = (self.replays, self.attempt, _RANK[self.state], self.at)
        return mine >= (other.replays, other.attempt, _RANK[other.state], other.at)


# -- worker side ----------------------------------------------------------------------------

_progress_sink: ContextVar[Callable[[float, str], None]] = ContextVar("brokerjobs_progress")


def report_progress(percent: float, message: str = "") -> None:
    """Report the running job's progress (0-100) from its handler, async or in a thread.

    Best effort and non-blocking; a no-op where status tracking is off or in process pools.
    """
    sink = _progress_sink.get(None)
    if sink is not None:
        sink(max(0.0, min(100.0, float(percent))), message)


class Publishing(Protocol):
    async def publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        """Publish and wait for the confirm."""


class StatusEmitter:
    """Publishes status events for one queue's jobs."""

    def __init__(self, channel: Publishing, exchange: str) -> None:
        self._channel = channel
        self._exchange = status_exchange_name(exchange)
        self._pending: set[asyncio.Task[None]] = set()

    async def emit(self, status: JobStatus) -> None:
        body = status.model_dump_json(exclude_none=True).encode()
        message = OutgoingMessage(
            body=body, message_id=new_job_id(), job_name=None, priority=0, headers={}
        )
        try:
            await self._channel.publish(message, self._exchange, f"{status.job}.{status.state}")
        except UnroutableJob:
            pass  # nobody is tracking this job type: fine
        except ConnectionLost as exc:
            log.debug("status event for %s lost: %s", status.job_id, exc)
        except BrokerJobsError as exc:  # the exchange deleted, a nack: best effort, but said
            log.warning("status event for %s lost: %s", status.job_id, exc)

    def emit_soon(self, status: JobStatus) -> None:
        self.run_soon(lambda: self.emit(status))

    def run_soon(self, send: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task = asyncio.get_running_loop().create_task(send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def bind_progress(self, base: JobStatus) -> object:
        """Route report_progress() calls of the current job to status events."""
        return _progress_sink.set(_Progress(self, base, asyncio.get_running_loop()).offer)

    @staticmethod
    def unbind_progress(token: object) -> None:
        _progress_sink.reset(token)  # type: ignore[arg-type]

    def reporter(self, delivery: Delivery, job: str) -> StatusReporter:
        return StatusReporter(self, delivery, job)


class _Progress:
    """One job's progress events: the newest value only, one publish at a time. A handler
    reporting once per row of a 200,000-row file must not queue 200,000 publishes (minutes of
    them, ahead of the job's final event and its ack)."""

    def __init__(self, emitter: StatusEmitter, base: JobStatus, loop: AbstractEventLoop):
        self._emitter, self._base, self._loop = emitter, base, loop
        self._latest: tuple[float, str, datetime] | None = None
        self._sending = False

    def offer(self, percent: float, message: str) -> None:
        """From the handler: its thread, or the loop."""
        self._latest = (percent, message, datetime.now(UTC))  # replaces one not sent yet
        if not self._sending:
            self._sending = True
            self._loop.call_soon_threadsafe(self._emitter.run_soon, self._send)

    async def _send(self) -> None:
        while True:
            latest, self._latest = self._latest, None
            if latest is None:
                self._sending = False
                if self._latest is None:  # else offered between the two looks: go on
                    return
                self._sending = True
                continue
            percent, message, at = latest
            update = {"progress": percent, "message": message or None, "at": at}
            await self._emitter.emit(self._base.model_copy(update=update))


class StatusReporter:
    """Status events of one delivery: active (with progress), then completed/retried/parked."""

    def __init__(self, emitter: StatusEmitter, delivery: Delivery, job: str) -> None:
        self._emitter = emitter
        self._base = JobStatus(
            job_id=delivery.message_id or "",
            job=job,
            state="active",
            attempt=delivery.attempt,
            replays=header_int(delivery.headers, REPLAYS, 0),
        )

    def started(self) -> object:
        """Emit "active" and route report_progress() here; returns the token to unbind."""
        self._emitter.emit_soon(self._base)
        return self._emitter.bind_progress(self._base)

    def unbind_progress(self, token: object) -> None:
        self._emitter.unbind_progress(token)

    async def completed(self, result: object) -> None:
        try:
            jsonable = to_jsonable_python(result)
        except PydanticSerializationError:
            jsonable = repr(result)
        await self._emitter.emit(self._final("completed", result=jsonable, progress=100.0))

    async def skipped(self, reason: str) -> None:
        await self._emitter.emit(
            self._final("completed", skipped=True, message=reason, progress=100.0)
        )

    async def failed(self, state: Literal["retried", "parked"], error: str) -> None:
        await self._emitter.emit(self._final(state, error=error))

    def _final(self, state: str, **fields: object) -> JobStatus:
        return self._base.model_copy(update={"state": state, "at": datetime.now(UTC), **fields})


# -- producer / API side --------------------------------------------------------------------


class StatusStore(Protocol):
    async def put(self, status: JobStatus) -> None: ...
    async def get(self, job_id: str) -> JobStatus | None: ...


class MemoryStatusStore:
    """Keeps the newest status per job in memory (bounded: oldest jobs are forgotten)."""

    def __init__(self, max_jobs: int = 100_000) -> None:
        self._statuses: dict[str, JobStatus] = {}
        self._max_jobs = max_jobs

    async def put(self, status: JobStatus) -> None:
        current = self._statuses.get(status.job_id)
        if current is not None and not status.supersedes(current):
            return
        self._statuses.pop(status.job_id, None)
        self._statuses[status.job_id] = status
        if len(self._statuses) > self._max_jobs:
            self._statuses.pop(next(iter(self._statuses)))

    async def get(self, job_id: str) -> JobStatus | None:
        return self._statuses.get(job_id)


@dataclass(frozen=True, slots=True)
class _Subscription:
    connection: Connection
    channel: Channel
    queue: str


def _report_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the status tracker stopped following events: %s", task.exception())


class StatusTracker:
    """Follows the status events of an app's jobs into a store; awaits completions.

    >>> async with StatusTracker(settings, exchange="shop") as tracker:
    ...     await tracker.mark_waiting(job_id, "image.thumbnail")
    ...     status = await tracker.wait(job_id, timeout=30)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        exchange: str,
        store: StatusStore | None = None,
        patterns: tuple[str, ...] = ("#",),
        broker: Broker | None = None,
        rebind_interval: float = REBIND_INTERVAL_S,
    ) -> None:
        """``rebind_interval``: seconds between re-declaring the status exchange and the
        subscription's bindings, which deleting the exchange removes without telling anyone."""
        self.settings = settings
        self.broker = broker or default_broker(settings)
        self.exchange = exchange
        self.store: StatusStore = store or MemoryStatusStore()
        self._patterns = patterns
        self._rebind_interval = rebind_interval
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._sessions: SessionSupervisor[_Subscription] = SessionSupervisor(
            self.broker, "status-tracker", self._stop, log=log
        )
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def __aenter__(self) -> StatusTracker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Subscribe; returns once subscribed. Raises what the first connect raised, or
        BrokerUnreachable if no subscription came up within ``connect_timeout``."""
        self._stop.clear()
        self._task = asyncio.create_task(self._sessions.run(self))
        self._task.add_done_callback(_report_end)
        subscribed = asyncio.ensure_future(self.ready.wait())
        try:
            await asyncio.wait(
                (self._task, subscribed),
                timeout=self.settings.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            subscribed.cancel()
            if not self.ready.is_set() and not self._task.done():
                self._task.cancel()  # gave up, or start() itself was cancelled
        if self._task.done() and not self._task.cancelled():
            self._task.result()
        if not self.ready.is_set():
            raise BrokerUnreachable(
                f"the status tracker could not subscribe within {self.settings.connect_timeout:g}s"
            )

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task

    async def open_session(self, connection: Connection) -> _Subscription:
        channel = await connection.channel(confirms=False, prefetch=1000)
        queue = await channel.declare_private_queue()
        await self._bind(channel, queue)
        await channel.consume(queue, self._on_event, no_ack=True)
        self.ready.set()
        return _Subscription(connection, channel, queue)

    async def _bind(self, channel: Channel, queue: str) -> None:
        exchange = status_exchange_name(self.exchange)
        await channel.declare_exchange(exchange, "topic")
        for pattern in self._patterns:
            await channel.bind(queue, exchange, pattern)

    async def serve_session(self, session: _Subscription, stop: asyncio.Event) -> str | None:
        stopping = asyncio.ensure_future(stop.wait())
        watched: set[asyncio.Future[Any]] = {
            stopping,
            session.connection.lost,
            session.channel.closing,
        }
        try:
            while not (
                await asyncio.wait(
                    watched, timeout=self._rebind_interval, return_when=asyncio.FIRST_COMPLETED
                )
            )[0]:
                await self._bind(session.channel, session.queue)
        except (ConnectionLost, TopologyError) as exc:
            return f"status tracker could not renew its subscription ({exc}); resubscribing"
        finally:
            stopping.cancel()
        return None if stop.is_set() else "status tracker lost its subscription; resubscribing"

    async def close_session(self, session: _Subscription, *, stopping: bool) -> None:
        self.ready.clear()
        await session.connection.close()

    async def _on_event(self, delivery: Any) -> None:
        try:
            status = JobStatus.model_validate_json(delivery.body)
        except ValueError:
            log.warning("ignoring a malformed status event")
            return
        await self.store.put(status)
        self._changed.set()
        self._changed = asyncio.Event()

    async def mark_waiting(self, job_id: str, job: str) -> None:
        await self.store.put(JobStatus(job_id=job_id, job=job, state="waiting"))

    async def get(self, job_id: str) -> JobStatus | None:
        return await self.store.get(job_id)

    async def wait(self, job_id: str, timeout: float) -> JobStatus:  # noqa: ASYNC109 - the API
        """Wait until the job is completed or parked; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                changed = self._changed
                status = await self.store.get(job_id)
                if status is not None and status.final:
                    return status
                await changed.wait()
