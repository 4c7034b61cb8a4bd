"""A worker's text log has one line per event whatever producers put in ids and job names:
a newline or an escape sequence in a message id cannot forge a log line or hide one."""

from __future__ import annotations

import signal
from pathlib import Path

from brokerjobs.envelope import OutgoingMessage
from brokerjobs.provision import declare
from tests.support.broker import Broker, unique, wait_for
from tests.support.child import LoggedProcess, child_env
from tests.support.poison_app import JOB_NAME, build_app

FORGED = "x\n2026-12-01 00:00:00,000 INFO brokerjobs.consumer completed all jobs\x1b[1A\x1b[2K"


async def test_a_message_id_with_a_newline_and_escapes_stays_on_its_own_log_line(
    broker: Broker, tmp_path: Path
) -> None:
    name = unique("loglines")
    app = broker.track(build_app(name, str(tmp_path / "records")))
    await declare(broker.connection, app.topology())
    channel = await broker.fresh_channel()
    for body in (b'{"n": 1}', b"not json"):  # one completed, one parked: both are logged
        await channel.publish(
            OutgoingMessage(body, FORGED, JOB_NAME, 0, {}), app.exchange, JOB_NAME
        )
    worker = LoggedProcess(
        ["brokerjobs.cli", "worker", "tests.support.poison_app:app"],
        child_env({"BJPOISON_NAME": name, "BJPOISON_LOG": str(tmp_path / "records")}),
        tmp_path / "worker.log",
    )
    try:
        await wait_for(lambda: broker.depth_is(f"{name}.jobs.parked", 1), timeout=30)
        await wait_for(lambda: "parked " in worker.log(), timeout=10)
        worker.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: worker.proc.poll() is not None, timeout=30)
    finally:
        worker.kill()
    text = (tmp_path / "worker.log").read_text()
    assert "\x1b" not in text
    assert not [line for line in text.splitlines() if line.startswith("2026-12-01 00:00:00")]
    escaped = FORGED.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert sum(escaped in line for line in text.splitlines()) >= 2, text[-3000:]
