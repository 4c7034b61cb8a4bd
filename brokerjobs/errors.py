"""The one exception tree of brokerjobs; each docstring is the message users see.

BrokerJobsError
├── ConfigError                 bad settings or a bad app definition
├── JobDefinitionError          a model that is not a job, duplicate names
├── BrokerUnreachable           cannot connect (host down, TLS, wrong credentials)
├── ConnectionLost              the connection or channel under an operation failed (retry it)
├── TopologyError               declaring exchanges/queues failed
│   └── TopologyMismatch        an existing queue has other arguments
├── PublishError                a publish was not confirmed
│   ├── UnroutableJob           no queue is bound for the routing key
│   ├── PublishNacked           the broker refused the message
│   └── UnencodableMessage      a property or header value AMQP cannot carry (never sent)
└── ParkingError                replay tool failures (queue missing, empty selection)
"""

from __future__ import annotations


class BrokerJobsError(Exception):
    """brokerjobs failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(BrokerJobsError):
    """The configuration is invalid."""


class JobDefinitionError(BrokerJobsError):
    """A job type is not defined correctly."""


class BrokerUnreachable(BrokerJobsError):
    """Cannot connect to RabbitMQ."""


class ConnectionLost(BrokerJobsError):
    """The connection or channel to the broker failed under an operation; it may be retried.

    Every broker implementation raises this (and only this) for a failure of the link itself:
    the client library's own exceptions never leave ``brokerjobs.broker``.
    """


class TopologyError(BrokerJobsError):
    """Declaring the topology failed."""


class TopologyMismatch(TopologyError):
    """An existing queue or exchange was declared with other arguments."""


class PublishError(BrokerJobsError):
    """The broker did not confirm the publish."""


class UnroutableJob(PublishError):
    """No queue is bound for the job's routing key; it was returned by the broker."""


class PublishNacked(PublishError):
    """The broker refused (nacked) the message."""


class UnencodableMessage(PublishError):
    """The message has a property or header value that AMQP cannot carry; it was not sent."""


class PublishInterrupted(PublishError):
    """The connection closed before the broker confirmed the message."""


class ParkingError(BrokerJobsError):
    """The parking operation failed."""
