"""Hostile schedule definitions fail when the app is defined, never at the first tick."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from brokerjobs import ConfigError, job
from brokerjobs.schedule import Schedule, at_or_before, make_schedule, plan_ticks

NOW = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)
LATER = datetime(2126, 2, 28, 23, 59, 59, tzinfo=UTC)


@job("hostile.tick")
class Tick(BaseModel):
    n: int = 0


def works_at_runtime(schedule: Schedule) -> None:
    """What the scheduler computes for a schedule: tick arithmetic and a catch-up plan."""
    for now in (NOW, LATER):
        latest = at_or_before(schedule.rule, now)
        assert schedule.rule.next_after(now) > now >= latest
        for catch_up in ("latest", "all", "none"):
            plan_ticks(schedule.rule, latest - timedelta(days=3), now, catch_up, schedule.grace)


def defined_or_refused(**options: object) -> Schedule | None:
    try:
        return make_schedule(Tick(), name="hostile", **options)  # type: ignore[arg-type]
    except ConfigError:
        return None


_seconds = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([timedelta.max, timedelta.min, timedelta(days=999_999)])
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(every=_seconds, grace=_seconds)
def test_any_interval_and_grace_is_refused_or_works(every: object, grace: object) -> None:
    schedule = defined_or_refused(every=every, grace=grace)
    if schedule is not None:
        works_at_runtime(schedule)


_field = st.one_of(
    st.just("*"),
    st.integers(0, 70).map(str),
    st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda r: f"{r[0]}-{r[1]}"),
    st.integers(1, 40).map(lambda n: f"*/{n}"),
    st.sampled_from(["L", "1W", "1#2", "MON", "FEB", "31", "30", "29", "2,4", "1970", "2020"]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=st.lists(_field, min_size=4, max_size=8))
def test_any_cron_expression_is_refused_or_fires(fields: list[str]) -> None:
    schedule = defined_or_refused(cron=" ".join(fields))
    if schedule is not None:
        works_at_runtime(schedule)


@pytest.mark.parametrize("cron", ["@hourly", "@daily", "0 3 * * mon-fri", "* * * * * */10"])
def test_documented_cron_forms_are_accepted(cron: str) -> None:
    works_at_runtime(make_schedule(Tick(), name="ok", cron=cron))


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"cron": "0 0 31 2 *"}, "never fires"),  # 31 February
        ({"cron": "0 0 31 4,6 *"}, "never fires"),
        ({"cron": "0 0 1 1 * 0 2020"}, "invalid cron expression"),  # a year field, past
        ({"every": float("nan")}, "up to 100 years"),
        ({"every": float("inf")}, "up to 100 years"),
        ({"every": timedelta(days=999_999)}, "up to 100 years"),
        ({"every": 5, "grace": 1e12}, "up to 100 years"),
    ],
)
def test_a_schedule_that_would_fail_at_its_first_tick_is_refused(
    options: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        make_schedule(Tick(), name="hostile", **options)  # type: ignore[arg-type]
