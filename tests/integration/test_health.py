"""Container probes: readiness follows the consumers, not just the socket."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from brokerjobs import App, ConfigError, job
from brokerjobs.health import probe
from brokerjobs.worker import Worker
from tests.support.broker import (
    TEST_HOST,
    TEST_PORT,
    TEST_URL,
    Broker,
    make_settings,
    running_worker,
    unique,
    wait_for,
)
from tests.support.proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]


@job("audit.write")
class WriteAudit(BaseModel):
    line: str


@job("audit.urgent", priority=5)
class UrgentAudit(BaseModel):
    line: str


def audit_app() -> App:
    app = App(unique("health"))

    @app.handler(WriteAudit)
    async def write(task: WriteAudit) -> None: ...

    return app


async def readyz(port: int) -> bool:
    return await asyncio.to_thread(probe, port, "/readyz")


async def not_ready(port: int) -> bool:
    return not await readyz(port)


async def test_readiness_turns_false_while_the_connection_is_cut_and_true_after(
    broker: Broker,
) -> None:
    app = broker.track(audit_app())
    async with TcpProxy(TEST_HOST, TEST_PORT) as proxy:
        settings = make_settings(url=proxy.url_for(TEST_URL), health_port=0)
        async with running_worker(app, settings) as worker:
            port = worker.health_port
            assert port is not None
            assert await readyz(port)
            assert await asyncio.to_thread(probe, port, "/healthz")

            proxy.pause()  # refuse reconnects until we say so
            proxy.cut()
            await wait_for(lambda: not_ready(port), timeout=10)
            assert await asyncio.to_thread(probe, port, "/healthz")  # alive, just not ready

            proxy.resume()
            await wait_for(lambda: readyz(port), timeout=15)
            assert worker.reconnects >= 1


async def test_readiness_recovers_after_the_queue_is_deleted_under_the_worker(
    broker: Broker,
) -> None:
    app = broker.track(audit_app())
    queue = f"{app.name}.audit.write"
    async with running_worker(app, make_settings(health_port=0)) as worker:
        port = worker.health_port
        assert port is not None
        seen_not_ready = asyncio.Event()

        async def watch() -> None:
            while not seen_not_ready.is_set():
                if not worker.ready:
                    seen_not_ready.set()
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        channel = await broker.fresh_channel()
        await channel.delete_queue(queue)
        await asyncio.wait_for(seen_not_ready.wait(), 10)
        watcher.cancel()
        await wait_for(lambda: readyz(port), timeout=15)
        state = await broker.state(queue)  # declared again, consumed again
        assert state.consumers == 1


async def test_health_command_exit_codes(broker: Broker) -> None:
    app = broker.track(audit_app())
    async with running_worker(app, make_settings(health_port=0)) as worker:
        ok = await asyncio.to_thread(_health_cli, worker.health_port)
        assert ok.returncode == 0, ok.stdout + ok.stderr
    down = await asyncio.to_thread(_health_cli, 1)
    assert down.returncode == 1


def _health_cli(port: int | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "brokerjobs.cli", "health", "--port", str(port)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
        env={**os.environ, "BROKERJOBS_URL": TEST_URL},
    )


async def test_stats_lists_depth_and_consumers_of_every_queue(
    broker: Broker, tmp_path: Path
) -> None:
    async with running_worker(broker.track(_importable_app(tmp_path))):
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "brokerjobs.cli", "stats", "statsapp:app", "--json"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=30,
            check=False,
            env={**os.environ, "BROKERJOBS_URL": TEST_URL, "PYTHONPATH": f"{tmp_path}:{REPO}"},
        )
    assert result.returncode == 0, result.stderr
    rows = {row["queue"]: row for row in json.loads(result.stdout)}
    main = next(r for r in rows.values() if r["role"] == "main")
    assert main["consumers"] == 1
    assert {r["role"] for r in rows.values()} == {"main", "retry", "parking"}


def _importable_app(tmp_path: Path) -> App:
    name = unique("stats")
    (tmp_path / "statsapp.py").write_text(
        "from tests.integration.test_health import WriteAudit\n"
        "from brokerjobs import App\n"
        f"app = App({name!r})\n"
        "@app.handler(WriteAudit)\n"
        "async def write(task: WriteAudit) -> None: ...\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import statsapp  # type: ignore[import-not-found]

        return statsapp.app  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(tmp_path))


async def test_start_up_checks_fail_loudly_with_the_fix(broker: Broker) -> None:
    with pytest.raises(ConfigError, match="consumer_timeout"):
        await Worker(audit_app(), make_settings(job_timeout=3600)).run()


async def test_start_up_check_of_quorum_priorities_follows_the_broker_version(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """3.x ignores priorities on quorum queues: refused. 4.0-4.2 have two levels: a warning
    that says what happens instead. 4.3+ honour 0-31: nothing to say about priority 5."""
    app = App(unique("checks"), queue_kind="quorum")

    @app.handler(UrgentAudit)
    async def urgent(task: UrgentAudit) -> None: ...

    broker.track(app)
    version = broker.connection.server_version
    if version < (4, 0):
        with pytest.raises(ConfigError, match="ignores on quorum queues") as info:
            await Worker(app, make_settings()).run()
        assert "use a classic queue" in str(info.value)
        return
    with caplog.at_level(logging.WARNING, "brokerjobs.worker"):
        async with running_worker(app):
            pass
    warnings = [r.getMessage() for r in caplog.records if "priorities" in r.getMessage()]
    if version < (4, 3):
        [warning] = warnings
        assert "two priority levels only" in warning
        assert "'audit.urgent' (5) run as high" in warning
    else:
        assert warnings == []
