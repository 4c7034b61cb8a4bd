"""The in-memory broker: the seam of ``brokerjobs.broker.base`` in this process, virtual time."""

from brokerjobs.broker.memory.broker import (
    MAX_DELIVERIES_PER_RUN,
    CallbackFailed,
    MemoryBroker,
    StillBusy,
)
from brokerjobs.broker.memory.channel import MemoryChannel
from brokerjobs.broker.memory.connection import MemoryConnection
from brokerjobs.broker.memory.core import VirtualClock

__all__ = [
    "MAX_DELIVERIES_PER_RUN",
    "CallbackFailed",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryConnection",
    "StillBusy",
    "VirtualClock",
]
