"""What a scenario is: its metrics, its arms (the contestants) and its measuring function; the
registry the scenarios module fills, in table order; the arm sets most scenarios use.

A scenario compares two or more arms. With two: a baseline (A) and a subject (B), usually raw
aio-pika and brokerjobs, or brokerjobs without and with one feature. A contest compares the
subject (brokerjobs) with each other arm: raw aiormq and raw aio-pika on a plain queue, raw
aio-pika on a priority queue, and with ``--baseline`` brokerjobs of another commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench_common import Result
from bench_parent import Bench

Measure = Callable[[Bench, str], Awaitable[Result]]
Derive = Callable[[float, float], float]  # (A sample, B sample) of one round -> derived value


@dataclass(frozen=True, slots=True)
class Metric:
    key: str  # key in the arm's result
    label: str  # may use {jobs}, {latency_jobs}, {retry_jobs}, {rate}, {prefetch}, {delay_ms}
    unit: str  # "%": values are fractions, shown as percent
    higher_is_better: bool
    ratio_name: str | None = None  # named B/A ratio of medians in the RESULT line
    value_name: str | None = None  # named B median (or derived median) in the RESULT line
    derive: Derive | None = None  # a row computed from each round's (A, B) pair of `key`
    target: float | None = None  # B's value (or the derived one) should reach this


@dataclass(frozen=True, slots=True)
class Arm:
    key: str  # short name: progress lines, legend, ratio column ("bj/raw")
    title: str  # column title (or row title) in the table
    does: str  # legend: what this arm does
    suffix: str | None = ""  # RESULT name of subject/this ratio: ratio_name + "_" + suffix
    baseline: bool = False  # runs only with --baseline REV (brokerjobs from that commit)


Unavailable = Callable[[], str | None]  # why a scenario cannot run in this tree, or None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    metrics: tuple[Metric, ...]
    arms: tuple[Arm, ...]  # with two: (A baseline, B subject); ratios are subject/other
    measure: Measure
    repeat: int = 1  # runs of each arm per round (more pairs where the effect is small)
    subject: str = ""  # key of the arm compared with every other; "": the last arm
    unavailable: Unavailable | None = None

    @property
    def subject_arm(self) -> Arm:
        return next((a for a in self.arms if a.key == self.subject), self.arms[-1])

    @property
    def others(self) -> tuple[Arm, ...]:
        return tuple(a for a in self.arms if a is not self.subject_arm)


SCENARIOS: list[Scenario] = []


def vs_raw(raw: str, bj: str) -> tuple[Arm, Arm]:
    """The usual arms: raw aio-pika (A) against brokerjobs (B)."""
    return Arm("raw", "raw aio-pika", raw), Arm("bj", "brokerjobs", bj)


BASELINE = Arm(
    "old",
    "brokerjobs baseline",
    "the brokerjobs arm with brokerjobs imported from a git worktree of --baseline REV "
    "(the same benchmark code and venv; its own exchange and queue, declared by its worker)",
    suffix="baseline",
    baseline=True,
)


def contest(aiormq: str, pika: str, bj: str, typed: str = "") -> tuple[Arm, ...]:
    """The ceiling, the usual baseline on both queue kinds, brokerjobs (the subject) and, with
    --baseline, brokerjobs of another commit; with ``typed``, also raw aio-pika validating each
    body into brokerjobs' pydantic job model (pydantic's floor under brokerjobs)."""
    typed_arm = (Arm("typed", "raw aio-pika + pydantic, plain", typed + PLAIN, suffix="typed"),)
    return (
        Arm("aiormq", "raw aiormq, plain queue", aiormq + PLAIN, suffix="aiormq"),
        Arm("pika", "raw aio-pika, plain queue", pika + PLAIN, suffix="plain"),
        *(typed_arm if typed else ()),
        Arm("prio", "raw aio-pika, priority queue", "as pika, on a queue with x-max-priority=10"),
        Arm("bj", "brokerjobs", bj + " (on the app's queue: arguments in the header)", suffix=None),
        BASELINE,
    )


PLAIN = " (on a queue with brokerjobs' main-queue arguments minus x-max-priority)"


def scenario(
    name: str,
    *metrics: Metric,
    arms: tuple[Arm, ...],
    repeat: int = 1,
    subject: str = "",
    unavailable: Unavailable | None = None,
) -> Callable[[Measure], Measure]:
    def register(measure: Measure) -> Measure:
        SCENARIOS.append(Scenario(name, metrics, arms, measure, repeat, subject, unavailable))
        return measure

    return register


def difference(a: float, b: float) -> float:
    return b - a


def overhead(a: float, b: float) -> float:
    """How much slower B is than A, as a fraction of A's throughput: 1 - B/A."""
    return 1 - b / a
