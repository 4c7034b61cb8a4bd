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
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from brokerjobs.app import App
from brokerjobs.consumer import Executors, QueueConsumer, build_consumer
from brokerjobs.errors import BrokerJobsError, BrokerUnreachable, ConfigError
from brokerjobs.health import HealthServer
from brokerjobs.settings import Settings, load_settings
from brokerjobs.telemetry import Telemetry
from brokerjobs.topology import declare
from brokerjobs.transport import CONNECTION_ERRORS, Channel, Connection, connect

log = logging.getLogger("brokerjobs.worker")

RECONNECT_MAX_DELAY = 10.0
QUEUE_PROBE_INTERVAL_S = 10.0


@dataclass
class _Session:
    """One connection's worth of channels and consumers."""

    connection: Connection
    channels: list[Channel] = field(default_factory=list)
    consumers: list[tuple[Channel, str, QueueConsumer]] = field(default_factory=list)

    def inflight(self) -> set[asyncio.Task[Any]]:
        return {task for _, _, consumer in self.consumers for task in consumer.inflight}

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
    ) -> None:
        self.app = app
        self.settings = settings or load_settings()
        self.telemetry = telemetry or Telemetry()
        self.queues = app.select_queues(queues)
        if not self.queues:
            raise ConfigError(f"app {app.name!r} has no handlers: nothing to consume")
        self.topology = app.topology()
        self._stop = asyncio.Event()
        self._session: _Session | None = None
        self._executors = Executors(ThreadPoolExecutor(self.settings.sync_workers, "bj-sync"))
        self.reconnects = 0
        self.health_port: int | None = None

    @property
    def ready(self) -> bool:
        """Connected, and a live consumer on every queue this worker should consume."""
        session = self._session
        if session is None or session.connection.is_closed:
            return False
        live = {c.queue for ch, _, c in session.consumers if not ch.is_closed}
        return live == set(self.queues) and all(
            not ch.consumer_cancelled.done() for ch in session.channels
        )

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
        }

    async def run(self) -> None:
        """Consume until ``stop()``; start-up problems raise ConfigError before consuming."""
        problem = self.settings.consumer_timeout_problem()
        if problem:
            raise ConfigError(problem)
        health = HealthServer(lambda: self.ready, self.health)
        if self.settings.health_port is not None:
            await health.start(self.settings.health_port)
            self.health_port = health.port
        probe = asyncio.create_task(self._probe_queues()) if self.telemetry.metering else None
        try:
            await self._supervise()
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

    async def _supervise(self) -> None:
        delay = 0.2
        started_once = False
        while not self._stop.is_set():
            try:
                session = await self._open_session_unless_stopped()
                if session is None:
                    return
                self._session = session
            except BrokerUnreachable:
                if not started_once:
                    raise
                log.warning("broker unreachable; retrying in %.1fs", delay)
            except CONNECTION_ERRORS as exc:
                log.warning("session setup failed (%s); retrying in %.1fs", exc, delay)
            else:
                started_once, delay = True, 0.2
                log.info("consuming %s", ", ".join(self.queues))
                reason = await self._session.wait_lost(self._stop)
                if reason is None:
                    await self._drain(self._session)
                    return
                log.warning("%s; reconnecting", reason)
                self.reconnects += 1
                await self._abandon(self._session)
            self._session = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)

    async def _open_session_unless_stopped(self) -> _Session | None:
        """Open a session; None if stop() came first (even while the broker is down)."""
        opening = asyncio.ensure_future(self._open_session())
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((opening, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if opening.done():
            session = opening.result()
            if not self._stop.is_set():
                return session
            await session.connection.close()
            return None
        opening.cancel()
        with contextlib.suppress(BaseException):
            await opening
        return None

    async def _open_session(self) -> _Session:
        connection = await connect(self.settings, "worker")
        session = _Session(connection)
        try:
            self._check_priorities(connection.server_version)
            await declare(connection, self.topology)
            for queue in self.queues:
                await self._start_consumer(session, queue)
        except BrokerJobsError:
            await connection.close()
            raise
        except Exception as exc:
            lost = connection.is_closed
            await connection.close()
            if lost:
                # aiormq reports a connection dropped mid-RPC as RuntimeError or a bare
                # Exception: it is an outage to retry, not a bug to crash on.
                raise ConnectionResetError(f"connection lost during set-up: {exc!r}") from exc
            raise
        except BaseException:
            await connection.close()
            raise
        return session

    def _check_priorities(self, version: tuple[int, ...]) -> None:
        """Refuse priorities the broker ignores outright; warn about ones it bends."""
        findings = self.app.priority_findings(version, self.queues)
        errors = [f.message for f in findings if f.severity == "error"]
        if errors:
            raise ConfigError("; ".join(errors))
        for finding in findings:
            log.warning("job priorities not honoured as written: %s", finding.message)

    async def _start_consumer(self, session: _Session, queue: str) -> None:
        prefetch = self.app.queues[queue].prefetch or self.settings.prefetch
        channel = await session.connection.channel(confirms=True, prefetch=prefetch)
        session.channels.append(channel)
        consumer = build_consumer(
            self.app, queue, channel, self.settings, self._executors, self.telemetry
        )
        tag = await channel.consume(queue, consumer.on_delivery)
        session.consumers.append((channel, tag, consumer))

    async def _drain(self, session: _Session) -> None:
        """Stop consuming, let in-flight jobs finish within the grace period, requeue the rest."""
        for channel, tag, _ in session.consumers:
            with contextlib.suppress(*CONNECTION_ERRORS):
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
        await session.connection.close()
        log.info("worker stopped")

    async def _abandon(self, session: _Session) -> None:
        # Their deliveries are requeued by the broker; stop them so they don't run twice at once.
        for task in session.inflight():
            task.cancel()
        await session.connection.close()


async def run_worker(app: App, settings: Settings | None = None) -> None:
    """Run a worker with SIGTERM/SIGINT handlers that start a graceful drain."""
    worker = Worker(app, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
