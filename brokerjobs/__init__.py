"""brokerjobs: reliable background jobs over RabbitMQ."""

from typing import TYPE_CHECKING, Any

from brokerjobs.app import App
from brokerjobs.context import JobContext, current_job
from brokerjobs.envelope import new_job_id
from brokerjobs.errors import (
    BrokerJobsError,
    BrokerUnreachable,
    ConfigError,
    ConnectionLost,
    PublishError,
    TopologyError,
    TopologyMismatch,
    UnroutableJob,
)
from brokerjobs.jobs import JobSpec, job
from brokerjobs.jobs import spec_of as job_spec
from brokerjobs.middleware import JobRun, Middleware
from brokerjobs.outcomes import Outcome, Settled
from brokerjobs.provision import declare_topology
from brokerjobs.publisher import Publisher
from brokerjobs.retry import Park, Retry, RetryPolicy
from brokerjobs.settings import Settings, load_settings
from brokerjobs.signals import PermanentFailure, RetryLater, SkipJob
from brokerjobs.worker import Worker

if TYPE_CHECKING:
    from brokerjobs.parking import ParkingLot
    from brokerjobs.scheduler import Scheduler
    from brokerjobs.slow_jobs import SlowJob
    from brokerjobs.status import JobStatus, StatusStore, StatusTracker, report_progress

# Loaded on first use: a worker needs neither the replay tool nor the scheduler, and only an
# app with track_status (or slow_job_after) needs the status (or slow-job) module.
_LAZY = {
    "ParkingLot": "brokerjobs.parking",
    "Scheduler": "brokerjobs.scheduler",
    "SlowJob": "brokerjobs.slow_jobs",
    "JobStatus": "brokerjobs.status",
    "StatusStore": "brokerjobs.status",
    "StatusTracker": "brokerjobs.status",
    "report_progress": "brokerjobs.status",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'brokerjobs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__version__ = "0.1.0"  # kept equal to pyproject.toml's by a test

# The public API, pinned by tests/unit/test_public_api.py: a name removed here breaks users.
__all__ = [
    "App",
    "BrokerJobsError",
    "BrokerUnreachable",
    "ConfigError",
    "ConnectionLost",
    "JobContext",
    "JobRun",
    "JobSpec",
    "JobStatus",
    "Middleware",
    "Outcome",
    "Park",
    "ParkingLot",
    "PermanentFailure",
    "PublishError",
    "Publisher",
    "Retry",
    "RetryLater",
    "RetryPolicy",
    "Scheduler",
    "Settings",
    "Settled",
    "SkipJob",
    "SlowJob",
    "StatusStore",
    "StatusTracker",
    "TopologyError",
    "TopologyMismatch",
    "UnroutableJob",
    "Worker",
    "current_job",
    "declare_topology",
    "job",
    "job_spec",
    "load_settings",
    "new_job_id",
    "report_progress",
]
