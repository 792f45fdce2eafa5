"""LangGraph: a graph's model calls wait on the shared budget, charged per agent or per node.

    from slowburn_redis.integrations.langgraph import BudgetMiddleware, budget_node

    agent = create_agent(model, tools, middleware=[BudgetMiddleware(budget, "acme", agent="researcher")])

    builder.add_node("writer", budget_node(write, agent="writer"))            # a node of your own graph
    graph.invoke(state, config={"callbacks": [BudgetCallbackHandler(budget, "acme", per_node=True)]})

- `BudgetMiddleware` is an agent middleware (``wrap_model_call`` /
  ``awrap_model_call``) for ``langchain.agents.create_agent``, which builds
  a LangGraph graph: before each model call it estimates the request
  (system message, messages and tool schemas counted by litellm, output at
  the model's ``max_tokens`` or `default_max_tokens`) and waits until the
  budget admits it; afterwards it commits the usage the model reported, or
  refunds if the call raised (a timeout or cancellation keeps the estimate).
- In a hand-built ``StateGraph``, pass a LangChain `BudgetCallbackHandler`
  in the run's callbacks: with ``per_node=True`` each model call is charged
  to the agent named after the node it runs in; `budget_node` wraps a node
  function to name its agent explicitly.

Both run the same `Meter` as every other integration. Needs the extra
``slowburn-redis[langgraph]``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from slowburn_redis.budget import Budget
from slowburn_redis.integrations.langchain import (
    CURRENT_AGENT,
    BudgetCallbackHandler,
    estimate_messages,
    message_usage,
)
from slowburn_redis.integrations.names import agent_name
from slowburn_redis.llm.estimate import CallEstimate
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage
from slowburn_redis.llm.options import check_agent
from slowburn_redis.sync import SyncBudget

__all__ = ["BudgetCallbackHandler", "BudgetMiddleware", "budget_node"]

F = TypeVar("F", bound=Callable[..., Any])


class BudgetMiddleware(AgentMiddleware):
    """Agent middleware metering every model call of a ``create_agent`` graph (see the module docstring).

    `options` are those of `slowburn_redis.llm.Meter` (model, price_per_token,
    default_max_tokens, mode, wait_timeout, priority, headroom). A
    `budget_node` around the agent's run, when there is one, names the agent.
    """

    def __init__(self, budget: Budget | SyncBudget, tenant: str, agent: str | None = None, **options: Any) -> None:
        super().__init__()
        self.meter = Meter(budget, tenant, agent, framework="langgraph", **options)

    def _estimate(self, request: ModelRequest) -> CallEstimate:
        model = request.model
        name = self.meter.model or getattr(model, "model_name", None) or getattr(model, "model", None)
        messages = ([request.system_message] if request.system_message is not None else []) + list(request.messages)
        params: dict[str, Any] = dict(request.model_settings or {})
        if params.get("max_tokens") is None and getattr(model, "max_tokens", None):
            params["max_tokens"] = getattr(model, "max_tokens", None)
        if request.tools:
            params["tools"] = [convert_to_openai_tool(t) for t in request.tools]
        return estimate_messages(self.meter, str(name or ""), [messages], params)

    def _who(self) -> str | None:
        return CURRENT_AGENT.get() or self.meter.agent

    def wrap_model_call(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        """Blocking: admit (on the budget's blocking twin), call, commit or refund."""
        call = self.meter.open(self._estimate(request), agent=self._who())
        try:
            response = handler(request)
        except BaseException as exc:
            self.meter.fail(call, exc)
            raise
        self.meter.succeed(call, _usage(call, response))
        return response

    async def awrap_model_call(self, request: Any, handler: Callable[[Any], Awaitable[Any]]) -> Any:
        """Async: admit without blocking the loop, call, commit or refund."""
        call = await self.meter.aopen(self._estimate(request), agent=self._who())
        try:
            response = await handler(request)
        except BaseException as exc:
            await self.meter.afail(call, exc)
            raise
        await self.meter.asucceed(call, _usage(call, response))
        return response


def _usage(call: MeteredCall, response: Any) -> Usage:
    messages = response.result if isinstance(response, ModelResponse) else [response]
    ai = [m for m in messages if isinstance(m, AIMessage)]
    if not ai:
        return message_usage(call, None)
    usages = [message_usage(call, m) for m in ai]
    prompt = sum(u.input_tokens for u in usages)
    output = sum(u.output_tokens for u in usages)
    return Usage(prompt, output, call.price.cost(prompt, output), reported=all(u.reported for u in usages))


def budget_node(node: F, *, agent: str) -> F:
    """`node` (a LangGraph node function, sync or async) with every model call inside charged to `agent`."""
    name = check_agent(agent_name(agent))

    if inspect.iscoroutinefunction(node):

        @functools.wraps(node)
        async def arun(*args: Any, **kwargs: Any) -> Any:
            token = CURRENT_AGENT.set(name)
            try:
                return await node(*args, **kwargs)
            finally:
                CURRENT_AGENT.reset(token)

        return arun  # type: ignore[return-value]

    @functools.wraps(node)
    def run(*args: Any, **kwargs: Any) -> Any:
        token = CURRENT_AGENT.set(name)
        try:
            return node(*args, **kwargs)
        finally:
            CURRENT_AGENT.reset(token)

    return run  # type: ignore[return-value]
