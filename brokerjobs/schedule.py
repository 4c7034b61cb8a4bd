"""Schedules, pure: rules and their ticks, catch-up of missed ticks, and the scheduler's state.

No I/O here: ``brokerjobs.scheduler`` holds the leader token and publishes what these rules say.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, TypeAlias, cast

from pydantic import BaseModel

from brokerjobs.errors import ConfigError
from brokerjobs.jobs import spec_of


def _croniter() -> Any:
    """croniter (and dateutil) only for apps with cron schedules: ~0.6 MiB spared otherwise."""
    from croniter import croniter  # type: ignore[import-untyped]

    return croniter


# The scheduler's logger: a bad token is reported where it always was.
log = logging.getLogger("brokerjobs.scheduler")

CatchUp = Literal["latest", "all", "none"]
Interval: TypeAlias = timedelta | float
# A job, or a function making one: with no argument, or with the tick (a UTC datetime).
ScheduleTarget: TypeAlias = BaseModel | Callable[[], BaseModel] | Callable[[datetime], BaseModel]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_INTERVAL = timedelta(seconds=1)
# Longer intervals or graces push tick arithmetic past the year 9999 (an OverflowError when the
# scheduler computes the tick, not when the app is defined).
MAX_PERIOD = timedelta(days=100 * 365)
DEFAULT_GRACE = timedelta(seconds=30)
MAX_CATCH_UP = 100  # jobs one schedule publishes at most in one catch-up


# -- rules: pure tick arithmetic -------------------------------------------------------------


class Rule(Protocol):
    def next_after(self, t: datetime) -> datetime: ...
    def prev_before(self, t: datetime) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Every:
    """Ticks at whole multiples of ``period`` since the Unix epoch (UTC): drift-free."""

    period: timedelta

    def next_after(self, t: datetime) -> datetime:
        return EPOCH + ((t - EPOCH) // self.period + 1) * self.period

    def prev_before(self, t: datetime) -> datetime:
        k = (t - EPOCH) // self.period
        tick = EPOCH + k * self.period
        return tick if tick < t else tick - self.period

    def __str__(self) -> str:
        return f"every({self.period.total_seconds():g}s)"


@dataclass(frozen=True, slots=True)
class Cron:
    """A cron expression evaluated in UTC (5 fields, or 6 with seconds last)."""

    expression: str

    def next_after(self, t: datetime) -> datetime:
        tick: datetime = _croniter()(self.expression, t).get_next(datetime)
        return tick

    def prev_before(self, t: datetime) -> datetime:
        tick: datetime = _croniter()(self.expression, t).get_prev(datetime)
        return tick

    def __str__(self) -> str:
        return f"cron({self.expression})"


def at_or_before(rule: Rule, t: datetime) -> datetime:
    """The latest tick <= t."""
    return rule.prev_before(rule.next_after(t))


@dataclass(frozen=True, slots=True)
class TickPlan:
    """What to publish now: ``ticks`` (ascending), the new state, and the skipped range."""

    ticks: tuple[datetime, ...]
    done_through: datetime
    skipped: tuple[datetime, datetime] | None = None  # first and last skipped tick


def plan_ticks(
    rule: Rule,
    done_through: datetime,
    now: datetime,
    catch_up: CatchUp,
    grace: timedelta,
    limit: int = MAX_CATCH_UP,
) -> TickPlan:
    """Due ticks are those in (done_through, now]. A tick at most ``grace`` late is on time and
    always published; older ones were missed: ``all`` publishes them too, ``latest`` collapses
    them into one run (the most recent missed tick, unless an on-time tick runs anyway),
    ``none`` skips them. Never more than ``limit`` ticks, the most recent ones.
    """
    latest = at_or_before(rule, now)
    if latest <= done_through:
        return TickPlan((), done_through)
    cutoff = now - grace
    ticks: list[datetime] = []
    tick = latest
    while tick > done_through and len(ticks) < limit:
        if tick < cutoff and (catch_up == "none" or (catch_up == "latest" and ticks)):
            break
        ticks.append(tick)
        tick = rule.prev_before(tick)
    ticks.reverse()
    # What is published is always the newest run of due ticks; anything before it is skipped.
    first_due = rule.next_after(done_through)
    skipped = None
    if not ticks:
        skipped = (first_due, latest)
    elif ticks[0] > first_due:
        skipped = (first_due, rule.prev_before(ticks[0]))
    return TickPlan(tuple(ticks), latest, skipped)


# -- schedules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Schedule:
    """One registered schedule; ``name`` keys its state and its job ids, keep it stable."""

    name: str
    rule: Every | Cron
    factory: Callable[[datetime], BaseModel]
    catch_up: CatchUp
    grace: timedelta

    def job_for(self, tick: datetime) -> BaseModel:
        job = self.factory(tick)
        if not isinstance(job, BaseModel):
            raise ConfigError(f"schedule {self.name!r} made {type(job).__name__}, not a job")
        spec_of(job)  # a clear error for a model that is not a @job
        return job


def _seconds(value: Interval, what: str) -> timedelta:
    period = None
    if isinstance(value, timedelta):
        period = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # NaN, infinities, 1e20
            period = timedelta(seconds=value)
    else:
        raise ConfigError(f"{what} must be seconds or a timedelta, got {value!r}")
    if period is None or period > MAX_PERIOD:
        raise ConfigError(f"{what}={value!r} is not a number of seconds up to 100 years")
    return period


def _rule(cron: str | None, every: Interval | None) -> Every | Cron:
    if (cron is None) == (every is None):
        raise ConfigError("a schedule needs exactly one of cron='...' or every=<seconds>")
    if cron is not None:
        # A 7th field (a year) is refused: a rule that stops firing fails at the first tick
        # after its last one, long after start-up.
        fields = len(cron.split()) if isinstance(cron, str) else 0
        alias = isinstance(cron, str) and cron.startswith("@")  # @hourly, @daily, ...
        if not (fields in (5, 6) or alias) or not _croniter().is_valid(cron):
            raise ConfigError(
                f"invalid cron expression {cron!r}: use 5 fields 'minute hour day month "
                "weekday' (UTC), e.g. '*/5 * * * *', or 6 with seconds last"
            )
        return _firing(Cron(cron))
    assert every is not None
    period = _seconds(every, "every")
    if period < MIN_INTERVAL:
        raise ConfigError(f"every={every!r} is below the minimum of 1 second")
    return Every(period)


def _firing(rule: Cron) -> Cron:
    try:
        rule.next_after(datetime.now(UTC))
    except Exception:  # croniter's CroniterBadDateError: no such date, e.g. 31 February
        raise ConfigError(
            f"cron expression {rule.expression!r} never fires (a day the month does not have?)"
        ) from None
    return rule


def _factory(target: ScheduleTarget) -> tuple[Callable[[datetime], BaseModel], str]:
    """Normalise the target to ``factory(tick)``; also return a label for the default name."""
    if isinstance(target, BaseModel):
        job = target
        return (lambda _tick: job), spec_of(job).name
    if not callable(target):
        raise ConfigError(f"schedule a job instance or a function returning one, not {target!r}")
    func = cast(Callable[..., BaseModel], target)
    if isinstance(func, type):
        label = spec_of(func).name  # a job class: called without arguments
    else:
        label = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
    if _takes_tick(func):
        return func, label
    return (lambda _tick: func()), label


def _takes_tick(func: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional for p in parameters)


def make_schedule(
    target: ScheduleTarget,
    *,
    cron: str | None = None,
    every: Interval | None = None,
    name: str | None = None,
    catch_up: CatchUp = "latest",
    grace: Interval = DEFAULT_GRACE,
) -> Schedule:
    """Validate a schedule definition (``App.schedule`` calls this)."""
    rule = _rule(cron, every)
    if catch_up not in ("latest", "all", "none"):
        raise ConfigError(f"catch_up must be 'latest', 'all' or 'none', got {catch_up!r}")
    grace_period = _seconds(grace, "grace")
    if grace_period < timedelta(0):
        raise ConfigError("grace must not be negative")
    factory, label = _factory(target)
    if name is None:
        if "<" in label:
            raise ConfigError(
                f"give this schedule a name= ({label} is not a stable name): the name keys "
                "the schedule's state and its job ids"
            )
        name = f"{label}@{rule}"
    if not name:
        raise ConfigError("a schedule name must not be empty")
    return Schedule(name, rule, factory, catch_up, grace_period)


def tick_job_id(exchange: str, schedule: str, tick: datetime) -> str:
    """The job id of a tick: the same on every instance, so duplicates carry the same id."""
    return hashlib.sha256(f"{exchange}\n{schedule}\n{tick.isoformat()}".encode()).hexdigest()[:32]


# -- the token: scheduler state in one message -----------------------------------------------

State: TypeAlias = dict[str, datetime]  # schedule name -> every tick up to here is done


def encode_state(state: Mapping[str, datetime]) -> bytes:
    done = {name: tick.isoformat() for name, tick in sorted(state.items())}
    return json.dumps({"version": 1, "done_through": done}).encode()


def decode_state(body: bytes) -> State:
    """The state in a token; a malformed token counts as empty (and is replaced)."""
    try:
        done = json.loads(body)["done_through"]
        state = {str(name): datetime.fromisoformat(text) for name, text in done.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("ignoring a malformed scheduler token", extra={"action": "bad_token"})
        return {}
    return {name: t if t.tzinfo else t.replace(tzinfo=UTC) for name, t in state.items()}


def merge_state(into: State, other: Mapping[str, datetime]) -> None:
    for name, tick in other.items():
        if name not in into or tick > into[name]:
            into[name] = tick


def covers(state: Mapping[str, datetime], other: Mapping[str, datetime]) -> bool:
    """True when ``state`` knows at least as much as ``other``."""
    return all(name in state and state[name] >= tick for name, tick in other.items())
