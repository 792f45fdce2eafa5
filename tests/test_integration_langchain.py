"""LangChain's real ChatOpenAI against the local stub: one handler under every way of running a model.

invoke, ainvoke, batch, abatch, stream and astream, from threads and from
inside a running loop: all wait on the shared budget, none hangs, and the
ledger equals what the stub billed, per agent, to the nano-dollar.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_openai", reason="the langchain extra (langchain-openai) is not installed")

from langchain_openai import ChatOpenAI
from structlog.testing import capture_logs

from slowburn_redis import Budget, BudgetExhausted
from slowburn_redis.integrations.langchain import BudgetCallbackHandler
from slowburn_redis.llm.bridge import stop_litellm_worker
from tests.stub_provider import StubProvider
from tests.test_integration_llm import ledger, ledger_by_agent

TENANT = "acme"
MODEL = "gpt-4o-mini"


@pytest.fixture(autouse=True)
async def _litellm_worker_stopped() -> AsyncIterator[None]:
    yield
    await stop_litellm_worker()


@pytest.fixture
def stub() -> Iterator[StubProvider]:
    with StubProvider() as server:
        yield server


def chat(stub: StubProvider, key: str, **kw: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL, base_url=stub.base_url, api_key=key, max_tokens=40, max_retries=0, stream_usage=True, **kw
    )  # type: ignore[call-arg]


async def test_every_way_of_running_a_model_is_metered(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 4"])
    handler = BudgetCallbackHandler(budget, TENANT, agent="lc")
    model = chat(stub, "lc")
    cfg: Any = {"callbacks": [handler]}
    await model.ainvoke("ainvoke", config=cfg)
    await model.abatch(["abatch 1", "abatch 2"], config=cfg)
    assert [c async for c in model.astream("astream", config=cfg)]
    # blocking calls: from a worker thread, and right here, inside the running loop (it stalls, never hangs)
    await asyncio.to_thread(model.invoke, "invoke in a thread", config=cfg)
    await asyncio.to_thread(model.batch, ["batch 1", "batch 2", "batch 3"], config=cfg)
    assert await asyncio.to_thread(lambda: list(model.stream("stream in a thread", config=cfg)))
    model.invoke("invoke inside the running loop", config=cfg)
    handler.close()
    assert len(stub.billed()) == 10
    assert await ledger_by_agent(budget) == {"lc": stub.bill()["lc"]}
    assert handler.calls == {}
    assert all(s.reserved == 0 for s in (await budget.status(TENANT)).limits)


def test_blocking_code_on_a_plain_thread_with_an_async_budget(make_budget: Any, stub: StubProvider) -> None:
    """The reported hang: an async handler, blocking invoke, no loop anywhere (and from a worker thread)."""
    budget = make_budget()
    handler = BudgetCallbackHandler(budget, TENANT, agent="t")  # built outside any loop
    sync = budget.sync()
    try:
        sync.set_limits(TENANT, ["usd 1/hour"])
        model = chat(stub, "t")
        model.invoke("main thread", config={"callbacks": [handler]})
        errors: list[BaseException] = []

        def work() -> None:
            try:
                model.invoke("worker thread", config={"callbacks": [handler]})
            except BaseException as exc:  # pragma: no cover - shown by the assert
                errors.append(exc)

        with capture_logs() as logs:
            thread = threading.Thread(target=work)
            thread.start()
            thread.join(60)
        assert not thread.is_alive() and not errors
        assert not [log for log in logs if log["event"] == "lease.extend_failed"]
        report = sync.report(TENANT)
        assert report.entries == 2 and report.totals.usd_nano == stub.bill()["t"]
    finally:
        handler.close()
        sync.close()


async def test_reject_mode_raises_in_blocking_and_async_code(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["requests 1/hour"])
    handler = BudgetCallbackHandler(budget, TENANT, agent="r", mode="reject")
    model = chat(stub, "r")
    await model.ainvoke("first", config={"callbacks": [handler]})
    with pytest.raises(BudgetExhausted):
        await model.ainvoke("second", config={"callbacks": [handler]})
    with pytest.raises(BudgetExhausted):
        await asyncio.to_thread(model.invoke, "third", config={"callbacks": [handler]})
    handler.close()
    assert len(stub.records) == 1


async def test_concurrent_agents_pause_resume_and_match_the_bill(budget: Budget, stub: StubProvider) -> None:
    stub.out_tokens = (40, 40)
    probe = BudgetCallbackHandler(budget, TENANT, agent="probe")
    from langchain_core.messages import HumanMessage

    from slowburn_redis.integrations.langchain import estimate_messages

    one = estimate_messages(probe.meter, MODEL, [[HumanMessage("agent-0 question 0")]], {"max_tokens": 40}).usd
    await budget.set_limits(TENANT, [f"usd {3 * one * 1.05:.9f}/2s"])
    handlers = {name: BudgetCallbackHandler(budget, TENANT, agent=name) for name in ("alpha", "beta", "gamma")}
    delta = BudgetCallbackHandler(budget, TENANT, agent="delta")  # blocking batch from a thread: its own twin
    with capture_logs() as logs:
        await asyncio.gather(
            *(
                chat(stub, name).ainvoke(f"{name} question {i}", config={"callbacks": [h]})
                for name, h in handlers.items()
                for i in range(3)
            ),
            asyncio.to_thread(
                chat(stub, "delta").batch,
                ["delta question 0", "delta question 1"],
                config={"callbacks": [delta]},
            ),
        )
    delta.close()
    events = [log["event"] for log in logs]
    assert "budget.paused" in events and "budget.resumed" in events
    assert await ledger_by_agent(budget) == stub.bill()
    admitted = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in await ledger(budget))
    limit_nano = round(3 * one * 1.05 * 10**9)
    for start, _ in admitted:  # the window holds by admission time
        assert sum(u for t, u in admitted if start <= t < start + 2000) <= limit_nano


async def test_a_failing_call_refunds(budget: Budget, stub: StubProvider) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 1"])
    handler = BudgetCallbackHandler(budget, TENANT, agent="f")
    model = chat(stub, "f")
    for call in (model.ainvoke, lambda *a, **k: asyncio.to_thread(model.invoke, *a, **k)):
        with pytest.raises(Exception, match="asked to fail"):
            await call("please [fail]", config={"callbacks": [handler]})
    handler.close()
    assert [(e["outcome"], e["usd"]) for e in await ledger(budget)] == [("error", "0"), ("error", "0")]
    assert all(s.used == 0 and s.reserved == 0 for s in (await budget.status(TENANT)).limits)
