"""The LLM layer: estimate -> acquire -> call -> commit, with litellm's offline mock responses.

Every mocked response carries a realistic usage block (`mock_reply` counts
the prompt and the reply the way litellm does); nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import litellm
import pytest
from structlog.testing import capture_logs

from slowburn_redis import Budget, BudgetExhausted, InvalidInput
from slowburn_redis.llm import BudgetedLLM, UnpricedModel, mock_reply
from slowburn_redis.llm.bridge import stop_litellm_worker
from slowburn_redis.llm.estimate import count_text_tokens

MODEL = "gpt-4o-mini"
TENANT = "acme"
QUESTION = [
    {"role": "system", "content": "You are a careful research assistant."},
    {"role": "user", "content": "Summarize the trade-offs of sliding-window rate limiting in three sentences."},
]
ANSWER = (
    "Sliding windows smooth out bursts that fixed windows let through at their edges. "
    "They cost more state or arithmetic per check. Bucketed windows trade a little precision for O(1) work."
)


async def ledger(budget: Budget, tenant: str = TENANT) -> list[dict[str, Any]]:
    """The tenant's ledger entries, with meta decoded."""
    out = []
    for _, fields in await budget.engine.client.xrange(budget.key(tenant) + ":ledger"):
        entry: dict[str, Any] = dict(fields)
        entry["meta"] = json.loads(fields["meta"]) if fields.get("meta") else {}
        out.append(entry)
    return out


def nano(usd: float) -> int:
    return round(usd * 10**9)


async def used(budget: Budget, dimension: str = "usd", tenant: str = TENANT) -> tuple[float, float]:
    """(used, reserved) of the tenant's first limit of `dimension`."""
    status = await budget.status(tenant)
    (row,) = [s for s in status.limits if s.limit.dimension == dimension][:1]
    return row.used, row.reserved


@pytest.fixture(autouse=True)
async def _litellm_worker_stopped() -> AsyncIterator[None]:
    """Stop litellm's logging task before the test's loop closes (no pending task left to the GC)."""
    yield
    await stop_litellm_worker()


@pytest.fixture
async def llm(budget: Budget) -> BudgetedLLM:
    await budget.set_limits(TENANT, ["usd 5/hour", "tokens 1M/hour", "requests 100/min", "concurrency 8"])
    return BudgetedLLM(budget, TENANT, agent="researcher", model=MODEL)


# -- cost ---------------------------------------------------------------------


async def test_committed_cost_equals_litellms_cost(budget: Budget, llm: BudgetedLLM) -> None:
    reply = mock_reply(MODEL, QUESTION, ANSWER)
    response = await llm.acompletion(QUESTION, max_tokens=400, mock_response=reply)
    assert response.choices[0].message.content == ANSWER
    expected_cost = litellm.completion_cost(completion_response=response)
    assert expected_cost > 0
    (entry,) = await ledger(budget)
    assert int(entry["usd"]) == nano(expected_cost)
    assert int(entry["input_tokens"]) == response.usage.prompt_tokens == litellm.token_counter(MODEL, messages=QUESTION)
    assert int(entry["output_tokens"]) == response.usage.completion_tokens == count_text_tokens(MODEL, ANSWER)
    assert int(entry["tokens"]) == response.usage.prompt_tokens + response.usage.completion_tokens
    assert (entry["agent"], entry["model"], entry["outcome"], entry["requests"]) == ("researcher", MODEL, "ok", "1")
    # the estimate: counted prompt + max_tokens, priced by litellm
    prompt_cost, completion_cost = litellm.cost_per_token(
        model=MODEL, prompt_tokens=response.usage.prompt_tokens, completion_tokens=400
    )
    assert int(entry["est_usd"]) == pytest.approx(nano(prompt_cost + completion_cost), abs=1)
    assert entry["meta"]["est_output_tokens"] == 400
    assert entry["meta"]["response_id"] == response.id and entry["meta"]["finish_reason"] == "stop"
    assert entry["meta"]["admitted_ms"] > 0


async def test_over_estimate_is_refunded(budget: Budget, llm: BudgetedLLM) -> None:
    reply = mock_reply(MODEL, QUESTION, "Short.")
    response = await llm.acompletion(QUESTION, max_tokens=4000, mock_response=reply)
    (entry,) = await ledger(budget)
    actual, estimate = int(entry["usd"]), int(entry["est_usd"])
    assert estimate > 20 * actual > 0
    usd_used, usd_reserved = await used(budget, "usd")
    assert (nano(usd_used), usd_reserved) == (actual, 0)
    tokens_used, _ = await used(budget, "tokens")
    assert tokens_used == response.usage.total_tokens
    status = await budget.status(TENANT)
    concurrency = next(s for s in status.limits if s.limit.dimension == "concurrency")
    assert concurrency.used == concurrency.reserved == 0  # the slot is back


async def test_registered_and_explicit_prices(budget: Budget) -> None:
    await budget.set_unlimited(TENANT)  # this test is about prices, not limits
    litellm.register_model(
        {
            "acme-private-llm": {
                "input_cost_per_token": 2e-06,
                "output_cost_per_token": 8e-06,
                "litellm_provider": "openai",
                "mode": "chat",
            }
        }
    )
    registered = BudgetedLLM(budget, TENANT, model="acme-private-llm")
    reply = mock_reply("acme-private-llm", QUESTION, ANSWER)
    await registered.acompletion(QUESTION, max_tokens=100, mock_response=reply)
    explicit = BudgetedLLM(budget, TENANT, model="openai/my-finetune", price_per_token=(1e-06, 3e-06))
    reply2 = mock_reply("openai/my-finetune", QUESTION, ANSWER)
    await explicit.acompletion(QUESTION, max_tokens=100, mock_response=reply2)
    first, second = await ledger(budget)
    # Each commit is exactly that reply's own usage x its model's price, whatever litellm counted.
    p1, c1 = reply.usage.prompt_tokens, reply.usage.completion_tokens
    p2, c2 = reply2.usage.prompt_tokens, reply2.usage.completion_tokens
    assert (int(first["input_tokens"]), int(first["output_tokens"])) == (p1, c1)
    assert (int(second["input_tokens"]), int(second["output_tokens"])) == (p2, c2)
    assert int(first["usd"]) == nano(p1 * 2e-06 + c1 * 8e-06)
    assert int(second["usd"]) == nano(p2 * 1e-06 + c2 * 3e-06)
    assert int(second["est_usd"]) == nano(p2 * 1e-06 + 100 * 3e-06)


# -- failures -----------------------------------------------------------------


async def test_provider_error_refunds(budget: Budget, llm: BudgetedLLM) -> None:
    with pytest.raises(litellm.RateLimitError):
        await llm.acompletion(QUESTION, max_tokens=300, mock_response="litellm.RateLimitError")
    assert await used(budget, "usd") == (0, 0)
    assert await used(budget, "requests") == (0, 0)
    (entry,) = await ledger(budget)
    assert (entry["outcome"], entry["usd"], entry["tokens"]) == ("error", "0", "0")
    assert entry["meta"]["error"] == "RateLimitError" and entry["meta"]["model"] == MODEL
    report = await budget.report(TENANT)
    assert report.models[0].name == MODEL and report.models[0].outcomes == {"error": 1}


async def test_provider_error_with_usage_is_charged(
    budget: Budget, llm: BudgetedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BilledError(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.usage = {"prompt_tokens": 120, "completion_tokens": 30}

    async def failing(**kwargs: Any) -> Any:
        raise BilledError("the provider billed, then failed")

    monkeypatch.setattr(litellm, "acompletion", failing)
    with pytest.raises(BilledError):
        await llm.acompletion(QUESTION, max_tokens=300)
    (entry,) = await ledger(budget)
    prompt, completion = litellm.cost_per_token(model=MODEL, prompt_tokens=120, completion_tokens=30)
    assert (entry["outcome"], entry["input_tokens"], entry["output_tokens"]) == ("error", "120", "30")
    assert int(entry["usd"]) == nano(prompt + completion)
    assert nano((await used(budget, "usd"))[0]) == int(entry["usd"])


async def test_timeout_keeps_the_estimate(budget: Budget, llm: BudgetedLLM) -> None:
    with pytest.raises(litellm.Timeout):
        await llm.acompletion(QUESTION, max_tokens=500, mock_response="late", mock_timeout=True, timeout=0.01)
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "timeout"
    assert int(entry["usd"]) == int(entry["est_usd"]) > 0
    assert int(entry["output_tokens"]) == 500
    usd_used, usd_reserved = await used(budget, "usd")
    assert (nano(usd_used), usd_reserved) == (int(entry["est_usd"]), 0)


async def test_cancelled_call_keeps_the_estimate(
    budget: Budget, llm: BudgetedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In flight means the provider was called: the client has read its admission. (Seeing the reservation
    # in Redis is not enough: a cancel landing while the acquire's reply is still on its way releases it.)
    provider_called = asyncio.Event()
    original = litellm.acompletion

    async def tracked(*args: Any, **kwargs: Any) -> Any:
        provider_called.set()
        return await original(*args, **kwargs)

    monkeypatch.setattr(litellm, "acompletion", tracked)
    task = asyncio.ensure_future(
        llm.acompletion(QUESTION, max_tokens=200, mock_response=mock_reply(MODEL, QUESTION, ANSWER), mock_delay=30)
    )
    await asyncio.wait_for(provider_called.wait(), 60)
    assert (await used(budget, "usd"))[1] > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "cancelled" and int(entry["usd"]) == int(entry["est_usd"])
    assert (await used(budget, "usd"))[1] == 0


async def test_unpriced_model_fails_before_the_call(
    budget: Budget, llm: BudgetedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []

    async def never(**kwargs: Any) -> Any:
        calls.append(kwargs)
        raise AssertionError("the provider must not be called")

    monkeypatch.setattr(litellm, "acompletion", never)
    unpriced = BudgetedLLM(budget, TENANT, model="someone/unpriced-model-x")
    with pytest.raises(UnpricedModel, match="unpriced-model-x"):
        await unpriced.acompletion(QUESTION, max_tokens=10, mock_response="hi")
    # a per-call model override is priced too
    with pytest.raises(UnpricedModel):
        await llm.acompletion(QUESTION, model="someone/unpriced-model-y", mock_response="hi")
    # zero in the price map (a local model) is no price: no silent zero-cost calls
    with pytest.raises(UnpricedModel):
        await BudgetedLLM(budget, TENANT, model="ollama/llama3").acompletion(QUESTION, mock_response="hi")
    assert calls == []
    assert await ledger(budget) == []
    status = await budget.status(TENANT)
    assert all(s.used == 0 and s.reserved == 0 for s in status.limits)
    assert await budget.engine.client.zcard(budget.key(TENANT) + ":leases") == 0


async def test_bad_input_is_refused_with_nothing_reserved(budget: Budget, llm: BudgetedLLM) -> None:
    for messages in ([], "hello", [{"content": "no role"}], None):
        with pytest.raises(InvalidInput):
            await llm.acompletion(messages, max_tokens=10)  # type: ignore[arg-type]
    for kwargs in ({"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": 1.5}, {"n": 0}, {"ledger_metadata": "x"}):
        with pytest.raises(InvalidInput):
            await llm.acompletion(QUESTION, mock_response="hi", **kwargs)
    with pytest.raises(InvalidInput):
        BudgetedLLM(budget, TENANT, agent="*", model=MODEL)
    with pytest.raises(InvalidInput):
        BudgetedLLM(budget, TENANT, model=MODEL, price_per_token=-1.0)
    with pytest.raises(InvalidInput):
        BudgetedLLM(budget, TENANT, model=MODEL, default_max_tokens=0)
    with pytest.raises(InvalidInput):
        BudgetedLLM(budget, "bad tenant", model=MODEL)
    assert await ledger(budget) == []
    assert all(s.used == 0 and s.reserved == 0 for s in (await budget.status(TENANT)).limits)


async def test_reject_mode_raises_when_spent(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["requests 1/hour"])
    llm = BudgetedLLM(budget, TENANT, model=MODEL, mode="reject")
    await llm.acompletion(QUESTION, max_tokens=50, mock_response=mock_reply(MODEL, QUESTION, "ok"))
    with pytest.raises(BudgetExhausted):
        await llm.acompletion(QUESTION, max_tokens=50, mock_response=mock_reply(MODEL, QUESTION, "ok"))
    assert len(await ledger(budget)) == 1


# -- streaming ----------------------------------------------------------------


async def test_stream_commits_once_from_reported_usage(budget: Budget, llm: BudgetedLLM) -> None:
    stream = await llm.acompletion(QUESTION, max_tokens=300, stream=True, mock_response=ANSWER)
    assert await ledger(budget) == []  # nothing committed while the stream is open
    assert (await used(budget, "usd"))[1] > 0
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(pieces) == ANSWER == stream.text
    settlement = stream.settlement
    assert settlement is not None and settlement.state == "committed"
    assert await stream.aclose() == settlement  # closing again changes nothing
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "ok" and "usage" not in entry["meta"]
    assert int(entry["input_tokens"]) == litellm.token_counter(MODEL, messages=QUESTION)
    assert int(entry["output_tokens"]) == count_text_tokens(MODEL, ANSWER)
    prompt, completion = litellm.cost_per_token(
        model=MODEL, prompt_tokens=int(entry["input_tokens"]), completion_tokens=int(entry["output_tokens"])
    )
    assert int(entry["usd"]) == nano(prompt + completion)
    assert (await used(budget, "usd"))[1] == 0


async def test_stream_without_reported_usage_counts_tokens(budget: Budget, llm: BudgetedLLM) -> None:
    stream = await llm.acompletion(
        QUESTION, max_tokens=300, stream=True, mock_response=ANSWER, stream_options={"include_usage": False}
    )
    async for _ in stream:
        pass
    (entry,) = await ledger(budget)
    assert entry["meta"]["usage"] == "counted"
    assert int(entry["output_tokens"]) == count_text_tokens(MODEL, ANSWER)
    assert int(entry["input_tokens"]) == litellm.token_counter(MODEL, messages=QUESTION)


async def test_abandoned_stream_commits_what_it_produced(budget: Budget, llm: BudgetedLLM) -> None:
    stream = await llm.acompletion(QUESTION, max_tokens=300, stream=True, mock_response=ANSWER)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 6:
            break
    partial = stream.text
    assert 0 < len(partial) < len(ANSWER)
    await stream.aclose()
    await stream.aclose()
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "abandoned"
    assert int(entry["output_tokens"]) == count_text_tokens(MODEL, partial) < count_text_tokens(MODEL, ANSWER)
    assert 0 < int(entry["usd"]) < int(entry["est_usd"])


async def test_dropped_stream_is_committed(budget: Budget, llm: BudgetedLLM) -> None:
    async with await llm.acompletion(QUESTION, max_tokens=300, stream=True, mock_response=ANSWER) as stream:
        await stream.__anext__()
    assert [e["outcome"] for e in await ledger(budget)] == ["abandoned"]

    stream = await llm.acompletion(QUESTION, max_tokens=300, stream=True, mock_response=ANSWER)
    await stream.__anext__()
    await stream.__anext__()
    del stream
    gc.collect()
    for _ in range(100):
        if len(await ledger(budget)) == 2:
            break
        await asyncio.sleep(0.01)
    entries = await ledger(budget)
    assert [e["outcome"] for e in entries] == ["abandoned", "abandoned"]
    assert (await used(budget, "usd"))[1] == 0


async def test_stream_failing_midway_charges_what_it_produced(
    budget: Budget, llm: BudgetedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = litellm.acompletion

    async def breaks_after_three(**kwargs: Any) -> Any:
        inner = await real(**kwargs)

        async def chunks() -> AsyncIterator[Any]:
            count = 0
            async for chunk in inner:
                yield chunk
                count += 1
                if count == 3:
                    raise litellm.InternalServerError("connection reset", llm_provider="openai", model=MODEL)

        return chunks()

    monkeypatch.setattr(litellm, "acompletion", breaks_after_three)
    stream = await llm.acompletion(QUESTION, max_tokens=300, stream=True, mock_response=ANSWER)
    with pytest.raises(litellm.InternalServerError):
        async for _ in stream:
            pass
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "error"
    assert int(entry["output_tokens"]) == count_text_tokens(MODEL, stream.text) > 0


async def test_stream_failing_before_any_chunk_refunds(budget: Budget, llm: BudgetedLLM) -> None:
    stream = await llm.acompletion(
        QUESTION, max_tokens=300, stream=True, mock_response="Exception: mock_streaming_error"
    )
    with pytest.raises(Exception, match="mid-stream"):
        async for _ in stream:
            pass
    (entry,) = await ledger(budget)
    assert entry["outcome"] == "error" and entry["usd"] == "0"
    assert await used(budget, "usd") == (0, 0)


# -- what goes through the same path -------------------------------------------


def _png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


async def test_vision_message_goes_through(budget: Budget, llm: BudgetedLLM) -> None:
    image = "data:image/png;base64," + base64.b64encode(_png(64, 64)).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour is this square?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
            ],
        }
    ]
    text_only = litellm.token_counter(MODEL, messages=[{"role": "user", "content": "What colour is this square?"}])
    reply = mock_reply(MODEL, messages, "It is red.")
    response = await llm.acompletion(messages, max_tokens=50, mock_response=reply)
    (entry,) = await ledger(budget)
    assert entry["meta"]["images"] == 1
    assert entry["meta"]["est_input_tokens"] == litellm.token_counter(MODEL, messages=messages) > text_only
    assert int(entry["input_tokens"]) == response.usage.prompt_tokens
    assert int(entry["usd"]) == nano(litellm.completion_cost(completion_response=response))


async def test_tool_call_goes_through(budget: Budget, llm: BudgetedLLM) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "search_papers",
                "description": "Search a paper index.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string"}, "year": {"type": "integer"}},
                    "required": ["query"],
                },
            },
        }
    ]
    reply = mock_reply(
        MODEL, QUESTION, tools=tools, tool_calls=[{"name": "search_papers", "arguments": {"query": "GCRA"}}]
    )
    response = await llm.acompletion(QUESTION, tools=tools, max_tokens=100, mock_response=reply)
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "search_papers"
    (entry,) = await ledger(budget)
    assert entry["meta"]["tools"] == 1 and entry["meta"]["tool_calls"] == 1
    assert entry["meta"]["finish_reason"] == "tool_calls"
    assert entry["meta"]["est_input_tokens"] > litellm.token_counter(MODEL, messages=QUESTION)
    assert int(entry["output_tokens"]) == response.usage.completion_tokens > 0
    assert int(entry["usd"]) == nano(litellm.completion_cost(completion_response=response))


# -- many calls ---------------------------------------------------------------

WINDOW_MS = 2000


async def test_batch_of_20_under_a_budget_for_5_pauses_and_stays_in_the_window(budget: Budget) -> None:
    # every reply is exactly max_tokens long, so the actual cost equals the estimate
    reply_text = " hello" * 40
    out_tokens = count_text_tokens(MODEL, reply_text)
    prompts = [[{"role": "user", "content": f"Question number {i:02d}: what is a token bucket?"}] for i in range(20)]
    llm = BudgetedLLM(budget, TENANT, agent="batch", model=MODEL)
    estimate = llm._plan("chat", prompts[0], {"max_tokens": out_tokens}).estimate.usd
    limit = 5 * estimate * 1.001  # room for five calls, not six
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/{WINDOW_MS // 1000}s"])
    replies = [mock_reply(MODEL, p, reply_text) for p in prompts]

    with capture_logs() as logs:
        results = await asyncio.gather(
            *(
                llm.acompletion(p, max_tokens=out_tokens, mock_response=r, ledger_metadata={"i": i})
                for i, (p, r) in enumerate(zip(prompts, replies, strict=True))
            )
        )
    assert len(results) == 20
    entries = await ledger(budget)
    assert sorted(e["meta"]["i"] for e in entries) == list(range(20))
    assert all(e["outcome"] == "ok" for e in entries)
    assert all(abs(int(e["usd"]) - int(e["est_usd"])) <= 1 for e in entries)  # no refund to hide behind
    paused = [log for log in logs if log["event"] == "budget.paused"]
    resumed = [log for log in logs if log["event"] == "budget.resumed"]
    assert len(paused) >= 15 and len(resumed) == len(paused)
    _assert_no_window_over(entries, nano(limit))


async def test_abatch_pauses_and_completes(budget: Budget) -> None:
    reply_text = " hello" * 30
    out_tokens = count_text_tokens(MODEL, reply_text)
    prompts = [[{"role": "user", "content": f"Item {i:02d}: define backpressure."}] for i in range(20)]
    llm = BudgetedLLM(budget, TENANT, agent="batch", model=MODEL, max_tokens=out_tokens)
    estimate = llm._plan("chat", prompts[0], {}).estimate.usd
    limit = 5 * estimate * 1.001
    await budget.set_limits(TENANT, [f"usd {limit:.9f}/{WINDOW_MS // 1000}s"])
    reply = mock_reply(MODEL, prompts[0], reply_text)  # same size for every prompt
    with capture_logs() as logs:
        results = await llm.abatch(prompts, mock_response=reply.model_dump())
    assert len(results) == 20 and all(r.choices[0].message.content == reply_text for r in results)
    entries = await ledger(budget)
    assert len(entries) == 20
    assert sum(1 for log in logs if log["event"] == "budget.paused") >= 15
    _assert_no_window_over(entries, nano(limit))


def _assert_no_window_over(entries: list[dict[str, Any]], limit_nano: int) -> None:
    """In every interval of WINDOW_MS starting at an admission, the admitted cost stays within the limit."""
    admitted = sorted((e["meta"]["admitted_ms"], int(e["usd"])) for e in entries)
    for start, _ in admitted:
        inside = sum(usd for at, usd in admitted if start <= at < start + WINDOW_MS)
        assert inside <= limit_nano, (start, inside, limit_nano)
    # and the window really was the constraint: 20 calls at 5 per window span more than 3 windows
    assert admitted[-1][0] - admitted[0][0] >= 3 * WINDOW_MS * 59 / 60


async def test_abatch_validates_everything_first_and_cancels_on_error(budget: Budget, llm: BudgetedLLM) -> None:
    with pytest.raises(InvalidInput):
        await llm.abatch([QUESTION, [], QUESTION], mock_response=mock_reply(MODEL, QUESTION, "x").model_dump())
    assert await ledger(budget) == []
    with pytest.raises(InvalidInput):
        await llm.abatch([QUESTION], stream=True)
    results = await llm.abatch(
        [QUESTION, QUESTION], return_exceptions=True, mock_response="litellm.RateLimitError", max_tokens=10
    )
    assert all(isinstance(r, litellm.RateLimitError) for r in results)
    assert [e["outcome"] for e in await ledger(budget)] == ["error", "error"]


# -- blocking twin ------------------------------------------------------------


def test_sync_completion_and_stream_reuse_the_async_path(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget()
    sync = budget.sync()
    try:
        sync.set_limits(TENANT, ["usd 1/hour", "concurrency 2"])
        llm = BudgetedLLM(sync, TENANT, agent="sync", model=MODEL)
        response = llm.completion(QUESTION, max_tokens=200, mock_response=mock_reply(MODEL, QUESTION, ANSWER))
        stream = llm.completion(QUESTION, max_tokens=200, stream=True, mock_response=ANSWER)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == ANSWER and stream.settlement is not None
        results = llm.batch([QUESTION] * 3, max_tokens=50, mock_response=mock_reply(MODEL, QUESTION, "ok").model_dump())
        assert len(results) == 3
        # the async side works too, from any loop (run on the SyncBudget's own loop, this one never blocked)
        asyncio.run(llm.acompletion(QUESTION, max_tokens=20, mock_response=mock_reply(MODEL, QUESTION, "ok")))
        report = sync.report(TENANT)
        llm.close()
        assert report.entries == 6 and report.agents[0].name == "sync"
        assert report.totals.usd_nano >= nano(litellm.completion_cost(completion_response=response))
    finally:
        sync.close()


async def test_sync_completion_on_an_async_budget(budget: Budget, llm: BudgetedLLM) -> None:
    response = await asyncio.to_thread(
        llm.completion, QUESTION, max_tokens=100, mock_response=mock_reply(MODEL, QUESTION, ANSWER)
    )
    llm.close()
    (entry,) = await ledger(budget)
    assert int(entry["usd"]) == nano(litellm.completion_cost(completion_response=response))


async def test_a_failed_commit_still_returns_the_response(
    budget: Budget, llm: BudgetedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slowburn_redis.reservation import Reservation

    async def unreachable(self: Reservation, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(Reservation, "commit", unreachable)
    with capture_logs() as logs:
        response = await llm.acompletion(QUESTION, max_tokens=50, mock_response=mock_reply(MODEL, QUESTION, "ok"))
    assert response.choices[0].message.content == "ok"
    assert [log["event"] for log in logs if log["log_level"] == "warning"] == ["llm.settle_failed"]
    # nothing was committed: the estimate stays reserved until the lease expires
    assert await ledger(budget) == []
    assert (await used(budget, "usd"))[1] > 0
