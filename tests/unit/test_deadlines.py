"""One sweeping timer for every running handler: overdue ones are cancelled, and only they."""

from __future__ import annotations

import asyncio

import pytest

from brokerjobs.deadlines import DeadlineKeeper


async def run_with(keeper: DeadlineKeeper, seconds: float, work: asyncio.Event) -> str:
    deadline = keeper.start(seconds)
    try:
        try:
            await work.wait()
        finally:
            expired = keeper.finish(deadline)
    except asyncio.CancelledError:
        if expired:
            return "timed out"
        raise
    return "done"


async def test_an_overdue_handler_is_cancelled_and_told_apart_from_other_cancels() -> None:
    keeper = DeadlineKeeper(resolution=0.01)
    never, soon = asyncio.Event(), asyncio.Event()
    slow = asyncio.create_task(run_with(keeper, 0.05, never))
    quick = asyncio.create_task(run_with(keeper, 5.0, soon))
    soon.set()
    assert await asyncio.wait_for(slow, 5) == "timed out"
    assert await quick == "done"
    assert not slow.cancelling()  # the keeper took its cancellation back


async def test_a_shutdown_cancel_is_not_mistaken_for_a_timeout() -> None:
    keeper = DeadlineKeeper(resolution=0.01)
    task = asyncio.create_task(run_with(keeper, 60.0, asyncio.Event()))
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_sweep_stops_when_nothing_runs() -> None:
    keeper = DeadlineKeeper(resolution=0.01)
    done = asyncio.Event()
    done.set()
    assert await run_with(keeper, 1.0, done) == "done"
    await asyncio.sleep(0.03)
    assert keeper._sweep is None
