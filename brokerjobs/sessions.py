"""One session supervisor for the worker, the scheduler and the status tracker.

A session is one connection's worth of work: connect, set up (declare, consume), serve until the
session breaks or a stop is asked, then close it: drain when stopping, abandon when broken. A
broken session is followed by a new one after a backoff that grows until a session proves the
broker healthy by lasting ``stable_after`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Generic, Protocol, TypeVar

from brokerjobs.broker.base import Broker, BrokerConnection
from brokerjobs.errors import BrokerUnreachable, ConnectionLost

S = TypeVar("S")

MIN_DELAY_S = 0.2
MAX_DELAY_S = 10.0
STABLE_AFTER_S = 30.0


class SessionOwner(Protocol[S]):
    """What a component does with each session the supervisor opens."""

    async def open_session(self, connection: BrokerConnection) -> S:
        """Set up on a fresh connection (declare, consume); raise to give up on it."""

    async def serve_session(self, session: S, stop: asyncio.Event) -> str | None:
        """Run until ``stop`` is set (return None) or the session breaks (return why)."""

    async def close_session(self, session: S, *, stopping: bool) -> None:
        """Drain (``stopping``) or abandon (broken) the session and close its connection."""


class SessionSupervisor(Generic[S]):
    """Runs sessions of one owner until ``stop`` is set; counts reconnects for readiness."""

    def __init__(
        self,
        broker: Broker,
        role: str,
        stop: asyncio.Event,
        *,
        log: logging.Logger,
        retry_on: tuple[type[BaseException], ...] = (ConnectionLost,),
        stable_after: float = STABLE_AFTER_S,
    ) -> None:
        """``retry_on``: set-up errors followed by a new session. A TopologyError (a queue
        deleted, access refused for a while) is retried too once a session has run; before
        that, and a TopologyMismatch always, it is raised: the configuration is wrong."""
        self._broker = broker
        self._role = role
        self._stop = stop
        self._log = log
        self._retry_on = retry_on
        self.stable_after = stable_after
        self.session: S | None = None
        self.opened_at = 0.0  # monotonic time the current session opened
        self.reconnects = 0
        self.short_sessions = 0  # sessions in a row that ended within stable_after

    async def run(self, owner: SessionOwner[S]) -> None:
        """Sessions until stop; the first connect's BrokerUnreachable raises (bad config)."""
        delay, started = MIN_DELAY_S, False
        while not self._stop.is_set():
            try:
                session = await self._open_unless_stopped(owner)
            except BrokerUnreachable:
                if not started:
                    raise
                self._log.warning("broker unreachable; retrying in %.1fs", delay)
            except self._retry_on as exc:
                self._log.warning(
                    "%s set-up failed (%s); retrying in %.1fs", self._role, exc, delay
                )
            else:
                if session is None:
                    return
                started = True
                lived = await self._serve(owner, session)
                if lived is None:
                    return
                if lived >= self.stable_after:  # only a lasting session resets the backoff
                    delay, self.short_sessions = MIN_DELAY_S, 0
                else:
                    self.short_sessions += 1
                self._log.info("reconnecting in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            delay = min(delay * 2, MAX_DELAY_S)

    async def _serve(self, owner: SessionOwner[S], session: S) -> float | None:
        """Serve one session; None after a stop, else how long it lived."""
        self.session, self.opened_at = session, time.monotonic()
        try:
            try:
                reason = await owner.serve_session(session, self._stop)
            except BaseException:  # cancelled, or a bug: never leave the connection open
                with contextlib.suppress(Exception):
                    await owner.close_session(session, stopping=False)
                raise
            lived = time.monotonic() - self.opened_at
            if reason is not None:
                self._log.warning("%s after %.1fs", reason, lived)
                self.reconnects += 1
            await owner.close_session(session, stopping=reason is None)
        finally:
            self.session = None
        return None if reason is None else lived

    async def _open_unless_stopped(self, owner: SessionOwner[S]) -> S | None:
        """Connect and set up; None if stop() came first (even while the broker is down)."""
        opening = asyncio.ensure_future(self._open(owner))
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((opening, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if opening.done():
            session = opening.result()
            if not self._stop.is_set():
                return session
            await owner.close_session(session, stopping=True)
            return None
        opening.cancel()
        with contextlib.suppress(BaseException):
            await opening
        return None

    async def _open(self, owner: SessionOwner[S]) -> S:
        connection = await self._broker.connect(self._role)
        try:
            return await owner.open_session(connection)
        except BaseException:
            await connection.close()
            raise
