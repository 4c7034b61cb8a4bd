"""``brokerjobs worker --processes N``: N worker processes of one app under a small supervisor.

Each child is an ordinary ``brokerjobs worker`` with its own connection and a health endpoint
on a loopback port the supervisor chose. SIGTERM (or SIGINT) is passed to every child, which
drains; a child that dies is logged and started again with backoff. The supervisor's own
``/readyz`` is 200 only while every child answers its ``/readyz`` with 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from brokerjobs.health import HealthServer, probe
from brokerjobs.settings import Settings

log = logging.getLogger("brokerjobs.supervisor")

RESTART_MIN_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_CHILD_S = 60.0  # a child that ran this long resets its restart backoff
PROBE_INTERVAL_S = 2.0
STOP_MARGIN_S = 10.0  # beyond the children's own shutdown grace


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Child:
    index: int
    health_port: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restart_delay: float = RESTART_MIN_DELAY_S
    ready: bool = False
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs ``processes`` workers of ``app_path`` until ``stop()``; ``run()`` returns 0 or 1."""

    def __init__(self, app_path: str, processes: int, settings: Settings, argv: list[str]) -> None:
        self.app_path = app_path
        self.settings = settings
        self._argv = argv  # extra worker arguments passed on to every child (e.g. --queues)
        self._children = [_Child(i, _free_loopback_port()) for i in range(processes)]
        self._stop = asyncio.Event()
        self.health_port: int | None = None

    @property
    def ready(self) -> bool:
        return all(c.ready and c.process is not None and c.process.returncode is None
                   for c in self._children)  # fmt: skip

    def details(self) -> dict[str, Any]:
        return {
            "processes": [
                {"pid": c.process.pid if c.process else None, "ready": c.ready,
                 "restarts": c.restarts}
                for c in self._children
            ]
        }  # fmt: skip

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        health = HealthServer(lambda: self.ready, self.details)
        if self.settings.health_port is not None:
            await health.start(self.settings.health_port, self.settings.health_host)
            self.health_port = health.port
        tasks = [asyncio.create_task(self._keep_running(child)) for child in self._children]
        prober = asyncio.create_task(self._probe_children())
        try:
            await self._stop.wait()
            # The restart loops end first: one caught spawning a child would set child.process
            # after _stop_child looked, and that worker would outlive the supervisor.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            codes = await asyncio.gather(*(self._stop_child(c) for c in self._children))
        finally:
            prober.cancel()
            for task in tasks:
                task.cancel()
            await health.stop()
        return 0 if all(code == 0 for code in codes) else 1

    async def _keep_running(self, child: _Child) -> None:
        while not self._stop.is_set():
            await self._start(child)
            assert child.process is not None
            code = await child.process.wait()
            child.ready = False
            if self._stop.is_set():
                return
            child.exit_codes.append(code)
            lived = time.monotonic() - child.started_at
            if lived >= STABLE_CHILD_S:
                child.restart_delay = RESTART_MIN_DELAY_S
            log.warning(
                "worker process %d (pid %d) exited with %d after %.1fs; restarting in %.1fs",
                *(child.index, child.process.pid, code, lived, child.restart_delay),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), child.restart_delay)
            child.restart_delay = min(child.restart_delay * 2, RESTART_MAX_DELAY_S)
            child.restarts += 1

    async def _start(self, child: _Child) -> None:
        if child.exit_codes:  # a fresh port: the last may have been taken since it was chosen
            child.health_port = _free_loopback_port()
        env = dict(os.environ)
        env["BROKERJOBS_HEALTH_PORT"] = str(child.health_port)
        env["BROKERJOBS_HEALTH_HOST"] = "127.0.0.1"
        env["BROKERJOBS_URL"] = self.settings.url.get_secret_value()  # as given to the CLI
        env["BROKERJOBS_LOG_FORMAT"] = self.settings.log_format
        command = [sys.executable, "-m", "brokerjobs.cli", "worker", self.app_path, *self._argv]
        child.process = await asyncio.create_subprocess_exec(
            *command, env=env, stdin=asyncio.subprocess.DEVNULL
        )
        child.started_at = time.monotonic()
        log.info("started worker process %d (pid %d)", child.index, child.process.pid)

    async def _probe_children(self) -> None:
        while True:
            for child in self._children:
                alive = child.process is not None and child.process.returncode is None
                child.ready = alive and await asyncio.to_thread(
                    probe, child.health_port, "/readyz", "127.0.0.1", 1.0
                )
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _stop_child(self, child: _Child) -> int:
        process = child.process
        if process is None or process.returncode is not None:
            return 0  # not running: its exit was logged (and it was to be restarted)
        process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(
                process.wait(), self.settings.shutdown_grace + STOP_MARGIN_S
            )
        except TimeoutError:
            log.error(
                "worker process %d (pid %d) did not stop: killing it", child.index, process.pid
            )
            process.kill()
            return await process.wait() or 1


async def run_supervisor(app_path: str, processes: int, settings: Settings, argv: list[str]) -> int:
    """Run the supervisor with SIGTERM/SIGINT handlers that drain every child."""
    supervisor = Supervisor(app_path, processes, settings, argv)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stop)
    try:
        return await supervisor.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
