"""A killed scheduler process: the standby scheduler (another process) takes over within
seconds; at most the tick in flight at the kill is published twice, with one message id.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from brokerjobs.envelope import Delivery
from brokerjobs.provision import declare
from brokerjobs.scheduler import scheduler_queue
from tests.support.broker import Broker, unique, wait_for
from tests.support.child import LoggedProcess, child_env
from tests.support.sched_app import EVERY_ENV, NAME_ENV, SCHEDULE_NAME, Tick, build_app, job_queue
from tests.support.ticks import assert_consecutive, assert_job_ids


class SchedulerProcess(LoggedProcess):
    """``python -m tests.support.sched_app``: the sched app's scheduler, output to a file."""

    def __init__(self, name: str, output: Path) -> None:
        env = child_env({NAME_ENV: name, EVERY_ENV: "1"})
        super().__init__(["tests.support.sched_app"], env, output)

    def check(self) -> bool:
        """False (for ``check() or condition``); raises if the process has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"scheduler exited with {self.proc.returncode}:\n{self.log()}")
        return False


@contextlib.contextmanager
def scheduler_processes(tmp_path: Path) -> Iterator[Callable[[str, str], SchedulerProcess]]:
    started: list[SchedulerProcess] = []

    def start(name: str, label: str) -> SchedulerProcess:
        process = SchedulerProcess(name, tmp_path / f"{label}.log")
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


class Received:
    """Jobs taken from the queue, each with the monotonic time it was seen."""

    def __init__(self, broker: Broker, queue: str) -> None:
        self.broker, self.queue = broker, queue
        self.jobs: list[tuple[Delivery, Tick, float]] = []

    async def poll(self) -> None:
        for delivery in await self.broker.drain(self.queue):
            self.jobs.append((delivery, Tick.model_validate_json(delivery.body), time.monotonic()))

    def by(self, pid: int) -> list[tuple[Delivery, Tick, float]]:
        return [job for job in self.jobs if job[1].pid == pid]

    def until(
        self, condition: Callable[[], bool], *processes: SchedulerProcess
    ) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            for process in processes:
                process.check()
            await self.poll()
            return condition()

        return check


@pytest.mark.slow
async def test_a_killed_leader_process_hands_over_to_the_other(
    broker: Broker, tmp_path: Path
) -> None:
    name = unique("schedkill")
    app = build_app(name, 1.0)
    broker.track(app)
    broker.track_queue(scheduler_queue(app))
    await declare(broker.connection, app.topology())
    received = Received(broker, job_queue(name))

    with scheduler_processes(tmp_path) as start:
        a, b = await leader_and_standby(start, name, received)
        a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await wait_for(received.until(lambda: len(received.by(b.pid)) >= 3, b), 10, interval=0.05)
        takeover = received.by(b.pid)[0][2] - killed

        b.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: b.proc.poll() is not None, 10)
        assert b.proc.returncode == 0, b.log()
    await received.poll()
    check_handover(received, a.pid, b.pid, takeover, app.exchange)


async def leader_and_standby(
    start: Callable[[str, str], SchedulerProcess], name: str, received: Received
) -> tuple[SchedulerProcess, SchedulerProcess]:
    """Process a publishing ticks, process b standing by (and publishing none)."""
    a = start(name, "a")
    await wait_for(received.until(lambda: bool(received.by(a.pid)), a), 20, interval=0.05)
    b = start(name, "b")
    await wait_for(lambda: b.check() or "standing by" in b.log(), 20)
    b.check()
    before = len(received.by(a.pid))
    await wait_for(received.until(lambda: len(received.by(a.pid)) >= before + 3, a, b), 10)
    assert not received.by(b.pid), "the standby published while the leader was alive"
    return a, b


def check_handover(received: Received, a: int, b: int, takeover: float, exchange: str) -> None:
    from_a, from_b = received.by(a), received.by(b)
    counts = Counter(tick.at for _, tick, _ in received.jobs)
    duplicates = sorted(at for at, n in counts.items() if n > 1)
    print(
        f"{len(counts)} ticks: {len(from_a)} from the killed leader, {len(from_b)} from the "
        f"other; first tick of the other {takeover * 1000:.0f} ms after the kill; "
        f"duplicated ticks (in flight at the kill): {len(duplicates)} {duplicates}"
    )
    assert takeover < 3
    assert_consecutive(sorted(counts))
    assert_job_ids([d for d, _, _ in received.jobs], exchange, SCHEDULE_NAME)
    # At most the tick in flight at the kill: published by both, with the same message id.
    assert len(duplicates) <= 1 and all(counts[at] == 2 for at in duplicates)
    last_of_a = max(tick.at for _, tick, _ in from_a)
    assert duplicates in ([], [last_of_a])
    assert all(tick.at >= last_of_a for _, tick, _ in from_b)
