"""The running job's context, readable from anywhere inside a handler."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class JobContext:
    job_id: str
    job_name: str
    queue: str
    attempt: int
    redelivered: bool


_current: ContextVar[JobContext] = ContextVar("brokerjobs_job")


def current_job() -> JobContext:
    """The job being handled; raises LookupError outside a handler (and in process pools)."""
    return _current.get()


def set_current(context: JobContext) -> object:
    return _current.set(context)


def reset_current(token: object) -> None:
    _current.reset(token)  # type: ignore[arg-type]
