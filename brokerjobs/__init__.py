"""brokerjobs: reliable background jobs over RabbitMQ."""

from brokerjobs.app import App
from brokerjobs.context import JobContext, current_job
from brokerjobs.errors import (
    BrokerJobsError,
    BrokerUnreachable,
    ConfigError,
    PublishError,
    TopologyMismatch,
    UnroutableJob,
)
from brokerjobs.jobs import job
from brokerjobs.publisher import Publisher
from brokerjobs.retry import RetryPolicy
from brokerjobs.settings import Settings
from brokerjobs.signals import PermanentFailure, RetryLater
from brokerjobs.worker import Worker

__version__ = "0.1.0"  # kept equal to pyproject.toml's by a test

__all__ = [
    "App",
    "BrokerJobsError",
    "BrokerUnreachable",
    "ConfigError",
    "JobContext",
    "PermanentFailure",
    "PublishError",
    "Publisher",
    "RetryLater",
    "RetryPolicy",
    "Settings",
    "TopologyMismatch",
    "UnroutableJob",
    "Worker",
    "current_job",
    "job",
]
