"""An app: its exchange, its queues and which handler runs each job type on each queue."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias, TypeVar, overload

from pydantic import BaseModel

from brokerjobs.errors import ConfigError
from brokerjobs.hooks import HookCallback, HookEvent, LifecycleHooks
from brokerjobs.jobs import JobSpec, spec_of
from brokerjobs.middleware import Middleware
from brokerjobs.priorities import PriorityFinding, check_queue, classic_max_priority
from brokerjobs.retry import RetryPolicy
from brokerjobs.schedule import (
    DEFAULT_GRACE,
    CatchUp,
    Interval,
    Schedule,
    ScheduleTarget,
    make_schedule,
)
from brokerjobs.topology import QueueKind, QueueSpec, TopologyPlan, plan, topic_matches

J = TypeVar("J", bound=BaseModel)
# A handler may return a JSON-able result; it is reported with the "completed" status.
HandlerFunc: TypeAlias = Callable[[J], Awaitable[object]] | Callable[[J], object]
RunIn = Literal["loop", "thread", "process"]


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    job: JobSpec
    func: Callable[[Any], Any]
    queue: str
    run_in: RunIn
    retry: RetryPolicy
    timeout: float | None
    slow_after: float | None = None


class App:
    """The consumer side of a service: ``brokerjobs worker module:app`` runs it.

    >>> app = App("shop")
    >>> @app.handler(SendEmail)
    ... async def send_email(job: SendEmail) -> None: ...
    """

    def __init__(
        self,
        name: str,
        *,
        exchange: str | None = None,
        queue_kind: QueueKind = "classic",
        track_status: bool = False,
        delay_levels: int = 0,
        middleware: Iterable[Middleware] = (),
        slow_job_after: float | None = None,
        on_slow_job: Callable[[Any], object] | None = None,
    ) -> None:
        """``track_status`` publishes job states and progress to ``<exchange>.status``;
        ``delay_levels`` > 0 adds the queues for delayed publishing (2**levels - 1 s at most).
        ``middleware`` run around every delivery and publish (``brokerjobs.Middleware``);
        ``slow_job_after`` (seconds) reports jobs still running past it, to ``on_slow_job``
        (a ``SlowJob``) as well as the log and metrics, while they run.
        """
        if not name:
            raise ConfigError("an app needs a name")
        if not 0 <= delay_levels <= 32:
            raise ConfigError("delay_levels must be 0..32 (32 levels delay up to 136 years)")
        self.name = name
        self.exchange = exchange or name
        self.queue_kind: QueueKind = queue_kind
        self.track_status = track_status
        self.delay_levels = delay_levels
        self._queues: dict[str, QueueSpec] = {}
        self._handlers: dict[str, dict[str, HandlerSpec]] = {}
        self.schedules: list[Schedule] = []
        self.middleware: list[Middleware] = list(middleware)
        if slow_job_after is not None and slow_job_after <= 0:
            raise ConfigError("slow_job_after must be positive seconds")
        self.slow_job_after = slow_job_after
        self.on_slow_job = on_slow_job
        self._hooks: LifecycleHooks | None = None

    def use(self, *middleware: Middleware) -> None:
        """Add middleware after those already added (each runs in the order added)."""
        for m in middleware:
            if not isinstance(m, Middleware):
                raise ConfigError(f"{m!r} is not a brokerjobs.Middleware")
        self.middleware.extend(middleware)

    @overload
    def on(self, event: HookEvent, callback: HookCallback) -> HookCallback: ...

    @overload
    def on(self, event: HookEvent) -> Callable[[HookCallback], HookCallback]: ...

    def on(
        self, event: HookEvent, callback: HookCallback | None = None
    ) -> HookCallback | Callable[[HookCallback], HookCallback]:
        """Call ``callback(run)`` on ``"start"``, ``"complete"`` or ``"fail"`` of every job
        (``brokerjobs.hooks``); without ``callback``, a decorator."""
        if self._hooks is None:
            self._hooks = LifecycleHooks()
            self.use(self._hooks)
        hooks = self._hooks

        def register(func: HookCallback) -> HookCallback:
            hooks.add(event, func)
            return func

        return register if callback is None else register(callback)

    def slow_thresholds(self) -> dict[str, float]:
        """Job name -> slow-job threshold, for the handlers that set one."""
        return {
            name: h.slow_after
            for handlers in self._handlers.values()
            for name, h in handlers.items()
            if h.slow_after is not None
        }

    def queue(
        self,
        name: str,
        *patterns: str,
        kind: QueueKind | None = None,
        max_priority: int | None = None,
        delivery_limit: int = 20,
        prefetch: int | None = None,
        parked_ttl: float | None = None,
    ) -> QueueSpec:
        """Add a main queue bound to the app's exchange with topic ``patterns``.

        A classic queue is a priority queue only if ``max_priority`` asks for one (for jobs
        published with a per-message priority) or a job handled on it declares a priority; then
        ``x-max-priority`` is the highest such priority. Parked jobs are kept until replayed or
        purged; ``parked_ttl`` (seconds) drops them after that long instead.
        """
        if name in self._queues:
            raise ConfigError(f"queue {name!r} is defined twice in app {self.name!r}")
        spec = QueueSpec(
            name,
            patterns,
            kind or self.queue_kind,
            max_priority,
            delivery_limit,
            prefetch,
            parked_ttl,
        )
        self._queues[name] = spec
        self._handlers.setdefault(name, {})
        return spec

    def handler(
        self,
        job_type: type[J],
        *,
        queue: str | QueueSpec | None = None,
        retry: RetryPolicy | None = None,
        run_in: RunIn | None = None,
        timeout: float | None = None,
        slow_after: float | None = None,
    ) -> Callable[[HandlerFunc[J]], HandlerFunc[J]]:
        """Register the decorated function as the handler of ``job_type`` on ``queue``.

        Without ``queue`` the job gets its own queue ``<app>.<job name>``. Async functions run on
        the event loop; plain functions run in a thread (``run_in="process"`` for CPU-bound work).
        ``slow_after``: seconds after which a still running job is reported (see ``App``).
        """
        if slow_after is not None and slow_after <= 0:
            raise ConfigError("slow_after must be positive seconds")
        job = spec_of(job_type)
        queue_name = self._queue_for(job, queue)

        def register(func: HandlerFunc[J]) -> HandlerFunc[J]:
            is_async = inspect.iscoroutinefunction(func)
            mode: RunIn = run_in or ("loop" if is_async else "thread")
            if is_async and mode != "loop":
                raise ConfigError(f"{func.__qualname__} is async: it runs on the loop, not {mode}")
            if not is_async and mode == "loop":
                raise ConfigError(f"{func.__qualname__} is not async: use run_in='thread'")
            handlers = self._handlers[queue_name]
            if job.name in handlers:
                raise ConfigError(f"job {job.name!r} already has a handler on queue {queue_name!r}")
            handlers[job.name] = HandlerSpec(
                job, func, queue_name, mode, retry or job.retry, timeout, slow_after
            )
            return func

        return register

    def _queue_for(self, job: JobSpec, queue: str | QueueSpec | None) -> str:
        if queue is None:
            name = f"{self.name}.{job.name}"
            if name not in self._queues:
                self.queue(name, job.name)
            return name
        name = queue.name if isinstance(queue, QueueSpec) else queue
        spec = self._queues.get(name)
        if spec is None:
            raise ConfigError(f"queue {name!r} is not defined: add app.queue({name!r}, 'pattern')")
        if not any(topic_matches(p, job.name) for p in spec.patterns):
            raise ConfigError(
                f"queue {name!r} (bound to {', '.join(spec.patterns)}) would never receive "
                f"job {job.name!r}: add a matching pattern"
            )
        return name

    @property
    def queues(self) -> Mapping[str, QueueSpec]:
        return self._queues

    def select_queues(self, queues: Iterable[str] | None) -> list[str]:
        """The queues to consume: all of the app's by default; unknown names are an error."""
        selected = list(queues) if queues is not None else list(self._queues)
        unknown = [q for q in selected if q not in self._queues]
        if unknown:
            raise ConfigError(f"app {self.name!r} has no queue(s) {unknown}: {list(self._queues)}")
        return selected

    def handlers(self, queue: str) -> Mapping[str, HandlerSpec]:
        return self._handlers[queue]

    def jobs(self, queue: str) -> Mapping[str, JobSpec]:
        return {name: h.job for name, h in self._handlers[queue].items()}

    def job_priorities(self, queue: str) -> dict[str, int]:
        """Job name -> declared priority, for the jobs handled on ``queue``."""
        return {name: h.job.priority for name, h in self._handlers[queue].items()}

    def max_priority(self, queue: str) -> int | None:
        """The ``x-max-priority`` a classic queue is declared with (None: none)."""
        spec = self._queues[queue]
        if spec.kind != "classic":
            return None
        return classic_max_priority(spec.max_priority, self.job_priorities(queue).values())

    def priority_findings(
        self, version: tuple[int, ...], queues: Iterable[str] | None = None
    ) -> list[PriorityFinding]:
        """Job priorities that the queues will not honour as written on broker ``version``."""
        return [
            finding
            for name in self.select_queues(queues)
            for finding in check_queue(
                name,
                self._queues[name].kind,
                self.max_priority(name),
                self.job_priorities(name),
                version,
            )
        ]

    def topology(self) -> TopologyPlan:
        return plan(
            self.exchange,
            (
                (
                    replace(spec, max_priority=self.max_priority(name)),
                    [d for h in self._handlers[name].values() for d in h.retry.delays],
                )
                for name, spec in self._queues.items()
            ),
            delay_levels=self.delay_levels,
            delay_kind=self.queue_kind,
            status=self.track_status,
            scheduler=self.queue_kind if self.schedules else None,
        )

    def schedule(
        self,
        target: ScheduleTarget,
        *,
        cron: str | None = None,
        every: Interval | None = None,
        name: str | None = None,
        catch_up: CatchUp = "latest",
        grace: Interval = DEFAULT_GRACE,
    ) -> Schedule:
        """Publish ``target`` on a cron rule (UTC) or every ``every`` seconds.

        ``target`` is a job, or a function returning one (given the tick if it takes an
        argument). Ticks more than ``grace`` late were missed (no scheduler was running):
        ``catch_up="latest"`` runs them once, ``"all"`` runs each (at most 100), ``"none"``
        skips them.
        ``brokerjobs scheduler module:app`` runs the schedules; see docs/scheduler.md.
        """
        schedule = make_schedule(
            target, cron=cron, every=every, name=name, catch_up=catch_up, grace=grace
        )
        if any(s.name == schedule.name for s in self.schedules):
            raise ConfigError(
                f"schedule {schedule.name!r} is defined twice in app {self.name!r}: "
                "give each one its own name="
            )
        self.schedules.append(schedule)
        return schedule
