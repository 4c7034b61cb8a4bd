"""``brokerjobs worker --processes 2``: two worker processes share the queue, a killed one is
started again, readiness needs both, and SIGTERM drains both (exit 0)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from brokerjobs.health import probe
from brokerjobs.provision import declare
from brokerjobs.publisher import Publisher
from tests.support.broker import TEST_URL, Broker, make_settings, unique, wait_for
from tests.support.fault_app import LOG_ENV, NAME_ENV, FaultJob, build_app, read_records

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ready(port: int) -> bool:
    return await asyncio.to_thread(probe, port, "/readyz", "127.0.0.1", 1.0)


async def test_two_worker_processes_share_work_restart_and_drain(
    broker: Broker, tmp_path: Path
) -> None:
    name, records, port = unique("super"), tmp_path / "records", free_port()
    app = broker.track(build_app(name, records, 0.0))
    await declare(broker.connection, app.topology())
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKERJOBS_")}
    env.update(BROKERJOBS_URL=TEST_URL, BROKERJOBS_HEALTH_PORT=str(port), BROKERJOBS_PREFETCH="5")
    env.update({NAME_ENV: name, LOG_ENV: str(records), "PYTHONUNBUFFERED": "1"})
    output = (tmp_path / "supervisor.log").open("wb")
    command = [sys.executable, "-m", "brokerjobs.cli", "worker", "tests.support.fault_app:app"]
    supervisor = subprocess.Popen(
        [*command, "--processes", "2"], cwd=REPO_ROOT, env=env, stdout=output, stderr=output
    )
    try:
        await wait_for(lambda: ready(port), timeout=30, interval=0.2)
        async with Publisher(make_settings(), exchange=app.exchange) as publisher:
            ids = await publisher.publish_many([FaultJob(n=i) for i in range(400)])
        await wait_for(lambda: set(read_records(records).done_ids()) >= set(ids), timeout=60)
        pids = {pid for _, pid in read_records(records).done}

        os.kill(next(iter(pids)), signal.SIGKILL)  # a child dies: not ready, then started again
        await wait_for(lambda: not_ready(port), timeout=15, interval=0.1)
        await wait_for(lambda: ready(port), timeout=30, interval=0.2)

        supervisor.send_signal(signal.SIGTERM)
        await wait_for(lambda: supervisor.poll() is not None, timeout=60)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        output.close()
    log = (tmp_path / "supervisor.log").read_text()
    assert supervisor.returncode == 0, log[-3000:]
    assert len(pids) == 2, pids  # both processes took jobs
    assert "exited with -9" in log and "restarting in" in log, log[-3000:]


async def not_ready(port: int) -> bool:
    return not await ready(port)
