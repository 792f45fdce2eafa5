"""Batching: concurrent requests of one tenant share one script call, and each stays all or nothing on its own.

The calls of different tenants (and scripts) ready in the same turn travel in one pipeline, each its own script run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from slowburn_redis import (
    Budget,
    BudgetClosed,
    BudgetExhausted,
    InvalidInput,
    RedisUnavailable,
    Reservation,
    protocol,
)
from slowburn_redis.batching import MAX_BATCH, MAX_PIPELINE, MAX_TENANTS
from slowburn_redis.scripts import Call, Script
from slowburn_redis.testing import freeze_clock
from tests.test_waiting import wait_queued

T = "acme"


class Calls:
    """Records every script call a Budget's batcher sends: (script name, key, number of requests) per tenant served.

    `trips` holds the number of script calls of each round trip (a plain call or a pipeline), and
    `tenants_per_call` the number of tenants each call served.
    """

    def __init__(self, budget: Budget) -> None:
        self.sent: list[tuple[str, str, int]] = []
        self.trips: list[int] = []
        self.tenants_per_call: list[int] = []
        batcher = budget.engine._batcher
        real, real_many = batcher._send, batcher._send_many
        assert real_many is not None

        async def send(script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
            replies = await real(script, keys, args)
            self.record(script, keys, args, replies)
            self.trips.append(1)
            return replies

        async def send_many(calls: list[Call]) -> list[Any]:
            results = await real_many(calls)
            for (script, keys, args), replies in zip(calls, results, strict=True):
                self.record(script, keys, args, replies)
            self.trips.append(len(calls))
            return results

        batcher._send = send
        batcher._send_many = send_many

    def record(self, script: Script, keys: Sequence[str], args: Sequence[Any], replies: Any) -> None:
        """One entry per tenant the call served: its requests (-1 when the call failed)."""
        self.tenants_per_call.append(len(keys))
        if len(keys) == 1:
            self.sent.append((script.name, keys[0], len(replies) if isinstance(replies, list) else -1))
            return
        width = 4 if script.name == "settle" else 1  # arguments per request (the scripts' headers)
        for key, count in zip(keys, str(args[0]).split(), strict=True):
            self.sent.append((script.name, key, int(count) // width if isinstance(replies, list) else -1))

    def of(self, name: str) -> list[int]:
        return [n for script, _, n in self.sent if script == name]


async def test_concurrent_acquires_of_one_tenant_share_calls(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 100/hour", "concurrency 100"])
    calls = Calls(budget)
    n = MAX_BATCH * 2 + 3
    reservations = await asyncio.gather(*(budget.acquire(T, f"a{i}", usd=0.5) for i in range(n)))
    assert sorted(calls.of("acquire")) == [3, MAX_BATCH, MAX_BATCH]  # recorded as the replies come back
    assert calls.trips == [1, 1, 1], "one tenant's batches go out side by side, never in one pipeline"
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


async def give_up_while_waiting_for_a_slot(budget: Budget, gone: list[str], kept: str | None = None) -> Any:
    """Acquires for the tenants `gone` (usd 0.1 each) and `kept` (usd 0.2) wait for a slot of the cap on calls
    in flight, every slot taken; those of `gone` are cancelled before one frees. `kept`'s reservation, or None."""
    async with every_slot_taken(budget):
        gone_tasks = [asyncio.create_task(budget.acquire(t, usd=0.1)) for t in gone]
        kept_task = asyncio.create_task(budget.acquire(kept, usd=0.2)) if kept else None
        for _ in range(10):  # the calls leave the batcher and wait for a slot
            await asyncio.sleep(0)
        assert budget.engine._batcher._sending, "the calls are waiting to be sent"
        for task in gone_tasks:
            task.cancel()
        await asyncio.sleep(0)
    reservation = await kept_task if kept_task else None
    for task in gone_tasks:
        with pytest.raises(asyncio.CancelledError):
            await task
    return reservation


async def test_a_batch_whose_callers_all_gave_up_while_it_waited_for_a_connection_is_not_sent(
    budget: Budget,
) -> None:
    """Every slot of the cap on calls in flight is taken: the batch waits; its callers give up; nothing is sent."""
    await budget.set_limits(T, ["usd 1/hour"])
    calls = Calls(budget)
    await give_up_while_waiting_for_a_slot(budget, [T] * 3)
    assert calls.of("acquire") == [], "nothing was sent for callers that all gave up"
    status = await budget.status(T)
    assert [s.used + s.reserved for s in status.limits] == [0]


async def test_a_batch_with_one_caller_left_is_sent_for_that_caller_only(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    calls = Calls(budget)
    reservation = await give_up_while_waiting_for_a_slot(budget, [T] * 2, T)
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


# cross-tenant pipelining ------------------------------------------------------------


class CountingClient:
    """Delegates to a client; counts the round trips of script calls: each EVALSHA, and each pipeline with its size.

    `scripts` lists the script names of each round trip. `fail_pipelines` pipelines fail as a whole with a
    connection error, before anything is sent.
    """

    def __init__(self, client: Any, names: dict[str, str]) -> None:
        self._client = client
        self.names = names
        self.trips: list[tuple[str, int]] = []
        self.scripts: list[list[str]] = []
        self.script_loads = 0
        self.fail_pipelines = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def sent(self, script: str) -> int:
        """How many calls of `script` were sent."""
        return sum(names.count(script) for names in self.scripts)

    async def evalsha(self, sha: str, *args: Any) -> Any:
        self.trips.append(("evalsha", 1))
        self.scripts.append([self.names.get(sha, sha)])
        return await self._client.evalsha(sha, *args)

    async def script_load(self, source: str) -> Any:
        self.script_loads += 1
        return await self._client.script_load(source)

    def pipeline(self, **options: Any) -> Any:
        return _CountingPipeline(self, self._client.pipeline(**options))


class _CountingPipeline:
    def __init__(self, owner: CountingClient, pipe: Any) -> None:
        self._owner, self._pipe, self._names = owner, pipe, list[str]()

    def execute_command(self, command: str, sha: str, *args: Any) -> _CountingPipeline:
        assert command == "EVALSHA"
        self._pipe.execute_command(command, sha, *args)
        self._names.append(self._owner.names.get(sha, sha))
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self._owner.trips.append(("pipeline", len(self._names)))
        self._owner.scripts.append(self._names)
        if self._owner.fail_pipelines:
            self._owner.fail_pipelines -= 1
            await self._pipe.reset()
            raise RedisConnectionError("Connection reset by peer (for the test)")
        return list(await self._pipe.execute(raise_on_error=raise_on_error))


async def loaded(budget: Budget) -> None:
    """Load the batched scripts, so a first call is not answered NOSCRIPT."""
    for script in (budget.engine.scripts.acquire, budget.engine.scripts.settle):
        await budget.engine.client.script_load(script.source)


def counting(budget: Budget, tenants_per_call: int = 1) -> CountingClient:
    """Count `budget`'s round trips; the pipelining tests send one call per tenant, as on a cluster."""
    budget.engine.tenants_per_call = tenants_per_call
    scripts = budget.engine.scripts
    names = {script.sha: script.name for script in (scripts.acquire, scripts.settle, scripts.leave, scripts.status)}
    client = CountingClient(budget.engine.client, names)
    budget.engine.client = client
    return client


TENANTS = [f"t{i}" for i in range(6)]


async def test_calls_of_different_tenants_ready_together_travel_in_one_pipeline(budget: Budget) -> None:
    for tenant in TENANTS:
        await budget.set_limits(tenant, ["usd 10/hour", "concurrency 10"])
    await loaded(budget)
    client = counting(budget)
    reservations = await asyncio.gather(
        *(budget.acquire(t, f"agent-{t}", usd=0.1 * (i + 1)) for i, t in enumerate(TENANTS))
    )
    assert client.trips == [("pipeline", len(TENANTS))], "one round trip for six tenants"
    assert [r.tenant for r in reservations] == TENANTS  # each caller got its own tenant's reply
    assert [r.agent for r in reservations] == [f"agent-{t}" for t in TENANTS]
    client.trips.clear()
    settled = await asyncio.gather(*(r.commit(usd=0.05) for r in reservations))
    assert [s.state for s in settled] == ["committed"] * len(TENANTS)
    assert client.trips == [("pipeline", len(TENANTS))]
    for tenant in TENANTS:
        status = await budget.status(tenant)
        used = {s.limit.dimension: (s.used, s.reserved) for s in status.limits}
        assert used == {"usd": (pytest.approx(0.05), 0), "concurrency": (0, 0)}


async def test_a_turn_with_one_call_sends_it_plainly_and_tenants_share_a_pipeline(budget: Budget) -> None:
    for tenant in TENANTS[:2]:
        await budget.set_limits(tenant, ["usd 10/hour"])
    await loaded(budget)
    client = counting(budget)
    first = await budget.acquire(TENANTS[0], usd=0.1)
    assert client.trips == [("evalsha", 1)]
    client.trips.clear()
    second, settled = await asyncio.gather(budget.acquire(TENANTS[1], usd=0.2), first.commit(usd=0.1))
    assert client.trips == [("pipeline", 2)], "an acquire and a commit of another tenant, one round trip"
    assert settled.state == "committed" and second.tenant == TENANTS[1]
    client.trips.clear()
    third, released = await asyncio.gather(budget.acquire(TENANTS[1], usd=0.3), second.release())
    assert client.trips == [("evalsha", 1), ("evalsha", 1)], "one tenant's calls never share a pipeline"
    assert released.state == "released"
    await third.release()


async def test_more_calls_than_a_pipeline_holds_go_out_as_several_pipelines(budget: Budget) -> None:
    tenants = [f"p{i}" for i in range(MAX_PIPELINE * 2 + 1)]
    for tenant in tenants:
        await budget.set_limits(tenant, ["usd 10/hour"])
    await loaded(budget)
    client = counting(budget)
    reservations = await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in tenants))
    assert sorted(client.trips) == [("evalsha", 1), ("pipeline", MAX_PIPELINE), ("pipeline", MAX_PIPELINE)]
    assert [r.tenant for r in reservations] == tenants


async def test_pipeline_size_one_sends_every_call_apart(budget: Budget) -> None:
    for tenant in TENANTS:
        await budget.set_limits(tenant, ["usd 10/hour"])
    budget.engine.pipeline_size = 1
    await loaded(budget)
    client = counting(budget)
    await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in TENANTS))
    assert client.trips == [("evalsha", 1)] * len(TENANTS)
    with pytest.raises(ValueError, match="pipeline_size"):
        budget.engine.pipeline_size = 0


async def test_a_script_error_of_one_tenant_fails_only_its_batch(budget: Budget) -> None:
    for tenant in TENANTS[:3]:
        await budget.set_limits(tenant, ["usd 10/hour"])
    await loaded(budget)
    client = counting(budget)
    engine = budget.engine
    malformed = engine.run(engine.scripts.acquire, budget.key(TENANTS[1]), ["malformed"])  # its script answers an error
    results = await asyncio.gather(
        budget.acquire(TENANTS[0], usd=0.1),
        malformed,
        budget.acquire(TENANTS[2], usd=0.1),
        budget.acquire(TENANTS[0], usd=0.2),
        return_exceptions=True,
    )
    assert client.trips == [("pipeline", 3)]
    assert isinstance(results[1], ResponseError) and "malformed acquire request" in str(results[1])
    admitted = [results[0], results[2], results[3]]
    assert [r.tenant for r in admitted] == [TENANTS[0], TENANTS[2], TENANTS[0]]  # type: ignore[union-attr]


async def test_a_pipeline_that_fails_as_a_whole_fails_every_batch_it_carries(make_budget: Any) -> None:
    budget = make_budget(on_unavailable="raise")
    try:
        for tenant in TENANTS[:3]:
            await budget.set_limits(tenant, ["usd 10/hour"])
        await loaded(budget)
        client = counting(budget)
        client.fail_pipelines = 1
        results = await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in TENANTS[:3]), return_exceptions=True)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert client.trips[0] == ("pipeline", 3)
        # the policy applies per caller, as for a plain call: they are simply batched again
        again = await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in TENANTS[:3]))
        assert [r.tenant for r in again] == TENANTS[:3]
    finally:
        await budget.aclose()


async def test_a_noscript_in_a_pipeline_reloads_and_resends_only_the_calls_it_failed(budget: Budget) -> None:
    for tenant in TENANTS[:3]:
        await budget.set_limits(tenant, ["usd 10/hour"])
    first = await budget.acquire(TENANTS[0], usd=0.1)
    engine = budget.engine
    await engine.client.script_flush()
    await engine.client.script_load(engine.scripts.acquire.source)  # acquire is known, settle is not
    client = counting(budget)
    settled, *admitted = await asyncio.gather(
        first.commit(usd=0.1), budget.acquire(TENANTS[1], usd=0.2), budget.acquire(TENANTS[2], usd=0.3)
    )
    assert client.trips == [("pipeline", 3), ("pipeline", 1)], "the settle alone is sent again"
    assert client.script_loads == 1
    assert settled.state == "committed"
    assert [r.tenant for r in admitted] == TENANTS[1:3]
    limit = (await budget.status(TENANTS[0])).limits[0]
    assert (limit.used, limit.reserved) == (pytest.approx(0.1), 0)  # committed once


async def test_a_pipeline_whose_callers_all_gave_up_while_it_waited_is_not_sent(budget: Budget) -> None:
    for tenant in TENANTS[:3]:
        await budget.set_limits(tenant, ["usd 1/hour"])
    await loaded(budget)
    client = counting(budget)
    await give_up_while_waiting_for_a_slot(budget, TENANTS[:3])
    assert client.sent("acquire") == 0, "nothing was sent for callers that all gave up"
    for tenant in TENANTS[:3]:
        assert [s.used + s.reserved for s in (await budget.status(tenant)).limits] == [0]


async def test_a_pipeline_with_one_caller_left_sends_that_call_only(budget: Budget) -> None:
    for tenant in TENANTS[:3]:
        await budget.set_limits(tenant, ["usd 1/hour"])
    await loaded(budget)
    client = counting(budget)
    reservation = await give_up_while_waiting_for_a_slot(budget, TENANTS[:2], TENANTS[2])
    assert [names for names in client.scripts if "acquire" in names] == [["acquire"]], "one call left: sent plainly"
    for tenant in TENANTS[:2]:
        assert [s.used + s.reserved for s in (await budget.status(tenant)).limits] == [0]
    await reservation.release()


async def test_quiesce_waits_for_the_pipeline_that_carries_the_slot(budget: Budget) -> None:
    """An acquire's cleanup is ordered after its request even when that request shares a pipeline."""
    for tenant in TENANTS[:2]:
        await budget.set_limits(tenant, ["usd 1/hour"])
    engine = budget.engine
    gate = asyncio.Event()
    engine.tenants_per_call = 1  # one call per tenant, in one pipeline
    real_many = engine._batcher._send_many
    assert real_many is not None

    async def held(calls: list[Call]) -> list[Any]:
        await gate.wait()
        return await real_many(calls)

    engine._batcher._send_many = held
    tasks = [asyncio.create_task(budget.acquire(t, usd=0.1)) for t in TENANTS[:2]]
    for _ in range(10):
        await asyncio.sleep(0)
    acquire = engine.scripts.acquire
    assert not await engine.quiesce(acquire, budget.key(TENANTS[0]), timeout=0.01), "in flight in the pipeline"
    waiting = asyncio.create_task(engine.quiesce(acquire, budget.key(TENANTS[1]), timeout=10))
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.set()
    assert await waiting
    assert await engine.quiesce(acquire, budget.key(TENANTS[0]), timeout=0)
    for reservation in await asyncio.gather(*tasks):
        await reservation.release()


async def test_an_orphaned_acquire_pipeline_is_abandoned_once_quiesce_of_its_slots_ran_out(budget: Budget) -> None:
    """Acquires are quiesced: their orphaned pipeline stays on the wire until a quiesce wait for each slot ran out."""
    for tenant in TENANTS[:2]:
        await budget.set_limits(tenant, ["usd 1/hour"])
    engine = budget.engine
    never = asyncio.Event()
    started = asyncio.Event()

    async def stuck(calls: list[Call]) -> list[Any]:
        started.set()
        await never.wait()
        raise AssertionError("never answered")

    engine.tenants_per_call = 1  # one call per tenant, in one pipeline
    engine._batcher._send_many = stuck
    batcher = engine._batcher
    futures = [asyncio.ensure_future(batcher.call(engine.scripts.acquire, budget.key(t), ["x"])) for t in TENANTS[:2]]
    await started.wait()
    (sender,) = [task for task in batcher._sending if not task.done()]
    for future in futures:
        future.cancel()
    await asyncio.sleep(0.01)
    assert not sender.done(), "kept on the wire: its callers clean up after it"
    acquire = engine.scripts.acquire
    assert not await engine.quiesce(acquire, budget.key(TENANTS[0]), timeout=0.01)
    await asyncio.sleep(0.01)
    assert not sender.done(), "the other slot's quiesce has not run out"
    assert not await engine.quiesce(acquire, budget.key(TENANTS[1]), timeout=0.01)
    for _ in range(100):
        if sender.done():
            break
        await asyncio.sleep(0.01)
    assert sender.done(), "abandoned once both slots' waits ran out"
    assert await engine.quiesce(acquire, budget.key(TENANTS[0]), timeout=0)


async def test_a_closing_engine_sends_the_leaves_of_a_pipeline_and_refuses_its_other_calls(budget: Budget) -> None:
    engine = budget.engine
    await loaded(budget)
    await engine.client.script_load(engine.scripts.leave.source)
    client = counting(budget)
    acquire = protocol.acquire_args(
        reservation_id="r1", agent=None, mode="reject", priority=0, ticket="", lease_ms=60_000,
        queue_ms=30_000, estimate={"usd": 1},
    )  # fmt: skip
    engine.begin_close()
    results = await asyncio.gather(
        engine.run(engine.scripts.leave, budget.keys("t-a").base, ["gone-a"]),
        engine.run(engine.scripts.leave, budget.keys("t-b").base, ["gone-b"]),
        engine.run(engine.scripts.acquire, budget.keys("t-c").base, acquire),
        return_exceptions=True,
    )
    assert not isinstance(results[0], BaseException) and not isinstance(results[1], BaseException)
    assert isinstance(results[2], BudgetClosed)
    assert client.scripts == [["leave", "leave"]], "only the leaves went out, together"


# calls serving several tenants ------------------------------------------------------


async def test_tenants_share_calls_off_a_cluster_only(budget: Budget) -> None:
    on_cluster = isinstance(budget.engine.client, RedisCluster)
    assert budget.engine.tenants_per_call == (1 if on_cluster else MAX_TENANTS)
    with pytest.raises(ValueError, match="tenants_per_call"):
        budget.engine.tenants_per_call = 0


def sharing(budget: Budget) -> None:
    """Skip on a Redis Cluster: there each call serves one tenant (the keys of one call must share a slot)."""
    if budget.engine.tenants_per_call == 1:
        pytest.skip("a call serves one tenant on a Redis Cluster")


async def test_one_call_serves_the_tenants_ready_together(budget: Budget) -> None:
    for tenant in TENANTS:
        await budget.set_limits(tenant, ["usd 10/hour", "concurrency 10"])
    await loaded(budget)
    sharing(budget)
    client = counting(budget, tenants_per_call=MAX_TENANTS)
    reservations = await asyncio.gather(
        *(budget.acquire(t, f"agent-{t}", usd=0.1 * (i + 1)) for i, t in enumerate(TENANTS))
    )
    assert client.trips == [("evalsha", 1)], "one script call for six one-request tenants"
    assert [r.tenant for r in reservations] == TENANTS  # each caller got its own tenant's reply
    assert [r.agent for r in reservations] == [f"agent-{t}" for t in TENANTS]
    client.trips.clear()
    settled = await asyncio.gather(*(r.commit(usd=0.01 * (i + 1)) for i, r in enumerate(reservations)))
    assert [s.state for s in settled] == ["committed"] * len(TENANTS)
    assert client.trips == [("evalsha", 1)]
    for i, tenant in enumerate(TENANTS):  # each tenant charged its own amount, on its own windows
        status = await budget.status(tenant)
        used = {s.limit.dimension: (s.used, s.reserved) for s in status.limits}
        assert used == {"usd": (pytest.approx(0.01 * (i + 1)), 0), "concurrency": (0, 0)}
        ledger = await budget.report(tenant)
        assert ledger.totals.calls == 1


async def test_a_call_serves_at_most_max_batch_requests_and_max_tenants_tenants(budget: Budget) -> None:
    tenants = [f"m{i}" for i in range(MAX_TENANTS + 2)]
    for tenant in tenants:
        await budget.set_limits(tenant, ["usd 10/hour"])
    await loaded(budget)
    sharing(budget)
    calls = Calls(budget)
    # three requests for each of the first three tenants: 9 requests, more than one call carries
    await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in tenants[:3] for _ in range(3)))
    assert sorted(calls.tenants_per_call) == [1, 2]
    assert sorted(n for _, _, n in calls.sent) == [3, 3, 3]
    calls.tenants_per_call.clear()
    await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in tenants))  # one request each, ten tenants
    assert sorted(calls.tenants_per_call) == [2, MAX_TENANTS]


async def test_a_script_error_in_a_shared_call_is_sent_again_one_call_per_tenant(budget: Budget) -> None:
    """The tenants served before the failing one are not charged twice: their requests are idempotent."""
    for tenant in TENANTS[:3]:
        await budget.set_limits(tenant, ["usd 10/hour"])
    await loaded(budget)
    sharing(budget)
    client = counting(budget, tenants_per_call=MAX_TENANTS)
    engine = budget.engine
    malformed = engine.run(engine.scripts.acquire, budget.key(TENANTS[1]), ["malformed"])
    results = await asyncio.gather(
        budget.acquire(TENANTS[0], usd=0.1),
        malformed,
        budget.acquire(TENANTS[2], usd=0.1),
        return_exceptions=True,
    )
    assert client.trips == [("evalsha", 1), ("pipeline", 3)], "the shared call, then one call per tenant"
    assert isinstance(results[1], ResponseError) and "malformed acquire request" in str(results[1])
    assert [r.tenant for r in (results[0], results[2])] == [TENANTS[0], TENANTS[2]]  # type: ignore[union-attr]
    status = await budget.status(TENANTS[0])  # served by the shared call before the error, and again: once
    assert [row.reserved for row in status.limits] == [pytest.approx(0.1)]


async def test_each_tenant_of_a_shared_call_is_judged_on_its_own_limits_and_clock(make_budget: Any) -> None:
    budget = make_budget(test_clock=True)
    try:
        await budget.set_limits("spent", ["usd 0.1/hour"])
        await budget.set_limits("roomy", ["usd 10/hour"])
        spent_at = await freeze_clock(budget, "spent")
        await freeze_clock(budget, "roomy", spent_at + 3_600_000 * 24)
        await (await budget.acquire("spent", usd=0.1)).commit()
        await loaded(budget)
        sharing(budget)
        client = counting(budget, tenants_per_call=MAX_TENANTS)
        refused, admitted = await asyncio.gather(
            budget.acquire("spent", usd=0.1, mode="reject"), budget.acquire("roomy", usd=0.1), return_exceptions=True
        )
        assert client.trips == [("evalsha", 1)]
        assert isinstance(refused, BudgetExhausted)
        assert isinstance(admitted, Reservation) and admitted.admitted_at_ms == spent_at + 3_600_000 * 24
        await admitted.release()
    finally:
        await budget.aclose()


async def test_a_waiter_is_woken_by_a_settle_that_shares_a_call_with_other_tenants(budget: Budget) -> None:
    await budget.set_limits("busy", ["concurrency 1"])
    await budget.set_limits("other", ["concurrency 5"])
    held = await budget.acquire("busy")
    waiter = asyncio.create_task(budget.acquire("busy", timeout=30))
    await wait_queued(budget, 1, "busy")
    others = [await budget.acquire("other") for _ in range(3)]
    sharing(budget)
    calls = Calls(budget)
    await asyncio.gather(held.release(), *(r.release() for r in others))
    assert calls.tenants_per_call == [2], "the releases of both tenants in one call"
    await (await waiter).release()


async def test_malformed_tenant_counts_are_refused_whole(budget: Budget) -> None:
    sharing(budget)
    engine = budget.engine
    script = engine.scripts.leave
    await engine.client.script_load(script.source)
    keys = [budget.key("a"), budget.key("b")]
    for counts in ("1", "1 2", "x 1", "-1 3"):
        with pytest.raises(ResponseError, match="malformed tenant counts"):
            await engine.client.evalsha(script.sha, 2, *keys, counts, "t1", "t2")
    assert await engine.client.evalsha(script.sha, 2, *keys, "1 1", "t1", "t2") == [1, 1]
