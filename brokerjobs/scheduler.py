"""The scheduler: leads through a token queue and publishes each tick of an app's schedules once.

Any number of ``brokerjobs scheduler`` instances may run; one leads. Leadership is a durable
queue ``<exchange>.scheduler`` with ``x-single-active-consumer`` holding one *token* message, the
JSON state "every tick up to T is done" per schedule. The broker delivers the token to one
consumer only; it comes back to the queue (and on to the next instance) when that consumer's
channel closes, so a killed leader hands over in milliseconds. The leader publishes a due tick's
job with a deterministic message id, then publishes the updated token, then acks the old one:
a crash in between can publish one tick twice (same message id), never lose it.
See docs/scheduler.md for the rules and the reasoning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker
from brokerjobs.broker.base import BrokerChannel as Channel
from brokerjobs.broker.base import BrokerConnection as Connection
from brokerjobs.envelope import encode
from brokerjobs.errors import (
    ConfigError,
    ConnectionLost,
    PublishError,
    PublishNacked,
    TopologyError,
    UnencodableMessage,
    UnroutableJob,
)
from brokerjobs.provision import declare
from brokerjobs.schedule import (
    DEFAULT_GRACE,
    EPOCH,
    MAX_CATCH_UP,
    MIN_INTERVAL,
    CatchUp,
    Cron,
    Every,
    Interval,
    Rule,
    Schedule,
    ScheduleTarget,
    State,
    TickPlan,
    at_or_before,
    covers,
    decode_state,
    encode_state,
    make_schedule,
    merge_state,
    plan_ticks,
    tick_job_id,
)
from brokerjobs.scheduler_token import TokenSession
from brokerjobs.sessions import SessionSupervisor
from brokerjobs.settings import Settings, load_settings
from brokerjobs.topology import scheduler_queue_arguments, scheduler_queue_name

if TYPE_CHECKING:
    from brokerjobs.app import App

log = logging.getLogger("brokerjobs.scheduler")

SCHEDULED_FOR = "bj-scheduled-for"
SCHEDULE = "bj-schedule"
TOKEN_PREFETCH = 10
REFRESH_INTERVAL_S = 60.0
# State further ahead of this instance's clock came from a clock that was ahead (it would hold
# every schedule back, silently, until then); closer, it is instances' ordinary skew.
CLOCK_SKEW_TOLERANCE = timedelta(minutes=5)
# A failed publish or ack may have lost the token: reconnect, and whoever leads next retries.
# TopologyError: the app's exchange was deleted under us; the next session declares it again.
SESSION_ERRORS: tuple[type[BaseException], ...] = (PublishError, ConnectionLost, TopologyError)


# -- the token: scheduler state in one message -----------------------------------------------


def scheduler_queue(app: App) -> str:
    return scheduler_queue_name(app.exchange)


# -- the scheduler ---------------------------------------------------------------------------

_SETUP_ERRORS: tuple[type[BaseException], ...] = (ConnectionLost, PublishNacked)


class Scheduler:
    """Publishes an app's schedules while it leads; ``run()`` returns after ``stop()``.

    >>> app.schedule(Cleanup(), cron="0 3 * * *")
    >>> await Scheduler(app).run()
    """

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        refresh_interval: float | None = None,
        clock: Callable[[], datetime] | None = None,
        broker: Broker | None = None,
    ) -> None:
        """``refresh_interval``: seconds between token refreshes (default 60 s, and under a
        quarter of the broker's consumer_timeout); ``clock``: the UTC time source (tests).
        """
        if not app.schedules:
            raise ConfigError(f"app {app.name!r} has no schedules: add app.schedule(...)")
        self.app = app
        self.settings = settings or load_settings()
        self.broker = broker or default_broker(self.settings)
        self.queue = scheduler_queue(app)
        if self.queue in app.queues:
            raise ConfigError(f"queue {self.queue!r} is reserved for the scheduler: rename it")
        self.refresh_interval = refresh_interval or min(
            REFRESH_INTERVAL_S, self.settings.broker_consumer_timeout / 4
        )
        self._clock = clock or (lambda: datetime.now(UTC))
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._sessions: SessionSupervisor[TokenSession] = SessionSupervisor(
            self.broker, "scheduler", self._stop, log=log, retry_on=_SETUP_ERRORS
        )
        self.published = 0  # jobs this instance published

    @property
    def _session(self) -> TokenSession | None:
        return self._sessions.session

    @property
    def reconnects(self) -> int:
        return self._sessions.reconnects

    @property
    def is_leader(self) -> bool:
        session = self._session
        return session is not None and session.ready and session.lost_reason() is None

    @property
    def state(self) -> State:
        """While leading: schedule name -> the tick up to which all is done; else empty."""
        session = self._session
        return dict(session.memory) if session is not None and session.ready else {}

    @property
    def persists(self) -> int:
        """Tokens published in the current session (ticks and refreshes)."""
        return self._session.persists if self._session is not None else 0

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """Lead or stand by until ``stop()``; reconnects after failures, with backoff."""
        # PublishNacked at set-up: RabbitMQ 4.0 may nack the first token of a quorum queue that
        # two instances declared at the same moment; the next session sees the token.
        await self._sessions.run(self)
        log.info("scheduler stopped")

    async def serve_session(self, session: TokenSession, stop: asyncio.Event) -> str | None:
        return await self._serve(session)

    async def close_session(self, session: TokenSession, *, stopping: bool) -> None:
        # Closing requeues a held token: the next instance leads at once. The channel first:
        # acks are sent without waiting, and closing the connection at once may drop them; the
        # channel's close-ok proves the broker has them.
        await session.channel.close()
        await session.connection.close()

    async def open_session(self, connection: Connection) -> TokenSession:
        """Declare the plan (the scheduler queue included) and consume the token queue."""
        await declare(connection, self.app.topology())
        channel = await connection.channel(confirms=True, prefetch=TOKEN_PREFETCH)
        state = await channel.inspect_queue(self.queue)
        session = TokenSession(connection, channel, self.queue, self._wake)
        if state.messages == 0 and state.consumers == 0:
            # No token and no instance that could hold one: create it. Instances starting
            # at the same moment may both do so; the leader merges and drops the twin.
            await session.publish_token({}, uuid.uuid4().hex)
        await channel.consume(self.queue, session.on_delivery)
        log.info("scheduler standing by on %s", self.queue, extra={"action": "standby"})
        return session

    async def _serve(self, session: TokenSession) -> str | None:
        """Run until stop (None) or until the session breaks (why)."""
        while True:
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._timeout(session))
            self._wake.clear()
            if self._stop.is_set():
                return None
            reason = session.lost_reason()
            if reason is not None:
                return reason
            try:
                while session.inbox:
                    await session.on_token(session.inbox.popleft())
                if session.ready:
                    await self._publish_due(session)
                    if time.monotonic() - session.last_persist >= self.refresh_interval:
                        await session.persist()  # never hold a token near consumer_timeout
            except SESSION_ERRORS as exc:
                return f"scheduler channel failed: {exc}"

    def _timeout(self, session: TokenSession) -> float | None:
        """Seconds until the next tick or token refresh; None while standing by."""
        if not session.ready:
            return None
        now = self._clock()
        waits = [self.refresh_interval - (time.monotonic() - session.last_persist)]
        for schedule in self.app.schedules:
            done = session.memory.get(schedule.name)
            if done is not None:
                waits.append((schedule.rule.next_after(max(done, now)) - now).total_seconds())
        return max(0.0, min(waits))

    async def _publish_due(self, session: TokenSession) -> None:
        now = self._clock()
        dirty = False
        for schedule in self.app.schedules:
            done = session.memory.get(schedule.name)
            if done is not None and done > now + CLOCK_SKEW_TOLERANCE:
                log.warning(
                    "schedule %s: its state says done through %s, after now (%s): a clock was "
                    "ahead; starting again from now",
                    *(schedule.name, done.isoformat(), now.isoformat()),
                    extra={"action": "clock_ahead", "schedule": schedule.name},
                )
                done = None
            if done is None:  # a new schedule starts with the first tick after now
                session.memory[schedule.name] = at_or_before(schedule.rule, now)
                dirty = True
                continue
            plan = plan_ticks(schedule.rule, done, now, schedule.catch_up, schedule.grace)
            if plan.skipped is not None:
                first, last = plan.skipped
                log.warning(
                    "schedule %s: skipped missed ticks %s..%s (catch_up=%s)",
                    schedule.name,
                    first.isoformat(),
                    last.isoformat(),
                    schedule.catch_up,
                    extra={"action": "ticks_skipped", "schedule": schedule.name},
                )
            for tick in plan.ticks:
                if not await self._publish_tick(session.channel, schedule, tick):
                    break  # refused: the tick stays due, for the next wake
                session.memory[schedule.name] = tick
                await session.persist()  # publish, then record: a crash here repeats one tick
            else:
                dirty |= self._skip_through(session, schedule, plan)
        if dirty:
            await session.persist()

    def _skip_through(self, session: TokenSession, schedule: Schedule, plan: TickPlan) -> bool:
        """Record the ticks the plan skipped as done; True when that changed the state."""
        if plan.done_through > session.memory[schedule.name]:
            session.memory[schedule.name] = plan.done_through
            return True
        return False

    async def _publish_tick(self, channel: Channel, schedule: Schedule, tick: datetime) -> bool:
        """Publish one tick's job: True when the tick is done with (published, or skipped
        with an error logged), False when the broker refused it (tried again later)."""
        job_id = tick_job_id(self.app.exchange, schedule.name, tick)
        fields = {"schedule": schedule.name, "tick": tick.isoformat(), "message_id": job_id}
        headers = {SCHEDULED_FOR: tick.isoformat(), SCHEDULE: schedule.name}
        try:
            message = encode(schedule.job_for(tick), message_id=job_id, headers=headers)
        except Exception:  # the factory failed, or its job does not serialise
            log.exception(
                "schedule %s: making the job failed; tick %s skipped",
                schedule.name,
                tick.isoformat(),
                extra={"action": "tick_failed", **fields},
            )
            return True
        try:
            await channel.publish(message, self.app.exchange, message.job_name or "")
        except (UnroutableJob, UnencodableMessage) as exc:
            action = "tick_unroutable" if isinstance(exc, UnroutableJob) else "tick_failed"
            log.error(
                "%s; tick %s skipped", exc, tick.isoformat(), extra={"action": action, **fields}
            )
            return True
        except PublishNacked as exc:  # e.g. a full queue with overflow=reject-publish
            log.error(
                "%s; tick %s is tried again at the next wake",
                exc,
                tick.isoformat(),
                extra={"action": "tick_refused", **fields},
            )
            return False
        self.published += 1
        log.info(
            "scheduled %s for %s",
            message.job_name,
            tick.isoformat(),
            extra={"action": "scheduled", **fields},
        )
        return True


async def run_scheduler(app: App, settings: Settings | None = None) -> None:
    """Run a scheduler with SIGTERM/SIGINT handlers that stop it gracefully (hand over)."""
    scheduler = Scheduler(app, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, scheduler.stop)
    try:
        await scheduler.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


# The pure rules live in brokerjobs.schedule; they are re-exported here, where they always were.
__all__ = [
    "DEFAULT_GRACE",
    "EPOCH",
    "MAX_CATCH_UP",
    "MIN_INTERVAL",
    "REFRESH_INTERVAL_S",
    "SCHEDULE",
    "SCHEDULED_FOR",
    "SESSION_ERRORS",
    "TOKEN_PREFETCH",
    "CatchUp",
    "Cron",
    "Every",
    "Interval",
    "Rule",
    "Schedule",
    "ScheduleTarget",
    "Scheduler",
    "State",
    "TickPlan",
    "at_or_before",
    "covers",
    "decode_state",
    "encode_state",
    "make_schedule",
    "merge_state",
    "plan_ticks",
    "run_scheduler",
    "scheduler_queue",
    "scheduler_queue_arguments",
    "tick_job_id",
]
