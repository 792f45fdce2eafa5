"""LangGraph: create_agent with the budget middleware, and a hand-built StateGraph metered per node.

Real langchain/langgraph and ChatOpenAI against the local stub.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, TypedDict

import pytest

pytest.importorskip("langgraph", reason="the langgraph extra is not installed")
pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")

from langchain.agents import create_agent
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from structlog.testing import capture_logs

from slowburn_redis import Budget
from slowburn_redis.integrations.langchain import estimate_messages
from slowburn_redis.integrations.langgraph import BudgetCallbackHandler, BudgetMiddleware, budget_node
from tests.stub_provider import StubProvider
from tests.test_integration_llm import ledger, ledger_by_agent

TENANT = "acme"
MODEL = "gpt-4o-mini"


@pytest.fixture
def stub() -> Iterator[StubProvider]:
    with StubProvider() as server:
        yield server


def chat(stub: StubProvider, key: str) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=stub.base_url, api_key=key, max_tokens=40, max_retries=0)  # type: ignore[call-arg]


async def test_agents_built_by_create_agent_pause_resume_and_match_the_bill(budget: Budget, stub: StubProvider) -> None:
    stub.out_tokens = (40, 40)
    names = ("scout", "critic")
    middlewares = {n: BudgetMiddleware(budget, TENANT, agent=n) for n in names}
    one = estimate_messages(middlewares["scout"].meter, MODEL, [[HumanMessage("scout task 0")]], {"max_tokens": 40}).usd
    limit = 3 * one * 1.1
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/2s"])
    agents = {n: create_agent(chat(stub, n), middleware=[middlewares[n]], name=n) for n in names}
    with capture_logs() as logs:
        results = await asyncio.gather(
            *(agents[n].ainvoke({"messages": [HumanMessage(f"{n} task {i}")]}) for n in names for i in range(3)),
            asyncio.to_thread(agents["critic"].invoke, {"messages": [HumanMessage("critic blocking task")]}),
        )
    assert all(r["messages"][-1].content for r in results)
    events = [log["event"] for log in logs]
    assert "budget.paused" in events and "budget.resumed" in events
    assert len(stub.billed()) == 7
    assert await ledger_by_agent(budget) == stub.bill()
    admitted = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in await ledger(budget))
    for start, _ in admitted:
        assert sum(u for t, u in admitted if start <= t < start + 2000) <= round(limit * 10**9)
    for m in middlewares.values():
        m.meter.close()


class State(TypedDict):
    topic: str
    draft: str
    final: str


async def test_a_state_graph_is_charged_per_node(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour"])
    model = chat(stub, "graph")

    def draft(state: State) -> dict[str, Any]:  # sync nodes: LangGraph runs them in threads under ainvoke too
        return {"draft": model.invoke(f"draft about {state['topic']}").content}

    def polish(state: State) -> dict[str, Any]:
        return {"final": model.invoke(f"polish: {state['draft']}").content}

    builder = StateGraph(State)
    builder.add_node("drafter", draft)
    builder.add_node("polish", budget_node(polish, agent="editor"))
    builder.add_edge(START, "drafter")
    builder.add_edge("drafter", "polish")
    builder.add_edge("polish", END)
    graph = builder.compile()
    handler = BudgetCallbackHandler(budget, TENANT, per_node=True)
    out = await graph.ainvoke({"topic": "windows", "draft": "", "final": ""}, config={"callbacks": [handler]})
    assert out["final"]
    out = await asyncio.to_thread(graph.invoke, {"topic": "leases", "draft": "", "final": ""}, {"callbacks": [handler]})
    assert out["final"]
    handler.close()
    entries = await ledger(budget)
    assert sorted(e["agent"] for e in entries) == ["drafter", "drafter", "editor", "editor"]
    assert sum(int(e["usd"]) for e in entries) == stub.bill()["graph"]
    assert {e["meta"]["node"] for e in entries} == {"drafter", "polish"}


async def test_a_failing_model_call_refunds(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 1"])
    middleware = BudgetMiddleware(budget, TENANT, agent="f")
    agent = create_agent(chat(stub, "f"), middleware=[middleware])
    for _ in range(2):
        with pytest.raises(Exception, match="asked to fail"):
            await agent.ainvoke({"messages": [HumanMessage("please [fail]")]})
    assert [(e["outcome"], e["usd"]) for e in await ledger(budget)] == [("error", "0"), ("error", "0")]
    assert all(s.used == 0 and s.reserved == 0 for s in (await budget.status(TENANT)).limits)
