"""``brokerjobs publish`` on the real broker: confirmed jobs and their ids, or nothing at all."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.provision import declare
from tests.support.broker import TEST_URL, Broker, unique, wait_for

REPO = Path(__file__).resolve().parents[2]
APP_SOURCE = textwrap.dedent(
    """
    import os
    from pydantic import BaseModel
    from brokerjobs import App, job
    from tests.support.matrix import force_queue_kind

    force_queue_kind()  # the test run's queue kind (BJTEST_QUEUE_KIND), as in-process

    @job("note.write")
    class Note(BaseModel):
        text: str
        copies: int = 1

    app = App(os.environ["PUBLISH_APP"], delay_levels=int(os.environ["PUBLISH_LEVELS"]))

    @app.handler(Note)
    async def write(note: Note) -> None:
        pass
    """
)


def make_app(name: str, levels: int) -> App:
    app = App(name, delay_levels=levels)

    async def write(_: BaseModel) -> None:
        pass

    note: type[BaseModel] = job("note.write")(
        type("Note", (BaseModel,), {"__annotations__": {"text": str}})
    )
    app.handler(note)(write)
    return app


def cli(
    tmp: Path, name: str, levels: int, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp / "publish_app.py").write_text(APP_SOURCE)
    env = {
        **os.environ,
        "BROKERJOBS_URL": TEST_URL,
        "PYTHONPATH": f"{tmp}{os.pathsep}{REPO}",
        "PUBLISH_APP": name,
        "PUBLISH_LEVELS": str(levels),
    }
    return subprocess.run(
        [sys.executable, "-m", "brokerjobs.cli", "publish", "publish_app:app", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        cwd=tmp,
        timeout=60,
        check=False,
    )


async def declared(broker: Broker, levels: int = 0) -> tuple[str, str]:
    name = unique("publish")
    app = broker.track(make_app(name, levels))
    await declare(broker.connection, app.topology())
    return name, f"{name}.note.write"


async def test_a_valid_payload_is_published_with_its_priority_and_its_id_printed(
    broker: Broker, tmp_path: Path
) -> None:
    name, queue = await declared(broker)
    result = await asyncio.to_thread(
        cli, tmp_path, name, 0, "note.write", '{"text": "hi"}', "--priority", "3"
    )
    assert result.returncode == 0, result.stderr
    (job_id,) = result.stdout.split()
    (delivery,) = await broker.drain(queue)
    assert delivery.message_id == job_id
    assert json.loads(delivery.body) == {"text": "hi", "copies": 1}
    assert delivery.priority == 3


async def test_json_lines_on_stdin_publish_nothing_if_one_line_is_invalid(
    broker: Broker, tmp_path: Path
) -> None:
    name, queue = await declared(broker)
    lines = '{"text": "a"}\n{"copies": 2}\n'
    result = await asyncio.to_thread(cli, tmp_path, name, 0, "note.write", "-", stdin=lines)
    assert result.returncode == 2
    assert (
        "stdin line 2: does not match Note (note.write): field 'text': Field required; "
        "nothing was published"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert await broker.depth(queue) == 0
    good = '{"text": "a"}\n\n{"text": "b", "copies": 2}\n'
    result = await asyncio.to_thread(cli, tmp_path, name, 0, "note.write", "-", stdin=good)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert [d.message_id for d in await broker.drain(queue)] == ids
    assert len(ids) == 2


async def test_delay_needs_delay_levels_and_holds_the_job_in_the_broker(
    broker: Broker, tmp_path: Path
) -> None:
    name, queue = await declared(broker, levels=2)
    no_levels = await asyncio.to_thread(
        cli, tmp_path, name, 0, "note.write", '{"text": "x"}', "--delay", "1s"
    )
    assert no_levels.returncode == 2
    assert "has no delay levels: --delay needs App(..., delay_levels=N)" in no_levels.stderr
    result = await asyncio.to_thread(
        cli, tmp_path, name, 2, "note.write", '{"text": "later"}', "--delay", "2s"
    )
    assert result.returncode == 0, result.stderr
    assert await broker.depth(queue) == 0  # held in the 2 s delay level first
    await wait_for(lambda: broker.depth_is(queue, 1), timeout=10)
    (delivery,) = await broker.drain(queue)
    assert delivery.message_id == result.stdout.strip()


async def test_an_unknown_job_names_the_apps_jobs(broker: Broker, tmp_path: Path) -> None:
    name, _ = await declared(broker)
    result = await asyncio.to_thread(cli, tmp_path, name, 0, "note.writ", '{"text": "x"}')
    assert result.returncode == 2
    assert "handles no job 'note.writ' (its jobs: note.write)" in result.stderr
