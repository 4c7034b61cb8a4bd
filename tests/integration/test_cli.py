"""The command line: clear errors and exit codes for bad settings, apps and brokers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.support.broker import TEST_URL, Broker

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "brokerjobs.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BROKERJOBS_URL": TEST_URL, **env},
        cwd=REPO,
        timeout=60,
        check=False,
    )


async def test_invalid_settings_stop_the_worker_with_the_setting_named() -> None:
    result = await asyncio.to_thread(
        run_cli, "worker", "examples.demo:app", BROKERJOBS_PREFETCH="0"
    )
    assert result.returncode == 2
    assert "BROKERJOBS_PREFETCH: Input should be greater than or equal to 1" in result.stderr


async def test_an_app_path_that_does_not_import_is_a_clear_error() -> None:
    result = await asyncio.to_thread(run_cli, "worker", "no_such_module:app")
    assert result.returncode == 1
    assert "cannot import 'no_such_module'" in result.stderr
    assert "PYTHONPATH" in result.stderr
    result = await asyncio.to_thread(run_cli, "worker", "examples.demo:nothing")
    assert "module 'examples.demo' has no attribute 'nothing'; its apps: app" in result.stderr
    result = await asyncio.to_thread(run_cli, "worker", "examples.demo:log")
    assert "is a Logger, not a brokerjobs App; its apps: app" in result.stderr
    assert "Traceback" not in result.stderr


async def test_an_unreachable_broker_fails_the_worker_without_leaking_the_password() -> None:
    result = await asyncio.to_thread(
        run_cli,
        "worker",
        "examples.demo:app",
        BROKERJOBS_URL="amqp://admin:sup3r-secret@127.0.0.1:1/",
        BROKERJOBS_CONNECT_TIMEOUT="1",
    )
    assert result.returncode == 1
    assert "cannot reach RabbitMQ at amqp://admin:***@127.0.0.1:1/" in result.stderr
    assert "sup3r-secret" not in result.stderr + result.stdout


async def test_topology_show_prints_the_plan() -> None:
    result = await asyncio.to_thread(run_cli, "topology", "show", "examples.demo:app")
    assert result.returncode == 0
    assert "demo.images.retry.1s" in result.stdout
    assert "x-dead-letter-routing-key='demo.images.parked'" in result.stdout


async def test_scheduler_command_publishes_ticks_and_stops_on_sigterm(broker: Broker) -> None:
    import signal

    from tests.support.broker import unique, wait_for
    from tests.support.sched_app import build_app, job_queue

    name = unique("schedcli")
    app = broker.track(build_app(name, 1.0))
    broker.track_queue(f"{name}.scheduler")
    from brokerjobs.provision import declare

    await declare(broker.connection, app.topology())
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerjobs.cli", "scheduler", "tests.support.sched_app:app"],
        env={**os.environ, "BROKERJOBS_URL": TEST_URL, "BJSCHED_NAME": name},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        async def ticked() -> bool:
            return await broker.depth(job_queue(name)) >= 2

        await wait_for(ticked, timeout=20)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 20)
    finally:
        process.kill()
    assert code == 0, process.stderr.read() if process.stderr else ""
