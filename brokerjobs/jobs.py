"""Job types: a pydantic model plus its name (routing key), priority, version and retry policy."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from brokerjobs.errors import JobDefinitionError
from brokerjobs.retry import DEFAULT_RETRY, RetryPolicy

JobT = TypeVar("JobT", bound=BaseModel)

_SPEC_ATTR = "__brokerjobs_job__"
# A routing key made of dot-separated words; no wildcards, because it is published, not bound.
_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
MAX_PRIORITY = 255


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What brokerjobs knows about one job type."""

    name: str
    model: type[BaseModel]
    priority: int = 0
    version: int = 1
    retry: RetryPolicy = DEFAULT_RETRY


def job(
    name: str, *, priority: int = 0, version: int = 1, retry: RetryPolicy | None = None
) -> Callable[[type[JobT]], type[JobT]]:
    """Declare a pydantic model as a job type published under routing key ``name``.

    >>> @job("email.send", priority=5)
    ... class SendEmail(BaseModel):
    ...     to: str
    """
    if not _NAME.match(name) or len(name) > 255:
        raise JobDefinitionError(
            f"job name {name!r} must be dot-separated words of letters, digits, '_' or '-' "
            "(it is the routing key; wildcards belong in queue bindings)"
        )
    if not 0 <= priority <= MAX_PRIORITY:
        raise JobDefinitionError(
            f"job {name!r}: priority must be 0..{MAX_PRIORITY}, got {priority}"
        )
    if version < 1:
        raise JobDefinitionError(f"job {name!r}: version must be >= 1, got {version}")

    def register(model: type[JobT]) -> type[JobT]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise JobDefinitionError(f"@job({name!r}) must decorate a pydantic BaseModel class")
        spec = JobSpec(name, model, priority, version, retry or DEFAULT_RETRY)
        setattr(model, _SPEC_ATTR, spec)
        return model

    return register


def spec_of(model: type[BaseModel] | BaseModel) -> JobSpec:
    """The job spec of a job class or instance; a clear error for plain models."""
    cls = model if isinstance(model, type) else type(model)
    spec: Any = cls.__dict__.get(_SPEC_ATTR)
    if not isinstance(spec, JobSpec):
        raise JobDefinitionError(
            f"{cls.__qualname__} is not a job type: decorate it with @brokerjobs.job('name')"
        )
    return spec
