"""Absence is not permission: a tenant with no limits stored is refused, in every mode, before anything is charged.

"Unlimited" is an explicit stored choice (`Budget.set_unlimited`). A Budget
that has seen a tenant's limits and then finds them gone (Redis restarted
empty, evicted them) logs at error level and raises LimitsMissing; a waiter
caught by that restart is refused, never admitted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from slowburn_redis import Budget, LimitsMissing
from tests.servers import RedisServer, redis_server_available

T = "acme"


async def stored_keys(budget: Budget) -> list[str]:
    return sorted([key async for key in budget.engine.client.scan_iter(match=budget.key(T) + "*")])


@pytest.mark.parametrize("mode", ["wait", "reject", "advisory"])
async def test_a_tenant_with_no_limits_is_refused_in_every_mode_and_nothing_is_charged(
    budget: Budget, mode: str
) -> None:
    with pytest.raises(LimitsMissing) as caught:
        await budget.acquire(T, agent="researcher", usd=0.01, mode=mode)  # type: ignore[arg-type]
    assert (caught.value.tenant, caught.value.agent) == (T, "researcher")
    assert "acme" in str(caught.value) and "no limits" in str(caught.value)
    assert await stored_keys(budget) == []


async def test_cleared_limits_are_refused_again(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=0.1)).commit()
    await budget.clear_limits(T)
    with pytest.raises(LimitsMissing):
        await budget.acquire(T, usd=0.1)


async def test_limits_of_another_agent_do_not_cover_this_one(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"], agent="researcher")
    await (await budget.acquire(T, agent="researcher", usd=0.1)).commit()
    with pytest.raises(LimitsMissing):
        await budget.acquire(T, agent="writer", usd=0.1)
    with pytest.raises(LimitsMissing):
        await budget.acquire(T, usd=0.1)  # the tenant's own scope is not stored either


async def test_the_default_of_every_agent_covers_each_agent(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"], agent="*")
    await (await budget.acquire(T, agent="writer", usd=0.1)).commit()
    with pytest.raises(LimitsMissing):
        await budget.acquire(T, usd=0.1)


async def test_unlimited_is_an_explicit_stored_choice(budget: Budget) -> None:
    await budget.set_unlimited(T)
    reservations = [await budget.acquire(T, agent="any", usd=1000) for _ in range(3)]
    for reservation in reservations:
        assert (await reservation.commit()).settled
    assert await budget.get_limits(T) == []
    await budget.clear_limits(T)
    with pytest.raises(LimitsMissing):
        await budget.acquire(T, usd=0.01)


async def test_limits_that_vanish_under_a_process_are_refused_and_logged_as_an_error(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=0.1)).commit()
    await budget.engine.client.delete(budget.keys(T).limits)  # as an eviction or an empty restart would
    with capture_logs() as logs, pytest.raises(LimitsMissing):
        await budget.acquire(T, usd=0.1)
    vanished = [e for e in logs if e["event"] == "limits.vanished"]
    assert len(vanished) == 1 and vanished[0]["log_level"] == "error" and vanished[0]["tenant"] == T


@pytest.fixture
def volatile_server(tmp_path: Path) -> RedisServer:
    if not redis_server_available():
        pytest.fail("redis-server is required on PATH for this test")
    return RedisServer(tmp_path / "redis")  # no persistence: a restart comes back empty


async def test_a_waiter_caught_by_an_empty_restart_is_refused_not_admitted(volatile_server: RedisServer) -> None:
    server = volatile_server
    server.start()
    fast = {"heartbeat": 0.2, "retry_timeout": 30.0}
    budget, holder_budget = Budget.from_url(server.url, **fast), Budget.from_url(server.url)
    try:
        await budget.set_limits(T, ["usd 1/hour"])
        await holder_budget.acquire(T, usd=0.9)
        waiter = asyncio.ensure_future(budget.acquire(T, usd=0.5, timeout=60))
        for _ in range(500):  # bounded: until the waiter holds its place in the queue
            if await budget.engine.client.hlen(budget.keys(T).queue) == 1:
                break
            await asyncio.sleep(0.02)
        server.kill()
        server.start()  # empty: limits, windows and the queue are gone
        with capture_logs() as logs, pytest.raises(LimitsMissing):
            await waiter
        assert any(e["event"] == "limits.vanished" and e["log_level"] == "error" for e in logs)
        assert await budget.engine.client.keys(budget.key(T) + ":r:*") == []
    finally:
        await budget.aclose()
        await holder_budget.aclose()
        server.stop()


def test_a_sync_twin_is_refused_the_same(make_budget: Callable[..., Budget]) -> None:
    twin = make_budget().sync()
    try:
        with pytest.raises(LimitsMissing):
            twin.acquire(T, usd=0.01)
    finally:
        twin.close()


async def test_totals_never_wrap_around(budget: Budget) -> None:
    """1,024 commits of 2^53-1 tokens on a lifetime cap: the total is capped, the next acquire is refused."""
    from slowburn_redis import BudgetExhausted

    biggest = 2**53 - 1
    await budget.set_limits(T, [f"tokens {biggest}"])
    await (await budget.acquire(T, tokens=1)).commit(tokens=biggest)
    for _ in range(1023):  # advisory: admitted whatever the limit says, so each commit adds 2^53-1 again
        reservation = await budget.acquire(T, tokens=1, mode="advisory")
        await reservation.commit(tokens=biggest)
    (limit,) = (await budget.status(T)).limits
    assert limit.used == biggest and limit.remaining == 0
    with pytest.raises(BudgetExhausted):
        await budget.acquire(T, tokens=1, mode="reject")
    window = await budget.engine.client.hgetall(budget.keys(T).window("T:tokens:0"))
    assert window["cap"] == "1" and 0 <= int(window["ov"]) <= biggest and int(window["t"]) == biggest


async def test_a_ghost_at_the_head_of_a_queue_is_dropped_by_the_next_script(make_budget: Callable[..., Budget]) -> None:
    """A blocked-set entry with no queue record (written by hand, allowed to a worker user) blocks nobody."""
    budget = make_budget(heartbeat=60.0)  # only a notification can wake the waiter within its timeout
    try:
        await budget.set_limits(T, ["usd 1/hour"])
        holder = await budget.acquire(T, usd=0.9)
        waiter = asyncio.ensure_future(budget.acquire(T, usd=0.5, timeout=30))
        for _ in range(500):  # bounded: until the waiter holds its place
            if await budget.engine.client.hlen(budget.keys(T).queue) == 1:
                break
            await asyncio.sleep(0.02)
        await budget.engine.client.zadd(budget.keys(T).blocked("T:usd:3600000"), {"ghost": 0})
        await holder.release()  # wakes the head of the queue: the ghost is dropped, the waiter is next
        admitted = await waiter
        await admitted.commit()
        assert await budget.engine.client.zrange(budget.keys(T).blocked("T:usd:3600000"), 0, -1) == []
    finally:
        await budget.aclose()
