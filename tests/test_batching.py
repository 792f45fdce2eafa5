"""Batching: concurrent requests of one tenant share one script call, and each stays all or nothing on its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ResponseError

from slowburn_redis import Budget, BudgetExhausted, InvalidInput, protocol
from slowburn_redis.batching import MAX_BATCH
from slowburn_redis.scripts import Script

T = "acme"


class Calls:
    """Records every script call a Budget's batcher sends: (script name, key, number of requests)."""

    def __init__(self, budget: Budget) -> None:
        self.sent: list[tuple[str, str, int]] = []
        real = budget.engine._batcher._send

        async def send(script: Script, key: str, args: list[Any]) -> Any:
            replies = await real(script, key, args)
            self.sent.append((script.name, key, len(replies)))
            return replies

        budget.engine._batcher._send = send

    def of(self, name: str) -> list[int]:
        return [n for script, _, n in self.sent if script == name]


async def test_concurrent_acquires_of_one_tenant_share_calls(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 100/hour", "concurrency 100"])
    calls = Calls(budget)
    n = MAX_BATCH * 2 + 3
    reservations = await asyncio.gather(*(budget.acquire(T, f"a{i}", usd=0.5) for i in range(n)))
    assert sorted(calls.of("acquire")) == [3, MAX_BATCH, MAX_BATCH]  # recorded as the replies come back
    assert len({r.id for r in reservations}) == n
    assert [r.agent for r in reservations] == [f"a{i}" for i in range(n)]  # each caller got its own reply
    await asyncio.gather(*(r.commit(usd=0.25) for r in reservations))
    assert sorted(calls.of("settle")) == [3, MAX_BATCH, MAX_BATCH]
    status = await budget.status(T)
    used = {s.limit.dimension: s.used + s.reserved for s in status.limits}
    assert used == {"usd": pytest.approx(0.25 * n), "concurrency": 0}


async def test_all_or_nothing_holds_for_each_request_of_a_batch(budget: Budget) -> None:
    """Six requests in one call against room for three: the first three in, the others refused whole."""
    await budget.set_limits(T, ["usd 1/hour", "tokens 250/hour"])
    calls = Calls(budget)
    results = await asyncio.gather(
        *(budget.acquire(T, usd=0.3, tokens=80, mode="reject") for _ in range(6)), return_exceptions=True
    )
    assert calls.of("acquire") == [6]
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BudgetExhausted)]
    assert results[:3] == admitted  # run in the order they were submitted
    assert len(admitted) == 3 and len(refused) == 3
    status = await budget.status(T)
    reserved = {s.limit.dimension: s.reserved for s in status.limits}
    assert reserved == {"usd": pytest.approx(0.9), "tokens": 240}


async def test_tenants_are_batched_apart(budget: Budget) -> None:
    for tenant in ("t1", "t2"):
        await budget.set_limits(tenant, ["usd 10/hour"])
    calls = Calls(budget)
    await asyncio.gather(*(budget.acquire(f"t{1 + i % 2}", usd=0.1) for i in range(6)))
    assert sorted((key, n) for _, key, n in calls.sent) == [(budget.key("t1"), 3), (budget.key("t2"), 3)]


async def test_a_request_cancelled_before_its_batch_left_is_not_sent(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    calls = Calls(budget)
    task = asyncio.create_task(budget.acquire(T, usd=0.5))
    await asyncio.sleep(0)  # the request waits in the batcher; the batch goes out on the next turn
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls.of("acquire") == []
    status = await budget.status(T)
    assert [s.used + s.reserved for s in status.limits] == [0]


@contextlib.asynccontextmanager
async def every_slot_taken(budget: Budget) -> AsyncIterator[None]:
    """Hold every slot of the Budget's cap on calls in flight, so a batch must wait for one; give them back after."""
    slots = budget.engine._in_flight
    taken = 0
    while not slots.locked():
        await slots.acquire()
        taken += 1
    try:
        yield
    finally:
        for _ in range(taken):
            slots.release()


async def test_a_batch_whose_callers_all_gave_up_while_it_waited_for_a_connection_is_not_sent(
    budget: Budget,
) -> None:
    """Every slot of the cap on calls in flight is taken: the batch waits; its callers give up; nothing is sent."""
    await budget.set_limits(T, ["usd 1/hour"])
    calls = Calls(budget)
    async with every_slot_taken(budget):
        tasks = [asyncio.create_task(budget.acquire(T, usd=0.1)) for _ in range(3)]
        for _ in range(10):  # the batch leaves the batcher and waits for a slot
            await asyncio.sleep(0)
        assert budget.engine._batcher._sending, "the batch is waiting to be sent"
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0)
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls.of("acquire") == [], "nothing was sent for callers that all gave up"
    status = await budget.status(T)
    assert [s.used + s.reserved for s in status.limits] == [0]


async def test_a_batch_with_one_caller_left_is_sent_for_that_caller_only(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    calls = Calls(budget)
    async with every_slot_taken(budget):
        gone = [asyncio.create_task(budget.acquire(T, usd=0.1)) for _ in range(2)]
        kept = asyncio.create_task(budget.acquire(T, usd=0.2))
        for _ in range(10):
            await asyncio.sleep(0)
        for task in gone:
            task.cancel()
        await asyncio.sleep(0)
    reservation = await kept
    for task in gone:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls.of("acquire") == [1]
    status = await budget.status(T)
    assert [s.used + s.reserved for s in status.limits] == [pytest.approx(0.2)]
    await reservation.release()


async def test_a_failed_call_fails_every_request_of_its_batch(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])

    async def refuse(script: Script, key: str, args: list[Any]) -> Any:
        raise ResponseError("ERR refused for the test")

    budget.engine._batcher._send = refuse
    results = await asyncio.gather(*(budget.acquire(T, usd=0.1) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ResponseError) and "refused for the test" in str(r) for r in results)


async def test_a_reply_of_the_wrong_length_is_an_error_not_a_wrong_answer(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    real = budget.engine._batcher._send

    async def short(script: Script, key: str, args: list[Any]) -> Any:
        return (await real(script, key, args))[:-1]

    budget.engine._batcher._send = short
    results = await asyncio.gather(*(budget.acquire(T, usd=0.1) for _ in range(2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "answered 2 requests" in str(r) for r in results)


def test_a_request_travels_as_few_arguments() -> None:
    acquire, settle, status = Script("acquire"), Script("settle"), Script("status")
    args = protocol.acquire_args(
        reservation_id="id1",
        agent=None,
        mode="wait",
        priority=0,
        ticket="",
        lease_ms=60000,
        queue_ms=15000,
        estimate={"usd": 5, "concurrency": 1},
        model="gpt-4o",
    )
    assert acquire.request(args) == ["id1  gpt-4o  wait 0  60000 15000 usd=5 concurrency=1"]
    assert settle.request(["id1", "commit", 100, "usd=4", "gpt-4o", "", '{"k": 1}']) == [
        "id1 commit 100 usd=4",
        "gpt-4o",
        "",
        '{"k": 1}',
    ]
    assert status.request(["agent"]) == ["agent"]


async def test_batch_size_one_sends_every_request_on_its_own(make_budget: Any) -> None:
    budget = make_budget(batch_size=1)
    try:
        await budget.set_limits(T, ["usd 10/hour"])
        calls = Calls(budget)
        await asyncio.gather(*(budget.acquire(T, usd=0.1) for _ in range(5)))
        assert calls.of("acquire") == [1, 1, 1, 1, 1]
    finally:
        await budget.aclose()


@pytest.mark.parametrize("size", [0, 65, 2.5, True, "8"])
def test_batch_size_out_of_range_is_refused(size: Any) -> None:
    with pytest.raises(InvalidInput, match="batch_size"):
        Budget.embedded(batch_size=size)
