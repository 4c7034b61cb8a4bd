"""``topology diff`` and ``prune`` against the real broker: an app whose retry delays changed.

The app lives in a module written to a temporary directory, so the real command imports it; its
name and delays come from the environment, and the test builds the same app in-process to
declare and track it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from brokerjobs import App, RetryPolicy, job
from brokerjobs.envelope import Delivery, OutgoingMessage, new_job_id
from brokerjobs.errors import TopologyError
from brokerjobs.provision import declare
from tests.support.broker import (
    TEST_HOST,
    TEST_PORT,
    TEST_URL,
    Broker,
    running_worker,
    unique,
    wait_for,
)
from tests.support.matrix import FORCED_KIND
from tests.support.proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
OLD_DELAYS, NEW_DELAYS = "60,300", "120,600"  # long tiers: nothing expires during the test
APP_SOURCE = textwrap.dedent(
    """
    import os
    from pydantic import BaseModel
    from brokerjobs import App, RetryPolicy, job
    from tests.support.matrix import force_queue_kind

    force_queue_kind()  # the test run's queue kind (BJTEST_QUEUE_KIND), as in-process

    DELAYS = tuple(float(d) for d in os.environ["PRUNE_DELAYS"].split(","))

    @job("task.run", retry=RetryPolicy(delays=DELAYS, max_attempts=3))
    class Task(BaseModel):
        n: int

    app = App(os.environ["PRUNE_APP"])
    app.queue(os.environ["PRUNE_APP"] + ".tasks", "task.#")

    @app.handler(Task, queue=os.environ["PRUNE_APP"] + ".tasks")
    async def run(task: Task) -> None:
        pass
    """
)


class Task(BaseModel):
    n: int


def make_app(name: str, delays: str) -> App:
    spec = job("task.run", retry=RetryPolicy(tuple(float(d) for d in delays.split(",")), 3))
    app = App(name)
    app.queue(f"{name}.tasks", "task.#")

    async def run(_: BaseModel) -> None:
        pass

    app.handler(spec(type("Task", (Task,), {})), queue=f"{name}.tasks")(run)
    return app


def cli(tmp: Path, name: str, *args: str, url: str = TEST_URL) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BROKERJOBS_URL": url,
        "PYTHONPATH": f"{tmp}{os.pathsep}{REPO}",
        "PRUNE_APP": name,
        "PRUNE_DELAYS": NEW_DELAYS,
    }
    return subprocess.run(
        [sys.executable, "-m", "brokerjobs.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


async def changed_app(broker: Broker, tmp: Path) -> tuple[str, str]:
    """Declare the old topology then the new one; 3 jobs wait in the old 1m tier."""
    (tmp / "prune_app.py").write_text(APP_SOURCE)
    name = unique("prune")
    old, new = broker.track(make_app(name, OLD_DELAYS)), broker.track(make_app(name, NEW_DELAYS))
    await declare(broker.connection, old.topology())
    await declare(broker.connection, new.topology())
    channel = await broker.fresh_channel()
    tier = f"{name}.tasks.retry.1m"
    for n in range(3):
        message = OutgoingMessage(
            f'{{"n": {n}}}'.encode(), new_job_id(), "task.run", None, {"bj-attempt": 2}
        )
        message.expiration_ms = 3_600_000
        await channel.publish(message, "", tier)
    return name, tier


async def test_diff_shows_the_old_tiers_of_an_app_whose_delays_changed(
    broker: Broker, tmp_path: Path
) -> None:
    name, _ = await changed_app(broker, tmp_path)
    result = await asyncio.to_thread(cli, tmp_path, name, "topology", "diff", "prune_app:app")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"obsolete {name}.tasks.retry.1m (3 message(s)): retry tier 1m is no longer in "
        f"{name}.tasks's policy",
        f"obsolete {name}.tasks.retry.5m (0 message(s)): retry tier 5m is no longer in "
        f"{name}.tasks's policy",
    ]


async def test_where_queues_cannot_be_listed_diff_says_so_and_finds_the_usual_tiers(
    broker: Broker, tmp_path: Path
) -> None:
    name, _ = await changed_app(broker, tmp_path)
    async with TcpProxy(TEST_HOST, TEST_PORT) as proxy:  # another port: rabbitmqctl cannot tell
        result = await asyncio.to_thread(
            cli, tmp_path, name, "topology", "diff", "prune_app:app", url=proxy.url_for(TEST_URL)
        )
    assert result.returncode == 0, result.stderr
    assert "cannot list the broker's queues: AMQP has no way to" in result.stderr
    assert "Guessing instead" in result.stderr
    assert [line.split(" (")[0] for line in result.stdout.splitlines()] == [
        f"obsolete {name}.tasks.retry.1m",
        f"obsolete {name}.tasks.retry.5m",
    ]


async def test_prune_removes_the_empty_tiers_and_keeps_the_one_with_jobs(
    broker: Broker, tmp_path: Path
) -> None:
    name, tier = await changed_app(broker, tmp_path)
    refused = await asyncio.to_thread(cli, tmp_path, name, "topology", "prune", "prune_app:app")
    assert refused.returncode == 2
    assert "refusing to prune without --yes (no terminal to ask)" in refused.stderr
    assert await broker.depth(f"{name}.tasks.retry.5m") == 0  # still there: nothing pruned
    result = await asyncio.to_thread(
        cli, tmp_path, name, "topology", "prune", "prune_app:app", "--yes"
    )
    assert result.returncode == 1
    assert await broker.depth(tier) == 3
    if FORCED_KIND == "quorum":  # no if-empty delete for quorum queues: both kept, and why
        assert f"kept {name}.tasks.retry.5m: RabbitMQ cannot delete a quorum queue" in (
            result.stderr
        )
        assert f"`rabbitmqctl delete_queue {tier}`" in result.stderr
        assert await exists(broker, f"{name}.tasks.retry.5m")
        return
    assert f"deleted {name}.tasks.retry.5m" in result.stdout
    assert f"kept {tier}: holds messages: use --drain to move them first" in result.stderr
    assert not await exists(broker, f"{name}.tasks.retry.5m")


async def test_prune_drain_moves_every_job_to_the_main_queue_then_deletes_the_tier(
    broker: Broker, tmp_path: Path
) -> None:
    name, tier = await changed_app(broker, tmp_path)
    before = {d.message_id for d in await peek(broker, tier)}
    result = await asyncio.to_thread(
        cli, tmp_path, name, "topology", "prune", "prune_app:app", "--drain", "--yes"
    )
    assert f"moved 3 message(s) from {tier}" in result.stdout
    assert (
        await broker.depth(tier) == 0 if FORCED_KIND == "quorum" else not await exists(broker, tier)
    )
    moved = await broker.drain(f"{name}.tasks")
    assert sorted(str(d.message_id) for d in moved) == sorted(
        map(str, before)
    )  # 0 lost, none duplicated
    assert all(d.expiration is None for d in moved)
    assert all(d.headers["bj-original-expiration"] == "3600000" for d in moved)
    assert all(d.headers["bj-attempt"] == 2 for d in moved)
    if FORCED_KIND == "quorum":
        assert result.returncode == 1
        assert f"kept {tier}: drained, but RabbitMQ cannot delete a quorum queue" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert "pruned 2 queue(s), moved 3 message(s), kept 0" in result.stdout
    again = await asyncio.to_thread(cli, tmp_path, name, "topology", "diff", "prune_app:app")
    assert again.stdout.strip() == "the broker matches the plan: nothing obsolete, nothing differs"


async def exists(broker: Broker, queue: str) -> bool:
    try:
        await broker.state(queue)
    except TopologyError:
        return False
    return True


async def peek(broker: Broker, queue: str) -> list[Delivery]:
    """The messages in ``queue``, returned to it (nothing acked)."""
    channel = await broker.connection.channel(confirms=False)
    taken: list[Delivery] = []
    while (delivery := await channel.get(queue)) is not None:
        taken.append(delivery)
    await channel.close()  # unacked: the broker puts them back
    return taken


async def test_the_worker_warns_at_start_up_about_an_old_tier_that_holds_jobs(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name, tier = await changed_app(broker, tmp_path)
    caplog.set_level(logging.WARNING, logger="brokerjobs.worker")

    def warned() -> bool:
        return any(tier in r.getMessage() for r in caplog.records)

    async with running_worker(make_app(name, NEW_DELAYS)):
        await wait_for(warned, timeout=10)
    (text,) = [r.getMessage() for r in caplog.records if tier in r.getMessage()]
    assert text == (
        f"obsolete queue {tier} holds 3 job(s) (retry tier 1m is no longer in {name}.tasks's "
        f"policy): they return to {name}.tasks when their delay ends; move them now and delete "
        "the tier with `brokerjobs topology prune MODULE:APP --drain`"
    )
    assert not any(f"{name}.tasks.retry.5m" in r.getMessage() for r in caplog.records)  # empty
