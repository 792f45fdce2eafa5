"""LangChain: make any chat model wait on the shared budget before each call, and commit after.

    from slowburn_redis.integrations.langchain import BudgetCallbackHandler

    handler = BudgetCallbackHandler(budget, "acme", agent="researcher")
    chat.invoke("...", config={"callbacks": [handler]})            # or ainvoke, batch, abatch, stream, astream

One handler for every way of running a chat model: ``invoke``, ``ainvoke``,
``batch``, ``abatch``, ``stream`` and ``astream``, from the main thread, from
worker threads, and from inside a running event loop. Before each call it
estimates it (prompt tokens counted by litellm, output at the call's
``max_tokens`` or `default_max_tokens`, priced from litellm's map or
`price_per_token`) and waits until the budget admits it; after the call it
commits the usage the model reported (``usage_metadata``, or
``llm_output["token_usage"]``), or the counted tokens when it reported none;
on an error it refunds (a timeout keeps the estimate). Budget errors
(BudgetExhausted in ``mode="reject"``, BudgetTimeout, UnpricedModel) stop
the call before it is made, in blocking and async code alike.

How it never hangs: LangChain awaits the handler's hooks in async code and
calls them in blocking code (the handler answers each way: it is both a
coroutine function to LangChain's async manager and a plain blocking call
to its sync one, so errors are raised in both). Async hooks run on the
budget's own loop when that is the running loop, and on a private blocking
twin otherwise (`slowburn_redis.llm.bridge`), so no hook ever waits on a
loop that cannot run.

`model` is optional: without it the model name comes from the chat model's
invocation parameters. Needs the extra ``slowburn-redis[langchain]``.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from langchain_core.outputs import LLMResult

from slowburn_redis.budget import Budget
from slowburn_redis.errors import InvalidInput
from slowburn_redis.integrations.names import agent_name
from slowburn_redis.llm.estimate import CallEstimate, count_input_tokens, count_text_tokens, output_cap
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage
from slowburn_redis.sync import SyncBudget

__all__ = [
    "CURRENT_AGENT",
    "BudgetCallbackHandler",
    "SyncBudgetCallbackHandler",
    "estimate_messages",
    "message_usage",
    "result_usage",
]


CURRENT_AGENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("slowburn_agent", default=None)
"""The agent model calls are charged to inside a `slowburn_redis.integrations.langgraph.budget_node`."""


async def _template() -> None:  # its code object marks a hook as a coroutine function to `inspect`
    return None


class _Hook:
    """A handler method LangChain's async manager awaits and its sync manager calls (see the module docstring).

    ``inspect.iscoroutinefunction`` says True (so ``AsyncCallbackManager``
    awaits it, in place); called from the blocking ``handle_event`` it runs
    the blocking side at once and returns None (so errors propagate there
    too, which LangChain does not do for coroutines it runs itself).
    """

    def __init__(self, name: str, acall: Callable[..., Coroutine[Any, Any, None]], call: Callable[..., None]):
        self.__name__ = self.__qualname__ = name
        self.__code__ = _template.__code__
        self.__defaults__ = None
        self.__kwdefaults__ = None
        self.__annotations__: dict[str, Any] = {}
        self._acall = acall
        self._call = call
        if hasattr(inspect, "markcoroutinefunction"):  # Python 3.12+
            inspect.markcoroutinefunction(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, None] | None:
        if sys._getframe(1).f_code.co_name == "handle_event":  # langchain_core's blocking callback manager
            self._call(*args, **kwargs)
            return None
        return self._acall(*args, **kwargs)


def estimate_messages(
    meter: Meter, model: str, batches: Sequence[Sequence[BaseMessage]], params: dict[str, Any]
) -> CallEstimate:
    """The estimate of a chat-model call on one or more message lists (LangChain messages)."""
    price = meter.price(model)
    input_tokens = sum(
        count_input_tokens(price.model, convert_to_openai_messages(list(batch)), params) for batch in batches
    )
    output_tokens = output_cap(params, meter.default_max_tokens) * max(1, len(batches))
    return CallEstimate(price.model, input_tokens, output_tokens, price.cost(input_tokens, output_tokens))


def message_usage(call: MeteredCall, message: Any) -> Usage:
    """Usage of one AIMessage: its ``usage_metadata``, else the tokens of its text."""
    usage = getattr(message, "usage_metadata", None)
    if usage:
        prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
        return Usage(prompt, completion, call.price.cost(prompt, completion))
    prompt = call.estimate.input_tokens
    text = getattr(message, "text", None)
    text = text() if callable(text) else text
    completion = count_text_tokens(call.estimate.model, str(text or getattr(message, "content", "") or ""))
    return Usage(prompt, completion, call.price.cost(prompt, completion), reported=False)


def result_usage(call: MeteredCall, response: LLMResult) -> Usage:
    """Reported usage (usage_metadata, then llm_output token_usage), else counted tokens."""
    prompt = completion = 0
    reported = False
    texts: list[str] = []
    for generations in response.generations:
        for generation in generations:
            texts.append(generation.text or "")
            usage = getattr(getattr(generation, "message", None), "usage_metadata", None)
            if usage:
                prompt += int(usage.get("input_tokens") or 0)
                completion += int(usage.get("output_tokens") or 0)
                reported = True
    if not reported:
        token_usage = (response.llm_output or {}).get("token_usage") or {}
        if token_usage.get("prompt_tokens") is not None or token_usage.get("completion_tokens") is not None:
            prompt = int(token_usage.get("prompt_tokens") or 0)
            completion = int(token_usage.get("completion_tokens") or 0)
            reported = True
    if not reported:
        prompt = call.estimate.input_tokens
        completion = sum(count_text_tokens(call.estimate.model, text) for text in texts)
    return Usage(prompt, completion, call.price.cost(prompt, completion), reported=reported)


def model_of(meter: Meter, serialized: dict[str, Any] | None, params: dict[str, Any]) -> str:
    """The model a chat model calls: the meter's `model`, else its invocation parameters."""
    if meter.model is not None:
        return meter.model
    for source in (params, (serialized or {}).get("kwargs") or {}):
        for key in ("model", "model_name"):
            if isinstance(source.get(key), str) and source[key]:
                return str(source[key])
    raise InvalidInput("cannot tell which model this chat model calls: pass model= to the handler")


class BudgetCallbackHandler(AsyncCallbackHandler):
    """A LangChain callback handler metering every chat-model call on the shared budget.

    `budget` is a `Budget` or a `SyncBudget`; `options` are those of
    `slowburn_redis.llm.Meter` (model, price_per_token, default_max_tokens,
    mode, wait_timeout, priority, headroom). Open calls are in `calls`
    (by LangChain run id) until they settle.

    The agent a call is charged to: the one set by a LangGraph `budget_node`
    around it, else (with `per_node`) the LangGraph node it runs in, else `agent`.
    """

    raise_error = True
    run_inline = True

    def __init__(
        self,
        budget: Budget | SyncBudget,
        tenant: str,
        agent: str | None = None,
        *,
        per_node: bool = False,
        framework: str = "langchain",
        **options: Any,
    ) -> None:
        self.meter = Meter(budget, tenant, agent, framework=framework, **options)
        self.per_node = per_node
        self.calls: dict[UUID, MeteredCall] = {}
        setattr(self, "on_chat_model_start", _Hook("on_chat_model_start", self._astart, self._start))  # noqa: B010
        setattr(self, "on_llm_end", _Hook("on_llm_end", self._aend, self._end))  # noqa: B010
        setattr(self, "on_llm_error", _Hook("on_llm_error", self._aerror, self._error))  # noqa: B010

    def _agent(self, metadata: dict[str, Any]) -> str | None:
        chosen = CURRENT_AGENT.get()
        if chosen is None and self.per_node and isinstance(metadata.get("langgraph_node"), str):
            chosen = agent_name(metadata["langgraph_node"])
        return chosen or self.meter.agent

    def _estimate(
        self, run_id: UUID, serialized: dict[str, Any] | None, messages: Sequence[Sequence[BaseMessage]], kw: Any
    ) -> tuple[CallEstimate, dict[str, Any]]:
        params = dict(kw.get("invocation_params") or {})
        estimate = estimate_messages(self.meter, model_of(self.meter, serialized, params), messages, params)
        meta: dict[str, Any] = {"run_id": str(run_id)}
        metadata = kw.get("metadata") or {}
        if metadata.get("ls_provider"):
            meta["provider"] = metadata["ls_provider"]
        if metadata.get("langgraph_node"):
            meta["node"] = metadata["langgraph_node"]
        return estimate, meta

    async def _astart(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kw: Any
    ) -> None:
        estimate, meta = self._estimate(run_id, serialized, messages, kw)
        agent = self._agent(kw.get("metadata") or {})
        self.calls[run_id] = await self.meter.aopen(estimate, agent=agent, metadata=meta)

    def _start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kw: Any) -> None:
        estimate, meta = self._estimate(run_id, serialized, messages, kw)
        agent = self._agent(kw.get("metadata") or {})
        self.calls[run_id] = self.meter.open(estimate, agent=agent, metadata=meta)

    async def _aend(self, response: LLMResult, *, run_id: UUID, **kw: Any) -> None:
        call = self.calls.pop(run_id, None)
        if call is not None:
            await self.meter.asucceed(call, result_usage(call, response))

    def _end(self, response: LLMResult, *, run_id: UUID, **kw: Any) -> None:
        call = self.calls.pop(run_id, None)
        if call is not None:
            self.meter.succeed(call, result_usage(call, response))

    async def _aerror(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        call = self.calls.pop(run_id, None)
        if call is not None:
            await self.meter.afail(call, error)

    def _error(self, error: BaseException, *, run_id: UUID, **kw: Any) -> None:
        call = self.calls.pop(run_id, None)
        if call is not None:
            self.meter.fail(call, error)

    def close(self) -> None:
        """Close the blocking twin the handler built for blocking code, if any."""
        self.meter.close()


class SyncBudgetCallbackHandler(BudgetCallbackHandler):
    """The same handler, built on a `SyncBudget` (kept for code written before one handler did both)."""

    def __init__(self, budget: SyncBudget, tenant: str, agent: str | None = None, **options: Any) -> None:
        if not isinstance(budget, SyncBudget):
            raise InvalidInput(
                "SyncBudgetCallbackHandler takes a SyncBudget (budget.sync()); use BudgetCallbackHandler"
            )
        super().__init__(budget, tenant, agent, **options)
