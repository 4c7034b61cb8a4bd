"""Handlers that outlive their timeout, for the hung-handler tests (process handlers must be
importable by the child process, hence a module of their own)."""

from __future__ import annotations

import threading
import time

from pydantic import BaseModel

from brokerjobs import RetryPolicy, job
from tests.support.fault_app import RecordLog

RELEASE = threading.Event()  # set by the test to let hung thread handlers return
HANG_S = 20.0


@job("hung.hang", retry=RetryPolicy(delays=(0.2,), max_attempts=2))
class Hang(BaseModel):
    n: int


@job("hung.quick")
class QuickJob(BaseModel):
    n: int
    log: str  # the record file each quick job appends "done <n>:<unix time>" to


def hang_in_thread(task: Hang) -> None:
    RELEASE.wait(HANG_S)


def hang_in_process(task: Hang) -> None:
    time.sleep(HANG_S)


def quick_job(task: QuickJob) -> None:
    RecordLog(task.log).write("done", f"{task.n}:{time.time():.3f}")
