"""The command line: clear errors and exit codes for bad settings, apps and brokers."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs import envelope as wire
from brokerjobs.cli_support import Exit
from brokerjobs.provision import declare
from tests.support.broker import TEST_URL, Broker, unique, wait_for

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


# --- exit codes (docs/cli.md, "Exit codes"), errors for people, output for people and scripts


@job("note.write")
class Note(BaseModel):
    text: str


def documented_exit_codes() -> dict[int, str]:
    section = (REPO / "docs" / "cli.md").read_text().split("\n## Exit codes\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return {int(m[1]): m[2].strip() for m in re.finditer(r"^\| (\d+) \| ([^|]+) \|", section, re.M)}


def test_the_exit_codes_are_the_documented_ones() -> None:
    assert documented_exit_codes() == {
        0: "done", 1: "failure", 2: "usage", 3: "queue not found", 4: "nothing matched",
        130: "interrupted",
    }  # fmt: skip
    assert {int(code) for code in Exit} == set(documented_exit_codes())


async def parked_queue(broker: Broker) -> str:
    """A queue with one job parked as a worker parks it."""
    queue = unique("cliexit")
    channel = await broker.fresh_channel()
    for name in (queue, f"{queue}.parked"):
        broker.track_queue(name)
        await channel.declare_queue(name, {})
    message = wire.encode(
        Note(text="hi"),
        headers={"bj-park-reason": "card declined", "bj-error-type": "PermanentFailure"},
    )
    assert not await channel.publish_many([(message, "", f"{queue}.parked")], 10)
    await wait_for(lambda: broker.depth_is(f"{queue}.parked", 1), timeout=5)
    return queue


async def test_each_documented_exit_code_for_its_cases(broker: Broker, tmp_path: Path) -> None:
    queue = await parked_queue(broker)
    cases = [
        (0, ["parked", "list", queue], "1 of 1 parked job(s)"),
        (0, ["parked", "list", queue, "--job", "nope"], "0 of 1 parked job(s)"),
        (1, ["worker", "no_such_module:app"], "cannot import 'no_such_module'"),
        (1, ["health", "--port", "1"], "/readyz: FAILING"),
        (2, ["parked", "list", queue, "--older-than", "soon"], "is not a duration like 30s"),
        (2, ["stats", "examples.demo:app", "--no-such-option"], "No such option"),
        (2, ["parked", "purge", queue], "refusing to purge without --yes (no terminal to ask)"),
        (2, ["parked", "purge", queue, "--expect-checksum", "ab"], "needs --expect-count"),
        (2, ["health"], "give --port or set BROKERJOBS_HEALTH_PORT"),
        (3, ["parked", "list", f"{queue}.nothing"], "does not exist"),
        (4, ["parked", "replay", queue, "--job", "nope"], "replayed 0 job(s)"),
        (4, ["parked", "purge", queue, "--job", "nope", "--yes"], "purged 0 job(s)"),
        (4, ["parked", "export", queue, str(tmp_path / "x.jsonl"), "--job", "nope"], "exported 0"),
        (4, ["parked", "show", queue, "no-such-id"], "no parked job 'no-such-id'"),
    ]
    for code, args, says in cases:
        result = await asyncio.to_thread(run_cli, *args, BROKERJOBS_HEALTH_PORT="")
        output = result.stdout + result.stderr
        assert (result.returncode, says in output) == (code, True), f"{args}:\n{output}"
        assert "Traceback" not in output, args
    assert await broker.depth(f"{queue}.parked") == 1  # nothing moved


async def test_tracebacks_only_with_debug_and_never_the_password() -> None:
    secret = {"BROKERJOBS_URL": "amqp://admin:sup3r-secret@127.0.0.1:1/"}
    quiet = await asyncio.to_thread(run_cli, "worker", "no_such_module:app")
    assert "Traceback" not in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) == 1  # one line naming the fix
    for debug in (["--debug"], []):
        env = {} if debug else {"BROKERJOBS_LOG_LEVEL": "DEBUG"}
        loud = await asyncio.to_thread(run_cli, *debug, "worker", "no_such_module:app", **env)
        assert loud.returncode == 1
        assert "Traceback" in loud.stderr and "cannot import 'no_such_module'" in loud.stderr
        down = await asyncio.to_thread(
            run_cli,
            *debug,
            "stats",
            "examples.demo:app",
            BROKERJOBS_CONNECT_TIMEOUT="1",
            **secret,
            **env,
        )
        assert down.returncode == 1
        assert "amqp://admin:***@127.0.0.1:1/" in down.stderr
        assert "sup3r-secret" not in down.stdout + down.stderr


async def test_stats_reads_every_queue_when_some_are_missing(broker: Broker) -> None:
    name = unique("clistats")
    app = App(name)
    app.handler(Note)(_ignore)
    broker.track(app)
    plan = app.topology()
    await declare(broker.connection, plan)
    main = next(q.name for q in plan.queues if q.role == "main")
    tiers = [q.name for q in plan.queues if q.role == "retry"]
    channel = await broker.fresh_channel()
    for tier in tiers[::2]:  # every other one: missing, present, missing...
        await channel.delete_queue(tier)
    await channel.publish(wire.encode(Note(text="x")), "", main)
    await wait_for(lambda: broker.depth_is(main, 1), timeout=5)
    result = await asyncio.to_thread(
        run_cli, "stats", "tests.support.clistats_app:app", "--json", CLISTATS_APP=name
    )
    assert result.returncode == 0, result.stderr
    rows = {row["queue"]: row for row in json.loads(result.stdout)}
    assert [q for q, row in rows.items() if row.get("missing")] == tiers[::2]
    assert rows[main]["messages"] == 1
    assert all(rows[t]["messages"] == 0 for t in tiers[1::2])


async def _ignore(_: BaseModel) -> None:
    pass


def run_on_terminal(*args: str, stream: str) -> str:
    """What the CLI writes to ``stream`` (stdout or stderr) when that is a terminal."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "brokerjobs.cli", *args],
        stdout=follower if stream == "stdout" else subprocess.DEVNULL,
        stderr=follower if stream == "stderr" else subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "BROKERJOBS_URL": TEST_URL, "TERM": "xterm-256color"},
        cwd=REPO,
    )
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the process closed the terminal
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    os.close(leader)
    process.wait(timeout=60)
    return b"".join(chunks).decode()


async def test_tables_for_people_on_a_terminal_plain_for_scripts(broker: Broker) -> None:
    queue = await parked_queue(broker)
    terminal = await asyncio.to_thread(run_on_terminal, "parked", "list", queue, stream="stdout")
    assert "\x1b[1mID" in terminal and "─" in terminal  # a bold header and a rule
    piped = await asyncio.to_thread(run_cli, "parked", "list", queue)
    header, row, total = piped.stdout.splitlines()
    assert total.startswith("1 of 1 parked job(s)")
    assert header.split() == ["ID", "JOB", "ERROR", "ATTEMPTS", "PARKED", "AT"]
    assert row.split()[1:4] == ["note.write", "card", "declined"]
    assert "\x1b" not in piped.stdout and "─" not in piped.stdout
    assert all(line == line.rstrip() for line in piped.stdout.splitlines())
    progress = await asyncio.to_thread(run_on_terminal, "parked", "replay", queue, stream="stderr")
    assert "scanning" in progress and "1/1" in progress
    assert await broker.depth(queue) == 1  # replayed
