"""Tick arithmetic and catch-up rules are pure: tables of (rule, state, now) -> ticks to publish."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from pydantic import BaseModel

from brokerjobs import App, ConfigError, job
from brokerjobs.errors import JobDefinitionError
from brokerjobs.scheduler import (
    CatchUp,
    Cron,
    Every,
    TickPlan,
    at_or_before,
    covers,
    decode_state,
    encode_state,
    make_schedule,
    merge_state,
    plan_ticks,
    tick_job_id,
)


def t(text: str) -> datetime:
    """'12:00:05' or '2024-03-01 12:00:05.5' as a UTC datetime (the date defaults to 2024-01-01)."""
    if " " not in text:
        text = f"2024-01-01 {text}"
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@job("report.render")
class Render(BaseModel):
    at: datetime | None = None


SEC = Every(timedelta(seconds=1))
FIVE_MIN = Cron("*/5 * * * *")


@pytest.mark.parametrize(
    ("rule", "now", "next_after", "prev_before", "latest"),
    [
        (SEC, "12:00:05", "12:00:06", "12:00:04", "12:00:05"),
        (SEC, "12:00:05.3", "12:00:06", "12:00:05", "12:00:05"),
        (Every(timedelta(seconds=7)), "00:00:00", "00:00:04", "2023-12-31 23:59:57",
         "2023-12-31 23:59:57"),
        (Every(timedelta(hours=1)), "12:30:00", "13:00:00", "12:00:00", "12:00:00"),
        (Every(timedelta(milliseconds=1500)), "00:00:01", "00:00:01.5", "00:00:00", "00:00:00"),
        (FIVE_MIN, "12:00:00", "12:05:00", "11:55:00", "12:00:00"),
        (FIVE_MIN, "12:04:59.9", "12:05:00", "12:00:00", "12:00:00"),
        (Cron("0 3 * * *"), "12:00:00", "2024-01-02 03:00:00", "03:00:00", "03:00:00"),
        (Cron("* * * * * */10"), "12:00:05", "12:00:10", "12:00:00", "12:00:00"),
        (Cron("0 0 29 2 *"), "12:00:00", "2024-02-29 00:00:00", "2020-02-29 00:00:00",
         "2020-02-29 00:00:00"),
        (Cron("0 0 1 * *"), "2024-03-31 23:59:59", "2024-04-01 00:00:00",
         "2024-03-01 00:00:00", "2024-03-01 00:00:00"),
    ],
)  # fmt: skip
def test_rules_step_to_the_neighbouring_ticks(
    rule: Every | Cron, now: str, next_after: str, prev_before: str, latest: str
) -> None:
    assert rule.next_after(t(now)) == t(next_after)
    assert rule.prev_before(t(now)) == t(prev_before)
    assert at_or_before(rule, t(now)) == t(latest)


def test_interval_ticks_are_anchored_to_the_epoch_and_never_drift() -> None:
    rule = Every(timedelta(seconds=7))
    tick = rule.next_after(t("00:00:00"))
    seen = []
    for _ in range(1000):
        seen.append(tick)
        tick = rule.next_after(tick)
    assert all(b - a == timedelta(seconds=7) for a, b in pairwise(seen))
    assert all(s.timestamp() % 7 == 0 for s in seen)


GRACE = timedelta(seconds=30)


# case, rule, done through, now, catch_up, the ticks to publish, the ticks skipped
PLAN_CASES = [
    # on time: the tick the leader woke up for, in every mode
    ("on time", SEC, "12:00:04", "12:00:05.01", "latest", ["12:00:05"], None),
    ("on time", SEC, "12:00:04", "12:00:05.01", "none", ["12:00:05"], None),
    ("on time", SEC, "12:00:04", "12:00:05.01", "all", ["12:00:05"], None),
    ("early wake", SEC, "12:00:04", "12:00:04.999", "latest", [], None),
    ("nothing new", SEC, "12:00:05", "12:00:05.5", "all", [], None),
    ("clock behind state", SEC, "12:00:09", "12:00:05", "all", [], None),
    # a short handover: every late tick is within grace, none is skipped
    ("handover", SEC, "12:00:04", "12:00:07.2", "latest",
     ["12:00:05", "12:00:06", "12:00:07"], None),
    ("handover", SEC, "12:00:04", "12:00:07.2", "none",
     ["12:00:05", "12:00:06", "12:00:07"], None),
    # down for hours: only ticks more than `grace` late count as missed
    ("downtime", FIVE_MIN, "09:00:00", "12:00:10", "latest", ["12:00:00"],
     ("09:05:00", "11:55:00")),
    ("downtime", FIVE_MIN, "09:00:00", "12:00:40", "latest", ["12:00:00"],
     ("09:05:00", "11:55:00")),
    ("downtime", FIVE_MIN, "09:00:00", "12:00:40", "none", [], ("09:05:00", "12:00:00")),
    ("downtime", FIVE_MIN, "09:00:00", "12:03:00", "latest", ["12:00:00"],
     ("09:05:00", "11:55:00")),
    ("downtime", FIVE_MIN, "09:00:00", "12:00:10", "none", ["12:00:00"],
     ("09:05:00", "11:55:00")),
    ("downtime", FIVE_MIN, "09:00:00", "12:03:00", "none", [], ("09:05:00", "12:00:00")),
    ("downtime", FIVE_MIN, "11:40:00", "12:03:00", "all",
     ["11:45:00", "11:50:00", "11:55:00", "12:00:00"], None),
    ("latest + on time", FIVE_MIN, "11:00:00", "12:00:10", "latest", ["12:00:00"],
     ("11:05:00", "11:55:00")),
    ("latest + on time", SEC, "12:00:00", "12:01:00.5", "latest",
     [f"12:00:{s:02}" for s in range(31, 60)] + ["12:01:00"], ("12:00:01", "12:00:30")),
    ("none, all late", SEC, "12:00:00", "12:01:00.5", "none",
     [f"12:00:{s:02}" for s in range(31, 60)] + ["12:01:00"], ("12:00:01", "12:00:30")),
    # `all` is bounded: the most recent 100 ticks
    ("all, bounded", SEC, "11:00:00", "12:00:00", "all",
     [(t("11:58:21") + timedelta(seconds=s)).strftime("%H:%M:%S") for s in range(100)],
     ("11:00:01", "11:58:20")),
    ("new day", Cron("0 3 * * *"), "2024-01-01 03:00:00", "2024-01-03 03:00:01", "latest",
     ["2024-01-03 03:00:00"], ("2024-01-02 03:00:00", "2024-01-02 03:00:00")),
    ("new day", Cron("0 3 * * *"), "2024-01-01 03:00:00", "2024-01-03 04:00:00", "latest",
     ["2024-01-03 03:00:00"], ("2024-01-02 03:00:00", "2024-01-02 03:00:00")),
    ("new day", Cron("0 3 * * *"), "2024-01-01 03:00:00", "2024-01-03 04:00:00", "all",
     ["2024-01-02 03:00:00", "2024-01-03 03:00:00"], None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "rule", "done", "now", "catch_up", "ticks", "skipped"), PLAN_CASES
)
def test_plan_publishes_on_time_ticks_and_applies_catch_up_to_missed_ones(
    case: str,
    rule: Every | Cron,
    done: str,
    now: str,
    catch_up: CatchUp,
    ticks: list[str],
    skipped: tuple[str, str] | None,
) -> None:
    plan = plan_ticks(rule, t(done), t(now), catch_up, GRACE)
    assert [x.isoformat() for x in plan.ticks] == [t(x).isoformat() for x in ticks], case
    assert plan.skipped == (None if skipped is None else (t(skipped[0]), t(skipped[1]))), case
    assert plan.done_through == max(t(done), at_or_before(rule, t(now))), case


def test_plan_with_zero_grace_treats_any_lateness_as_missed() -> None:
    plan = plan_ticks(SEC, t("12:00:00"), t("12:00:03.2"), "latest", timedelta(0))
    assert plan == TickPlan((t("12:00:03"),), t("12:00:03"), (t("12:00:01"), t("12:00:02")))
    plan = plan_ticks(SEC, t("12:00:00"), t("12:00:03"), "none", timedelta(0))
    assert plan.ticks == (t("12:00:03"),)  # exactly on time is not late


def test_catch_up_after_a_year_is_bounded_work() -> None:
    plan = plan_ticks(SEC, t("2023-01-01 00:00:00"), t("12:00:00"), "all", GRACE, limit=5)
    assert len(plan.ticks) == 5 and plan.ticks[-1] == t("12:00:00")
    plan = plan_ticks(Cron("* * * * * *"), t("2023-01-01 00:00:00"), t("12:00:00"), "none", GRACE)
    assert len(plan.ticks) == 31 and plan.skipped == (t("2023-01-01 00:00:01"), t("11:59:29"))


# -- schedule definitions ----------------------------------------------------------------------


def make_tick(at: datetime) -> Render:
    return Render(at=at)


def test_targets_are_a_job_a_job_class_or_a_factory_with_or_without_the_tick() -> None:
    tick = t("12:00:00")
    assert make_schedule(Render(), every=60).job_for(tick) == Render()
    assert make_schedule(Render, every=60).job_for(tick) == Render()
    assert make_schedule(lambda: Render(), every=60, name="a").job_for(tick) == Render()
    assert make_schedule(make_tick, every=60).job_for(tick) == Render(at=tick)
    made = make_schedule(lambda at: Render(at=at), every=60, name="b").job_for(tick)
    assert isinstance(made, Render)  # for mypy: job_for returns a BaseModel
    assert made.at == tick


def test_default_names_are_stable_and_describe_the_rule() -> None:
    assert make_schedule(Render(), every=60).name == "report.render@every(60s)"
    assert make_schedule(Render, cron="0 3 * * *").name == "report.render@cron(0 3 * * *)"
    name = make_schedule(make_tick, every=timedelta(minutes=5)).name
    assert name == f"{__name__}.make_tick@every(300s)"


class NotAJob(BaseModel):
    x: int = 0


@pytest.mark.parametrize(
    ("target", "options", "error"),
    [
        (Render(), {}, "exactly one of cron"),
        (Render(), {"cron": "* * * * *", "every": 5}, "exactly one of cron"),
        (Render(), {"cron": "61 * * * *"}, "invalid cron expression '61 \\* \\* \\* \\*'"),
        (Render(), {"cron": "every day"}, "invalid cron expression"),
        (Render(), {"every": 0.5}, "below the minimum of 1 second"),
        (Render(), {"every": "5"}, "seconds or a timedelta"),
        (Render(), {"every": 5, "catch_up": "some"}, "catch_up must be"),
        (Render(), {"every": 5, "grace": -1}, "grace must not be negative"),
        (lambda: Render(), {"every": 5}, "give this schedule a name="),
        (Render(), {"every": 5, "name": ""}, "must not be empty"),
        ("report.render", {"every": 5}, "not 'report.render'"),
    ],
)
def test_bad_schedules_are_refused_with_the_fix(
    target: object, options: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        make_schedule(target, **options)  # type: ignore[arg-type]


def test_plain_models_cannot_be_scheduled() -> None:
    with pytest.raises(JobDefinitionError, match="decorate it with @brokerjobs.job"):
        make_schedule(NotAJob(), every=5)
    factory = make_schedule(lambda: NotAJob(), every=5, name="plain")
    with pytest.raises(JobDefinitionError):
        factory.job_for(t("12:00:00"))
    with pytest.raises(ConfigError, match="made int, not a job"):
        make_schedule(lambda: 3, every=5, name="int").job_for(t("12:00:00"))  # type: ignore[arg-type]


def test_app_refuses_two_schedules_with_one_name() -> None:
    app = App("sched-unit")
    first = app.schedule(Render(), every=60)
    app.schedule(Render(), every=120)
    with pytest.raises(ConfigError, match="defined twice"):
        app.schedule(Render(), every=60)
    assert app.schedules[0] is first and len(app.schedules) == 2


def test_tick_job_ids_are_deterministic_32_hex_chars() -> None:
    a = tick_job_id("shop", "nightly", t("03:00:00"))
    assert a == tick_job_id("shop", "nightly", t("03:00:00"))
    assert len(a) == 32 and int(a, 16) >= 0
    assert a != tick_job_id("shop", "nightly", t("03:00:01"))
    assert a != tick_job_id("shop", "hourly", t("03:00:00"))
    assert a != tick_job_id("other", "nightly", t("03:00:00"))


# -- the token's state -------------------------------------------------------------------------


def test_state_round_trips_and_a_malformed_token_is_empty() -> None:
    state = {"a": t("12:00:00"), "b": t("2024-02-29 03:00:00.5")}
    assert decode_state(encode_state(state)) == state
    for body in (b"", b"not json", b"[]", b'{"done_through": {"a": "yesterday"}}', b"\xff"):
        assert decode_state(body) == {}
    assert decode_state(b'{"done_through": {"a": "2024-01-01T12:00:00"}}') == {"a": t("12:00:00")}


def test_merge_keeps_the_newest_tick_per_schedule_and_unknown_schedules() -> None:
    memory = {"a": t("12:00:00"), "b": t("12:00:05")}
    merge_state(memory, {"a": t("12:00:03"), "b": t("12:00:01"), "old": t("09:00:00")})
    assert memory == {"a": t("12:00:03"), "b": t("12:00:05"), "old": t("09:00:00")}
    assert covers(memory, {"a": t("12:00:03")})
    assert covers(memory, {})
    assert not covers(memory, {"a": t("12:00:04")})
    assert not covers(memory, {"c": t("00:00:00")})
