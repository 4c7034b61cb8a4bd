"""A worker app for the poison-mix test, run as ``brokerjobs worker tests.support.poison_app:app``.

``BJPOISON_NAME`` names the app (queue ``<name>.jobs``), ``BJPOISON_LOG`` the record file: one
``done <job_id> <pid>`` line per job handled (see ``fault_app.RecordLog``). A job whose ``fail`` is
true raises every time, so it is retried once (after 0.2 s) and then parked.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel

from brokerjobs import App, RetryPolicy, current_job, job
from tests.support.fault_app import RecordLog

JOB_NAME = "poison.job"


@job(JOB_NAME, retry=RetryPolicy(delays=(0.2,), max_attempts=2))
class PoisonJob(BaseModel):
    n: int
    fail: bool = False
    payload: Any = None


def build_app(name: str, log_path: str) -> App:
    app = App(name)
    queue = app.queue(f"{name}.jobs", "poison.#")
    records = RecordLog(log_path)

    @app.handler(PoisonJob, queue=queue)
    async def handle(task: PoisonJob) -> None:
        if task.fail:
            raise RuntimeError(f"job {task.n} fails by design")
        records.write("done", current_job().job_id)

    return app


app = build_app(
    os.environ.get("BJPOISON_NAME", "bjtest.poison.default"),
    os.environ.get("BJPOISON_LOG", os.devnull),
)
