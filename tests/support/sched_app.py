"""A scheduler app for subprocess tests: ``python -m tests.support.sched_app`` runs its scheduler
(the same as ``brokerjobs scheduler tests.support.sched_app:app``).

Configured by environment variables so that every test run uses its own names:

- ``BJSCHED_NAME``   app name: the exchange, the job queue ``<name>.sched.tick`` and the
                     scheduler queue ``<name>.scheduler``
- ``BJSCHED_EVERY``  seconds between ticks (default 1)

One schedule, ``tick``: each job carries its tick and the pid of the scheduler that made it.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime

from pydantic import BaseModel

from brokerjobs import App, job
from brokerjobs.logs import configure_logging
from brokerjobs.scheduler import run_scheduler
from brokerjobs.settings import load_settings
from tests.support.hygiene import record_declarations
from tests.support.matrix import force_queue_kind

# A subprocess of the tests: record what it declares and follow the queue-kind matrix.
record_declarations()
force_queue_kind()

NAME_ENV, EVERY_ENV = "BJSCHED_NAME", "BJSCHED_EVERY"
JOB_NAME = "sched.tick"
SCHEDULE_NAME = "tick"


@job(JOB_NAME)
class Tick(BaseModel):
    at: datetime
    pid: int


def job_queue(app_name: str) -> str:
    return f"{app_name}.{JOB_NAME}"


def build_app(name: str, every: float) -> App:
    """The app: a handler so that the topology has the job queue, and one ``every`` schedule."""
    app = App(name)

    @app.handler(Tick)
    async def handle(task: Tick) -> None: ...

    app.schedule(lambda at: Tick(at=at, pid=os.getpid()), every=every, name=SCHEDULE_NAME)
    return app


app = build_app(
    os.environ.get(NAME_ENV, "bjtest.sched.default"), float(os.environ.get(EVERY_ENV, "1"))
)


if __name__ == "__main__":
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(run_scheduler(app, settings))
