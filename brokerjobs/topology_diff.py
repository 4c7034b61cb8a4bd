"""Pure comparison of an app's plan with the broker's queues: what is obsolete, what differs.

Given the plan and a list of the broker's queues (name, arguments, depth), a queue the plan lacks
is *obsolete* when the app's naming scheme made it:

- ``M.retry.<label>`` of a planned main ``M`` (a tier of an older retry policy): its messages
  belong back in ``M``;
- ``M.retry.<label>``, ``M.parked``, or ``M`` itself (dead-lettering to ``M.parked``) for a main
  ``M`` under the app's name (``<app>.``) that the plan no longer has (a removed handler): there
  is no planned queue to move their messages to.

Anything else is someone else's queue and is never reported. A planned queue whose arguments
differ from the broker's is *differing* (redeclaring it would fail).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from brokerjobs.topology import TopologyPlan

_TIER = re.compile(r"^(?P<main>.+)\.retry\.(?P<label>\d+(?:ms|s|m|h))$")
_DL_KEY = "x-dead-letter-routing-key"
_ABSENT = object()
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


@dataclass(frozen=True, slots=True)
class BrokerQueue:
    """A queue as the broker has it; ``arguments`` None when the source cannot tell them."""

    name: str
    messages: int
    arguments: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Obsolete:
    queue: BrokerQueue
    why: str
    main: str | None  # the planned main queue its messages go back to; None: none planned
    quorum: bool = False  # from its arguments, else (unknown) from its planned main queue's

    @property
    def name(self) -> str:
        return self.queue.name


@dataclass(frozen=True, slots=True)
class Differs:
    name: str
    arguments: tuple[tuple[str, Any, Any], ...]  # (argument, planned, broker); absent: None


@dataclass(frozen=True, slots=True)
class TopologyDiff:
    obsolete: tuple[Obsolete, ...] = ()
    differing: tuple[Differs, ...] = ()
    missing: tuple[str, ...] = field(default=())  # planned, not on the broker

    @property
    def clean(self) -> bool:
        return not (self.obsolete or self.differing)

    def describe(self) -> str:
        if self.clean and not self.missing:
            return "the broker matches the plan: nothing obsolete, nothing differs"
        lines = [
            f"obsolete {o.name} ({o.queue.messages} message(s)): {o.why}" for o in self.obsolete
        ]
        for d in self.differing:
            for argument, planned, broker in d.arguments:
                lines.append(
                    f"differs  {d.name}: {argument} planned {_show(planned)}, "
                    f"broker has {_show(broker)}"
                )
        lines += [f"missing  {name}: run `brokerjobs topology declare`" for name in self.missing]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "obsolete": [
                {"queue": o.name, "messages": o.queue.messages, "why": o.why, "main": o.main}
                for o in self.obsolete
            ],
            "differing": [
                {"queue": d.name, "argument": a, "planned": p, "broker": b}
                for d in self.differing
                for a, p, b in d.arguments
            ],
            "missing": list(self.missing),
        }


def with_depths(found: TopologyDiff, depths: Mapping[str, int]) -> TopologyDiff:
    """``found`` with the obsolete queues' depths from ``depths`` (live counts: listings lag);
    an obsolete queue missing from ``depths`` is gone and left out."""
    obsolete = tuple(
        replace(o, queue=replace(o.queue, messages=depths[o.name]))
        for o in found.obsolete
        if o.name in depths
    )
    return replace(found, obsolete=obsolete)


def _show(value: Any) -> str:
    return "nothing" if value is None else repr(value)


def diff(plan: TopologyPlan, broker: Iterable[BrokerQueue], app_name: str) -> TopologyDiff:
    """Compare ``plan`` with the broker's queues; ``app_name`` scopes removed mains."""
    queues = {q.name: q for q in broker}
    planned = {q.name: q for q in plan.queues}
    mains = {q.name for q in plan.main_queues}
    quorum = {q.name for q in plan.main_queues if q.arguments.get("x-queue-type") == "quorum"}
    prefix = f"{app_name}."
    obsolete = [
        _with_kind(found, quorum)
        for name in sorted(set(queues) - set(planned), key=_order)
        if (found := classify(queues[name], mains, prefix)) is not None
    ]
    differing = [
        Differs(name, changes)
        for name in sorted(set(queues) & set(planned))
        if (changes := argument_changes(planned[name].arguments, queues[name].arguments))
    ]
    missing = [q.name for q in plan.queues if q.name not in queues]
    return TopologyDiff(tuple(obsolete), tuple(differing), tuple(missing))


def _with_kind(found: Obsolete, quorum_mains: set[str]) -> Obsolete:
    arguments = found.queue.arguments
    if arguments is not None:
        return replace(found, quorum=arguments.get("x-queue-type") == "quorum")
    return replace(found, quorum=found.main in quorum_mains)


def _order(name: str) -> tuple[str, int, int, str]:
    """Each main's queues together: the main, its tiers by delay, its parking queue."""
    tier = _TIER.match(name)
    if tier:
        label = tier["label"]
        unit = next(u for u in ("ms", "s", "m", "h") if label.endswith(u))
        millis = int(label.removesuffix(unit)) * _UNIT_MS[unit]
        return tier["main"], 1, millis, name
    if name.endswith(".parked"):
        return name.removesuffix(".parked"), 2, 0, name
    return name, 0, 0, name


def classify(queue: BrokerQueue, mains: set[str], prefix: str) -> Obsolete | None:
    """Why ``queue`` (not in the plan) is obsolete, or None when the app did not make it."""
    dead_letters_to = None if queue.arguments is None else queue.arguments.get(_DL_KEY, _ABSENT)
    tier = _TIER.match(queue.name)
    if tier:
        main = tier["main"]
        if dead_letters_to not in (None, main):
            return None  # named like a tier, but not one of ours
        if main in mains:
            return Obsolete(
                queue, f"retry tier {tier['label']} is no longer in {main}'s policy", main
            )
        if main.startswith(prefix):
            return Obsolete(queue, f"retry tier of {main}, which is no longer in the plan", None)
        return None
    if not queue.name.startswith(prefix):
        return None
    parked_main = queue.name.removesuffix(".parked")
    if parked_main != queue.name and parked_main not in mains:
        return Obsolete(
            queue, f"parking queue of {parked_main}, which is no longer in the plan", None
        )
    if dead_letters_to == f"{queue.name}.parked":
        return Obsolete(queue, "main queue no longer in the plan (no handler uses it)", None)
    return None


def argument_changes(
    planned: Mapping[str, Any], broker: Mapping[str, Any] | None
) -> tuple[tuple[str, Any, Any], ...]:
    """(argument, planned, broker) for each argument that differs; none if unknown."""
    if broker is None:
        return ()
    ours, theirs = _normal(planned), _normal(broker)
    return tuple(
        (key, ours.get(key), theirs.get(key))
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key, _ABSENT) != theirs.get(key, _ABSENT)
    )


def _normal(arguments: Mapping[str, Any]) -> dict[str, Any]:
    # A classic queue is classic whether or not it was declared with x-queue-type=classic.
    return {k: v for k, v in arguments.items() if not (k == "x-queue-type" and v == "classic")}


def drainable(found: Sequence[Obsolete]) -> list[Obsolete]:
    """The obsolete queues whose messages have a planned main queue to go back to."""
    return [o for o in found if o.main is not None]
