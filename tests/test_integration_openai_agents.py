"""The OpenAI Agents SDK's real Runner against the local stub: model calls wait, commit, refund.

Both SDK model classes are exercised (Responses and Chat Completions), per
SDK agent attribution from the run, concurrency under a small dollar window,
a failing call and a cancelled run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("agents", reason="the openai_agents extra (openai-agents) is not installed")

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, RunConfig, Runner, set_tracing_disabled
from openai import AsyncOpenAI
from structlog.testing import capture_logs

from slowburn_redis import Budget
from slowburn_redis.integrations.openai_agents import BudgetedModelProvider
from tests.stub_provider import StubProvider
from tests.test_integration_llm import ledger, ledger_by_agent

TENANT = "acme"
MODEL = "gpt-4o-mini"
set_tracing_disabled(True)  # the SDK would export traces to api.openai.com


@pytest.fixture
def stub() -> Iterator[StubProvider]:
    with StubProvider() as server:
        yield server


def client(stub: StubProvider, key: str) -> AsyncOpenAI:
    """A client of this test's loop (the SDK's default shares one httpx client across loops)."""
    return AsyncOpenAI(base_url=stub.base_url, api_key=key, max_retries=0)


def settings() -> ModelSettings:
    return ModelSettings(max_tokens=40)


async def test_runs_of_several_agents_pause_resume_and_match_the_bill(budget: Budget, stub: StubProvider) -> None:
    stub.out_tokens = (40, 40)
    provider = BudgetedModelProvider(
        budget, TENANT, model=MODEL, provider_options={"openai_client": client(stub, "fleet")}
    )
    one = provider.meter.estimate_responses(MODEL, "researcher task 0", {"max_output_tokens": 40}).usd
    limit = 3 * one * 1.2
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/2s"])
    agents = [Agent(name=n, instructions="Be brief.", model_settings=settings()) for n in ("researcher", "writer")]
    config = RunConfig(model_provider=provider, tracing_disabled=True)
    with capture_logs() as logs:
        results = await asyncio.gather(
            *(Runner.run(a, f"{a.name} task {i}", run_config=config) for a in agents for i in range(4))
        )
    assert all(r.final_output for r in results)
    events = [log["event"] for log in logs]
    assert "budget.paused" in events and "budget.resumed" in events
    assert len(stub.billed()) == 8 and all(r.path.endswith("/responses") for r in stub.records)
    billed_by_agent: dict[str, int] = {}
    for r in stub.billed():
        name = r.body["input"][0]["content"].split()[0]
        billed_by_agent[name] = billed_by_agent.get(name, 0) + r.nano
    assert await ledger_by_agent(budget) == billed_by_agent
    admitted = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in await ledger(budget))
    for start, _ in admitted:
        assert sum(u for t, u in admitted if start <= t < start + 2000) <= round(limit * 10**9)


async def test_chat_completions_model_per_agent_and_a_failure_refunds(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 2"])
    provider = BudgetedModelProvider(budget, TENANT, model=MODEL)
    model = provider.model(OpenAIChatCompletionsModel(MODEL, client(stub, "planner")), agent="planner")
    agent = Agent(name="Planner Bot", instructions="Plan.", model=model, model_settings=settings())
    result = await Runner.run(agent, "make a plan", run_config=RunConfig(tracing_disabled=True))
    assert result.final_output
    with pytest.raises(Exception, match="asked to fail"):
        await Runner.run(agent, "please [fail]", run_config=RunConfig(tracing_disabled=True))
    entries = await ledger(budget)
    assert [(e["agent"], e["outcome"]) for e in entries] == [("planner", "ok"), ("planner", "error")]
    assert entries[1]["usd"] == "0"
    assert await ledger_by_agent(budget) == {"planner": stub.bill()["planner"]}
    assert all(s.reserved == 0 for s in (await budget.status(TENANT)).limits)


async def test_a_cancelled_run_keeps_the_estimate_and_frees_the_slot(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 1"])
    stub.delay = (30.0, 30.0)  # far longer than any machine needs to cancel it
    provider = BudgetedModelProvider(
        budget, TENANT, "c", model=MODEL, provider_options={"openai_client": client(stub, "c")}
    )
    agent = Agent(name="slow", model_settings=settings())
    run: Any = asyncio.ensure_future(Runner.run(agent, "take your time", run_config=RunConfig(model_provider=provider)))
    assert await asyncio.to_thread(stub.arrived.wait, 60)  # the provider has the request
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "cancelled" and int(entry["usd"]) > 0
    status = await budget.status(TENANT)
    assert next(s for s in status.limits if s.limit.dimension == "concurrency").reserved == 0


async def test_a_streamed_run_commits_what_the_stream_reported(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 2"])
    provider = BudgetedModelProvider(budget, TENANT, model=MODEL)
    model = provider.model(OpenAIChatCompletionsModel(MODEL, client(stub, "s")), agent="streamer")
    agent = Agent(name="streamer", instructions="Stream.", model=model, model_settings=settings())
    run = Runner.run_streamed(agent, "stream something", run_config=RunConfig(tracing_disabled=True))
    events = [event async for event in run.stream_events()]
    assert events and run.final_output
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "ok" and entry["meta"]["stream"] is True
    assert entry["meta"].get("usage") != "counted"  # the usage the stream reported, not a count
    assert await ledger_by_agent(budget) == {"streamer": stub.bill()["s"]}
    assert all(s.reserved == 0 for s in (await budget.status(TENANT)).limits)
