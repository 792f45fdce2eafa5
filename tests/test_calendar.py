"""Calendar periods: parsing, the boundary in several zones, waiters, settlements, status.

Behaviour tests run on fakeredis and on a real Redis with the frozen test
clock; the period arithmetic of lua/lib.lua is also compared with zoneinfo
for random instants and zones (hypothesis).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slowburn_redis import Budget, BudgetExhausted, InvalidLimit, Limit
from slowburn_redis.keys import LimitKey, describe_limit_key
from slowburn_redis.periods import DAY_MS, PERIODS, local_period, offset_table, period_bounds
from slowburn_redis.scripts import lua_dir
from slowburn_redis.testing import advance_clock, freeze_clock
from tests.test_waiting import Events, spawn, wait_queued

T = "acme"
LONG = 60.0  # a heartbeat too slow to matter: only the retry time (or a notification) wakes a waiter


def ms(year: int, month: int, day: int, zone: str, hour: int = 0, minute: int = 0) -> int:
    """The UTC ms of a local wall time (the earlier one when it is ambiguous)."""
    return round(datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone)).timestamp() * 1000)


# parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "period", "tz", "shown"),
    [
        ("usd 50/month", "month", "UTC", "usd 50/month"),
        ("usd 50/calendar month", "month", "UTC", "usd 50/month"),
        ("usd 50/month@Europe/Berlin", "month", "Europe/Berlin", "usd 50/month@Europe/Berlin"),
        ("usd 5/calendar day@America/New_York", "day", "America/New_York", "usd 5/calendar day@America/New_York"),
        ("requests 1000/calendar week@UTC", "week", "UTC", "requests 1000/calendar week"),
        ("tokens 2M/calendar day @ Asia/Kolkata", "day", "Asia/Kolkata", "tokens 2000000/calendar day@Asia/Kolkata"),
    ],
)
def test_calendar_limits_parse_and_round_trip(text: str, period: str, tz: str, shown: str) -> None:
    limit = Limit.parse(text)
    assert (limit.period, limit.tz, limit.window) == (period, tz, None)
    assert str(limit) == shown
    assert Limit.parse(str(limit)) == limit
    assert Limit(dimension=limit.dimension, amount=limit.amount, period=period, tz=tz) == limit
    assert limit.key == f"{limit.dimension}:{period}@{tz}"


def test_sliding_windows_are_unchanged() -> None:
    day = Limit.parse("usd 5/day")
    assert (day.window, day.period, day.tz, day.key, str(day)) == (86400.0, None, None, "usd:86400000", "usd 5/day")
    assert Limit(dimension="usd", amount=50, period="month") == Limit.parse("usd 50/month")


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("usd 5/month@Mars/Olympus", "Mars/Olympus"),
        ("usd 5/month@../../etc/passwd", "../../etc/passwd"),
        ("usd 5/2 months", "2 months"),
        ("usd 5/months", "months"),
        ("usd 5/day@Europe/Berlin", "@Europe/Berlin"),  # a sliding day takes no zone: say 'calendar day'
        ("usd 5/calendar fortnight", "calendar fortnight"),
        ("usd 5/calendar 2 days", "calendar 2 days"),
        ("usd 5/month@", "@"),
        ("concurrency 5/month", "period"),
    ],
)
def test_bad_calendar_limits_name_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(InvalidLimit) as caught:
        Limit.parse(text)
    assert caught.value.part == part


def test_bad_calendar_fields() -> None:
    with pytest.raises(InvalidLimit):
        Limit(dimension="usd", amount=5, period="month", window="1d")
    with pytest.raises(InvalidLimit):
        Limit(dimension="usd", amount=5, tz="Europe/Berlin")
    with pytest.raises(InvalidLimit):
        Limit(dimension="usd", amount=5, period="year")
    with pytest.raises(InvalidLimit):
        Limit(dimension="usd", amount=5, period="day", tz="Nowhere/Land")
    with pytest.raises(InvalidLimit):
        Limit(dimension="usd", amount=5, period="day", tz=["UTC"])


def test_calendar_limit_keys_read_as_words() -> None:
    assert LimitKey.parse("T:usd:month@Europe/Berlin") == LimitKey("T", "usd", 0, "month@Europe/Berlin")
    assert describe_limit_key("T:usd:month@Europe/Berlin", 50 * 10**9) == "usd 50/month (Europe/Berlin, tenant)"
    assert describe_limit_key("A:bot:requests:week@UTC") == "requests per calendar week (UTC, agent bot)"
    assert describe_limit_key("T:usd:86400000", 5 * 10**9) == "usd 5/day (tenant)"
    assert describe_limit_key("T:usd:fortnight@UTC") == "T:usd:fortnight@UTC"


# the boundary -------------------------------------------------------------------------------

# (limit, zone, a local time inside the period, the period's local start and end, its length in hours)
BOUNDARIES = [
    pytest.param("calendar day", "UTC", (2027, 1, 15, 13), (2027, 1, 15), (2027, 1, 16), 24, id="day-UTC"),
    pytest.param(
        "calendar day", "Europe/Berlin", (2027, 3, 28, 12), (2027, 3, 28), (2027, 3, 29), 23, id="day-Berlin-spring"
    ),
    pytest.param(
        "calendar day", "America/New_York", (2027, 11, 7, 12), (2027, 11, 7), (2027, 11, 8), 25, id="day-NY-fall"
    ),
    pytest.param(
        "calendar day", "Australia/Lord_Howe", (2027, 4, 4, 9), (2027, 4, 4), (2027, 4, 5), 24.5, id="day-LordHowe"
    ),
    pytest.param(
        "calendar week", "Asia/Kolkata", (2027, 1, 6, 9), (2027, 1, 4), (2027, 1, 11), 7 * 24, id="week-Kolkata"
    ),
    pytest.param("month", "Asia/Kolkata", (2027, 2, 10, 9), (2027, 2, 1), (2027, 3, 1), 28 * 24, id="month-28"),
    pytest.param("month", "UTC", (2028, 2, 29, 23), (2028, 2, 1), (2028, 3, 1), 29 * 24, id="month-29"),
    pytest.param("month", "Europe/Berlin", (2027, 4, 10, 9), (2027, 4, 1), (2027, 5, 1), 30 * 24, id="month-30-Berlin"),
    pytest.param(
        "month", "America/New_York", (2027, 3, 20, 9), (2027, 3, 1), (2027, 4, 1), 31 * 24 - 1, id="month-31-NY-DST"
    ),
]


@pytest.mark.parametrize(("per", "zone", "inside", "start", "end", "hours"), BOUNDARIES)
async def test_usage_resets_exactly_at_the_period_boundary(
    clocked: Budget,
    per: str,
    zone: str,
    inside: tuple[int, ...],
    start: tuple[int, int, int],
    end: tuple[int, int, int],
    hours: float,
) -> None:
    budget = clocked
    await budget.set_limits(T, [f"requests 2/{per}@{zone}"])
    start_ms, end_ms = ms(*start, zone), ms(*end, zone)
    assert end_ms - start_ms == hours * 3_600_000
    # The last millisecond of the previous period is not this one: a request there fills the previous period.
    await freeze_clock(budget, T, start_ms - 1)
    for _ in range(2):
        await (await budget.acquire(T, mode="reject")).commit()
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(T, mode="reject")
    assert caught.value.retry_after == pytest.approx(0.001)
    # The period starts exactly at its start.
    await advance_clock(budget, T, 0.001)
    await (await budget.acquire(T, mode="reject")).commit()
    await freeze_clock(budget, T, ms(*inside[:3], zone, *inside[3:]))
    await (await budget.acquire(T, mode="reject")).commit()
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(T, mode="reject")
    assert caught.value.retry_after == pytest.approx((end_ms - ms(*inside[:3], zone, *inside[3:])) / 1000)
    # 1 ms before the end: still spent, and told to retry in 1 ms; at the end: a new period.
    await freeze_clock(budget, T, end_ms - 1)
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(T, mode="reject")
    assert caught.value.retry_after == pytest.approx(0.001)
    await advance_clock(budget, T, 0.001)
    for _ in range(2):
        await (await budget.acquire(T, mode="reject")).commit()
    status = await budget.status(T)
    assert status.limits[0].used == 2
    assert status.limits[0].resets_at is not None
    assert status.limits[0].resets_at.timestamp() * 1000 > end_ms


# waiting, settling, events, status ------------------------------------------------------------


async def test_a_waiter_is_told_the_period_end_and_admitted_then(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget(test_clock=True, heartbeat=LONG)
    try:
        await budget.set_limits(T, ["usd 1/calendar day@Europe/Berlin"])
        end = ms(2027, 6, 2, "Europe/Berlin")
        await freeze_clock(budget, T, end - 200)
        await (await budget.acquire(T, usd=1)).commit()
        with pytest.raises(BudgetExhausted) as caught:
            await budget.acquire(T, usd=0.5, mode="reject")
        assert caught.value.retry_after == pytest.approx(0.2)
        async with Events(budget) as events:
            waiter = spawn(budget.acquire(T, usd=0.5))
            await wait_queued(budget, 1)
            (waiting,) = await events.wait_for("waiting")
            assert waiting.limit == "T:usd:day@Europe/Berlin"
            # Nothing is published at the boundary: the waiter retries at the period end it was given.
            await advance_clock(budget, T, 0.2)
            reservation = await asyncio.wait_for(waiter, 30)
            await reservation.commit()
        status = await budget.status(T)
        assert status.limits[0].used == 0.5
    finally:
        await budget.aclose()


@pytest.mark.parametrize("how", ["refund", "overrun", "release"])
async def test_a_settlement_from_the_previous_period_leaves_the_new_one_alone(clocked: Budget, how: str) -> None:
    budget = clocked
    await budget.set_limits(T, ["usd 10/month@America/New_York"])
    await freeze_clock(budget, T, ms(2027, 1, 31, "America/New_York", 23, 59))
    old = await budget.acquire(T, usd=4)
    await freeze_clock(budget, T, ms(2027, 2, 1, "America/New_York"))
    await (await budget.acquire(T, usd=3)).commit()
    if how == "refund":
        await old.commit(usd=1)
    elif how == "overrun":
        await old.commit(usd=9)
    else:
        await old.release()
    (row,) = (await budget.status(T)).limits
    assert (row.used, row.reserved, row.remaining) == (3, 0, 7)


async def test_thresholds_and_exhausted_re_arm_in_the_new_period(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["usd 1/calendar week"])
    await freeze_clock(budget, T, ms(2027, 1, 10, "UTC", 23))  # a Sunday
    async with Events(budget) as events:
        await (await budget.acquire(T, usd=1)).commit()
        with pytest.raises(BudgetExhausted):
            await budget.acquire(T, usd=0.5, mode="reject")
        await events.wait_for("threshold", 4)
        await events.wait_for("exhausted", 1)
        await freeze_clock(budget, T, ms(2027, 1, 11, "UTC"))  # Monday 00:00: a new week
        await (await budget.acquire(T, usd=1)).commit()
        with pytest.raises(BudgetExhausted):
            await budget.acquire(T, usd=0.5, mode="reject")
        await events.wait_for("threshold", 8)
        await events.wait_for("exhausted", 2)
    levels = [e.level for e in events.of("threshold")]  # type: ignore[attr-defined]
    assert levels == [50, 75, 90, 100] * 2


async def test_status_shows_when_the_period_resets(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["usd 50/month@Europe/Berlin", "usd 5/day"])
    await freeze_clock(budget, T, ms(2027, 12, 14, "Europe/Berlin", 10))
    await (await budget.acquire(T, usd=2)).commit()
    calendar, sliding = (await budget.status(T)).limits
    assert calendar.resets == "2028-01-01 00:00 Europe/Berlin"
    assert calendar.refill_in is None
    assert calendar.resets_at == datetime(2028, 1, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    dumped = calendar.model_dump(mode="json")
    assert dumped["resets_at"] == "2028-01-01T00:00:00+01:00"
    assert (calendar.used, calendar.remaining) == (2, 48)
    assert sliding.resets_at is None and sliding.refill_in is not None
    assert await budget.get_limits(T) == [Limit.parse("usd 50/month@Europe/Berlin"), Limit.parse("usd 5/day")]


async def test_an_empty_calendar_period_still_shows_its_reset(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["requests 10/calendar day@Asia/Kolkata"])
    await freeze_clock(budget, T, ms(2027, 5, 5, "Asia/Kolkata", 23, 30))
    (row,) = (await budget.status(T)).limits
    assert row.resets == "2027-05-06 00:00 Asia/Kolkata"
    assert row.used == 0


# the Lua period arithmetic against zoneinfo --------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "America/Santiago",
    "America/Havana",
    "Pacific/Chatham",
    "Asia/Kathmandu",
    "Africa/Casablanca",
    "Europe/London",
    "Pacific/Apia",
]
TABLE_FROM = ms(2026, 12, 1, "UTC")


def local_key(period: str, zone: ZoneInfo, at_ms: int) -> int:
    """The local start of the period holding instant `at_ms`, by zoneinfo alone."""
    wall = datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(zone).replace(tzinfo=UTC)
    return local_period(period, round(wall.timestamp() * 1000))[0]


async def lua_bounds(budget: Budget, period: str, table: list[int], at_ms: int) -> tuple[int, int]:
    """period_bounds as lua/lib.lua computes it, run in the test's Redis."""
    lib = (lua_dir() / "lib.lua").read_text()
    body = lib[lib.index("local DAY_MS") : lib.index("-- The current period")]
    script = (
        "local function fmt(x) return string.format('%d', x) end\n"
        + body
        + "local s, e = period_bounds(ARGV[1], cjson.decode(ARGV[2]), tonumber(ARGV[3]))\n"
        + "return {fmt(s), fmt(e)}"
    )
    reply = await budget.engine.client.eval(script, 0, period, json.dumps(table), str(at_ms))
    return int(reply[0]), int(reply[1])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    zone_name=st.sampled_from(ZONES),
    period=st.sampled_from(PERIODS),
    offset=st.integers(min_value=0, max_value=9 * 365 * DAY_MS),
)
async def test_lua_periods_agree_with_zoneinfo(budget: Budget, zone_name: str, period: str, offset: int) -> None:
    table = offset_table(zone_name, now_ms=TABLE_FROM)
    at = TABLE_FROM + offset
    start, end = await lua_bounds(budget, period, table, at)
    assert (start, end) == period_bounds(period, table, at)
    zone = ZoneInfo(zone_name)
    key = local_key(period, zone, at)
    assert start <= at < end
    assert local_key(period, zone, start) == key and local_key(period, zone, end - 1) == key
    assert local_key(period, zone, start - 1) != key and local_key(period, zone, end) != key
    assert end - start <= 32 * DAY_MS


def test_dst_days_have_their_length() -> None:
    table = offset_table("Europe/Berlin", now_ms=TABLE_FROM)
    start, end = period_bounds("day", table, ms(2027, 10, 31, "Europe/Berlin", 12))
    assert (end - start) / 3_600_000 == 25
    assert datetime.fromtimestamp(end / 1000, tz=ZoneInfo("Europe/Berlin")) == datetime(
        2027, 11, 1, tzinfo=ZoneInfo("Europe/Berlin")
    )
    assert timedelta(milliseconds=end - start) == timedelta(hours=25)
