"""Run budgets: lifetime caps of one run, charged with the tenant's windows in the same script call.

Every test runs on fakeredis and on a real Redis (the `budget` fixtures); the
multi-process test needs the real one. Nothing waits for wall time: a run
that is spent must raise at once, which the tests see by the exception and by
the absence of a queue entry; time is the frozen tenant clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from slowburn_redis import Budget, BudgetExhausted, InvalidInput, RunExhausted, current_run
from slowburn_redis.runs import GRACE, TTL_MARGIN
from slowburn_redis.testing import advance_clock, freeze_clock

ROOT = Path(__file__).resolve().parent.parent
T = "acme"
AGENT = "researcher"


async def _limits(budget: Budget) -> None:
    await budget.set_limits(T, ["requests 1000/hour", "tokens 10M/hour", "usd 100/hour"])


async def _nobody_queued(budget: Budget) -> bool:
    keys = budget.keys(T)
    return await budget.engine.exists(keys.queue, keys.queue_expiry) == 0


async def _eventually(check: Callable[[], Awaitable[object]], *, what: str) -> None:
    """Wait for a condition (polled), never for a length of time; fail after a generous bound."""
    for _ in range(6000):
        if await check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def _used(budget: Budget, dimension: str) -> float:
    status = await budget.status(T)
    (row,) = [s for s in status.limits if s.limit.dimension == dimension]
    return row.used


async def _run_keys(budget: Budget, run_id: str) -> list[str]:
    return sorted([key async for key in budget.engine.scan_keys(f"{budget.key(T)}:*{run_id}*")])


async def test_caps_hold_exactly_and_raise_run_exhausted(budget: Budget) -> None:
    await _limits(budget)
    async with budget.run(T, agent=AGENT, caps=["requests 5", "tokens 50k"]) as run:
        for _ in range(5):
            await (await budget.acquire(T, agent=AGENT, tokens=100)).commit()
        with pytest.raises(RunExhausted) as caught:
            await budget.acquire(T, agent=AGENT, tokens=100)
    error = caught.value
    assert error.reason == "cap" and error.run_id == run.id
    assert error.cap == f"requests 5 (run {run.id})"
    assert f"requests 5 (run {run.id}) has 5 used and this call needs 1" in str(error)
    assert "R:" not in str(error) and budget.key(T) not in str(error)
    assert error.summary is not None and error.summary.steps == 5
    assert await _used(budget, "requests") == 5  # the refused call charged the tenant nothing


async def test_a_spent_run_never_waits_even_in_wait_mode(budget: Budget) -> None:
    await budget.set_limits(T, ["requests 1/hour", "tokens 1M/hour"])
    async with budget.run(T, agent=AGENT, caps=["tokens 1000"]):
        held = await budget.acquire(T, agent=AGENT, tokens=600)
        # The tenant's window is full too (requests 1/hour): the run's verdict comes first, so no wait.
        with pytest.raises(RunExhausted):
            await budget.acquire(T, agent=AGENT, tokens=600, mode="wait", timeout=30)
        assert await _nobody_queued(budget)
        with pytest.raises(RunExhausted):
            await budget.acquire(T, agent=AGENT, tokens=2000, mode="reject")  # larger than the cap itself
        await held.commit()


async def test_a_waiter_whose_run_is_spent_leaves_the_queue_when_it_retries(budget: Budget) -> None:
    await budget.set_limits(T, ["requests 1/hour"])
    async with budget.run(T, agent=AGENT, caps=["tokens 1000"]) as run:
        held = await budget.acquire(T, agent=AGENT, tokens=100)
        waiter = asyncio.create_task(budget.acquire(T, agent=AGENT, tokens=500, timeout=60))
        keys = budget.keys(T)
        await _eventually(lambda: budget.engine.exists(keys.queue), what="the waiter queued on the tenant's window")
        await held.commit(tokens=600)  # the run now has 400 left: the waiter cannot fit
        await budget.reset(T)  # the tenant's window is free again, and the waiter is woken
        with pytest.raises(RunExhausted):
            await waiter
        assert await _nobody_queued(budget)
        assert (await run.summary()).steps == 1


async def test_the_summary_counts_per_dimension_per_model_steps_and_time(clocked: Budget) -> None:
    budget = clocked
    await _limits(budget)
    await freeze_clock(budget, T)
    async with budget.run(T, agent=AGENT, caps=["tokens 50k", "usd 0.50"], max_seconds=600) as run:
        r = await budget.acquire(T, agent=AGENT, tokens=1000, usd=0.01, model="gpt-4o-mini")
        await r.commit(tokens=800, usd=0.004)
        await advance_clock(budget, T, 2.5)
        r = await budget.acquire(T, agent=AGENT, tokens=2000, usd=0.02, model="gpt-4o")
        await r.commit(tokens=1500, usd=0.015, input_tokens=1000, output_tokens=500)
        r = await budget.acquire(T, agent=AGENT, tokens=500, usd=0.01)  # in flight: counted on the caps only
        await advance_clock(budget, T, 0.5)
        summary = await run.summary()
        await r.release()
    assert summary.run_id == run.id and summary.agent == AGENT and summary.tenant == T
    assert summary.steps == 3
    assert summary.elapsed == 3.0 and summary.max_seconds == 600
    assert summary.spent == {
        "tokens": 2300,
        "usd": pytest.approx(0.019),
        "requests": 2,
        "input_tokens": 1000,
        "output_tokens": 500,
    }
    assert summary.by_model["gpt-4o-mini"] == {"tokens": 800, "usd": pytest.approx(0.004), "requests": 1}
    assert summary.by_model["gpt-4o"]["tokens"] == 1500
    caps = {c.limit: c.used for c in summary.caps}
    assert caps == {"tokens 50000": 2800, "usd 0.5": pytest.approx(0.029)}
    text = str(summary)
    assert "3 step(s) in 3.0s of 600s" in text and "tokens 2800 of 50000" in text


async def test_a_run_cap_that_denies_leaves_the_tenant_untouched(budget: Budget) -> None:
    await _limits(budget)
    async with budget.run(T, caps=["tokens 1000"]) as run:
        await (await budget.acquire(T, tokens=900)).commit()
        before = {d: await _used(budget, d) for d in ("requests", "tokens")}
        with pytest.raises(RunExhausted):
            await budget.acquire(T, tokens=200)
        assert {d: await _used(budget, d) for d in ("requests", "tokens")} == before
        assert (await run.summary()).steps == 1


async def test_a_tenant_window_that_denies_leaves_the_run_untouched(budget: Budget) -> None:
    await budget.set_limits(T, ["tokens 1000/hour"])
    async with budget.run(T, caps=["tokens 5000", "requests 10"]) as run:
        await (await budget.acquire(T, tokens=900)).commit()
        with pytest.raises(BudgetExhausted):
            await budget.acquire(T, tokens=200, mode="reject")
        summary = await run.summary()
    assert summary.steps == 1
    assert {c.limit: c.used for c in summary.caps} == {"tokens 5000": 900, "requests 10": 1}


async def test_a_commit_below_the_estimate_refunds_the_run_cap(budget: Budget) -> None:
    await _limits(budget)
    async with budget.run(T, caps=["tokens 1000"]) as run:
        r = await budget.acquire(T, tokens=1000)
        with pytest.raises(RunExhausted):
            await budget.acquire(T, tokens=1)
        await r.commit(tokens=300)
        await (await budget.acquire(T, tokens=700)).commit()  # exactly what the refund left
        with pytest.raises(RunExhausted):
            await budget.acquire(T, tokens=1)
        r = await budget.acquire(T, requests=1)  # no tokens reserved: a commit charges them all the same
        await r.commit(tokens=50)
        assert {c.limit: c.used for c in (await run.summary()).caps} == {"tokens 1000": 1050}


async def test_max_seconds_is_judged_on_the_tenant_clock(clocked: Budget) -> None:
    budget = clocked
    await _limits(budget)
    await freeze_clock(budget, T)
    async with budget.run(T, caps=["requests 100"], max_seconds=10) as run:
        await advance_clock(budget, T, 9.999)
        await (await budget.acquire(T)).commit()
        await advance_clock(budget, T, 0.001)
        with pytest.raises(RunExhausted) as caught:
            await budget.acquire(T, mode="wait", timeout=30)
        assert await _nobody_queued(budget)
    assert caught.value.reason == "time"
    assert caught.value.cap == f"max_seconds 10 (run {run.id})"
    assert "out of time" in str(caught.value) and "10.0s used" in str(caught.value)
    assert caught.value.summary is not None and caught.value.summary.steps == 1


async def test_a_runs_keys_expire_after_it(budget: Budget) -> None:
    await _limits(budget)
    client = budget.engine.client
    async with budget.run(T, caps=["tokens 1000", "requests 5"], max_seconds=100) as run:
        await (await budget.acquire(T, tokens=10)).commit()
        keys = await _run_keys(budget, run.id)
        assert len(keys) == 3  # the run's hash and its two caps' windows
        for key in keys:
            assert 0 < await client.pttl(key) <= (100 + TTL_MARGIN) * 1000, key
    for key in keys:
        assert 0 < await client.pttl(key) <= GRACE * 1000, key
    late = await budget.acquire(T, tokens=10)  # outside the run: not charged to it
    await late.commit()
    for key in keys:
        assert 0 < await client.pttl(key) <= GRACE * 1000, key
    reservation_keys = [key async for key in budget.engine.scan_keys(f"{budget.key(T)}:r:*")]
    assert [key for key in reservation_keys if await client.pttl(key) <= 0] == []


async def test_a_late_commit_lands_on_a_run_that_ended(budget: Budget) -> None:
    await _limits(budget)
    async with budget.run(T, caps=["tokens 1000"]) as run:
        r = await budget.acquire(T, tokens=500)
    await r.commit(tokens=200)
    summary = await run.summary()
    assert summary.spent["tokens"] == 200 and summary.caps[0].used == 200


async def test_a_run_whose_keys_expired_refuses(budget: Budget) -> None:
    await _limits(budget)
    async with budget.run(T, caps=["tokens 1000"]) as run:
        for key in await _run_keys(budget, run.id):
            await budget.engine.client.delete(key)  # what the TTL does
        with pytest.raises(RunExhausted) as caught:
            await budget.acquire(T, tokens=1, mode="advisory")
    assert caught.value.reason == "gone" and caught.value.summary is None
    assert await _run_keys(budget, run.id) == []  # nothing was written back


async def test_two_concurrent_runs_of_one_agent_are_independent(budget: Budget) -> None:
    await _limits(budget)

    async def one_run() -> tuple[str, int, int]:
        admitted = refused = 0
        async with budget.run(T, agent=AGENT, caps=["requests 3"]) as run:
            for _ in range(5):
                try:
                    await (await budget.acquire(T, agent=AGENT)).commit()
                    admitted += 1
                except RunExhausted:
                    refused += 1
        return run.id, admitted, refused

    (id1, a1, r1), (id2, a2, r2) = await asyncio.gather(one_run(), one_run())
    assert id1 != id2
    assert (a1, r1, a2, r2) == (3, 2, 3, 2)
    assert await _used(budget, "requests") == 6


async def test_the_run_reaches_tasks_created_inside_and_not_other_tenants(budget: Budget) -> None:
    await _limits(budget)
    await budget.set_limits("globex", ["requests 10/hour"])
    async with budget.run(T, caps=["requests 4"]) as run:

        async def child() -> None:
            assert current_run() is run
            await (await budget.acquire(T)).commit()

        await asyncio.gather(*(asyncio.create_task(child()) for _ in range(4)))
        await (await budget.acquire("globex")).commit()  # another tenant: not charged to the run
        with pytest.raises(RunExhausted):
            await budget.acquire(T)
    assert current_run() is None


async def test_the_sync_twin_runs_in_the_calling_thread(budget: Budget) -> None:
    await _limits(budget)
    twin = budget.sync()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            with twin.run(T, agent=AGENT, caps=["requests 2"], max_seconds=60) as run:
                with twin.acquire(T, agent=AGENT) as r:
                    r.commit()
                twin.acquire(T, agent=AGENT).commit()
                try:
                    twin.acquire(T, agent=AGENT, timeout=30)
                except RunExhausted as exc:
                    outcome["error"] = exc
                outcome["summary"] = run.summary()
                outcome["id"] = run.id
        finally:
            twin.close()

    thread = threading.Thread(target=work)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert isinstance(outcome["error"], RunExhausted)
    summary = outcome["summary"]
    assert summary.steps == 2 and summary.spent["requests"] == 2  # type: ignore[attr-defined]
    assert await _nobody_queued(budget)


async def test_joining_a_run_by_id_shares_its_caps(budget: Budget) -> None:
    await _limits(budget)
    async with budget.run(T, caps=["requests 3"], run_id="shared-1") as first:
        async with budget.run(T, run_id="shared-1") as second:
            assert second.id == first.id == "shared-1"
            assert [str(c) for c in second.caps] == ["requests 3"]
            await (await budget.acquire(T)).commit()
        await (await budget.acquire(T)).commit()  # the run stays open while one process is inside
        with pytest.raises(InvalidInput, match="other caps"):
            async with budget.run(T, caps=["requests 4"], run_id="shared-1"):
                pass
        assert (await first.summary()).steps == 2
    with pytest.raises(InvalidInput, match="does not exist"):
        async with budget.run(T, run_id="never-opened"):
            pass


def test_run_arguments_are_checked_before_redis() -> None:
    budget = Budget.embedded()
    for caps in (["tokens 5/min"], ["usd 5/month"], ["concurrency 2"], ["tokens 5", "tokens 6"]):
        with pytest.raises(InvalidInput):
            budget.run(T, caps=caps)
    with pytest.raises(InvalidInput):
        budget.run(T, caps=["tokens 5"], max_seconds=0)
    with pytest.raises(InvalidInput):
        budget.run(T, caps=["tokens 5"], run_id="bad id")


# -- BudgetedLLM -------------------------------------------------------------------


async def test_budgeted_llm_calls_inside_a_run_are_charged_to_it(budget: Budget) -> None:
    from slowburn_redis.llm import BudgetedLLM, mock_reply
    from slowburn_redis.llm.bridge import stop_litellm_worker

    model = "gpt-4o-mini"
    question = [{"role": "user", "content": "Name three sliding-window rate limiters."}]
    await _limits(budget)
    llm = BudgetedLLM(budget, T, agent=AGENT, model=model)
    try:
        async with budget.run(T, agent=AGENT, caps=["requests 1"]) as run:
            await llm.acompletion(question, max_tokens=50, mock_response=mock_reply(model, question, "Three."))
            with pytest.raises(RunExhausted):
                await llm.acompletion(question, max_tokens=50, mock_response=mock_reply(model, question, "Again."))
            summary = await run.summary()
    finally:
        await stop_litellm_worker()  # litellm's logging task, before the test's loop closes
    assert summary.steps == 1
    assert summary.by_model[model]["requests"] == 1
    assert summary.spent["usd"] > 0 and summary.spent["input_tokens"] > 0


# -- several OS processes share one run ------------------------------------------------


async def test_processes_sharing_a_run_id_hold_its_cap_exactly(real_url: str, prefix: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = ["-m", "tests.run_worker", real_url, prefix, T, "fleet-run", "10"]
    async with Budget.from_url(real_url, prefix=prefix) as budget:
        await budget.set_limits(T, ["requests 1000/hour"])
        async with budget.run(T, agent="worker", caps=["requests 12"], run_id="fleet-run") as run:
            workers = [
                await asyncio.create_subprocess_exec(
                    sys.executable, *command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                for _ in range(3)
            ]
            outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), timeout=120)
            summary = await run.summary()
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err.decode()
    results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["other"] for r in results] == [[], [], []]
    assert sum(r["admitted"] for r in results) == 12
    assert sum(r["exhausted"] for r in results) == 18
    assert summary.steps == 12 and summary.spent["tokens"] == 120
