"""Time never runs backward for a window, and status tells the truth (issue 13).

The test clock stands in for the server's TIME: each test freezes it and
then steps it forward, back, or forward and back, with calls in flight. The
tenant's clock (NOW, lua/lib.lua "clock") must never run backward nor stand
still, leases must not all expire on a forward step, no charge may be lost
after a back step, `retry_after` must be true to the millisecond, and status
must not count an expired lease as in flight. Every check of a window uses
the script's own NOW: each admission's ``t0`` as the reservation record holds it.
Runs on fakeredis and on a real Redis (the `clocked` fixture).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from slowburn_redis import Budget, BudgetExhausted, Reservation
from slowburn_redis.events import EVENT_TYPES
from slowburn_redis.testing import advance_clock, freeze_clock
from tests.test_waiting import Events

T = "acme"
T0 = 1_900_000_000_000
"""A frozen start on a bucket boundary (1 s buckets for a 60 s window), so retry times are whole."""
MIN = 60_000
LUA = Path(__file__).resolve().parent.parent / "lua"


class Admissions:
    """Every admission of a test with the NOW its script used (``t0`` of the reservation record)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.at: list[int] = []

    async def take(self, **options: object) -> Reservation:
        r = await self.budget.acquire(T, lease_ttl=60, **options)  # type: ignore[arg-type]
        t0 = await self.budget.engine.hget(self.budget.keys(T).reservation(r.id), "t0")
        assert t0 is not None and int(t0) == r.admitted_at_ms
        self.at.append(int(t0))
        return r

    def assert_window(self, limit: int, window_ms: int) -> None:
        """No interval of `window_ms` of the script's NOW holds more than `limit` admissions (1.00 of the limit)."""
        worst = max(sum(1 for u in self.at if t <= u < t + window_ms) for t in self.at)
        assert worst <= limit, (worst, limit, self.at)


async def refused(budget: Budget) -> BudgetExhausted:
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(T, lease_ttl=60, mode="reject")
    return caught.value


async def in_flight(budget: Budget) -> float:
    """What status says is in flight on the tenant's concurrency limit."""
    rows = [s for s in (await budget.status(T)).limits if s.limit.dimension == "concurrency"]
    return rows[0].used + rows[0].reserved


async def test_a_forward_jump_frees_no_slot_and_is_announced(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["requests 4/min", "concurrency 2"])
    await freeze_clock(budget, T, T0)
    admissions = Admissions(budget)
    async with Events(budget) as events:
        calls = [await admissions.take(), await admissions.take()]  # two calls in flight, leases of 60 s
        await advance_clock(budget, T, 120)  # TIME steps 120 s forward: past every lease's expiry
        denied = await refused(budget)
        jumps = await events.wait_for("clock_jump")
    assert denied.limit == "T:concurrency:0"  # the window refilled (120 s passed), the slots did not
    assert await in_flight(budget) == 2
    assert (jumps[0].jump_ms, jumps[0].from_ms, jumps[0].leases) == (120_000, T0, 2)  # type: ignore[attr-defined]
    # The leases aged 30 s (CLOCK_JUMP_MS) across the step, not 120: 30 s left; the retry time says so.
    assert denied.retry_after == pytest.approx(30.0)
    await advance_clock(budget, T, 29.999)
    assert (await refused(budget)).limit == "T:concurrency:0"
    await advance_clock(budget, T, 0.001)
    late = await admissions.take()
    assert await in_flight(budget) == 1  # both old leases expired together, once their time ran out
    for r in (*calls, late):
        await r.commit()
    admissions.assert_window(4, MIN)


async def test_a_back_jump_loses_no_budget_and_retry_after_is_true(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["requests 4/min"])
    await freeze_clock(budget, T, T0)
    admissions = Admissions(budget)
    async with Events(budget) as events:
        for _ in range(2):
            await (await admissions.take()).commit()
        await advance_clock(budget, T, 30)
        for _ in range(2):
            await (await admissions.take()).commit()
        await advance_clock(budget, T, -120)  # TIME steps back 120 s
        denied = await refused(budget)
        jumps = await events.wait_for("clock_jump")
    assert jumps[0].jump_ms == -120_000  # type: ignore[attr-defined]
    # The charges of T0 leave the window at T0 + 61 s (1 s buckets), and the tenant's clock stands at
    # T0 + 30 s: 31 s to go, counted at TIME's rate from now on.
    assert denied.retry_after == pytest.approx(31.0)
    await advance_clock(budget, T, 30.999)
    await refused(budget)
    await advance_clock(budget, T, 0.001)
    for _ in range(2):  # the first two aged out: nothing was lost below the window
        await (await admissions.take()).commit()
    assert (await refused(budget)).retry_after == pytest.approx(30.0)  # the two of T0 + 30 s go next
    await advance_clock(budget, T, 30)
    for _ in range(2):
        await (await admissions.take()).commit()
    status = await budget.status(T)
    assert status.limits[0].used == 4 and status.limits[0].remaining == 0
    assert (
        max(admissions.at) - min(admissions.at) == 91_000
    )  # NOW ran on from T0 + 30 s (30 + 31 + 30 s): never backward
    admissions.assert_window(4, MIN)


async def test_forward_then_back_keeps_every_limit_at_one(clocked: Budget) -> None:
    """The measured fault: +120 s then -120 s gave 2.0x, 8 in flight under `concurrency 4`, a 13x wrong retry."""
    budget = clocked
    await budget.set_limits(T, ["requests 4/min", "concurrency 4"])
    await freeze_clock(budget, T, T0)
    admissions = Admissions(budget)
    async with Events(budget) as events:
        calls = [await admissions.take() for _ in range(4)]  # four calls in flight, the window full
        assert (await refused(budget)).limit == "T:requests:60000"
        await advance_clock(budget, T, 120)
        assert (await refused(budget)).limit == "T:concurrency:0"  # not 8 in flight
        for r in calls[:2]:
            await r.commit()
        calls[:2] = [await admissions.take(), await admissions.take()]
        assert await in_flight(budget) == 4
        await advance_clock(budget, T, -120)  # TIME comes back: the tenant's clock holds at its mark
        denied = await refused(budget)
        await events.wait_for("clock_jump", 2)
    assert denied.limit == "T:concurrency:0"
    assert [e.jump_ms for e in events.of("clock_jump")] == [120_000, -120_000]  # type: ignore[attr-defined]
    assert denied.retry_after == pytest.approx(30.0)  # the two oldest leases aged 30 s across the step
    await advance_clock(budget, T, 29.999)
    await refused(budget)
    await advance_clock(budget, T, 0.001)
    calls.append(await admissions.take())
    assert await in_flight(budget) == 3
    for r in calls:
        await r.commit()
    # Two windows' worth in 180 s of NOW; never more than 4 in any 60 s of it.
    admissions.assert_window(4, MIN)


async def test_status_does_not_count_an_expired_lease(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["concurrency 2", "usd 1/hour"])
    await freeze_clock(budget, T, T0)
    dead = await budget.acquire(T, usd=0.3, lease_ttl=10)  # its worker dies: never settled
    await advance_clock(budget, T, 9.999)
    usage = {s.limit.dimension: (s.used, s.reserved) for s in (await budget.status(T)).limits}
    assert usage == {"concurrency": (0, 1), "usd": (0, pytest.approx(0.3))}
    await advance_clock(budget, T, 0.001)  # the lease ran out; no acquire has purged it
    before = await budget.engine.client.hgetall(budget.keys(T).clock)
    usage = {s.limit.dimension: (s.used, s.reserved) for s in (await budget.status(T)).limits}
    assert usage == {"concurrency": (0, 0), "usd": (pytest.approx(0.3), 0)}  # its money stays charged
    # Read-only: the lease is still stored, the clock's mark did not move.
    assert await budget.engine.client.zscore(budget.keys(T).leases, dead.id) is not None
    assert await budget.engine.client.hgetall(budget.keys(T).clock) == before


async def test_status_computes_the_clock_a_writer_would(clocked: Budget) -> None:
    """After a back step status reports the tenant's clock (the mark, then on at TIME's rate), storing nothing."""
    budget = clocked
    await budget.set_limits(T, ["requests 4/min"])
    await freeze_clock(budget, T, T0)
    await (await budget.acquire(T)).commit()
    stored = await budget.engine.client.hgetall(budget.keys(T).clock)
    await advance_clock(budget, T, -120)
    assert (await budget.status(T)).at.timestamp() * 1000 == T0
    await advance_clock(budget, T, 5)  # TIME is still 115 s behind the mark: a writer would serve the mark too
    assert (await budget.status(T)).at.timestamp() * 1000 == T0
    assert await budget.engine.client.hgetall(budget.keys(T).clock) == stored
    await (await budget.acquire(T)).commit()  # a writer stores the grown offset
    await advance_clock(budget, T, 5)
    assert (await budget.status(T)).at.timestamp() * 1000 == T0 + 5_000  # on at TIME's rate from the mark


def test_every_writing_script_stores_the_clock_once() -> None:
    for path in LUA.glob("*.lua"):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        calls = len(re.findall(r"(?<!function )clock_commit\(\)", code))
        if path.name in ("lib.lua", "status.lua", "quote.lua", "reset.lua", "set_limits.lua"):
            assert calls == 0, path.name  # read-only, or admin actions that move no mark
        else:
            assert calls == 1, path.name


def test_clock_jump_is_a_known_event_type() -> None:
    assert "clock_jump" in EVENT_TYPES
