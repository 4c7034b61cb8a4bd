"""Worker lifecycle: connect, declare, consume every queue, survive reconnects, drain on SIGTERM.

The worker supervises its connection itself instead of using aio-pika's robust connection: each
(re)connect declares the topology again and starts every consumer anew, so a consumer cannot
silently go missing, and ``ready`` is true only while every queue has a live consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from brokerjobs import obsolete_check
from brokerjobs.app import App
from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker
from brokerjobs.broker.base import BrokerChannel as Channel
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.consumer import QueueConsumer, build_consumer
from brokerjobs.errors import ConfigError, ConnectionLost
from brokerjobs.executors import Executors
from brokerjobs.health import HealthServer
from brokerjobs.middleware import Middleware, Pipeline
from brokerjobs.provision import declare
from brokerjobs.sessions import SessionSupervisor
from brokerjobs.settings import Settings, load_settings
from brokerjobs.telemetry import Telemetry

if TYPE_CHECKING:
    from brokerjobs.status_events import StatusChannel

log = logging.getLogger("brokerjobs.worker")

QUEUE_PROBE_INTERVAL_S = 10.0
# A session shorter than this did not prove the broker healthy: backoff keeps growing, and
# this many such sessions in a row make the worker not ready (reconnecting in a loop).
STABLE_SESSION_S = 30.0
SHORT_SESSIONS_NOT_READY = 3
# Beyond a job's timeout, settling may take the confirm timeout (the publish watchdog) plus this
# (nack retries, the status event): a delivery held longer means the worker makes no progress.
SETTLE_MARGIN_S = 5.0


@dataclass
class _Session:
    """One connection's worth of channels and consumers."""

    connection: Connection
    status: StatusChannel | None = None  # where the app tracks status
    channels: list[Channel] = field(default_factory=list)
    consumers: list[tuple[Channel, str, QueueConsumer]] = field(default_factory=list)

    def inflight(self) -> set[asyncio.Task[Any]]:
        return {task for _, _, consumer in self.consumers for task in consumer.inflight}

    def oldest_inflight_s(self) -> float:
        return max((c.oldest_inflight_s() for _, _, c in self.consumers), default=0.0)

    async def wait_lost(self, stop: asyncio.Event) -> str | None:
        """Wait until stop is requested (returns None) or the session breaks (returns why)."""
        watched: dict[asyncio.Future[Any], str] = {
            asyncio.ensure_future(stop.wait()): "stop",
            self.connection.lost: "connection closed",
        }
        for channel in self.channels:
            watched[channel.closing] = "channel closed"
            watched[channel.consumer_cancelled] = "consumer cancelled by the broker"
        for _, _, consumer in self.consumers:
            watched[consumer.needs_new_session] = "settling failed"
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for future in watched:
            if watched[future] == "stop":
                future.cancel()
        return None if stop.is_set() else watched[next(iter(done))]


class Worker:
    """Runs an app's handlers until ``stop()``; ``run()`` returns after a graceful drain."""

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        queues: Iterable[str] | None = None,
        telemetry: Telemetry | None = None,
        broker: Broker | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        """``broker`` defaults to RabbitMQ at ``settings.url``; ``middleware`` run after the
        app's own, around every delivery of this worker."""
        self.app = app
        self._middleware = tuple(middleware)
        self.settings = settings or load_settings()
        self.broker = broker or default_broker(self.settings)
        self.telemetry = telemetry or Telemetry()
        self.queues = app.select_queues(queues)
        if not self.queues:
            raise ConfigError(f"app {app.name!r} has no handlers: nothing to consume")
        self.topology = app.topology()
        self._stop = asyncio.Event()
        self._sessions: SessionSupervisor[_Session] = SessionSupervisor(
            self.broker, "worker", self._stop, log=log, stable_after=STABLE_SESSION_S
        )
        self._executors = Executors(self.settings.sync_workers)
        self._lifecycle = Pipeline((*app.middleware, *self._middleware))
        self._announced = False
        self._warned: set[str] = set()
        self.health_port: int | None = None
        self._last_problems: list[str] = []
        self._settle_margin_s = self.settings.confirm_timeout + SETTLE_MARGIN_S
        self._stuck_after_s = self._longest_job_timeout() + self._settle_margin_s

    @property
    def _session(self) -> _Session | None:
        return self._sessions.session

    @property
    def reconnects(self) -> int:
        return self._sessions.reconnects

    @property
    def short_sessions(self) -> int:
        """Sessions in a row that ended within ``stable_session_s``."""
        return self._sessions.short_sessions

    @property
    def stable_session_s(self) -> float:
        return self._sessions.stable_after

    @stable_session_s.setter
    def stable_session_s(self, seconds: float) -> None:
        self._sessions.stable_after = seconds

    def _longest_job_timeout(self) -> float:
        timeouts = [
            handler.timeout or self.settings.job_timeout
            for queue in self.queues
            for handler in self.app.handlers(queue).values()
        ]
        return max(timeouts, default=self.settings.job_timeout)

    @property
    def ready(self) -> bool:
        """Connected, a live consumer on every queue, and making progress (see ``problems``)."""
        problems = self.problems()
        if problems != self._last_problems:
            if problems:
                log.warning("not ready: %s", "; ".join(problems))
            elif self._last_problems:
                log.info("ready again")
            self._last_problems = problems
        return not problems

    def problems(self) -> list[str]:
        """Why the worker is not ready; empty when it is."""
        session = self._session
        if session is None or session.connection.is_closed:
            problems = ["not connected to the broker"]
        else:
            problems = self._session_problems(session)
        if self._reconnecting_in_a_loop():
            problems.append(
                f"reconnecting in a loop: {self.short_sessions} sessions in a row ended within "
                f"{self.stable_session_s:g}s"
            )
        executors = self._executors.problem()
        if executors:
            problems.append(executors)
        return problems

    def _reconnecting_in_a_loop(self) -> bool:
        """Several short sessions in a row, and the current one (if any) not yet long-lived."""
        if self.short_sessions < SHORT_SESSIONS_NOT_READY:
            return False
        return self._session is None or (
            time.monotonic() - self._sessions.opened_at < self.stable_session_s
        )

    def _session_problems(self, session: _Session) -> list[str]:
        problems = []
        live = {c.queue for ch, _, c in session.consumers if not ch.is_closed}
        if live != set(self.queues) or any(ch.consumer_cancelled.done() for ch in session.channels):
            missing = sorted(set(self.queues) - live) or sorted(self.queues)
            problems.append(f"no live consumer on {', '.join(missing)}")
        if not self._hears_broker(session):
            problems.append(
                f"no frame from the broker for {session.connection.silent_for():.0f}s "
                f"(two heartbeats of {self.settings.heartbeat}s): the connection looks cut"
            )
        held = session.oldest_inflight_s()
        if held > self._stuck_after_s:
            problems.append(
                f"a delivery has been held {held:.0f}s, past its job timeout plus "
                f"{self._settle_margin_s:g}s to settle: the worker makes no progress"
            )
        return problems

    def _hears_broker(self, session: _Session) -> bool:
        """False once no frame came for two heartbeat timeouts (the broker sends one every half
        timeout): a partitioned connection is unready long before aiormq declares it dead."""
        heartbeat = self.settings.heartbeat
        return heartbeat == 0 or session.connection.silent_for() <= 2 * heartbeat

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> dict[str, Any]:
        session = self._session
        live = set()
        if session is not None and not session.connection.is_closed:
            live = {c.queue for ch, _, c in session.consumers if not ch.is_closed}
        return {
            "consumers": {queue: queue in live for queue in self.queues},
            "reconnects": self.reconnects,
            "problems": self.problems(),
        }

    async def run(self) -> None:
        """Consume until ``stop()``; start-up problems raise ConfigError before consuming."""
        problem = self.settings.consumer_timeout_problem()
        if problem:
            raise ConfigError(problem)
        health = HealthServer(lambda: self.ready, self.health)
        if self.settings.health_port is not None:
            await health.start(self.settings.health_port, self.settings.health_host)
            self.health_port = health.port
        probe = asyncio.create_task(self._probe_queues()) if self.telemetry.metering else None
        try:
            await self._sessions.run(self)
        finally:
            if probe is not None:
                probe.cancel()
            await health.stop()
            self._executors.shutdown()

    async def _probe_queues(self) -> None:
        """Feed the queue depth and consumer gauges (AMQP calls cannot run in a metric callback)."""
        while True:
            session = self._session
            with contextlib.suppress(Exception):
                if session is not None and not session.connection.is_closed:
                    channel = await session.connection.channel(confirms=False)
                    try:
                        for queue in self.topology.queues:
                            state = await channel.inspect_queue(queue.name)
                            self.telemetry.record_queue(
                                queue.name, queue.role, state.messages, state.consumers
                            )
                    finally:
                        await channel.close()
            await asyncio.sleep(QUEUE_PROBE_INTERVAL_S)

    async def open_session(self, connection: Connection) -> _Session:
        """A session: the topology declared and a consumer on every queue."""
        session = _Session(connection, _status_channel(self.app, connection))
        self._check_priorities(connection.server_version)
        await declare(connection, self.topology)
        for queue in self.queues:
            await self._start_consumer(session, queue)
        obsolete_check.after_start(self, connection)
        return session

    async def serve_session(self, session: _Session, stop: asyncio.Event) -> str | None:
        log.info("consuming %s", ", ".join(self.queues))
        if not self._announced:
            self._announced = True
            await self._lifecycle.worker_event("worker_started", self)
        return await session.wait_lost(stop)

    async def close_session(self, session: _Session, *, stopping: bool) -> None:
        if stopping:
            await self._lifecycle.worker_event("worker_stopping", self)
            await self._drain(session)
        else:
            await self._abandon(session)

    def _check_priorities(self, version: tuple[int, ...]) -> None:
        """Refuse priorities the broker ignores outright; warn about ones it bends."""
        findings = self.app.priority_findings(version, self.queues)
        errors = [f.message for f in findings if f.severity == "error"]
        if errors:
            raise ConfigError("; ".join(errors))
        for finding in findings:
            if finding.message not in self._warned:  # once per worker, not per reconnect
                self._warned.add(finding.message)
                log.warning("job priorities not honoured as written: %s", finding.message)

    async def _start_consumer(self, session: _Session, queue: str) -> None:
        prefetch = self.app.queues[queue].prefetch or self.settings.prefetch
        channel = await session.connection.channel(confirms=True, prefetch=prefetch)
        session.channels.append(channel)
        consumer = build_consumer(
            self.app,
            queue,
            channel,
            self.settings,
            self._executors,
            self.telemetry,
            self._middleware,
            session.status,
        )
        tag = await channel.consume(queue, consumer.on_delivery)
        session.consumers.append((channel, tag, consumer))

    async def _drain(self, session: _Session) -> None:
        """Stop consuming, let in-flight jobs finish within the grace period, requeue the rest."""
        for channel, tag, _ in session.consumers:
            with contextlib.suppress(ConnectionLost):
                await channel.cancel(tag)
        inflight = session.inflight()
        if inflight:
            log.info("draining %d in-flight job(s)", len(inflight))
            _, late = await asyncio.wait(inflight, timeout=self.settings.shutdown_grace)
            if late:
                log.warning("%d job(s) still running after the grace period: requeued", len(late))
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=5)
        # Acks are sent without waiting; closing each channel first flushes them (a bare
        # connection close can drop them, and the jobs would be delivered again).
        for channel in session.channels:
            await channel.close()
        if session.status is not None:
            await session.status.close()
        await session.connection.close()
        log.info("worker stopped")

    async def _abandon(self, session: _Session) -> None:
        # Their deliveries are requeued by the broker; stop them so they don't run twice at once.
        for task in session.inflight():
            task.cancel()
        await session.connection.close()


async def run_worker(
    app: App, settings: Settings | None = None, queues: Iterable[str] | None = None
) -> None:
    """Run a worker with SIGTERM/SIGINT handlers that start a graceful drain."""
    worker = Worker(app, settings, queues=queues)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _status_channel(app: App, connection: Connection) -> StatusChannel | None:
    if not app.track_status:
        return None
    from brokerjobs.status_events import StatusChannel  # loaded only by apps that track status

    return StatusChannel(connection)
