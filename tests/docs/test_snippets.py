"""Every Python block of README.md and docs/*.md runs as written, against the real broker.

Each block is saved in a temporary directory under the name the document gives it, with the
document's other files beside it and every app renamed to a unique name, then imported, run
(beside a real ``brokerjobs worker`` where the document says so), or tested with pytest; see
``tests/docs/snippets.py`` for how a block says which. What the apps declared is deleted after.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest

from tests.docs.snippets import (
    DOCUMENTS,
    ROOT,
    Plan,
    Snippet,
    Unclassified,
    app_names,
    classify,
    extract,
    renamed,
)
from tests.support import hygiene
from tests.support.broker import TEST_URL, Broker, wait_for

SNIPPETS = [snippet for document in DOCUMENTS for snippet in extract(document)]
BROKERJOBS = str(Path(sys.executable).parent / "brokerjobs")
RUN_TIMEOUT_S = 60
# Run in the snippet's directory: what its apps plan to declare, status and scheduler included.
_NAMES_OF_APPS = """
import importlib, json, sys
from brokerjobs import App
from brokerjobs.scheduler import scheduler_queue
from brokerjobs.status import status_exchange_name
queues, exchanges = [], []
for module in sys.argv[1:]:
    for app in {id(v): v for v in vars(importlib.import_module(module)).values()
                if isinstance(v, App)}.values():
        plan = app.topology()
        queues += [q.name for q in plan.queues] + [scheduler_queue(app)]
        exchanges += [plan.exchange, *plan.exchanges, status_exchange_name(plan.exchange)]
print(json.dumps({"queue": queues, "exchange": exchanges}))
"""


# Every process a snippet starts records what it declares, for the session's leftover check,
# through a sitecustomize that only this PYTHONPATH holds (the snippet's own imports are as a
# user's: its directory first, the test suite last).
_SITE = Path(tempfile.mkdtemp(prefix="bjtest-site-"))
(_SITE / "sitecustomize.py").write_text(
    f"import sys\nsys.path.append({str(ROOT)!r})\n"
    "from tests.support import hygiene\nhygiene.record_declarations()\n"
)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "BROKERJOBS_URL": TEST_URL,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(_SITE),
    }


def _run(*command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )


class Workspace:
    """A directory holding a document's files as a user would save them, apps renamed."""

    def __init__(self, snippet: Snippet, root: Path) -> None:
        siblings = [s for s in SNIPPETS if s.document == snippet.document]
        tag = uuid.uuid4().hex[:10]
        self.names = {name: f"bjtest.doc.{tag}.{name}" for name in app_names(siblings)}
        self.root = root
        self.modules: list[str] = []
        for sibling in siblings:
            name = sibling.file_name
            if name and classify(sibling).kind == "file":
                self.write(name, sibling.code)

    def write(self, name: str, code: str, *, module: bool = True) -> Path:
        """Save ``code`` as ``name``; a ``module`` is imported afterwards to find its apps."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(renamed(code, self.names))
        dotted = module_of(name)
        if module and dotted not in self.modules:
            self.modules.append(dotted)
        return path

    def read(self, name: str) -> str:
        return (self.root / name).read_text()

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return _run(*command, cwd=self.root)

    def planned_names(self) -> dict[str, list[str]]:
        result = self.run(sys.executable, "-c", _NAMES_OF_APPS, *self.modules)
        assert result.returncode == 0, f"importing {self.modules} failed:\n{result.stderr}"
        names: dict[str, list[str]] = json.loads(result.stdout)
        return names


def module_of(file_name: str) -> str:
    return file_name.removesuffix(".py").replace("/", ".")


def _record(names: dict[str, list[str]]) -> None:
    """Log what the snippets' processes (which do not record) may have declared, so that the
    session's leftover check covers it too."""
    log = os.environ.get(hygiene.LOG_ENV)
    if log:
        with open(log, "a") as file:
            file.writelines(f"{kind} {name}\n" for kind, group in names.items() for name in group)


async def _delete(broker: Broker, names: dict[str, list[str]]) -> None:
    _record(names)
    for kind in ("queue", "exchange"):
        for name in names.get(kind, []):
            channel = await broker.connection.channel(confirms=False)
            with contextlib.suppress(Exception):
                if kind == "queue":
                    await channel.delete_queue(name)
                else:
                    await channel.delete_exchange(name)
            with contextlib.suppress(Exception):
                await channel.close()


@pytest.fixture
async def workspace(
    request: pytest.FixtureRequest, tmp_path: Path, broker: Broker
) -> AsyncIterator[Workspace]:
    space = Workspace(request.param, tmp_path)
    try:
        yield space
    finally:
        names = await asyncio.to_thread(space.planned_names) if space.modules else {}
        await _delete(broker, names)


class Output:
    """Lines a subprocess prints, read as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read(process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    async def finished(self) -> None:
        await self._reader

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def __str__(self) -> str:
        return "\n".join(self.lines)


@contextlib.asynccontextmanager
async def worker(space: Workspace, app: str) -> AsyncIterator[Output]:
    """``brokerjobs worker APP`` run from the workspace, as the README says, until it consumes."""
    process = await asyncio.create_subprocess_exec(
        BROKERJOBS, "worker", app, cwd=space.root, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = Output(process)
    try:
        await wait_for(lambda: output.has("consuming ") or process.returncode is not None, 30)
        assert process.returncode is None, f"the worker exited:\n{output}"
        yield output
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        await asyncio.wait_for(output.finished(), 5)
    assert code == 0, f"the worker exited {code} after SIGTERM:\n{output}"


def _snippet_id(snippet: Snippet) -> str:
    return snippet.where


@pytest.mark.parametrize("workspace", SNIPPETS, ids=_snippet_id, indirect=True)
async def test_the_snippet_runs_as_written(
    workspace: Workspace, request: pytest.FixtureRequest
) -> None:
    snippet: Snippet = request.node.callspec.params["workspace"]
    plan = classify(snippet)  # Unclassified: a block nobody said how to run fails the test
    if plan.kind == "skip":
        pytest.skip(f"{snippet.where}: {plan.target}")
    elif plan.kind == "signature":
        check_signature(snippet, plan.target)
    elif plan.kind == "file":
        workspace.planned_names()  # imports every file of the document, this one included
    elif plan.kind == "continues":
        workspace.write(plan.target, workspace.read(plan.target) + "\n" + snippet.code)
        workspace.planned_names()
    elif plan.kind == "pytest":
        run_pytest(workspace, snippet)
    else:
        await run_program(workspace, snippet, plan)


def run_pytest(space: Workspace, snippet: Snippet) -> None:
    path = space.write(snippet.file_name or "test_snippet.py", snippet.code, module=False)
    result = space.run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path.name)
    assert result.returncode == 0, f"{snippet.where}:\n{result.stdout}{result.stderr}"


async def run_program(space: Workspace, snippet: Snippet, plan: Plan) -> None:
    name = snippet.file_name or "snippet.py"
    apps = {(plan.worker or "").partition(":")[0], (plan.declare or "").partition(":")[0]}
    path = space.write(
        name, snippet.code, module=module_of(name) in apps
    )  # a program runs on import
    if plan.declare:
        declared = await asyncio.to_thread(
            space.run, BROKERJOBS, "topology", "declare", plan.declare
        )
        assert declared.returncode == 0, f"{snippet.where}: declare failed:\n{declared.stderr}"
    async with contextlib.AsyncExitStack() as stack:
        beside = (
            await stack.enter_async_context(worker(space, plan.worker)) if plan.worker else None
        )
        result = await asyncio.to_thread(
            space.run, sys.executable, str(path.relative_to(space.root))
        )
        assert result.returncode == 0, f"{snippet.where}:\n{result.stdout}{result.stderr}"
        for text in plan.expect:
            if beside is None:
                assert text in result.stdout, f"{snippet.where}: {text!r} not in:\n{result.stdout}"
            else:
                with contextlib.suppress(AssertionError):
                    await wait_for(partial(_printed, text, result.stdout, beside), 15)
                assert _printed(text, result.stdout, beside), (
                    f"{snippet.where}: {text!r} never printed:\n{result.stdout}\n{beside}"
                )


def _printed(text: str, stdout: str, worker_output: Output) -> bool:
    return text in stdout or worker_output.has(text)


def check_signature(snippet: Snippet, dotted: str) -> None:
    module_name, _, name = dotted.rpartition(".")
    target = getattr(importlib.import_module(module_name), name)
    call = snippet.code.strip()
    assert call.startswith(f"{name}("), f"{snippet.where}: expected {name}(...), got {call!r}"
    written = ast.parse(f"def f{call.removeprefix(name)}: pass").body[0]
    assert isinstance(written, ast.FunctionDef)
    documented = [(a.arg, "keyword-only" if a in written.args.kwonlyargs else "positional")
                  for a in (*written.args.args, *written.args.kwonlyargs)]  # fmt: skip
    real = [
        (p.name, "keyword-only" if p.kind is p.KEYWORD_ONLY else "positional")
        for p in inspect.signature(target).parameters.values()
    ]
    assert documented == real, f"{snippet.where}: documented {documented}, real {real}"


def test_a_python_block_nobody_said_how_to_run_fails() -> None:
    fragment = Snippet(ROOT / "README.md", 1, "publisher.publish(job)\n", None)
    with pytest.raises(Unclassified, match="say how it runs"):
        classify(fragment)
    with pytest.raises(Unclassified, match="needs a reason"):
        classify(Snippet(ROOT / "README.md", 1, "x\n", "skip:"))
    with pytest.raises(Unclassified, match="unknown snippet marker"):
        classify(Snippet(ROOT / "README.md", 1, "x\n", "runs beside a worker"))


def test_every_document_is_searched_and_has_runnable_blocks() -> None:
    by_document = {s.document.name for s in SNIPPETS}
    assert {"README.md", "scheduler.md", "testing.md"} <= by_document
    assert len([s for s in SNIPPETS if s.document.name == "README.md"]) >= 7
