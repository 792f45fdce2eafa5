"""Waiting for budget in one process, on fakeredis and on a real Redis.

Waiters here use a long heartbeat (60 s) and long windows, so the only thing
that can wake them in time is a notification: a test that passes shows the
pub/sub path works, not a retry timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from slowburn_redis import Budget, BudgetExhausted, BudgetTimeout, Event, RequestTooLarge, Reservation, Status
from slowburn_redis.testing import advance_clock
from tests.servers import RedisServer, redis_server_available

T = "acme"
LONG = 60.0  # heartbeat of waiters that must be woken by a notification


def spawn(acquire: Awaitable[Reservation]) -> asyncio.Task[Reservation]:
    """Run an acquire as a task (`Budget.acquire` returns an awaitable, not a coroutine)."""

    async def run() -> Reservation:
        return await acquire

    return asyncio.create_task(run())


async def eventually(check: Callable[[], Any], within: float = 30.0, what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


async def queued(budget: Budget, tenant: str = T) -> int:
    """How many waiters hold a place in the tenant's queue."""
    return int(await budget.engine.client.hlen(budget.key(tenant) + ":q"))


async def wait_queued(budget: Budget, count: int, tenant: str = T) -> None:
    async def check() -> bool:
        return await queued(budget, tenant) == count

    await eventually(check, what=f"{count} queued waiters")


async def leftovers(budget: Budget, tenant: str = T) -> dict[str, Any]:
    """The queue and lease keys of a tenant: what a departed waiter must not leave behind."""
    base = budget.key(tenant)
    blocked = [key async for key in budget.engine.client.scan_iter(match=base + ":b:*")]
    return {
        "q": await budget.engine.client.hgetall(base + ":q"),
        "qexp": await budget.engine.client.zrange(base + ":qexp", 0, -1),
        "blocked": blocked,
        "leases": await budget.engine.client.zrange(base + ":leases", 0, -1),
    }


async def open_reservations(budget: Budget, tenant: str = T) -> list[str]:
    base = budget.key(tenant)
    ids = []
    async for key in budget.engine.client.scan_iter(match=base + ":r:*"):
        if await budget.engine.client.hget(key, "s") == "open":
            ids.append(key.rsplit(":", 1)[1])
    return sorted(ids)


class Events:
    """Collects `budget.events(tenant)` in a background task."""

    def __init__(self, budget: Budget, tenant: str = T) -> None:
        self.budget = budget
        self.tenant = tenant
        self.items: list[Event] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Events:
        async def pump() -> None:
            async for event in self.budget.events(self.tenant):
                self.items.append(event)

        self._task = asyncio.create_task(pump())
        channel = self.budget.key(self.tenant) + ":events"

        async def subscribed() -> bool:
            counts = await self.budget.engine.client.pubsub_numsub(channel)
            return bool(counts and int(counts[0][1]) >= 1)

        await eventually(subscribed, what="the events subscription")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.items if e.type == kind]

    async def wait_for(self, kind: str, count: int = 1) -> list[Event]:
        await eventually(lambda: len(self.of(kind)) >= count, what=f"{count} {kind!r} events")
        return self.of(kind)


@pytest.fixture
async def waiting_budget(make_budget: Callable[..., Budget]) -> AsyncIterator[Budget]:
    """A Budget whose heartbeat is too slow to matter within a test."""
    b = make_budget(heartbeat=LONG)
    yield b
    await b.aclose()


# waking ----------------------------------------------------------------------


async def test_waiter_resumes_when_holder_commits_lower(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    holder = await budget.acquire(T, usd=1)
    waiter = spawn(budget.acquire(T, usd=0.5))
    await wait_queued(budget, 1)
    assert not waiter.done()
    await holder.commit(usd=0.2)
    reservation = await asyncio.wait_for(waiter, 30)
    assert isinstance(reservation, Reservation)
    await reservation.commit()
    status = await budget.status(T)
    assert status.limits[0].used == pytest.approx(0.7)
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}


async def test_release_wakes_waiter(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["requests 1/day"])
    holder = await budget.acquire(T)
    waiter = spawn(budget.acquire(T))
    await wait_queued(budget, 1)
    await holder.release()
    await (await asyncio.wait_for(waiter, 30)).commit()
    assert await queued(budget) == 0


async def test_reset_wakes_every_waiter(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=1)).commit()
    waiters = [spawn(budget.acquire(T, f"w{i}", usd=0.3)) for i in range(3)]
    await wait_queued(budget, 3)
    await budget.reset(T)
    admitted = await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert len({r.id for r in admitted}) == 3
    assert await queued(budget) == 0


async def test_raised_limit_wakes_waiter(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=1)).commit()
    waiter = spawn(budget.acquire(T, usd=0.5))
    await wait_queued(budget, 1)
    await budget.set_limits(T, ["usd 2/hour"])
    await (await asyncio.wait_for(waiter, 30)).commit()


async def test_window_expiry_admits_waiter_without_notification(make_budget: Callable[..., Budget]) -> None:
    """Nothing is published when a window slides: the waiter wakes at the retry time the script computed."""
    budget = make_budget(heartbeat=LONG)
    try:
        await budget.set_limits(T, ["requests 1/1s"])
        await (await budget.acquire(T)).commit()
        started = time.monotonic()
        reservation = await asyncio.wait_for(budget.acquire(T), 30)
        # The window is 1 s wide (buckets of 17 ms): the second request can only fit once it slid.
        assert time.monotonic() - started > 0.5
        await reservation.commit()
    finally:
        await budget.aclose()


# fairness --------------------------------------------------------------------


async def test_fifo_within_priority_and_higher_priority_first(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["concurrency 1"])
    holder = await budget.acquire(T)
    order: list[str] = []

    async def worker(name: str, priority: int) -> None:
        reservation = await budget.acquire(T, name, priority=priority)
        order.append(name)
        await reservation.release()

    tasks = []
    for count, (name, priority) in enumerate([("a", 0), ("b", 0), ("hi", 5), ("c", 0), ("lo", -5)], start=1):
        tasks.append(asyncio.create_task(worker(name, priority)))
        await wait_queued(budget, count)
    await holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 15)
    assert order == ["hi", "a", "b", "c", "lo"]


async def test_large_request_is_not_starved_by_small_ones(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    first, second = await budget.acquire(T, usd=0.5), await budget.acquire(T, usd=0.5)
    order: list[str] = []

    async def worker(name: str, usd: float) -> None:
        reservation = await budget.acquire(T, name, usd=usd)
        order.append(name)
        await reservation.commit()

    large = asyncio.create_task(worker("large", 0.8))
    await wait_queued(budget, 1)
    await first.release()  # 0.5 free: too little for the large one, enough for any small one
    smalls = []
    for i in range(3):  # small requests arriving after the large one queue behind it
        smalls.append(asyncio.create_task(worker(f"s{i}", 0.1)))
        await wait_queued(budget, 2 + i)
    await asyncio.sleep(0.3)
    assert order == []
    assert (await budget.status(T)).limits[0].remaining == pytest.approx(0.5)
    await second.commit(usd=0.1)  # 0.9 free: the large one first, then one small one
    await eventually(lambda: len(order) == 2, what="two admissions")
    assert order == ["large", "s0"]
    await budget.reset(T)
    await asyncio.wait_for(asyncio.gather(large, *smalls), 30)
    assert order == ["large", "s0", "s1", "s2"]


async def test_waiter_blocked_only_by_its_agent_limit_does_not_hold_up_other_agents(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 10/hour"])
    await budget.set_limits(T, ["usd 1/hour"], agent="slow")
    await (await budget.acquire(T, "slow", usd=1)).commit()
    blocked = spawn(budget.acquire(T, "slow", usd=0.5))
    await wait_queued(budget, 1)
    other = await asyncio.wait_for(budget.acquire(T, "fast", usd=2), 5)
    await other.commit()
    assert not blocked.done()
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked


# modes and errors --------------------------------------------------------------


async def test_timeout_raises_budget_timeout_with_status(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=0.9)).commit()
    with pytest.raises(BudgetTimeout) as caught:
        await asyncio.wait_for(budget.acquire(T, usd=0.5, timeout=0.3), 30)
    error = caught.value
    assert error.tenant == T
    assert error.limit == "T:usd:3600000"
    assert isinstance(error.status, Status)
    assert error.status.limits[0].used == pytest.approx(0.9)
    assert error.status.limits[0].remaining == pytest.approx(0.1)
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}


async def test_zero_timeout_fails_without_waiting(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["requests 1/hour"])
    await (await budget.acquire(T)).commit()
    with pytest.raises(BudgetTimeout):
        await asyncio.wait_for(budget.acquire(T, timeout=0), 5)
    assert await queued(budget) == 0


async def test_reject_mode_raises_at_once_with_retry_after(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/min"])
    await (await budget.acquire(T, usd=0.8)).commit()
    with pytest.raises(BudgetExhausted) as caught:
        await asyncio.wait_for(budget.acquire(T, usd=0.5, mode="reject"), 5)
    assert caught.value.limit == "T:usd:60000"
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 61
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}
    # A request that still fits is admitted in reject mode.
    await (await budget.acquire(T, usd=0.2, mode="reject")).commit()


async def test_reject_mode_on_a_lifetime_cap_has_no_retry_time(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["requests 1"])
    await (await budget.acquire(T)).commit()
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(T, mode="reject")
    assert caught.value.retry_after is None


async def test_reject_mode_respects_the_queue(waiting_budget: Budget) -> None:
    """A request in reject mode does not jump over waiters already queued."""
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    holder = await budget.acquire(T, usd=0.6)
    waiter = spawn(budget.acquire(T, "big", usd=0.5))
    await wait_queued(budget, 1)
    with pytest.raises(BudgetExhausted):
        await budget.acquire(T, usd=0.1, mode="reject")
    await holder.release()
    await (await asyncio.wait_for(waiter, 30)).commit()


async def test_advisory_mode_never_blocks_and_emits_events(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    async with Events(budget) as events:
        first = await asyncio.wait_for(budget.acquire(T, usd=0.6, mode="advisory"), 5)
        assert first.over_limits == []
        second = await asyncio.wait_for(budget.acquire(T, usd=0.6, mode="advisory"), 5)
        assert second.over_limits == ["T:usd:3600000"]
        third = await asyncio.wait_for(budget.acquire(T, usd=0.6, mode="advisory"), 5)
        assert third.over_limits == ["T:usd:3600000"]
        levels = [e.level for e in await events.wait_for("threshold", 4)]  # type: ignore[attr-defined]
    assert levels == [50, 75, 90, 100]
    status = await budget.status(T)
    assert status.limits[0].reserved == pytest.approx(1.8)
    assert status.limits[0].remaining == 0
    assert await queued(budget) == 0
    for r in (first, second, third):
        await r.commit()


async def test_request_larger_than_a_limit_fails_at_once(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour", "requests 10/min"])
    with pytest.raises(RequestTooLarge) as caught:
        await asyncio.wait_for(budget.acquire(T, usd=2), 5)
    assert caught.value.limit == "T:usd:3600000"
    assert caught.value.requested == 2 * caught.value.amount
    with pytest.raises(RequestTooLarge):
        await asyncio.wait_for(budget.acquire(T, requests=11), 5)
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}


async def test_waiter_fails_when_its_limit_is_lowered_below_its_request(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    holder = await budget.acquire(T, usd=0.8)
    waiter = spawn(budget.acquire(T, usd=0.5))
    await wait_queued(budget, 1)
    await budget.set_limits(T, ["usd 0.4/hour"])
    with pytest.raises(RequestTooLarge):
        await asyncio.wait_for(waiter, 30)
    await holder.release()
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}


# cancellation --------------------------------------------------------------------


async def test_cancelled_waiter_leaves_no_queue_entry_and_no_reservation(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour", "concurrency 1"])
    holder = await budget.acquire(T, usd=0.5)
    waiters = []
    for i in range(3):
        waiters.append(spawn(budget.acquire(T, f"w{i}", usd=0.1)))
        await wait_queued(budget, i + 1)
    waiters[0].cancel()  # the head of the queue
    waiters[2].cancel()
    for task in (waiters[0], waiters[2]):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await queued(budget) == 1
    await holder.release()
    survivor = await asyncio.wait_for(waiters[1], 30)  # the cancelled head does not block it
    await survivor.release()
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}
    assert await open_reservations(budget) == []
    status = await budget.status(T)
    assert {s.limit.dimension: s.reserved for s in status.limits} == {"usd": 0, "concurrency": 0}


async def test_cancel_after_the_script_admitted_releases_the_reservation(
    waiting_budget: Budget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that lands after Redis admitted the request but before the reply was read leaks nothing."""
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour", "concurrency 1"])
    holder = await budget.acquire(T, usd=0.5)
    real_call = budget.engine.run
    admitted = asyncio.Event()

    async def slow_reply(script: Any, key: str, args: list[Any], **options: Any) -> Any:
        reply = await real_call(script, key, args, **options)
        if script is budget.engine.scripts.acquire and reply[0] == 1:
            admitted.set()
            await asyncio.sleep(3600)  # the reply is "still on the wire" when the cancel comes
        return reply

    monkeypatch.setattr(budget.engine, "run", slow_reply)
    waiter = spawn(budget.acquire(T, usd=0.2))
    await wait_queued(budget, 1)
    await holder.release()
    await asyncio.wait_for(admitted.wait(), 30)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    monkeypatch.undo()
    assert await open_reservations(budget) == []
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}
    status = await budget.status(T)
    assert {s.limit.dimension: s.used + s.reserved for s in status.limits} == {"usd": 0, "concurrency": 0}


async def test_cancel_before_the_first_denial_was_read_leaves_no_queue_entry(
    waiting_budget: Budget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script queued the request, but the client never saw its ticket: the place is still given up."""
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=1)).commit()
    real_call = budget.engine.run

    async def slow_reply(script: Any, key: str, args: list[Any], **options: Any) -> Any:
        reply = await real_call(script, key, args, **options)
        if script is budget.engine.scripts.acquire:
            await asyncio.sleep(3600)
        return reply

    monkeypatch.setattr(budget.engine, "run", slow_reply)
    waiter = spawn(budget.acquire(T, usd=0.5))
    await wait_queued(budget, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    monkeypatch.undo()
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}
    assert await open_reservations(budget) == []


async def test_timed_out_head_wakes_the_next_waiter(waiting_budget: Budget) -> None:
    """A head that gives up hands its place on: the next waiter retries at once."""
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=0.6)).commit()
    head = spawn(budget.acquire(T, "head", usd=0.5, timeout=0.5))
    await wait_queued(budget, 1)
    second = spawn(budget.acquire(T, "second", usd=0.4))
    await wait_queued(budget, 2)
    with pytest.raises(BudgetTimeout):
        await asyncio.wait_for(head, 30)
    await (await asyncio.wait_for(second, 30)).commit()
    assert await queued(budget) == 0


# events and logs -------------------------------------------------------------------


async def test_events_arrive_through_budget_events(waiting_budget: Budget) -> None:
    budget = waiting_budget
    async with Events(budget) as events:
        await budget.set_limits(T, ["usd 1/hour"])
        for usd in (0.5, 0.3, 0.1, 0.1):  # 50 %, 80 %, 90 %, 100 %
            await (await budget.acquire(T, "bot", usd=usd)).commit()
        waiter = spawn(budget.acquire(T, "bot", usd=0.2))
        await events.wait_for("waiting")
        await budget.reset(T)
        await (await asyncio.wait_for(waiter, 30)).commit()
        await events.wait_for("resumed")
        await budget.set_limits(T, ["usd 2/hour"])
        await events.wait_for("limits_changed", 2)
    kinds = [e.type for e in events.items if e.type != "threshold"]
    assert kinds == ["limits_changed", "exhausted", "waiting", "reset", "resumed", "limits_changed"]
    thresholds = [(e.level, e.limit) for e in events.of("threshold")]  # type: ignore[attr-defined]
    # after the reset the waiter's 0.2 is 20 %: no crossing
    assert thresholds == [(50, "T:usd:3600000"), (75, "T:usd:3600000"), (90, "T:usd:3600000"), (100, "T:usd:3600000")]
    exhausted = events.of("exhausted")[0]
    assert exhausted.agent == "bot"
    assert exhausted.limit == "T:usd:3600000"
    assert all(e.tenant == T for e in events.items)
    waiting, resumed = events.of("waiting")[0], events.of("resumed")[0]
    assert waiting.ticket == resumed.ticket  # type: ignore[attr-defined]
    assert resumed.waited_ms >= 0  # type: ignore[attr-defined]


async def test_each_threshold_is_announced_once_per_crossing(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["usd 1/min"])
    async with Events(budget) as events:
        await (await budget.acquire(T, usd=0.6)).commit()
        await (await budget.acquire(T, usd=0.05)).commit()  # still between 50 and 75: nothing new
        with pytest.raises(BudgetExhausted):
            await budget.acquire(T, usd=0.5, mode="reject")  # denied at 65 %: exhausted
        await (await budget.acquire(T, usd=0.2)).commit()  # 85 %: crosses 75
        await events.wait_for("threshold", 2)
        await advance_clock(budget, T, 120)  # the window slides empty: every level re-arms
        await (await budget.acquire(T, usd=1)).commit()  # 100 %: crosses all four again
        await events.wait_for("threshold", 6)
        await asyncio.sleep(0.1)
    levels = [e.level for e in events.of("threshold")]  # type: ignore[attr-defined]
    assert levels == [50, 75, 50, 75, 90, 100]
    assert len(events.of("exhausted")) == 1


async def test_exhausted_is_announced_once_until_capacity_returns(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["requests 2/hour"])
    async with Events(budget) as events:
        first = await budget.acquire(T)
        await (await budget.acquire(T)).commit()
        for _ in range(3):
            with pytest.raises(BudgetExhausted):
                await budget.acquire(T, mode="reject")
        await first.release()
        await (await budget.acquire(T)).commit()
        with pytest.raises(BudgetExhausted):
            await budget.acquire(T, mode="reject")
        await events.wait_for("exhausted", 2)
        await asyncio.sleep(0.1)
    assert len(events.of("exhausted")) == 2


async def test_pause_and_resume_are_logged(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    holder = await budget.acquire(T, usd=1)
    with capture_logs() as logs:
        waiter = spawn(budget.acquire(T, "bot", usd=0.5))
        await wait_queued(budget, 1)
        await asyncio.sleep(0.05)
        await holder.commit(usd=0.1)
        await (await asyncio.wait_for(waiter, 30)).commit()
    paused = [entry for entry in logs if entry["event"] == "budget.paused"]
    resumed = [entry for entry in logs if entry["event"] == "budget.resumed"]
    assert len(paused) == 1 and len(resumed) == 1
    assert paused[0]["reason"] == "capacity"
    assert paused[0]["limit"] == "T:usd:3600000"
    assert paused[0]["tenant"] == T and paused[0]["agent"] == "bot"
    assert resumed[0]["waited"] >= 0.05
    assert logs.index(paused[0]) < logs.index(resumed[0])


async def test_pause_behind_the_queue_is_logged_with_reason_queue(waiting_budget: Budget) -> None:
    budget = waiting_budget
    await budget.set_limits(T, ["usd 1/hour"])
    holder = await budget.acquire(T, usd=0.6)
    with capture_logs() as logs:  # from the start: the first waiter's log can land after it is queued
        big = spawn(budget.acquire(T, usd=0.5))
        await wait_queued(budget, 1)
        small = spawn(budget.acquire(T, usd=0.1))  # would fit, but waits behind the first
        await wait_queued(budget, 2)
        await eventually(lambda: sum(e["event"] == "budget.paused" for e in logs) == 2, what="both pause logs")
    assert sorted(e["reason"] for e in logs if e["event"] == "budget.paused") == ["capacity", "queue"]
    await holder.release()
    for task in (big, small):
        await (await asyncio.wait_for(task, 30)).commit()


async def test_a_lost_pubsub_connection_only_delays_the_waiter(tmp_path: Path) -> None:
    """The hub reconnects, and every waiter of the process retries, so a wake sent meanwhile is not lost for good."""
    if not redis_server_available():
        pytest.skip("needs redis-server on PATH")
    server = RedisServer(tmp_path / "redis")
    server.start()
    budget = Budget.from_url(server.url, prefix="lost", heartbeat=LONG)
    try:
        await budget.set_limits(T, ["usd 1/hour"])
        holder = await budget.acquire(T, usd=1)
        waiter = spawn(budget.acquire(T, usd=0.5))
        await wait_queued(budget, 1)

        async def subscribed() -> bool:  # queued first, subscribed next: under load the second can lag
            clients = await budget.engine.client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
            return " sub=1 " in f" {clients} "

        await eventually(subscribed, what="the waiter's process to subscribe")
        killed = await budget.engine.client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert int(killed) == 1
        await holder.commit(usd=0.2)  # published while the waiter's process may be unsubscribed
        await (await asyncio.wait_for(waiter, 30)).commit()
        assert await queued(budget) == 0
    finally:
        await budget.aclose()
        server.stop()


async def test_the_heartbeat_survives_an_unexpected_error_and_beats_again() -> None:
    """One refresh fails with an error nobody expected: logged, and the next heartbeat still runs (and wakes)."""
    from slowburn_redis.waiting import Waiter, WakeHub

    calls: list[list[str]] = []

    async def refresh(tenant: str, tickets: list[str]) -> tuple[list[str], list[str]]:
        calls.append(tickets)
        if len(calls) == 1:
            raise RuntimeError("a bug in one heartbeat")
        return tickets, []  # the waiter stands first: the heartbeat wakes it

    hub = WakeHub(lambda: None, refresh, channel=lambda tenant: tenant, heartbeat=0.001)
    waiter = Waiter(T)
    waiter.ticket = "t1"
    hub._tenants[T] = {waiter}
    with capture_logs() as logs:
        beater = asyncio.ensure_future(hub._beat())
        try:
            woken = await asyncio.wait_for(waiter.sleep(None), 30)
        finally:
            beater.cancel()
            with pytest.raises(asyncio.CancelledError):
                await beater
    assert woken and len(calls) >= 2, calls
    assert [e["event"] for e in logs if e["log_level"] == "error"][:1] == ["heartbeat.error"]


async def test_a_waiter_cancelled_as_its_subscription_completes_leaves_the_hub(budget: Budget) -> None:
    """The join finishes in the very turn its caller is cancelled: its waiter must not stay behind (close hung)."""
    await budget.set_limits(T, ["concurrency 1"])
    holder = await budget.acquire(T)
    hub = budget._hub
    real_join = hub.join
    caller: asyncio.Task[Any] | None = None

    async def join_then_cancel_the_caller(tenant: str) -> Any:
        waiter = await real_join(tenant)
        assert caller is not None
        caller.cancel()  # the caller is cancelled while this join completes
        return waiter

    hub.join = join_then_cancel_the_caller  # type: ignore[method-assign]
    caller = asyncio.create_task(budget.acquire(T, timeout=30))
    with contextlib.suppress(asyncio.CancelledError):
        await caller
    await eventually(lambda: hub.waiting == 0, what="the cancelled waiter gone from the hub")
    await holder.release()
    await asyncio.wait_for(budget.aclose(), 10)  # hung for ever while the waiter stayed behind
