"""AG2 (ag2 1.x) agents with the budget middleware, their real OpenAI client against the local stub."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("ag2", reason="the autogen extra (ag2) is not installed")

from ag2 import Agent
from ag2.config.openai import OpenAIConfig
from structlog.testing import capture_logs

from slowburn_redis import Budget
from slowburn_redis.integrations.autogen import budget_middleware
from tests.stub_provider import PRICES_NANO, StubProvider
from tests.test_integration_llm import ledger, ledger_by_agent

TENANT = "acme"
MODEL = "gpt-4o-mini"


@pytest.fixture
def stub() -> Iterator[StubProvider]:
    with StubProvider() as server:
        yield server


def agent(stub: StubProvider, budget: Budget, name: str, **options: object) -> Agent:
    config = OpenAIConfig(model=MODEL, base_url=stub.base_url, api_key=name, max_tokens=40, max_retries=0)
    return Agent(name, prompt="Be brief.", config=config, middleware=[budget_middleware(budget, TENANT, **options)])


async def test_agents_pause_resume_and_match_the_bill(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour"])
    stub.out_tokens = (40, 40)
    probe = agent(stub, budget, "probe")
    assert await probe.ask("probe question")
    (entry,) = await ledger(budget)
    price = PRICES_NANO[MODEL]
    estimate = int(entry["meta"]["est_input_tokens"]) * price[0] + int(entry["meta"]["est_output_tokens"]) * price[1]
    await budget.reset(TENANT)
    limit = 2 * estimate * 1.2 / 10**9  # two calls at a time
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/2s"])
    agents = [agent(stub, budget, name) for name in ("alice", "bob", "carol")]
    with capture_logs() as logs:
        replies = await asyncio.gather(*(a.ask(f"{a.name} question {i}") for a in agents for i in range(2)))
    assert all(r for r in replies)
    events = [log["event"] for log in logs]
    assert "budget.paused" in events and "budget.resumed" in events
    assert await ledger_by_agent(budget) == stub.bill()
    recent = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in await ledger(budget))[1:]
    assert len(recent) == 6
    for start, _ in recent:
        assert sum(u for t, u in recent if start <= t < start + 2000) <= round(limit * 10**9)


async def test_a_failing_call_refunds_and_reject_mode_raises(budget: Budget, stub: StubProvider) -> None:
    from slowburn_redis import BudgetExhausted

    await budget.set_limits(TENANT, ["requests 2/hour", "concurrency 1"])
    failing = agent(stub, budget, "f")
    for _ in range(2):
        with pytest.raises(Exception, match="asked to fail"):
            await failing.ask("please [fail]")
    assert [(e["outcome"], e["usd"]) for e in await ledger(budget)] == [("error", "0"), ("error", "0")]
    rejecting = agent(stub, budget, "r", mode="reject")
    assert await rejecting.ask("one")
    assert await rejecting.ask("two")
    with pytest.raises(BudgetExhausted):
        await rejecting.ask("three")
    assert len(stub.billed()) == 2
