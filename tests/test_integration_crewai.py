"""CrewAI: real crews (native OpenAI LLM) against the local stub; calls wait, commit per crew role, refund.

Crews run from threads (as ``kickoff`` blocks), several at once under a
small dollar window.
"""

from __future__ import annotations

import os

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("crewai", reason="the crewai extra is not installed")

from crewai import LLM, Agent, Crew, Task
from structlog.testing import capture_logs

from slowburn_redis import Budget
from slowburn_redis.integrations.crewai import budgeted
from tests.stub_provider import StubProvider
from tests.test_integration_llm import ledger, ledger_by_agent

TENANT = "acme"
MODEL = "gpt-4o-mini"
ROLES = ("Researcher", "Writer")


@pytest.fixture
def stub() -> Iterator[StubProvider]:
    with StubProvider(prefix="Thought: I now know the final answer\nFinal Answer: ") as server:
        yield server


def crew(stub: StubProvider, budget: Budget, n: int, **options: object) -> Crew:
    agents = [
        Agent(
            role=role,
            goal=f"{role} things",
            backstory="terse",
            llm=budgeted(
                LLM(model=MODEL, base_url=stub.base_url, api_key=role, max_tokens=60), budget, TENANT, **options
            ),
            allow_delegation=False,
            max_iter=2,
            verbose=False,
        )
        for role in ROLES
    ]
    tasks = [Task(description=f"{a.role} task {n}", expected_output="a line", agent=a) for a in agents]
    return Crew(agents=agents, tasks=tasks, verbose=False)


async def test_crews_pause_resume_and_match_the_bill_per_role(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour"])
    probe = await asyncio.to_thread(crew(stub, budget, 0).kickoff)  # one crew, to size the window by
    assert str(probe)
    price = (150, 600)  # nano-dollars per input/output token of gpt-4o-mini
    estimates = [
        int(e["meta"]["est_input_tokens"]) * price[0] + int(e["meta"]["est_output_tokens"]) * price[1]
        for e in await ledger(budget)
    ]
    await budget.reset(TENANT)
    limit = 2 * max(estimates) / 10**9  # room for two calls at a time, for six calls
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/2s"])
    with capture_logs() as logs:
        outputs = await asyncio.gather(*(asyncio.to_thread(crew(stub, budget, i).kickoff) for i in range(1, 4)))
    assert all(str(o) for o in outputs)
    events = [log["event"] for log in logs]
    assert "budget.paused" in events and "budget.resumed" in events
    bill = stub.bill()
    assert set(bill) == {"Researcher", "Writer"}
    assert await ledger_by_agent(budget) == bill
    entries = await ledger(budget)
    assert len(entries) == 8 and len(stub.billed()) == 8  # 4 crews x 2 agents, one call each
    recent = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in entries)[2:]
    for start, _ in recent:  # the window holds by admission time (the probe crew ran before the window was set)
        assert sum(u for t, u in recent if start <= t < start + 2000) <= round(limit * 10**9)


async def test_a_failing_call_refunds(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 1"])
    llm = budgeted(LLM(model=MODEL, base_url=stub.base_url, api_key="f", max_tokens=30), budget, TENANT, agent="f")
    for _ in range(2):
        with pytest.raises(Exception, match="asked to fail"):
            await asyncio.to_thread(llm.call, "please [fail]")
    assert [(e["outcome"], e["usd"]) for e in await ledger(budget)] == [("error", "0"), ("error", "0")]
    assert all(s.used == 0 and s.reserved == 0 for s in (await budget.status(TENANT)).limits)
    answer = await asyncio.to_thread(llm.call, "a direct call, no crew")
    assert answer and await ledger_by_agent(budget) == {"f": stub.bill()["f"]}
