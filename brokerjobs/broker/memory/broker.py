"""The in-memory broker: RabbitMQ's behaviour that brokerjobs relies on, on a virtual clock.

Played: topic/direct/fanout exchanges and exchange-to-exchange bindings, the default exchange,
idempotent declares (other arguments: TopologyMismatch), priorities (``x-max-priority``, classic
queues), per-queue and per-message TTLs firing at the queue head, dead-lettering with the
``x-death``/``x-first-death-*`` (and from 3.13 ``x-last-death-*``) headers, quorum delivery
limits, mandatory publishing, per-consumer prefetch, round-robin and single active consumers,
redelivery, exclusive queues, connection loss. Not played: flow control, max-length, x-expires,
headers exchanges, transactions.

Time is virtual: only ``advance`` moves ``clock``, and TTLs expire on it. Delivery callbacks
run as tasks of the running loop; ``run_until_idle`` waits until every deliverable message was
delivered and every callback finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from brokerjobs.broker.memory.connection import MemoryConnection
from brokerjobs.broker.memory.core import Core, VirtualClock
from brokerjobs.broker.memory.deaths import delivery_of
from brokerjobs.envelope import Delivery
from brokerjobs.errors import BrokerJobsError, BrokerUnreachable
from brokerjobs.topology import TopologyPlan

MAX_DELIVERIES_PER_RUN = 100_000
IDLE_TIMEOUT_S = 30.0  # real seconds a run may wait on callbacks that do not finish
QUIET_TICKS = 10  # loop iterations with nothing to do before the broker counts as idle
DEFAULT_VERSION = (4, 0, 0)


class StillBusy(BrokerJobsError):
    """The in-memory broker did not become idle."""


class CallbackFailed(BrokerJobsError):
    """A delivery callback raised (the first exception is the cause)."""


class MemoryBroker:
    """A ``Broker`` in this process; see the module docstring for what it plays."""

    def __init__(
        self, *, server_version: Sequence[int] = DEFAULT_VERSION, hold_roles: Iterable[str] = ()
    ) -> None:
        """``hold_roles``: consumers of connections with these roles (``connect(role)``) get
        messages only when ``run_until_idle`` or ``advance`` runs (TestBroker holds the
        worker's); all others, and every consumer by default, get them at once."""
        self.clock = VirtualClock()
        self._core = Core(self.clock, tuple(server_version))
        self._core.held_roles = frozenset(hold_roles)
        self.connections: list[MemoryConnection] = []
        self.unreachable = False  # True: connect raises BrokerUnreachable

    @property
    def server_version(self) -> tuple[int, ...]:
        return self._core.version

    @server_version.setter
    def server_version(self, version: Sequence[int]) -> None:
        """Applies to connections made and queues declared from now on."""
        self._core.version = tuple(version)

    async def connect(self, role: str) -> MemoryConnection:
        if self.unreachable:
            raise BrokerUnreachable(
                f"the memory broker refuses connections (unreachable=True; role {role!r})"
            )
        connection = MemoryConnection(self._core, role, self._core.version)
        self.connections = [c for c in self.connections if not c.is_closed]
        self.connections.append(connection)
        return connection

    def drop_connections(self, why: str = "the network failed") -> int:
        """Lose every open connection at once (see ``MemoryConnection.drop``); how many."""
        open_ones = [c for c in self.connections if not c.is_closed]
        for connection in open_ones:
            connection.drop(why)
        return len(open_ones)

    async def declare_plan(self, plan: TopologyPlan) -> None:
        """Declare ``plan`` as ``provision.declare`` does, on a connection of its own."""
        from brokerjobs.provision import declare

        connection = await self.connect("topology")
        try:
            await declare(connection, plan)
        finally:
            await connection.close()

    # -- time and progress -------------------------------------------------------------------

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` ahead: each TTL that falls due on the way fires at its
        own time, in order, and what it dead-letters is delivered before the next one."""
        target = round(self.clock.now + seconds, 6)
        await self.run_until_idle()
        while (due := self._core.next_expiry()) is not None and due <= target:
            self.clock.now = max(self.clock.now, due)
            await self.run_until_idle()
        self.clock.now = max(self.clock.now, target)
        await self.run_until_idle()

    def next_expiry(self) -> float | None:
        """The virtual time at which the next TTL fires, or None if none is pending."""
        return self._core.next_expiry()

    async def run_until_idle(
        self,
        *,
        advance_clock: bool = False,
        max_deliveries: int = MAX_DELIVERIES_PER_RUN,
        stuck_after: float = IDLE_TIMEOUT_S,
        raise_errors: bool = True,
    ) -> None:
        """Wait until no message waits for a consumer with credit and no delivery callback
        runs; the clock stands still unless ``advance_clock``, which then jumps it to each
        pending TTL in turn until none is left. StillBusy after ``max_deliveries`` deliveries
        or ``stuck_after`` real seconds waiting on callbacks; CallbackFailed if a callback
        raised (``raise_errors``)."""
        start = self._core.deliveries
        while True:
            left = max_deliveries - (self._core.deliveries - start)
            await self._settle(left, stuck_after)
            if raise_errors:
                self.raise_callback_errors()
            due = self._core.next_expiry()
            if not advance_clock or due is None:
                return
            self.clock.now = max(self.clock.now, due)

    async def _settle(self, max_deliveries: int, stuck_after: float) -> None:
        start = self._core.deliveries
        deadline = asyncio.get_running_loop().time() + stuck_after
        quiet = 0
        while quiet < QUIET_TICKS:
            self._core.dispatch(driven=True)
            if self._core.deliveries - start > max_deliveries:
                raise StillBusy(
                    f"still busy after {max_deliveries} deliveries: does a handler requeue "
                    "or republish every message it gets?"
                )
            quiet = 0 if await self._wait_callbacks(deadline) else quiet + 1

    async def _wait_callbacks(self, deadline: float) -> bool:
        """Wait for a running callback to finish (True), or give the loop one turn (False)."""
        running = [task for task in self._core.tasks if not task.done()]
        if not running:
            await asyncio.sleep(0)
            return False
        left = deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait(running, timeout=max(left, 0), return_when="FIRST_COMPLETED")
        if not done:
            names = ", ".join(sorted(task.get_name() for task in running)[:5])
            raise StillBusy(f"{len(running)} delivery callback(s) still running ({names})")
        return True

    def raise_callback_errors(self) -> None:
        """Raise CallbackFailed for the first exception a delivery callback raised (once)."""
        if self._core.errors:
            first, count = self._core.errors[0], len(self._core.errors)
            self._core.errors.clear()
            raise CallbackFailed(
                f"{count} delivery callback(s) raised; the first: {type(first).__name__}: {first}"
            ) from first

    # -- inspection (not part of the seam) ---------------------------------------------------

    @property
    def channel_failures(self) -> list[str]:
        """Why the broker closed a channel (unknown delivery tag, missing queue, other
        arguments...), oldest first: the client's bug or a test's expectation."""
        return self._core.channel_failures

    @property
    def deliveries(self) -> int:
        """Deliveries to consumers so far (``get`` not counted)."""
        return self._core.deliveries

    def queue_names(self) -> list[str]:
        return sorted(self._core.queues)

    def exchange_names(self) -> list[str]:
        return sorted(self._core.exchanges.kinds)

    def queue_depths(self) -> dict[str, int]:
        """Ready messages per queue (unacked deliveries not counted, as in RabbitMQ)."""
        return {name: len(queue) for name, queue in sorted(self._core.queues.items())}

    def messages(self, queue: str) -> list[Delivery]:
        """Copies of ``queue``'s ready messages in delivery order, left in place (tag 0)."""
        source = self._core.queue(queue, None)
        return [delivery_of(stored, 0) for stored in source.ready()]
