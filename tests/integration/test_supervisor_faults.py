"""The ``--processes`` supervisor when a child cannot start, or starts as it stops."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from brokerjobs import supervisor as supervising
from brokerjobs.provision import declare
from brokerjobs.supervisor import Supervisor
from tests.support.broker import TEST_URL, Broker, make_settings, unique, wait_for
from tests.support.fault_app import LOG_ENV, NAME_ENV, build_app


async def test_a_child_whose_health_port_was_taken_is_started_again_on_another(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique("superport")
    app = broker.track(build_app(name, tmp_path / "records", 0.0))
    await declare(broker.connection, app.topology())
    for variable, value in {NAME_ENV: name, LOG_ENV: str(tmp_path / "records")}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("BROKERJOBS_URL", TEST_URL)
    with socket.socket() as taken:  # another process took the port the supervisor chose
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        free = supervising._free_loopback_port
        monkeypatch.setattr(supervising, "_free_loopback_port", lambda: next(ports, None) or free())
        supervisor = Supervisor("tests.support.fault_app:app", 1, make_settings(), [])
        task = asyncio.create_task(supervisor.run())
        try:
            await wait_for(lambda: task.done() or supervisor.ready, 30, interval=0.2)
            assert not task.done()
        finally:
            supervisor.stop()
            code = await asyncio.wait_for(task, 60)
    assert code == 0
    assert supervisor.details()["processes"][0]["restarts"] >= 1


async def test_a_child_started_while_the_supervisor_stops_does_not_outlive_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The window: stop() comes while a child is being spawned; _stop_child looks before the
    spawn has returned, so it sees no process. That child must still be stopped."""
    spawned: list[asyncio.subprocess.Process] = []
    looked = asyncio.Event()
    real_spawn, real_stop_child = asyncio.create_subprocess_exec, Supervisor._stop_child

    async def spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        process = await real_spawn(*args, **kwargs)
        spawned.append(process)
        try:
            await looked.wait()  # the spawn returns only once _stop_child has looked
        except asyncio.CancelledError:
            process.kill()  # what asyncio does to a process whose spawn is cancelled
            await process.wait()
            raise
        return process

    async def stop_child(self: Supervisor, child: Any) -> int:
        code = await real_stop_child(self, child)
        looked.set()
        return code

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)  # as supervisor calls it
    monkeypatch.setattr(Supervisor, "_stop_child", stop_child)
    supervisor = Supervisor("tests.support.sleepy_app:app", 1, make_settings(), [])
    task = asyncio.create_task(supervisor.run())
    try:
        await wait_for(lambda: bool(spawned), 10)
        supervisor.stop()
        await asyncio.wait_for(task, 30)
        assert spawned[0].returncode is not None, "the child outlived its supervisor"
    finally:
        if spawned and spawned[0].returncode is None:
            spawned[0].kill()
            await spawned[0].wait()
