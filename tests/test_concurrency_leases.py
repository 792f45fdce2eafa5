"""Concurrency limits: a fleet-wide count of calls in flight, held by leases.

A slot is freed by commit or release (at once, with a notification), or when
the lease runs out because its worker died: then the money stays charged at
the estimate. `extend` keeps a long call's slot.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from slowburn_redis import Budget
from tests.test_waiting import LONG, Events, leftovers, queued, spawn, wait_queued
from tests.test_waiting_processes import Fleet, eventually

T = "acme"


@pytest.fixture
async def short_leases(make_budget: Callable[..., Budget]) -> AsyncIterator[Budget]:
    """Leases of 0.5 s; a heartbeat too slow to wake anyone within a test."""
    b = make_budget(lease_ttl=0.5, heartbeat=LONG)
    yield b
    await b.aclose()


async def test_commit_and_release_free_the_slot_at_once(short_leases: Budget) -> None:
    budget = short_leases
    await budget.set_limits(T, ["concurrency 2"])
    first = await budget.acquire(T, lease_ttl=60)
    second = await budget.acquire(T, lease_ttl=60)
    third = spawn(budget.acquire(T, lease_ttl=60))
    fourth = spawn(budget.acquire(T, lease_ttl=60))
    await wait_queued(budget, 2)
    await first.commit()
    await second.release()
    for task in (third, fourth):
        await (await asyncio.wait_for(task, 30)).commit()
    status = await budget.status(T)
    assert status.limits[0].used == 0 and status.limits[0].reserved == 0


async def test_expired_lease_frees_the_slot_but_keeps_the_money(short_leases: Budget) -> None:
    budget = short_leases
    await budget.set_limits(T, ["concurrency 1", "usd 1/hour"])
    async with Events(budget) as events:
        dead = await budget.acquire(T, "dead", usd=0.3)  # never settled: its worker "died"
        waiter = spawn(budget.acquire(T, "next", usd=0.2, lease_ttl=60))
        reservation = await asyncio.wait_for(waiter, 30)  # admitted once the 0.5 s lease ran out
        expired = await events.wait_for("lease_expired")
    assert [e.agent for e in expired] == ["dead"]
    assert expired[0].reservation == dead.id  # type: ignore[attr-defined]
    usage = {s.limit.dimension: (s.used, s.reserved) for s in (await budget.status(T)).limits}
    assert usage["concurrency"] == (0, 1)
    assert usage["usd"][0] == pytest.approx(0.3)  # the dead worker's estimate stays charged
    assert usage["usd"][1] == pytest.approx(0.2)
    late_release = await dead.release()
    assert (late_release.settled, late_release.state) == (False, "expired")
    assert (await budget.status(T)).limits[1].used == pytest.approx(0.3)  # a late release refunds nothing
    await reservation.commit()


async def test_late_commit_replaces_the_estimate(short_leases: Budget) -> None:
    budget = short_leases
    await budget.set_limits(T, ["concurrency 1", "usd 1/hour"])
    slow = await budget.acquire(T, usd=0.5)
    waiter = spawn(budget.acquire(T, usd=0.1, lease_ttl=60))
    other = await asyncio.wait_for(waiter, 30)  # the slow call's lease expired
    settlement = await slow.commit(usd=0.2)
    assert settlement.settled and settlement.state == "committed"
    await other.commit()
    usage = {s.limit.dimension: (s.used, s.reserved) for s in (await budget.status(T)).limits}
    assert usage["usd"] == (pytest.approx(0.3), 0)
    assert usage["concurrency"] == (0, 0)


async def test_extend_keeps_a_long_calls_slot(short_leases: Budget) -> None:
    budget = short_leases
    await budget.set_limits(T, ["concurrency 1"])
    long_call = await budget.acquire(T, lease_ttl=1.0)
    waiter = spawn(budget.acquire(T, lease_ttl=60))
    await wait_queued(budget, 1)
    first_expiry = long_call.lease_expires_ms
    for _ in range(11):  # 2.2 s: more than two lease TTLs
        await asyncio.sleep(0.2)
        assert await long_call.extend(1.0)
        assert not waiter.done()
    assert long_call.lease_expires_ms > first_expiry
    assert await queued(budget) == 1
    await long_call.commit()
    await (await asyncio.wait_for(waiter, 30)).commit()
    assert not await long_call.extend()  # settled: nothing to extend


async def test_extend_after_expiry_fails(short_leases: Budget) -> None:
    budget = short_leases
    await budget.set_limits(T, ["concurrency 1"])
    reservation = await budget.acquire(T, lease_ttl=0.1)
    await asyncio.sleep(0.3)
    await budget.status(T)
    assert not await reservation.extend()
    assert (await reservation.release()).state == "expired"
    assert await leftovers(budget) == {"q": {}, "qexp": [], "blocked": [], "leases": []}


# across processes ------------------------------------------------------------------


@pytest.fixture
def fleet(server_url: str, prefix: str) -> Iterator[Fleet]:
    f = Fleet(server_url, prefix)
    try:
        yield f
    finally:
        f.close()


def test_sigkilled_holder_keeps_its_slot_while_extending_and_frees_it_after_its_ttl(fleet: Fleet) -> None:
    fleet.budget.set_limits(T, ["concurrency 1", "usd 1/hour"])
    # A long call in another process: 1.5 s lease, extended every 0.2 s.
    holder = fleet.start("acquire", "--usd", "0.3", "--lease-ttl", "1.5", "--keepalive", "0.2", "--then", "hold")
    reservation_id = holder.expect("admitted")["id"]
    waiter = fleet.start("acquire", "--usd", "0.2", "--then", "stdin", "--label", "waiter")
    fleet.wait_queued(1)
    deadline = time.monotonic() + 3.2  # more than two lease TTLs: the extensions keep the slot
    while time.monotonic() < deadline:
        assert holder.expect("extended")["ok"] is True
    assert fleet.queued() == 1
    assert "admitted" not in [line["event"] for line in waiter.seen]
    assert fleet.redis.zscore(fleet.base + ":leases", reservation_id) is not None
    holder.signal(signal.SIGKILL)
    holder.wait()
    waiter.expect("admitted")  # the dead holder's lease ran out
    usage = {s.limit.dimension: (s.used, s.reserved) for s in fleet.budget.status(T).limits}
    assert usage["concurrency"] == (0, 1)
    assert usage["usd"] == (pytest.approx(0.3), pytest.approx(0.2))  # the dead call stays charged
    assert fleet.redis.hget(f"{fleet.base}:r:{reservation_id}", "s") == "expired"
    waiter.send("commit")
    waiter.expect("settled")
    waiter.send("exit")
    assert waiter.wait() == 0
    eventually(lambda: fleet.queued() == 0, what="an empty queue")
    assert fleet.leftovers() == {"q": {}, "qexp": [], "blocked": [], "leases": []}
