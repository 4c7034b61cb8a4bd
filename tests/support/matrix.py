"""The quorum matrix: ``BJTEST_QUEUE_KIND=quorum`` makes every app of a test run use quorum queues.

``force_queue_kind`` rewrites ``App`` in this process (pytest, and the worker and scheduler
processes the tests start, which inherit the variable), so tests need no change to run on
either kind; tests whose expectations differ by kind read ``FORCED_KIND`` or ``queue_kind``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from brokerjobs import App
from brokerjobs.topology import QueueKind

KIND_ENV = "BJTEST_QUEUE_KIND"  # not BROKERJOBS_*: fault tests clear those for their workers
FORCED_KIND: QueueKind | None = None
_value = os.environ.get(KIND_ENV, "")
if _value in ("classic", "quorum"):
    FORCED_KIND = _value  # type: ignore[assignment]
elif _value:
    raise RuntimeError(f"{KIND_ENV}={_value!r}: use 'classic' or 'quorum'")


def queue_kind(app: App, queue: str) -> QueueKind:
    """The kind ``queue`` of ``app`` really gets (after any forcing)."""
    return app.queues[queue].kind


def force_queue_kind() -> None:
    """Apply ``BJTEST_QUEUE_KIND`` to every App created from now on (idempotent)."""
    if FORCED_KIND is None or getattr(App, "_bj_forced", False):
        return
    kind = FORCED_KIND
    init, add_queue = App.__init__, App.queue

    @functools.wraps(init)
    def forced_init(self: App, name: str, **kwargs: Any) -> None:
        init(self, name, **{**kwargs, "queue_kind": kind})

    @functools.wraps(add_queue)
    def forced_queue(self: App, name: str, *patterns: str, **kwargs: Any) -> Any:
        return add_queue(self, name, *patterns, **{**kwargs, "kind": kind})

    App.__init__ = forced_init  # type: ignore[method-assign]
    App.queue = forced_queue  # type: ignore[method-assign]
    App._bj_forced = True  # type: ignore[attr-defined]


def delivery_order(
    published: list[tuple[str, int]],
    kind: QueueKind,
    max_priority: int | None,
    version: tuple[int, ...],
) -> list[str]:
    """The order in which a consumer at prefetch 1 gets ``published`` (label, priority) jobs
    that all waited in one queue, as each broker version really does it."""
    if kind == "classic":
        if not max_priority:
            return [label for label, _ in published]
        return _strict(published, max_priority)
    if version >= (4, 3):
        return _strict(published, 31)
    if version >= (4, 0):
        return _two_levels(published)
    return [label for label, _ in published]  # 3.x: quorum queues ignore priorities


def _strict(published: list[tuple[str, int]], cap: int) -> list[str]:
    ranked = sorted(enumerate(published), key=lambda item: (-min(item[1][1], cap), item[0]))
    return [label for _, (label, _) in ranked]


def _two_levels(published: list[tuple[str, int]]) -> list[str]:
    # RabbitMQ 4.0-4.2 (rabbit_fifo_q): 5+ is high, and while both levels wait, two high
    # jobs go out for every normal one.
    high = [label for label, p in published if p >= 5]
    normal = [label for label, p in published if p < 5]
    order: list[str] = []
    streak = 0
    while high or normal:
        if high and (streak < 2 or not normal):
            order.append(high.pop(0))
            streak += 1
        else:
            order.append(normal.pop(0))
            streak = 0
    return order
