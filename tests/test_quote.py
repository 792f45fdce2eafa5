"""`Budget.quote`: read-only, and the same verdict an acquire at the same instant gets.

Every test runs on fakeredis and on a real Redis; time is the frozen test
clock (`clocked`), so "when would it fit" is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import litellm
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slowburn_redis import Budget, BudgetExhausted, LimitsMissing, RequestTooLarge
from slowburn_redis.llm import BudgetedLLM, mock_reply
from slowburn_redis.llm.bridge import stop_litellm_worker
from slowburn_redis.testing import advance_clock, freeze_clock

TENANT = "acme"


async def keys_and_values(budget: Budget) -> dict[str, Any]:
    """Every key of the tenant with its type and content (the test clock key aside)."""
    client = budget.engine.client
    out: dict[str, Any] = {}
    async for key in client.scan_iter(match=budget.key(TENANT) + ":*"):
        if key.endswith(":testclock"):
            continue
        kind = await client.type(key)
        if kind == "hash":
            out[key] = await client.hgetall(key)
        elif kind == "zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            out[key] = await client.xlen(key)
        elif kind == "set":
            out[key] = sorted(await client.smembers(key))
        else:
            out[key] = await client.get(key)
    return out


async def test_a_quote_changes_nothing_and_names_the_limit(clocked: Budget) -> None:
    budget = clocked
    await freeze_clock(budget, TENANT)
    await budget.set_limits(TENANT, ["usd 1/min", "requests 100/min"])
    await budget.set_limits(TENANT, ["usd 0.5/hour"], agent="researcher")
    await (await budget.acquire(TENANT, "researcher", usd=0.45)).commit()

    before = await keys_and_values(budget)
    fits = await budget.quote(TENANT, "researcher", usd=0.05)
    no = await budget.quote(TENANT, "researcher", usd=0.10)
    never = await budget.quote(TENANT, "researcher", usd=0.60)
    assert await keys_and_values(budget) == before

    assert (fits.admitted, fits.retry_in, fits.reason) == (True, 0.0, None)
    assert (no.admitted, no.reason, no.limit) == (False, "capacity", "usd 0.5/hour (agent researcher)")
    assert (
        no.retry_in is not None and 3600 < no.retry_in <= 3660
    )  # when the 0.45 leaves the hour: its bucket (1/60) ends
    assert "does not fit now" in str(no) and "usd 0.5/hour (agent researcher)" in str(no)
    assert (never.admitted, never.reason, never.retry_in) == (False, "too_large", None)
    with pytest.raises(RequestTooLarge):
        await budget.acquire(TENANT, "researcher", usd=0.60)

    # the retry time is exact: a moment before it the acquire is denied, at it admitted
    assert no.retry_in is not None
    await advance_clock(budget, TENANT, no.retry_in - 0.001)
    with pytest.raises(BudgetExhausted):
        await budget.acquire(TENANT, "researcher", usd=0.10, mode="reject")
    await advance_clock(budget, TENANT, 0.001)
    assert (await budget.quote(TENANT, "researcher", usd=0.10)).admitted
    await budget.acquire(TENANT, "researcher", usd=0.10, mode="reject")


async def queue_length_is(budget: Budget, n: int) -> None:
    for _ in range(4000):
        if (await budget.status(TENANT)).queue_length == n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the queue never held {n}")


async def test_a_quote_sees_waiters_ahead_and_returned_leases(clocked: Budget) -> None:
    budget = clocked
    await freeze_clock(budget, TENANT)
    await budget.set_limits(TENANT, ["concurrency 1", "requests 3/min"])
    holder = await budget.acquire(TENANT, requests=2, lease_ttl=30)
    busy = await budget.quote(TENANT)
    assert (busy.admitted, busy.reason, busy.limit) == (False, "capacity", "concurrency 1 (tenant)")
    assert busy.retry_in == pytest.approx(30.0)  # when the lease expires
    await holder.commit()
    # one request of three left: a waiter for two queues, and a newcomer for one must wait behind it
    waiter = asyncio.create_task(budget.acquire(TENANT, requests=2, timeout=600))
    await queue_length_is(budget, 1)
    behind = await budget.quote(TENANT)
    higher = await budget.quote(TENANT, priority=5)
    assert (behind.admitted, behind.reason, behind.retry_in) == (False, "queue", None)
    assert higher.admitted  # a higher priority goes before the waiter
    with pytest.raises(BudgetExhausted):
        await budget.acquire(TENANT, mode="reject")
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    await queue_length_is(budget, 0)

    # a lease that ran out frees its slot for a quote as for an acquire, before any script purged it
    await advance_clock(budget, TENANT, 61)
    await budget.acquire(TENANT, lease_ttl=30)
    assert not (await budget.quote(TENANT)).admitted
    await advance_clock(budget, TENANT, 31)
    assert (await budget.quote(TENANT)).admitted
    await budget.acquire(TENANT, mode="reject")


async def test_quote_covers_models_custom_dimensions_and_missing_limits(budget: Budget) -> None:
    with pytest.raises(LimitsMissing):
        await budget.quote(TENANT, usd=0.01)
    await budget.set_limits(TENANT, ["requests 100/min", "tool_calls 2/hour"])
    await budget.set_limits(TENANT, ["tokens 1000/min"], model="gpt-4o")
    assert (await budget.quote(TENANT, tokens=900, model="gpt-4o")).admitted
    assert (await budget.quote(TENANT, tokens=1001, model="gpt-4o")).reason == "too_large"
    await (await budget.acquire(TENANT, tokens=900, model="gpt-4o")).commit()
    denied = await budget.quote(TENANT, tokens=200, model="gpt-4o")
    assert (denied.admitted, denied.limit) == (False, "tokens 1000/min (model gpt-4o)")
    assert (await budget.quote(TENANT, tokens=200, model="gpt-4o-mini")).admitted
    await (await budget.acquire(TENANT, tool_calls=2)).commit()
    tools = await budget.quote(TENANT, tool_calls=1)
    assert (tools.admitted, tools.limit, tools.amounts) == (
        False,
        "tool_calls 2/hour (tenant)",
        {
            "tool_calls": 1.0,
            "requests": 1.0,
            "concurrency": 1.0,
        },
    )


# The property: at any instant, for any request, quote's verdict is the verdict an acquire gets.

_REQUEST = st.fixed_dictionaries(
    {
        "usd": st.sampled_from([None, 0.05, 0.2, 0.4]),
        "tokens": st.sampled_from([None, 100, 600]),
        "agent": st.sampled_from([None, "a", "b"]),
        "model": st.sampled_from([None, "m"]),
        "tool_calls": st.sampled_from([0, 1, 2]),
        "settle": st.sampled_from(["commit", "release", "keep", "half"]),
        "step": st.sampled_from([0, 0.5, 7, 31]),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(_REQUEST, min_size=1, max_size=12))
def test_quote_agrees_with_acquire(make_budget: Callable[..., Budget], requests: list[dict[str, Any]]) -> None:
    async def example() -> None:
        budget = make_budget(test_clock=True, prefix="q" + secrets.token_hex(6))
        try:
            await agree(budget, requests)
        finally:
            keys = [k async for k in budget.engine.client.scan_iter(match=budget.prefix + ":*")]
            if keys:
                await budget.engine.client.delete(*keys)
            await budget.aclose()

    asyncio.run(example())


async def agree(budget: Budget, requests: list[dict[str, Any]]) -> None:
    """Quote each request, then acquire it in reject mode at the same instant: the verdicts agree."""
    tenant = TENANT
    await freeze_clock(budget, tenant, 1_800_000_000_000)
    await budget.set_limits(tenant, ["usd 1/min", "concurrency 3", "requests 100/min"])
    await budget.set_limits(tenant, ["usd 0.5/10s", "tool_calls 3/min"], agent="a")
    await budget.set_limits(tenant, ["tokens 1000/30s"], model="m")
    open_reservations = []
    for r in requests:
        kwargs: dict[str, Any] = {"usd": r["usd"], "tokens": r["tokens"], "model": r["model"]}
        if r["tool_calls"]:
            kwargs["tool_calls"] = r["tool_calls"]
        quote = await budget.quote(tenant, r["agent"], **kwargs)
        try:
            reservation = await budget.acquire(tenant, r["agent"], mode="reject", lease_ttl=20, **kwargs)
        except BudgetExhausted as denied:
            assert not quote.admitted and quote.reason == "capacity", (quote, denied)
            assert quote.limit_key == denied.limit
        except RequestTooLarge:
            assert quote.reason == "too_large"
        else:
            assert quote.admitted, quote
            if r["settle"] == "commit":
                await reservation.commit()
            elif r["settle"] == "release":
                await reservation.release()
            elif r["settle"] == "half" and r["usd"]:
                await reservation.commit(usd=r["usd"] / 2)
            else:
                open_reservations.append(reservation)
        if r["step"]:
            await advance_clock(budget, tenant, r["step"])
    for reservation in open_reservations:
        await reservation.release()


@pytest.fixture
async def _litellm_worker_stopped() -> AsyncIterator[None]:
    yield
    await stop_litellm_worker()


@pytest.mark.usefixtures("_litellm_worker_stopped")
async def test_budgeted_llm_quotes_a_call_without_making_it(budget: Budget) -> None:
    model = "gpt-4o-mini"
    question = [{"role": "user", "content": "Summarize sliding windows in one line."}]
    await budget.set_limits(TENANT, ["usd 0.001/hour", "requests 10/min"])
    llm = BudgetedLLM(budget, TENANT, agent="researcher", model=model)
    small = await llm.aquote(question, max_tokens=100)
    large = await llm.aquote(question, max_tokens=5000)
    prompt_cost, completion_cost = litellm.cost_per_token(
        model=model, prompt_tokens=small.input_tokens, completion_tokens=100
    )
    assert small.usd == pytest.approx(prompt_cost + completion_cost)
    assert (small.output_tokens, small.model, small.admitted) == (100, model, True)
    assert (large.admitted, large.quote.reason, large.quote.limit) == (False, "too_large", "usd 0.001/hour (tenant)")
    assert (await budget.status(TENANT)).limits[0].used == 0  # nothing was charged
    reply = mock_reply(model, question, "Windows slide.")
    await llm.acompletion(question, max_tokens=100, mock_response=reply)
    entries = await budget.engine.client.xlen(budget.key(TENANT) + ":ledger")
    assert entries == 1  # the quotes wrote nothing to the ledger; the call did


async def test_a_quote_inside_a_run_judges_its_caps(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 100/min", "tokens 10k/min"])
    async with budget.run(TENANT, agent="researcher", caps=["tokens 1000"], max_seconds=60):
        assert (await budget.quote(TENANT, "researcher", tokens=900)).admitted
        await (await budget.acquire(TENANT, "researcher", tokens=900)).commit()
        spent = await budget.quote(TENANT, "researcher", tokens=200)
        assert (spent.admitted, spent.reason, spent.retry_in) == (False, "run", None)
        assert spent.limit is not None and spent.limit.startswith("tokens 1000 (run ")
        assert "never fits in this run" in str(spent)
    assert (await budget.quote(TENANT, "researcher", tokens=200)).admitted  # outside the run: the tenant's limits


async def test_the_sync_twin_quotes_inside_its_run(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 100/min"])
    twin = budget.sync()

    def work() -> tuple[str | None, bool]:
        try:
            with twin.run(TENANT, caps=["requests 1"], max_seconds=60):
                twin.acquire(TENANT).commit()
                inside = twin.quote(TENANT).reason  # the run reached the twin's loop thread
            return inside, twin.quote(TENANT).admitted
        finally:
            twin.close()

    assert await asyncio.to_thread(work) == ("run", True)
