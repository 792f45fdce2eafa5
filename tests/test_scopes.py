"""Custom dimensions (``tool_calls 100/hour``, ``steps 20``) and per-model scopes (``model="gpt-4o"``).

Both run on fakeredis and on a real Redis (the `budget` fixture); the
per-model limits are checked with the tenant's and the agent's in the same
script call, all or nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from slowburn_redis import Budget, BudgetExhausted, InvalidInput, InvalidLimit, Limit, LimitsMissing
from slowburn_redis.errors import InvalidName
from slowburn_redis.llm import BudgetedLLM, mock_reply
from slowburn_redis.llm.bridge import stop_litellm_worker

TENANT = "acme"


async def ledger(budget: Budget) -> list[dict[str, Any]]:
    return [dict(fields) for _, fields in await budget.engine.client.xrange(budget.key(TENANT) + ":ledger")]


async def row(budget: Budget, label: str) -> Any:
    """The status row whose label is `label` (``tool_calls 3/hour (tenant)``)."""
    status = await budget.status(TENANT)
    found = [s for s in status.limits if s.label == label]
    assert found, [s.label for s in status.limits]
    return found[0]


async def eventually(predicate: Any, *, what: str) -> None:
    for _ in range(2000):
        if await predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


# -- custom dimensions ------------------------------------------------------------


def test_custom_dimensions_parse_round_trip_and_refuse_bad_names() -> None:
    limit = Limit.parse("tool_calls 100/hour")
    assert (limit.dimension, limit.amount, limit.window) == ("tool_calls", 100, 3600.0)
    assert Limit.parse(str(limit)) == limit == Limit(dimension="tool_calls", amount=100, window="1h")
    assert str(Limit.parse("steps 20")) == "steps 20"  # a lifetime cap
    for text, part in [
        ("Tool_calls 5/hour", "Tool_calls"),
        ("tool2 5", "tool2"),
        ("timeout 5", "timeout"),  # a keyword of acquire
        ("dollars 5/day", "dollars"),  # money is usd
        ("x" * 33 + " 5", "x" * 33),
    ]:
        with pytest.raises(InvalidLimit) as caught:
            Limit.parse(text)
        assert caught.value.part == part, text
    with pytest.raises(InvalidLimit):
        Limit.parse("tool_calls 1.5/hour")  # whole units only


async def test_a_custom_dimension_is_acquired_committed_and_shown(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 100/min", "tool_calls 3/hour", "steps 4"])
    first = await budget.acquire(TENANT, tool_calls=1, steps=1)
    second = await budget.acquire(TENANT, tool_calls=2, steps=1)
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(TENANT, tool_calls=1, mode="reject")
    assert "tool_calls 3/hour (tenant)" in str(caught.value)
    before = await row(budget, "tool_calls 3/hour (tenant)")
    assert (before.used, before.reserved, before.remaining) == (0, 3, 0)

    await second.commit(tool_calls=1)  # one fewer than reserved: refunded at once
    admitted = await budget.acquire(TENANT, tool_calls=1, mode="reject")
    await admitted.commit()
    settled = await first.commit(tool_calls=2, steps=1)  # one more than reserved: charged, an overrun
    assert settled.overrun == {"tool_calls": 1}
    tools = await row(budget, "tool_calls 3/hour (tenant)")
    assert (tools.used, tools.reserved, tools.overrun) == (4, 0, 1)
    steps = await row(budget, "steps 4 (tenant)")
    assert (steps.used, steps.remaining, steps.refill_in) == (2, 2, None)  # a lifetime cap never refills
    entries = await ledger(budget)
    assert sorted(e["x"] for e in entries) == ["steps=1 tool_calls=1", "steps=1 tool_calls=2", "tool_calls=1"]


async def test_custom_amounts_are_checked_before_redis_is_touched(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["tool_calls 3/hour"])
    before = await budget.status(TENANT)
    bad: list[Any] = [
        lambda: budget.acquire(TENANT, tokns=5),  # a near miss of tokens: a typo, not a new dimension
        lambda: budget.acquire(TENANT, request=1),
        lambda: budget.acquire(TENANT, tool_calls=1.5),
        lambda: budget.acquire(TENANT, tool_calls=-1),
        lambda: budget.acquire(TENANT, **{"Tool": 1}),
        lambda: budget.acquire(TENANT, **{"concurrency": 2}),
    ]
    for call in bad:
        with pytest.raises(InvalidInput):
            await call()
    after = await budget.status(TENANT)
    assert [(s.used, s.reserved) for s in after.limits] == [(s.used, s.reserved) for s in before.limits] == [(0, 0)]


async def test_reset_takes_a_custom_dimension(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["tool_calls 3/hour", "requests 10/hour"])
    await (await budget.acquire(TENANT, tool_calls=3)).commit()
    assert await budget.reset(TENANT, dimension="tool_calls") == 1
    assert (await row(budget, "tool_calls 3/hour (tenant)")).used == 0
    assert (await row(budget, "requests 10/hour (tenant)")).used == 1


# -- per-model scopes -------------------------------------------------------------


async def test_model_limits_apply_to_calls_of_that_model_all_or_nothing(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 100/min", "tokens 10k/min"])
    await budget.set_limits(TENANT, ["tokens 1000/min", "requests 2/min"], model="gpt-4o")
    assert await budget.get_limits(TENANT, model="gpt-4o") == [
        Limit.parse("tokens 1000/min"),
        Limit.parse("requests 2/min"),
    ]
    assert await budget.get_limits(TENANT) == [Limit.parse("requests 100/min"), Limit.parse("tokens 10k/min")]

    big = await budget.acquire(TENANT, "researcher", tokens=800, model="gpt-4o")
    assert big.model == "gpt-4o"
    tenant_before = await row(budget, "tokens 10000/min (tenant)")
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(TENANT, "writer", tokens=300, model="gpt-4o", mode="reject")
    assert "tokens 1000/min (model gpt-4o)" in str(caught.value)
    # all or nothing: the denied request charged none of the tenant's windows
    tenant_after = await row(budget, "tokens 10000/min (tenant)")
    assert (tenant_after.used, tenant_after.reserved) == (tenant_before.used, tenant_before.reserved) == (0, 800)
    # other models, and calls naming none, see only the tenant's limits
    await (await budget.acquire(TENANT, tokens=300, model="gpt-4o-mini", mode="reject")).commit()
    await (await budget.acquire(TENANT, tokens=300, mode="reject")).commit()

    await big.commit(tokens=500)  # 300 back to the model's window at once
    await (await budget.acquire(TENANT, "writer", tokens=300, model="gpt-4o", mode="reject")).commit()
    model_row = await row(budget, "tokens 1000/min (model gpt-4o)")
    assert (model_row.scope, model_row.model, model_row.agent, model_row.used) == ("model", "gpt-4o", None, 800)
    assert (await row(budget, "requests 2/min (model gpt-4o)")).remaining == 0
    assert (await row(budget, "tokens 10000/min (tenant)")).used == 1400
    models = sorted(e["model"] for e in await ledger(budget))
    assert models == ["", "gpt-4o", "gpt-4o", "gpt-4o-mini"]  # the commit names the model acquired for


async def test_a_waiter_on_a_model_limit_resumes_when_it_refills(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 100/min"])
    await budget.set_limits(TENANT, ["concurrency 1"], model="openai/gpt-4o")
    holder = await budget.acquire(TENANT, model="openai/gpt-4o")
    waiter = asyncio.create_task(budget.acquire(TENANT, model="openai/gpt-4o", timeout=60))

    async def queued() -> bool:
        return (await row(budget, "concurrency 1 (model openai/gpt-4o)")).waiters == 1

    await eventually(queued, what="the waiter queued on the model's limit")
    await holder.release()
    admitted = await waiter
    await admitted.release()


async def test_model_scopes_need_the_tenants_own_and_stand_apart(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["tokens 1000/min"], model="gpt-4o")
    with pytest.raises(LimitsMissing):  # a model's limits add to the tenant's, they never stand for them
        await budget.acquire(TENANT, tokens=10, model="gpt-4o")
    with pytest.raises(InvalidInput):
        await budget.set_limits(TENANT, ["tokens 5/min"], agent="bot", model="gpt-4o")
    for bad in ["", "gpt 4o", "a|b", "{x}", "m" * 129]:
        with pytest.raises(InvalidName):
            await budget.set_limits(TENANT, ["tokens 5/min"], model=bad)
        with pytest.raises(InvalidName):
            await budget.acquire(TENANT, tokens=1, model=bad)

    await budget.set_limits(TENANT, ["requests 10/min"])
    await (await budget.acquire(TENANT, tokens=900, model="gpt-4o")).commit()
    assert await budget.reset(TENANT) == 2  # the tenant's window and the model's
    assert (await row(budget, "tokens 1000/min (model gpt-4o)")).used == 0
    await budget.clear_limits(TENANT, model="gpt-4o")
    assert await budget.get_limits(TENANT, model="gpt-4o") == []
    await (await budget.acquire(TENANT, tokens=5000, model="gpt-4o", mode="reject")).commit()


@pytest.fixture
async def _litellm_worker_stopped() -> AsyncIterator[None]:
    yield
    await stop_litellm_worker()


@pytest.mark.usefixtures("_litellm_worker_stopped")
async def test_budgeted_llm_passes_its_model(budget: Budget) -> None:
    model = "gpt-4o-mini"
    await budget.set_limits(TENANT, ["usd 5/hour", "requests 100/min"])
    await budget.set_limits(TENANT, ["requests 1/min"], model=model)
    question = [{"role": "user", "content": "Say hi."}]
    llm = BudgetedLLM(budget, TENANT, agent="researcher", model=model, mode="reject")
    await llm.acompletion(question, max_tokens=20, mock_response=mock_reply(model, question, "Hi."))
    with pytest.raises(BudgetExhausted) as caught:
        await llm.acompletion(question, max_tokens=20, mock_response=mock_reply(model, question, "Hi."))
    assert "requests 1/min (model gpt-4o-mini)" in str(caught.value)
    other = BudgetedLLM(budget, TENANT, agent="researcher", model="gpt-4o", mode="reject")
    await other.acompletion(question, max_tokens=20, mock_response=mock_reply("gpt-4o", question, "Hi."))


async def test_a_model_scope_takes_custom_dimensions_and_calendar_periods(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 100/min"])
    await budget.set_limits(TENANT, ["tool_calls 2/calendar day@Europe/Berlin"], model="ollama/llama3:8b")
    await (await budget.acquire(TENANT, tool_calls=2, model="ollama/llama3:8b")).commit()
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire(TENANT, tool_calls=1, model="ollama/llama3:8b", mode="reject")
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 86400 + 3600
    limit_row = await row(budget, "tool_calls 2/calendar day@Europe/Berlin (model ollama/llama3:8b)")
    assert (limit_row.used, limit_row.model, limit_row.refill_in) == (2, "ollama/llama3:8b", None)
    assert limit_row.resets is not None and limit_row.resets.endswith("00:00 Europe/Berlin")


async def test_reports_sum_custom_dimensions(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["tool_calls 10/hour", "requests 10/hour"])
    await (await budget.acquire(TENANT, "a", tool_calls=2)).commit(tool_calls=3)
    await (await budget.acquire(TENANT, "b", tool_calls=1, steps=1)).commit()
    report = await budget.report(TENANT)
    assert report.totals.custom == {"tool_calls": 4, "steps": 1}
    assert {row.name: row.custom for row in report.agents} == {
        "a": {"tool_calls": 3},
        "b": {"tool_calls": 1, "steps": 1},
    }
    assert "custom dimensions: steps 1, tool_calls 4" in report.to_table()
    assert "Custom dimensions, in total: steps 1, tool_calls 4." in report.to_markdown()
