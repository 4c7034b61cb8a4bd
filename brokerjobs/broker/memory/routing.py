"""Exchanges and bindings: where a published message goes (queue and exchange bindings)."""

from __future__ import annotations

from dataclasses import dataclass

from brokerjobs.broker.problems import mismatch_message, missing_message
from brokerjobs.errors import TopologyError, TopologyMismatch
from brokerjobs.topology import DEFAULT_EXCHANGE, topic_matches

KINDS = ("topic", "direct", "fanout")
# Exchanges every RabbitMQ vhost has.
PREDECLARED = {"amq.topic": "topic", "amq.direct": "direct", "amq.fanout": "fanout"}


@dataclass(frozen=True, slots=True)
class Binding:
    source: str
    destination: str
    pattern: str
    to_exchange: bool = False


class Exchanges:
    """The declared exchanges and every binding out of them."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = dict(PREDECLARED)
        self.bindings: list[Binding] = []

    def declare(self, name: str, kind: str) -> None:
        if kind not in KINDS:
            raise TopologyError(
                f"exchange {name!r}: type {kind!r} is not one the in-memory broker plays "
                f"({', '.join(KINDS)})"
            )
        if name == DEFAULT_EXCHANGE or name.startswith("amq."):
            raise TopologyError(f"access refused for exchange {name!r}: the name is reserved")
        current = self.kinds.setdefault(name, kind)
        if current != kind:
            text = (
                f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost "
                f"'/': received '{kind}' but current is '{current}'"
            )
            raise TopologyMismatch(mismatch_message("exchange", name, text))

    def require(self, name: str) -> None:
        if name != DEFAULT_EXCHANGE and name not in self.kinds:
            raise TopologyError(missing_message("exchange", name))

    def bind(self, binding: Binding) -> None:
        if binding.source == DEFAULT_EXCHANGE:
            raise TopologyError("access refused: the default exchange cannot be bound")
        self.require(binding.source)
        if binding not in self.bindings:
            self.bindings.append(binding)

    def delete(self, name: str) -> None:
        self.kinds.pop(name, None)
        self.bindings = [
            b
            for b in self.bindings
            if b.source != name and not (b.to_exchange and b.destination == name)
        ]

    def unbind_queue(self, queue: str) -> None:
        self.bindings = [b for b in self.bindings if b.to_exchange or b.destination != queue]

    def route(self, exchange: str, routing_key: str) -> list[str]:
        """The queues ``routing_key`` reaches from ``exchange``: each once, in binding order.
        The default exchange routes to the queue of that name (existence is the caller's)."""
        if exchange == DEFAULT_EXCHANGE:
            return [routing_key]
        self.require(exchange)
        names: dict[str, None] = {}  # ordered, and each queue gets one copy
        self._collect(exchange, routing_key, names, set())
        return list(names)

    def _collect(self, exchange: str, key: str, names: dict[str, None], seen: set[str]) -> None:
        seen.add(exchange)
        kind = self.kinds.get(exchange, "topic")
        for binding in self.bindings:
            if binding.source != exchange or not _matches(kind, binding.pattern, key):
                continue
            if not binding.to_exchange:
                names[binding.destination] = None
            elif binding.destination not in seen and binding.destination in self.kinds:
                self._collect(binding.destination, key, names, seen)


def _matches(kind: str, pattern: str, key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "direct":
        return pattern == key
    return topic_matches(pattern, key)
