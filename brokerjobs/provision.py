"""Declaring an app's topology plan on a broker (the plan itself is pure: ``topology``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from brokerjobs.broker import default_broker
from brokerjobs.broker.base import Broker, BrokerConnection
from brokerjobs.settings import Settings, load_settings
from brokerjobs.topology import TopologyPlan

if TYPE_CHECKING:
    from brokerjobs.app import App


async def declare(connection: BrokerConnection, topology: TopologyPlan) -> None:
    """Declare the plan; idempotent. A queue with other arguments raises TopologyMismatch."""
    channel = await connection.channel(confirms=False)
    try:
        for exchange in (topology.exchange, *topology.exchanges):
            await channel.declare_exchange(exchange, "topic")
        for queue in topology.queues:
            await channel.declare_queue(queue.name, queue.arguments)
            for pattern in queue.patterns:
                await channel.bind(queue.name, topology.exchange, pattern)
        for binding in topology.bindings:
            if binding.to_exchange:
                await channel.bind_exchange(binding.destination, binding.source, binding.pattern)
            else:
                await channel.bind(binding.destination, binding.source, binding.pattern)
    finally:
        await channel.close()


async def declare_topology(
    app: App, settings: Settings | None = None, *, broker: Broker | None = None
) -> None:
    """Declare ``app``'s exchanges, queues and bindings (what ``brokerjobs topology declare``
    does): for a service that publishes before any worker of the app has started."""
    broker = broker or default_broker(settings or load_settings())
    connection = await broker.connect("topology")
    try:
        await declare(connection, app.topology())
    finally:
        await connection.close()
