"""The ``--processes`` supervisor when a child cannot start: it is started again, never stuck."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

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
