"""Driving the in-memory broker from a test: run deliveries until a condition holds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from brokerjobs.broker.memory import MemoryBroker, StillBusy

Predicate = Callable[[], bool | Awaitable[bool]]


async def holds(predicate: Predicate) -> bool:
    result = predicate()
    return result if isinstance(result, bool) else await result


async def drive_until(memory: MemoryBroker, predicate: Predicate, timeout: float = 15.0) -> None:
    """Let deliveries run; jump the virtual clock to the next expiry while none is due. A
    handler still running on real time (a slow one, a timer) is no reason to stop looking."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await holds(predicate):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (memory broker)")
        try:
            await memory.run_until_idle(stuck_after=0.05)
        except StillBusy:
            continue
        if await holds(predicate):
            return
        due = memory.next_expiry()
        if due is not None:
            await memory.advance(max(due - memory.clock.now, 0.0))
        else:
            await asyncio.sleep(0.01)
