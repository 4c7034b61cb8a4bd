"""A worker app for fault tests, run as ``brokerjobs worker tests.support.fault_app:app``.

Configured by environment variables so that every test run uses its own names:

- ``BJFAULT_NAME``   app name; the exchange has this name and the queue is ``<name>.jobs``
- ``BJFAULT_LOG``    file that every handler appends its records to
- ``BJFAULT_SLEEP``  seconds each job takes (``asyncio.sleep``)
- ``BJFAULT_SPREAD`` optional: job ``n`` takes ``SLEEP * (1 + SPREAD * (n % 5) / 4)`` so that jobs
  started together finish one after another

Each job appends ``start <job_id> <pid>`` when it begins and ``done <job_id> <pid>`` just before it
returns (so before the ack). Each record is one ``write(2)`` on an ``O_APPEND`` descriptor: records
of concurrent jobs and of several processes never interleave, and a record survives SIGKILL of
the writer because it is in the kernel as soon as ``write`` returns.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from brokerjobs import App, current_job, job
from tests.support.hygiene import record_declarations
from tests.support.matrix import force_queue_kind

# A subprocess of the tests: record what it declares and follow the queue-kind matrix.
record_declarations()
force_queue_kind()

NAME_ENV, LOG_ENV, SLEEP_ENV = "BJFAULT_NAME", "BJFAULT_LOG", "BJFAULT_SLEEP"
SPREAD_ENV = "BJFAULT_SPREAD"
JOB_NAME = "fault.job"


@job(JOB_NAME)
class FaultJob(BaseModel):
    n: int


def queue_name(app_name: str) -> str:
    return f"{app_name}.jobs"


class RecordLog:
    """Appends one line per call with a single ``write``; safe across threads and processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._fd: int | None = None

    def write(self, kind: str, job_id: str) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, f"{kind} {job_id} {os.getpid()}\n".encode())


def build_app(
    name: str, log_path: str | os.PathLike[str], sleep: float, spread: float = 0.0
) -> App:
    """The app: one queue ``<name>.jobs`` whose handler records start and done around a sleep."""
    app = App(name)
    queue = app.queue(queue_name(name), JOB_NAME)
    records = RecordLog(log_path)

    @app.handler(FaultJob, queue=queue)
    async def handle(task: FaultJob) -> None:
        job_id = current_job().job_id
        records.write("start", job_id)
        if sleep > 0:
            await asyncio.sleep(sleep * (1 + spread * (task.n % 5) / 4))
        records.write("done", job_id)

    return app


@dataclass
class Records:
    """A parsed record file."""

    started: list[tuple[str, int]] = field(default_factory=list)  # (job_id, pid)
    done: list[tuple[str, int]] = field(default_factory=list)

    def done_ids(self, pid: int | None = None) -> list[str]:
        return [j for j, p in self.done if pid is None or p == pid]

    def started_ids(self, pid: int | None = None) -> list[str]:
        return [j for j, p in self.started if pid is None or p == pid]


def read_records(path: str | os.PathLike[str]) -> Records:
    records = Records()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return records
    lines = text.split("\n")
    for line in lines[:-1]:  # the last piece is empty, or a record still being written
        kind, job_id, pid = line.split()
        target = records.started if kind == "start" else records.done
        target.append((job_id, int(pid)))
    return records


app = build_app(
    os.environ.get(NAME_ENV, "bjtest.fault.default"),
    os.environ.get(LOG_ENV, os.devnull),
    float(os.environ.get(SLEEP_ENV, "0")),
    float(os.environ.get(SPREAD_ENV, "0")),
)
