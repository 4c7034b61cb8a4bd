"""The leftover check: every queue and exchange a test run declares must be gone when it ends.

Each test process (pytest and the workers and schedulers it starts) appends the name of every
queue and exchange it declares to the file named by ``BJTEST_DECLARED_LOG``; at the end of the
session, ``find_leftovers`` asks the broker which of them still exist. Only names this session
declared are checked, so tests of other runs on a shared broker never count. Exclusive queues
die with their connection and are not recorded.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiormq
from aiormq.exceptions import ChannelClosed

LOG_ENV = "BJTEST_DECLARED_LOG"  # not BROKERJOBS_*: fault tests clear those for their workers


@dataclass(frozen=True, slots=True)
class Leftover:
    kind: str  # "queue" or "exchange"
    name: str
    messages: int | None = None

    def __str__(self) -> str:
        held = f" ({self.messages} message(s))" if self.messages else ""
        return f"{self.kind} {self.name}{held}"


def record_declarations() -> None:
    """Record every non-passive, named declare of this process (once; only if the log is set)."""
    path = os.environ.get(LOG_ENV)
    if not path or getattr(aiormq.Channel, "_bj_recorded", False):
        return
    queue_declare = aiormq.Channel.queue_declare
    exchange_declare = aiormq.Channel.exchange_declare

    async def recording_queue_declare(self: Any, queue: str = "", **kwargs: Any) -> Any:
        result = await queue_declare(self, queue, **kwargs)
        if queue and not kwargs.get("passive") and not kwargs.get("exclusive"):
            _append(path, "queue", queue)
        return result

    async def recording_exchange_declare(self: Any, exchange: str = "", **kwargs: Any) -> Any:
        result = await exchange_declare(self, exchange, **kwargs)
        if exchange and not kwargs.get("passive"):
            _append(path, "exchange", exchange)
        return result

    aiormq.Channel.queue_declare = recording_queue_declare  # type: ignore[method-assign]
    aiormq.Channel.exchange_declare = recording_exchange_declare  # type: ignore[method-assign]
    aiormq.Channel._bj_recorded = True  # type: ignore[attr-defined]


def _append(path: str, kind: str, name: str) -> None:
    # One write(2) on O_APPEND per name: lines of concurrent processes never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {name}\n".encode())
    finally:
        os.close(fd)


def declared(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The (kind, name) pairs in the log, each once, in first-declared order."""
    log = Path(path)
    if not log.exists():
        return []
    pairs = (line.split(" ", 1) for line in log.read_text().splitlines() if " " in line)
    return list(dict.fromkeys((kind, name) for kind, name in pairs))


async def find_leftovers(url: str, names: list[tuple[str, str]]) -> list[Leftover]:
    """Which of ``names`` still exist on the broker at ``url``."""
    connection = await aiormq.connect(url)
    found: list[Leftover] = []
    try:
        channel = await connection.channel()
        for kind, name in names:
            try:
                if kind == "queue":
                    ok = await channel.queue_declare(name, passive=True)
                    found.append(Leftover(kind, name, ok.message_count))
                else:
                    await channel.exchange_declare(name, passive=True)
                    found.append(Leftover(kind, name))
            except ChannelClosed:  # 404: gone, as it should be; the channel closed with it
                channel = await connection.channel()
    finally:
        await connection.close()
    return found


async def remove(url: str, leftovers: list[Leftover]) -> None:
    """Delete what a leaking test left, so that one leak does not haunt later runs."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for item in leftovers:
            with contextlib.suppress(ChannelClosed):
                if item.kind == "queue":
                    await channel.queue_delete(item.name)
                else:
                    await channel.exchange_delete(item.name)
    finally:
        await connection.close()
