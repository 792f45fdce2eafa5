"""No stampede: only the queue heads retry, as many as the freed capacity admits, in order.

Waiters behind an earlier waiter get no retry time of their own (they sleep
until a notification names them); a waiter that leaves or is admitted wakes
the next head. Timed-out crowds share one status read and send no extra
attempt at their deadline, and the heartbeat refreshes only aging places and
wakes only heads that have no timed retry. Waiters here use a long heartbeat
so that nothing but a notification (or their own deadline) can wake them.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from slowburn_redis import Budget, BudgetTimeout, Reservation
from slowburn_redis.acquiring import RETRY_SPREAD, RETRY_SPREAD_MAX, spread
from slowburn_redis.waiting import REFRESH_AGE, Waiter, WakeHub
from tests.test_waiting import LONG, T, eventually, leftovers, queued, spawn, wait_queued


class Attempts:
    """Counts the acquire script requests a Budget sends, per agent (each waiter here has its own)."""

    def __init__(self, budget: Budget) -> None:
        self.by_agent: Counter[str] = Counter()
        self.status_reads = 0
        engine = budget.engine
        run = engine.run

        async def counting_run(script: Any, key: str, args: list[Any], **kw: Any) -> Any:
            if script is engine.scripts.acquire:
                self.by_agent[str(args[1])] += 1
            return await run(script, key, args, **kw)

        engine.run = counting_run  # type: ignore[method-assign]
        status = budget.status

        async def counting_status(tenant: str, *, agent: str | None = None) -> Any:
            self.status_reads += 1
            return await status(tenant, agent=agent)

        budget.status = counting_status  # type: ignore[method-assign]


async def wakes_delivered(budget: Budget) -> None:
    """Return once every wake published so far has reached this process's waiters and the retries it caused are sent.

    A marker published now is dispatched after every earlier message of the
    channel (pub/sub keeps the order of publication); a few loop turns then
    let a woken waiter's task run up to its attempt (which `Attempts` counts).
    """
    hub = budget._hub
    marker = f"barrier-{secrets.token_hex(4)}"
    seen = asyncio.Event()
    dispatch = hub._dispatch

    def spy(message: dict[str, Any]) -> None:
        dispatch(message)
        data = message.get("data")
        if (data.decode() if isinstance(data, bytes) else data) == marker:
            seen.set()

    hub._dispatch = spy  # type: ignore[method-assign]
    try:
        await budget.engine.publish(budget.keys(T).wake_channel, marker)
        await asyncio.wait_for(seen.wait(), 30)
    finally:
        hub._dispatch = dispatch  # type: ignore[method-assign]
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
async def budget(make_budget: Callable[..., Budget]) -> AsyncIterator[Budget]:
    b = make_budget(heartbeat=LONG)
    yield b
    await b.aclose()


async def queue_up(budget: Budget, agents: list[str], **amounts: Any) -> list[asyncio.Task[Reservation]]:
    """One waiter per agent, queued in this order (each is queued before the next asks)."""
    tasks = []
    for i, agent in enumerate(agents):
        tasks.append(spawn(budget.acquire(T, agent, **amounts)))
        await wait_queued(budget, i + 1)
    return tasks


async def test_only_the_queue_head_gets_a_retry_time(budget: Budget) -> None:
    """On a window that refills by itself, the head retries at the refill; the others wait to be named."""
    await budget.set_limits(T, ["requests 2/hour"])
    for _ in range(2):
        await (await budget.acquire(T)).commit()
    agents = [f"w{i}" for i in range(6)]
    with capture_logs() as logs:
        tasks = await queue_up(budget, agents)
        await eventually(lambda: sum(e["event"] == "budget.paused" for e in logs) == 6, what="six pause logs")
    retry = {e["agent"]: e["retry_in"] for e in logs if e["event"] == "budget.paused"}
    assert retry["w0"] is not None and 0 < retry["w0"] <= 3700
    assert [retry[a] for a in agents[1:]] == [None] * 5, retry
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert await queued(budget) == 0


async def test_freed_capacity_for_k_wakes_exactly_the_k_heads_in_order(budget: Budget) -> None:
    """Two slots freed, six waiters: exactly the first two retry and are admitted, in order; nobody else retries.

    The second admission leaves no slot, so the next head is told to retry when
    the soonest lease ends (ten minutes away) rather than now; a slot returned
    earlier wakes it (and it alone).
    """
    await budget.set_limits(T, ["concurrency 3"])
    held = [await budget.acquire(T, "holder", lease_ttl=600) for _ in range(3)]
    agents = [f"w{i}" for i in range(6)]
    tasks = await queue_up(budget, agents)
    attempts = Attempts(budget)
    for reservation in held[:2]:
        await reservation.release()
    admitted = [await asyncio.wait_for(tasks[0], 30), await asyncio.wait_for(tasks[1], 30)]
    await wakes_delivered(budget)  # any wrong retry has been sent by now (nothing else changes)
    assert dict(attempts.by_agent) == {"w0": 1, "w1": 1}
    assert [r.agent for r in admitted] == ["w0", "w1"]
    assert not any(t.done() for t in tasks[2:])
    await held[2].release()  # one more slot: the next head, and only it
    admitted.append(await asyncio.wait_for(tasks[2], 30))
    await wakes_delivered(budget)
    assert dict(attempts.by_agent) == {"w0": 1, "w1": 1, "w2": 1}
    assert not any(t.done() for t in tasks[3:])
    for task in tasks[3:]:
        task.cancel()
    await asyncio.gather(*tasks[3:], return_exceptions=True)
    for r in admitted:
        await r.release()
    assert await queued(budget) == 0


async def test_the_head_after_an_admission_that_spent_the_window_waits_for_the_refill(budget: Budget) -> None:
    """An admission that takes the window's last unit tells the next head when to retry, not to retry now."""
    await budget.set_limits(T, ["requests 3/hour"])
    holder = await budget.acquire(T, "holder", requests=3)
    agents = [f"w{i}" for i in range(4)]
    tasks = await queue_up(budget, agents)
    attempts = Attempts(budget)
    with capture_logs() as logs:
        await holder.commit(requests=2)  # one unit back: w0 is admitted and takes it
        first = await asyncio.wait_for(tasks[0], 30)
        await wakes_delivered(budget)
    assert dict(attempts.by_agent) == {"w0": 1}  # w1 was not woken to be denied
    assert first.agent == "w0" and not any(t.done() for t in tasks[1:])
    assert not [e for e in logs if e["event"] == "budget.paused"]
    for task in tasks[1:]:
        task.cancel()
    await asyncio.gather(*tasks[1:], return_exceptions=True)
    await first.commit()


async def test_a_refund_chain_admits_the_waiters_in_fifo_order(budget: Budget) -> None:
    """Each admitted head wakes the next while capacity lasts: every waiter gets in, first come first served."""
    await budget.set_limits(T, ["usd 1/hour"])
    holder = await budget.acquire(T, "holder", usd=1)
    agents = [f"w{i}" for i in range(8)]
    tasks = await queue_up(budget, agents, usd=0.1)
    attempts = Attempts(budget)
    await holder.commit(usd=0)  # room for all eight (and two more)
    admitted = [await asyncio.wait_for(t, 30) for t in tasks]
    order = sorted(admitted, key=lambda r: r.admitted_at_ms)
    assert [r.agent for r in order] == agents
    assert dict(attempts.by_agent) == dict.fromkeys(agents, 1)  # one retry each: no wasted wake
    for r in admitted:
        await r.commit()


async def test_a_timed_out_crowd_sends_no_attempt_at_its_deadline_and_shares_its_status_reads(
    budget: Budget,
) -> None:
    """Forty waiters with one timeout: none retries at its deadline, few status reads, no place left behind."""
    await budget.set_limits(T, ["requests 1/hour"])
    await (await budget.acquire(T)).commit()
    attempts = Attempts(budget)
    tasks = [spawn(budget.acquire(T, timeout=0.5)) for _ in range(40)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    assert all(isinstance(r, BudgetTimeout) for r in results), results
    statuses = [r.status for r in results]  # type: ignore[union-attr]
    assert all(s is not None and s.limits[0].used == 1 for s in statuses), statuses[:3]
    # Two attempts each: the denial, and the one that follows the subscription; none at the deadline.
    assert sum(attempts.by_agent.values()) == 2 * len(tasks)
    assert attempts.status_reads < len(tasks)
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}


def test_timed_retries_are_spread_and_never_early() -> None:
    for retry_in in (0.0, 0.01, 0.5, 30.0):
        values = [spread(retry_in) for _ in range(200)]
        assert all(retry_in <= v <= retry_in + min(RETRY_SPREAD * retry_in, RETRY_SPREAD_MAX) for v in values)
        if retry_in:
            assert len(set(values)) > 100  # not synchronized


async def test_the_heartbeat_refreshes_only_aging_places_and_wakes_only_untimed_heads() -> None:
    """A waiter that attempted recently is not refreshed; a head with its own retry time is not woken."""
    calls: list[list[str]] = []

    async def refresh(tenant: str, tickets: list[str]) -> tuple[list[str], list[str]]:
        calls.append(sorted(tickets))
        return tickets, []  # every one stands first

    heartbeat = 0.05
    hub = WakeHub(lambda: None, refresh, channel=lambda tenant: tenant, heartbeat=heartbeat)
    loop = asyncio.get_running_loop()
    timed, untimed, fresh = Waiter(T), Waiter(T), Waiter(T)
    for waiter, ticket in ((timed, "timed"), (untimed, "untimed"), (fresh, "fresh")):
        waiter.ticket = ticket
        waiter.refreshed_at = loop.time() - 10 * heartbeat  # aged
    timed.timed = True
    fresh.refreshed_at = loop.time() + 3600  # as if it had just attempted, for the whole test
    hub._tenants[T] = {timed, untimed, fresh}
    await hub._beat_tenant(T, hub._tenants[T])
    assert calls == [["timed", "untimed"]]
    assert untimed._event.is_set() and not timed._event.is_set() and not fresh._event.is_set()
    # Both were refreshed just now: the next beat, within REFRESH_AGE heartbeats, sends nothing.
    await hub._beat_tenant(T, hub._tenants[T])
    assert len(calls) == 1
    assert REFRESH_AGE + 1 < 3  # a place (three heartbeats) is refreshed before it can expire


async def test_many_waiters_time_out_on_the_frozen_clock_without_an_extra_round(clocked: Budget) -> None:
    """On a frozen test clock, a crowd's deadlines are its own timers: all raise, none is admitted late."""
    budget = clocked
    await budget.set_limits(T, ["requests 1/min"])
    await (await budget.acquire(T)).commit()
    tasks = [spawn(budget.acquire(T, f"w{i}", timeout=0.3)) for i in range(100)]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    assert all(isinstance(r, BudgetTimeout) for r in results)
    assert await queued(budget) == 0


async def test_a_wake_with_a_time_wakes_its_waiter_then_and_plain_wakes_at_once() -> None:
    """``<ticket>@<ms>`` sets the waiter's retry time; a plain ticket wakes at once; others sleep on."""

    async def refresh(tenant: str, tickets: list[str]) -> tuple[list[str], list[str]]:
        return [], []

    hub = WakeHub(lambda: None, refresh, channel=lambda tenant: tenant, heartbeat=LONG)
    later, now, other = Waiter(T), Waiter(T), Waiter(T)
    for waiter, ticket in ((later, "later"), (now, "now"), (other, "other")):
        waiter.ticket = ticket
    hub._tenants[T] = {later, now, other}
    hub._by_channel[T] = T
    hub._dispatch({"type": "message", "channel": T, "data": "later@20 now"})
    assert now._event.is_set() and not later._event.is_set() and not other._event.is_set()
    assert later.timed
    assert await asyncio.wait_for(later.sleep(None), 30)  # woken by its time, not by a timeout
    assert not other._event.is_set()


async def test_a_head_leaving_a_spent_window_hands_its_retry_time_on_instead_of_a_retry(budget: Budget) -> None:
    """The head times out on a window with no unit left: the next waiter is told when, and does not retry now.

    (When units remain, the next waiter is woken at once: test_waiting's
    test_timed_out_head_wakes_the_next_waiter.)
    """
    await budget.set_limits(T, ["requests 1/hour"])
    await (await budget.acquire(T)).commit()
    head = spawn(budget.acquire(T, "head", timeout=0.3))
    await wait_queued(budget, 1)
    second = spawn(budget.acquire(T, "second"))
    await wait_queued(budget, 2)
    attempts = Attempts(budget)
    with pytest.raises(BudgetTimeout):
        await asyncio.wait_for(head, 30)
    await wait_queued(budget, 1)
    await wakes_delivered(budget)  # a wrong retry has been sent by now
    assert dict(attempts.by_agent) == {}
    assert not second.done()
    await budget.reset(T)  # capacity back at once: the reset wakes it
    await (await asyncio.wait_for(second, 30)).commit()
