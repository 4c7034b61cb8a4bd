"""The delivery pipeline: ordered middleware around each delivery and each publish.

A middleware subclasses ``Middleware`` and overrides the hooks it needs; every hook is optional.
For one delivery the worker calls, in this order (the before-points on every middleware in the
order they were added, the after-points in the reverse order, as layers unwind):

1. ``received(run)``: the delivery arrived (``run.job`` is still None).
2. ``decoded(run)``: the body is a valid job of a known type (``run.job``, ``run.job_name``).
3. ``before_handler(run)``: just before the handler runs (``run.context`` is set). A hook here
   may answer for the handler, which then does not run, by raising what a handler would:
   ``RetryLater`` (a limit reached, a circuit open: run it again later; the attempt counts) or
   ``PermanentFailure`` (park it), or ``SkipJob`` (settle it as completed: a duplicate already
   done; ``run.skipped`` says why). The first hook that answers ends the before-handler hooks,
   and the layers after it never saw the job: point 4 goes only to the answering middleware
   and those before it (``after_settle`` still to all), as if the handler had raised (or,
   skipped, returned None). Before-handler hooks run outside the job's timeout.
4. ``after_success(run)`` (``run.result``) or ``after_failure(run)`` (``run.failure`` and
   ``run.decision``: the retry or park that settlement is about to carry out; rarely, a retry
   whose copy cannot be sent is parked instead: ``run.decision`` is then updated before 5).
5. ``after_settle(run)``: the delivery is settled (``run.settled``): always called once,
   also for undecodable messages (no step 2-4), requeues on shutdown and unexpected errors.

A worker calls ``worker_started(worker)`` once consuming began and ``worker_stopping(worker)``
when it drains. A publisher calls ``before_publish(message, exchange, routing_key)`` for every
message it sends (it may add headers; one that raises stops that publish, with its error). An
exception in a delivery hook is logged and never changes how the delivery settles (but for the
answers of point 3): the pipeline observes and decorates, settlement decides.

Hooks the subclass does not override are never called: with no middleware (or none that
overrides a point) that point costs one empty-tuple check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from brokerjobs.envelope import Delivery, OutgoingMessage
from brokerjobs.signals import PermanentFailure, RetryLater, SkipJob

if TYPE_CHECKING:
    from pydantic import BaseModel

    from brokerjobs.context import JobContext
    from brokerjobs.outcomes import Settled
    from brokerjobs.retry import Decision, Failure

log = logging.getLogger("brokerjobs.middleware")


class JobRun:
    """One delivery as it passes the pipeline: what every hook sees, filled in as it goes."""

    __slots__ = (
        "_answered_by",
        "_state",
        "context",
        "decision",
        "delivery",
        "failure",
        "job",
        "job_name",
        "queue",
        "result",
        "settled",
        "skipped",
        "started_at",
    )

    def __init__(self, delivery: Delivery, queue: str) -> None:
        self.delivery = delivery
        self.queue = queue
        self.job_name: str = delivery.original_job_name
        self.started_at = time.monotonic()
        self.job: BaseModel | None = None
        self.context: JobContext | None = None
        self.result: object = None
        self.failure: Failure | None = None
        self.decision: Decision | None = None
        self.settled: Settled | None = None
        self.skipped: str | None = None  # why the handler did not run (a SkipJob answer)
        self._answered_by: int | None = None  # the middleware whose before_handler answered
        self._state: dict[object, Any] | None = None

    @property
    def state(self) -> dict[object, Any]:
        """Per-delivery scratch space for middleware, keyed by the middleware itself."""
        if self._state is None:
            self._state = {}
        return self._state

    @property
    def job_id(self) -> str:
        return self.delivery.message_id or f"delivery-{self.delivery.delivery_tag}"

    @property
    def attempt(self) -> int:
        return self.context.attempt if self.context is not None else self.delivery.attempt

    @property
    def elapsed(self) -> float:
        """Seconds since the delivery arrived."""
        return time.monotonic() - self.started_at


class Middleware:
    """Base class of every middleware: override the hooks you need (see the module doc)."""

    async def worker_started(self, worker: Any) -> None:
        """The worker consumes its queues (called once, after the first session opened)."""

    async def worker_stopping(self, worker: Any) -> None:
        """The worker was asked to stop and starts draining."""

    async def received(self, run: JobRun) -> None:
        """A delivery arrived; nothing is decoded yet."""

    async def decoded(self, run: JobRun) -> None:
        """The body is a valid job of a type this queue handles."""

    async def before_handler(self, run: JobRun) -> None:
        """The handler is about to run; raise ``RetryLater``, ``PermanentFailure`` or ``SkipJob``
        to answer in its place (it then does not run)."""

    async def after_success(self, run: JobRun) -> None:
        """The handler returned ``run.result``; the ack follows."""

    async def after_failure(self, run: JobRun) -> None:
        """The handler failed (``run.failure``); ``run.decision`` (retry or park) follows."""

    async def after_settle(self, run: JobRun) -> None:
        """The delivery is settled: ``run.settled`` says how."""

    def before_publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        """A publisher is about to send ``message`` (headers may be added here)."""


_DELIVERY_POINTS = (
    "received",
    "decoded",
    "before_handler",
    "after_success",
    "after_failure",
    "after_settle",
)
Hook = Callable[[JobRun], Any]
# What a before-handler hook may raise to answer for the handler.
ANSWERS: tuple[type[Exception], ...] = (RetryLater, PermanentFailure, SkipJob)


def _overrides(middleware: Middleware, point: str) -> bool:
    return getattr(type(middleware), point) is not getattr(Middleware, point)


class Pipeline:
    """The middleware of one worker or publisher, resolved per point once."""

    def __init__(self, middleware: Iterable[Middleware] = ()) -> None:
        self.middleware: tuple[Middleware, ...] = tuple(middleware)
        for m in self.middleware:
            if not isinstance(m, Middleware):
                raise TypeError(f"{m!r} is not a brokerjobs.Middleware")
        points = (*_DELIVERY_POINTS, "worker_started", "worker_stopping")
        self._owners: dict[str, tuple[int, ...]] = {
            point: tuple(i for i, m in enumerate(self.middleware) if _overrides(m, point))
            for point in points
        }
        self._hooks: dict[str, tuple[Hook, ...]] = {
            point: tuple(getattr(self.middleware[i], point) for i in owners)
            for point, owners in self._owners.items()
        }
        self._entered: dict[tuple[str, int], tuple[Hook, ...]] = {}
        self.received = self._hooks["received"]
        self.decoded = self._hooks["decoded"]
        self.before_handler = self._hooks["before_handler"]
        # After-points run in reverse order, as layers unwind: the first middleware (telemetry,
        # whose span holds the others) sees the delivery first and last.
        self.after_success = self._hooks["after_success"][::-1]
        self.after_failure = self._hooks["after_failure"][::-1]
        self.after_settle = self._hooks["after_settle"][::-1]
        self.publishing: tuple[Callable[[OutgoingMessage, str, str], None], ...] = tuple(
            m.before_publish for m in self.middleware if _overrides(m, "before_publish")
        )
        # Whether any delivery hook exists: without one the consumer builds no JobRun.
        self.watches_deliveries = any(self._hooks[p] for p in _DELIVERY_POINTS)

    async def run(self, hooks: tuple[Hook, ...], run: JobRun) -> None:
        """Call ``hooks`` in order; one that raises is logged and the others still run."""
        await _call_each(hooks, run)

    async def before_handler_hooks(self, run: JobRun) -> None:
        """Call the before-handler hooks; the first answer (see ``ANSWERS``) stops them and is
        raised for the consumer to settle by."""
        for owner, hook in zip(self._owners["before_handler"], self.before_handler, strict=True):
            try:
                await hook(run)
            except ANSWERS:
                run._answered_by = owner
                raise
            except Exception:
                _log_failure(hook, run)

    def unwinding(self, point: str, run: JobRun) -> tuple[Hook, ...]:
        """The hooks of after-point ``point`` for the layers ``run`` entered: all, unless a
        before-handler hook answered: then that middleware's and those before it."""
        hooks: tuple[Hook, ...] = getattr(self, point)
        answered_by = run._answered_by
        if answered_by is None:
            return hooks
        entered = self._entered.get((point, answered_by))
        if entered is None:
            owners = self._owners[point][::-1]
            entered = tuple(h for o, h in zip(owners, hooks, strict=True) if o <= answered_by)
            self._entered[point, answered_by] = entered
        return entered

    async def run_all(self, hooks: tuple[Hook, ...], run: JobRun) -> None:
        """As ``run``, but every hook runs even if the task is cancelled meanwhile (a shutdown
        past its grace period): the cancellation is raised again after the last one."""
        await _call_each(hooks, run, finish_all=True)

    async def worker_event(self, point: str, worker: Any) -> None:
        await _call_each(self._hooks[point], worker)

    def before_publish(self, message: OutgoingMessage, exchange: str, routing_key: str) -> None:
        for hook in self.publishing:
            hook(message, exchange, routing_key)


async def _call_each(
    hooks: tuple[Callable[[Any], Any], ...], arg: object, *, finish_all: bool = False
) -> None:
    cancelled: asyncio.CancelledError | None = None
    for hook in hooks:
        try:
            await hook(arg)
        except asyncio.CancelledError as exc:
            if not finish_all:
                raise
            cancelled = exc
        except Exception:
            _log_failure(hook, arg)
    if cancelled is not None:
        raise cancelled


def _log_failure(hook: Callable[..., Any], arg: object) -> None:
    where = f" on job {arg.job_id}" if isinstance(arg, JobRun) else ""
    log.exception("middleware %s failed%s", _name(hook), where)


def _name(hook: Callable[..., Any]) -> str:
    owner = getattr(hook, "__self__", None)
    return f"{type(owner).__name__}.{hook.__name__}" if owner is not None else repr(hook)
