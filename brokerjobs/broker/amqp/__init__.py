"""RabbitMQ over AMQP 0-9-1: the only package that imports aio-pika, aiormq or pamqp."""

from brokerjobs.broker.amqp.channel import Channel
from brokerjobs.broker.amqp.connect import AmqpBroker, connect
from brokerjobs.broker.amqp.connection import Connection

__all__ = ["AmqpBroker", "Channel", "Connection", "connect"]
