"""The topology as data: every exchange, queue, argument and binding, planned purely, then declared.

Names, for a main queue ``Q`` of an app whose topic exchange is ``X``:

- ``Q``            main queue, bound to ``X`` with the queue's topic patterns
- ``Q.retry.<d>``  one delay tier per distinct retry delay ``d`` (``5s``, ``2m``, ``1h``)
- ``Q.parked``     the parking queue, ``Q``'s dead-letter target

Retry tiers dead-letter through the default exchange with ``x-dead-letter-routing-key=Q``: a topic
exchange would hand the retry to every queue bound to the job's key, duplicating it for consumers
that already succeeded. Per-message TTL only expires at a queue's head, so each tier holds one
delay only, and the delay is in the name because ``x-message-ttl`` cannot change on a live queue.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from brokerjobs.errors import ConfigError
from brokerjobs.retry import tier_label

QueueKind = Literal["classic", "quorum"]
QueueRole = Literal["main", "retry", "parking", "delay", "scheduler"]
DEFAULT_EXCHANGE = ""
_PATTERN_WORD = re.compile(r"^([A-Za-z0-9_-]+|\*|#)$")


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A main queue as the user configures it."""

    name: str
    patterns: tuple[str, ...]
    kind: QueueKind = "classic"
    max_priority: int | None = None  # classic only; None: no priority queue
    delivery_limit: int = 20
    prefetch: int | None = None
    parked_ttl: float | None = None  # parked jobs never expire unless this is set (seconds)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 200 or self.name.startswith("amq."):
            raise ConfigError(f"queue name {self.name!r} must be 1-200 chars, not 'amq.*'")
        if not self.patterns:
            raise ConfigError(f"queue {self.name!r} needs at least one binding pattern")
        for pattern in self.patterns:
            if not all(_PATTERN_WORD.match(word) for word in pattern.split(".")):
                raise ConfigError(f"queue {self.name!r}: invalid topic pattern {pattern!r}")
        if self.kind not in ("classic", "quorum"):
            raise ConfigError(f"queue {self.name!r}: kind must be 'classic' or 'quorum'")
        if self.max_priority is not None and not 1 <= self.max_priority <= 255:
            raise ConfigError(
                f"queue {self.name!r}: max_priority must be 1..255 (single digits are advised), "
                "or None for no priority queue"
            )
        if self.delivery_limit < 1:
            raise ConfigError(f"queue {self.name!r}: delivery_limit must be >= 1")
        if self.parked_ttl is not None and self.parked_ttl <= 0:
            raise ConfigError(f"queue {self.name!r}: parked_ttl must be positive seconds")


@dataclass(frozen=True, slots=True)
class QueuePlan:
    name: str
    role: QueueRole
    main: str
    arguments: Mapping[str, Any]
    patterns: tuple[str, ...] = ()
    delay: float | None = None


@dataclass(frozen=True, slots=True)
class BindingPlan:
    """A binding beyond the main queues' patterns: exchange -> queue or exchange -> exchange."""

    source: str
    destination: str
    pattern: str
    to_exchange: bool = False


@dataclass(frozen=True, slots=True)
class TopologyPlan:
    exchange: str
    queues: tuple[QueuePlan, ...]
    exchanges: tuple[str, ...] = ()  # more topic exchanges (delay levels)
    bindings: tuple[BindingPlan, ...] = ()
    _by_name: dict[str, QueuePlan] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({q.name: q for q in self.queues})

    def queue(self, name: str) -> QueuePlan:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(q.name for q in self.queues if q.role == "main")
            raise ConfigError(f"queue {name!r} is not in the plan (main queues: {known})") from None

    @property
    def main_queues(self) -> tuple[QueuePlan, ...]:
        return tuple(q for q in self.queues if q.role == "main")

    def retry_tiers(self, main: str) -> tuple[QueuePlan, ...]:
        return tuple(q for q in self.queues if q.role == "retry" and q.main == main)

    def describe(self) -> str:
        lines = [f"exchange {name} (topic, durable)" for name in (self.exchange, *self.exchanges)]
        for q in self.queues:
            binds = f"  <- {self.exchange}: {', '.join(q.patterns)}" if q.patterns else ""
            args = " ".join(f"{k}={v!r}" for k, v in sorted(q.arguments.items())) or "-"
            lines.append(f"  {q.role:<8} {q.name}{binds}\n           {args}")
        for b in self.bindings:
            kind = "exchange" if b.to_exchange else "queue"
            lines.append(f"  binding  {b.source} -> {kind} {b.destination}: {b.pattern}")
        return "\n".join(lines)


def status_exchange_name(exchange: str) -> str:
    """Where a worker of an app with ``track_status`` publishes job states."""
    return f"{exchange}.status"


def scheduler_queue_name(exchange: str) -> str:
    """The queue holding the scheduler's token (its state; one consumer leads)."""
    return f"{exchange}.scheduler"


def scheduler_queue_arguments(kind: QueueKind) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-single-active-consumer": True}
    if kind == "quorum":
        # A requeued token counts as a delivery; 4.x drops it past the limit (default 20).
        arguments.update({"x-queue-type": "quorum", "x-delivery-limit": 1_000_000})
    return arguments


def retry_queue_name(main: str, delay: float) -> str:
    return f"{main}.retry.{tier_label(delay)}"


def parking_queue_name(main: str) -> str:
    return f"{main}.parked"


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is exactly one word, ``#`` zero or more words."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _match(rest, words[1:])


def plan(
    exchange: str,
    queues: Iterable[tuple[QueueSpec, Iterable[float]]],
    *,
    delay_levels: int = 0,
    delay_kind: QueueKind = "classic",
    status: bool = False,
    scheduler: QueueKind | None = None,
) -> TopologyPlan:
    """Plan every queue: main, its retry tiers (one per distinct delay) and its parking queue,
    plus the delay levels for delayed publishing when ``delay_levels`` > 0, the status exchange
    with ``status``, and the scheduler's token queue (of kind ``scheduler``) when given."""
    planned: list[QueuePlan] = []
    specs: list[QueueSpec] = []
    for spec, delays in queues:
        specs.append(spec)
        planned.extend(_plan_main(spec, delays))
    exchanges: list[str] = []
    bindings: list[BindingPlan] = []
    if delay_levels:
        exchanges, delay_queues, bindings = _plan_delays(exchange, delay_levels, delay_kind, specs)
        planned.extend(delay_queues)
    if status:
        exchanges.append(status_exchange_name(exchange))
    if scheduler is not None:
        name = scheduler_queue_name(exchange)
        planned.append(QueuePlan(name, "scheduler", "", scheduler_queue_arguments(scheduler)))
    names = [q.name for q in planned]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"queue names collide in the plan: {', '.join(duplicates)}")
    return TopologyPlan(exchange, tuple(planned), tuple(exchanges), tuple(bindings))


def _plan_main(spec: QueueSpec, delays: Iterable[float]) -> list[QueuePlan]:
    """A main queue, its retry tiers (one per distinct delay) and its parking queue."""
    parking = parking_queue_name(spec.name)
    planned = [QueuePlan(parking, "parking", spec.name, _parking_arguments(spec))]
    for delay in sorted(set(delays)):
        name = retry_queue_name(spec.name, delay)
        planned.append(
            QueuePlan(name, "retry", spec.name, _retry_arguments(spec, delay), delay=delay)
        )
    main_arguments = _main_arguments(spec, parking)
    planned.append(QueuePlan(spec.name, "main", spec.name, main_arguments, spec.patterns))
    return planned


# -- delayed publishing: binary-decomposed delay levels (as NServiceBus does) -----------------
#
# Level L holds messages for 2**L seconds in one queue (one TTL per queue: no head-of-line
# blocking). A delayed job's routing key is its delay in binary, highest level first, then its
# job name: "0.0.1.0.1.email.send" waits 4 s + 1 s. Each level's exchange sends a message whose
# bit is 1 into its wait queue and one whose bit is 0 straight on; a wait queue dead-letters to
# the next level (keeping the routing key), and the last level hands over to `<X>.delayed`,
# whose bindings mirror the main queues' patterns behind exactly `levels` one-word bits.


def delay_exchange_name(exchange: str, level: int) -> str:
    return f"{exchange}.delay.{level}"


def delivery_exchange_name(exchange: str) -> str:
    return f"{exchange}.delayed"


def delay_route(exchange: str, levels: int, seconds: float, job_name: str) -> tuple[str, str]:
    """Where to publish a job delayed by ``seconds`` (rounded up to whole seconds)."""
    whole = max(0, math.ceil(seconds))
    if whole >= 2**levels:
        raise ConfigError(
            f"delay {seconds:g}s exceeds the {2**levels - 1}s maximum of {levels} delay levels"
        )
    bits = ".".join(str((whole >> level) & 1) for level in reversed(range(levels)))
    return delay_exchange_name(exchange, levels - 1), f"{bits}.{job_name}"


def _plan_delays(
    exchange: str, levels: int, kind: QueueKind, mains: list[QueueSpec]
) -> tuple[list[str], list[QueuePlan], list[BindingPlan]]:
    delivery = delivery_exchange_name(exchange)
    exchanges = [delay_exchange_name(exchange, level) for level in range(levels)] + [delivery]
    queues: list[QueuePlan] = []
    bindings: list[BindingPlan] = []
    for level in range(levels):
        source = delay_exchange_name(exchange, level)
        following = delay_exchange_name(exchange, level - 1) if level else delivery
        queue = f"{source}.{tier_label(2**level)}"
        arguments = _kind_arguments_for(kind)
        arguments["x-message-ttl"] = 2**level * 1000
        arguments["x-dead-letter-exchange"] = following  # no routing key: keep the bits
        queues.append(QueuePlan(queue, "delay", "", arguments, delay=float(2**level)))
        prefix = "*." * (levels - 1 - level)
        bindings.append(BindingPlan(source, queue, f"{prefix}1.#"))
        bindings.append(BindingPlan(source, following, f"{prefix}0.#", to_exchange=True))
    bits = "*." * levels
    for spec in mains:
        bindings.extend(BindingPlan(delivery, spec.name, f"{bits}{p}") for p in spec.patterns)
    return exchanges, queues, bindings


def _kind_arguments(spec: QueueSpec) -> dict[str, Any]:
    return _kind_arguments_for(spec.kind)


def _kind_arguments_for(kind: QueueKind) -> dict[str, Any]:
    if kind == "classic":
        return {}
    # Quorum dead-lettering is at-most-once unless at-least-once, which needs reject-publish.
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def _main_arguments(spec: QueueSpec, parking: str) -> dict[str, Any]:
    arguments = _kind_arguments(spec)
    arguments["x-dead-letter-exchange"] = DEFAULT_EXCHANGE
    arguments["x-dead-letter-routing-key"] = parking
    if spec.kind == "classic":
        if spec.max_priority is not None:
            arguments["x-max-priority"] = spec.max_priority
    else:
        # 4.x drops a message past the default limit of 20 when no DLX is set; be explicit.
        arguments["x-delivery-limit"] = spec.delivery_limit
    return arguments


def _retry_arguments(spec: QueueSpec, delay: float) -> dict[str, Any]:
    arguments = _kind_arguments(spec)
    arguments["x-message-ttl"] = round(delay * 1000)
    arguments["x-dead-letter-exchange"] = DEFAULT_EXCHANGE
    arguments["x-dead-letter-routing-key"] = spec.name
    if spec.kind == "quorum":
        # Nothing consumes a tier, but 4.x would apply its default limit (20) to any return.
        arguments["x-delivery-limit"] = spec.delivery_limit
    return arguments


# Browsing parked jobs returns them to the queue; on 4.x every return may count toward the
# quorum delivery limit (default 20, then dropped): make that limit unreachable in practice.
PARKING_DELIVERY_LIMIT = 1_000_000


def _parking_arguments(spec: QueueSpec) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    if spec.kind == "quorum":
        arguments = {"x-queue-type": "quorum", "x-delivery-limit": PARKING_DELIVERY_LIMIT}
    if spec.parked_ttl is not None:
        arguments["x-message-ttl"] = round(spec.parked_ttl * 1000)
    return arguments
