"""The broker seam (``base``) and its implementations: ``amqp`` (RabbitMQ) and ``memory``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from brokerjobs.broker.base import (
    Around,
    Broker,
    BrokerChannel,
    BrokerConnection,
    DeliveryCallback,
    MessageChannel,
    QueueState,
)

if TYPE_CHECKING:
    from brokerjobs.settings import Settings


def default_broker(settings: Settings) -> Broker:
    """RabbitMQ at ``settings.url``: every component's broker unless it is given one."""
    from brokerjobs.broker.amqp import AmqpBroker  # aio-pika loads only when it is used

    return AmqpBroker(settings)


__all__ = [
    "Around",
    "Broker",
    "BrokerChannel",
    "BrokerConnection",
    "DeliveryCallback",
    "MessageChannel",
    "QueueState",
    "default_broker",
]
