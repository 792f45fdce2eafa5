"""The LangChain callback handler: a chat model waits on the shared budget and commits what it used.

Needs the extra ``slowburn-redis[langchain]`` (langchain-core); skipped only when it is missing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("langchain_core", reason="the langchain extra (langchain-core) is not installed")

import litellm
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from structlog.testing import capture_logs

from slowburn_redis import Budget, BudgetTimeout, InvalidInput
from slowburn_redis.integrations.langchain import BudgetCallbackHandler, SyncBudgetCallbackHandler
from slowburn_redis.llm import UnpricedModel
from slowburn_redis.llm.bridge import stop_litellm_worker
from slowburn_redis.llm.estimate import count_text_tokens

MODEL = "gpt-4o-mini"
TENANT = "acme"
PROMPT = "Name three uses of Redis streams."
REPLY = "Event sourcing, activity feeds and job queues with consumer groups."


@pytest.fixture(autouse=True)
async def _litellm_worker_stopped() -> AsyncIterator[None]:
    yield
    await stop_litellm_worker()


async def ledger(budget: Budget) -> list[dict[str, Any]]:
    out = []
    for _, fields in await budget.engine.client.xrange(budget.key(TENANT) + ":ledger"):
        entry: dict[str, Any] = dict(fields)
        entry["meta"] = json.loads(fields["meta"]) if fields.get("meta") else {}
        out.append(entry)
    return out


def replies(count: int, usage: bool = True) -> Iterator[AIMessage]:
    for _ in range(count):
        meta = {"input_tokens": 14, "output_tokens": 13, "total_tokens": 27} if usage else None
        yield AIMessage(REPLY, usage_metadata=meta)  # type: ignore[arg-type]


class Exploding(BaseChatModel):
    """A chat model whose provider fails, and counts how often it was called."""

    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "exploding"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls += 1
        raise RuntimeError("provider down")


class Echo(BaseChatModel):
    """A chat model that reports token usage only through llm_output, like older integrations."""

    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.calls += 1
        return ChatResult(
            generations=[ChatGeneration(message=AIMessage(REPLY))],
            llm_output={"token_usage": {"prompt_tokens": 40, "completion_tokens": 9}},
        )


async def test_handler_commits_reported_usage(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour"])
    handler = BudgetCallbackHandler(budget, TENANT, agent="lc", model=MODEL, default_max_tokens=200)
    chat = GenericFakeChatModel(messages=replies(1))
    answer = await chat.ainvoke([HumanMessage(PROMPT)], config={"callbacks": [handler]})
    assert answer.content == REPLY
    (entry,) = await ledger(budget)
    prompt, completion = litellm.cost_per_token(model=MODEL, prompt_tokens=14, completion_tokens=13)
    assert (entry["agent"], entry["model"], entry["outcome"]) == ("lc", MODEL, "ok")
    assert (entry["input_tokens"], entry["output_tokens"]) == ("14", "13")
    assert int(entry["usd"]) == round((prompt + completion) * 10**9)
    assert entry["meta"]["framework"] == "langchain" and entry["meta"]["est_output_tokens"] == 200
    assert entry["meta"]["est_input_tokens"] == litellm.token_counter(
        MODEL, messages=[{"role": "user", "content": PROMPT}]
    )
    assert handler.calls == {}
    status = await budget.status(TENANT)
    assert status.limits[0].reserved == 0


async def test_usage_from_llm_output_or_counted(budget: Budget) -> None:
    await budget.set_unlimited(TENANT)  # this test is about usage, not limits
    handler = BudgetCallbackHandler(budget, TENANT, model=MODEL)
    await Echo().ainvoke(PROMPT, config={"callbacks": [handler]})
    await GenericFakeChatModel(messages=replies(1, usage=False)).ainvoke(PROMPT, config={"callbacks": [handler]})
    first, second = await ledger(budget)
    assert (first["input_tokens"], first["output_tokens"]) == ("40", "9")
    assert second["meta"]["usage"] == "counted"
    assert int(second["output_tokens"]) == count_text_tokens(MODEL, REPLY)


async def test_provider_error_refunds(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["usd 1/hour", "concurrency 1"])
    handler = BudgetCallbackHandler(budget, TENANT, model=MODEL)
    chat = Exploding()
    for _ in range(2):  # the slot comes back: the second call is admitted too
        with pytest.raises(RuntimeError, match="provider down"):
            await chat.ainvoke(PROMPT, config={"callbacks": [handler]})
    assert chat.calls == 2
    entries = await ledger(budget)
    assert [(e["outcome"], e["usd"]) for e in entries] == [("error", "0"), ("error", "0")]
    assert all(s.used == 0 and s.reserved == 0 for s in (await budget.status(TENANT)).limits)


async def test_chat_models_wait_on_the_shared_budget(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 2/2s"])
    handler = BudgetCallbackHandler(budget, TENANT, agent="lc", model=MODEL)
    chat = GenericFakeChatModel(messages=replies(6))
    with capture_logs() as logs:
        answers = await asyncio.gather(
            *(chat.ainvoke(f"{PROMPT} ({i})", config={"callbacks": [handler]}) for i in range(6))
        )
    assert [a.content for a in answers] == [REPLY] * 6
    paused = [log for log in logs if log["event"] == "budget.paused"]
    assert len(paused) >= 1, logs
    admitted = sorted(e["meta"]["admitted_ms"] for e in await ledger(budget))
    assert len(admitted) == 6
    for start in admitted:  # never more than 2 admissions in any 2 s
        assert sum(1 for t in admitted if start <= t < start + 2000) <= 2, admitted
    assert admitted[-1] - admitted[0] >= 2 * 2000 * 59 / 60, admitted  # 6 calls at 2 per window: 3 windows


async def test_budget_errors_stop_the_call(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 1/hour"])
    handler = BudgetCallbackHandler(budget, TENANT, model=MODEL, wait_timeout=0.2)
    echo = Echo()
    await echo.ainvoke(PROMPT, config={"callbacks": [handler]})
    with pytest.raises(BudgetTimeout):
        await echo.ainvoke(PROMPT, config={"callbacks": [handler]})
    assert echo.calls == 1
    with pytest.raises(UnpricedModel):
        BudgetCallbackHandler(budget, TENANT, model="someone/unpriced-model")
    # without model=, the handler reads the model name; a fake model has none
    with pytest.raises(InvalidInput, match="model="):
        await Echo().ainvoke(PROMPT, config={"callbacks": [BudgetCallbackHandler(budget, TENANT)]})
    assert len(await ledger(budget)) == 1


def test_sync_handler_on_a_sync_budget(make_budget: Callable[..., Budget]) -> None:
    sync = make_budget().sync()
    try:
        sync.set_limits(TENANT, ["usd 1/hour"])
        handler = SyncBudgetCallbackHandler(sync, TENANT, agent="sync", model=MODEL)
        answer = GenericFakeChatModel(messages=replies(1)).invoke(PROMPT, config={"callbacks": [handler]})
        assert answer.content == REPLY
        report = sync.report(TENANT)
        assert report.entries == 1 and report.agents[0].name == "sync" and report.totals.input_tokens == 14
        with pytest.raises(InvalidInput):
            SyncBudgetCallbackHandler(sync.budget, TENANT, model=MODEL)  # type: ignore[arg-type]
    finally:
        sync.close()
