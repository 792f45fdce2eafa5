"""AG2 (formerly AutoGen): every LLM call of an agent waits on the shared budget, then commits or refunds.

    from ag2 import Agent
    from slowburn_redis.integrations.autogen import budget_middleware

    agent = Agent("researcher", config=OpenAIConfig(model="gpt-4o-mini", max_tokens=300),
                  middleware=[budget_middleware(budget, "acme")])
    reply = await agent.ask("...")

AG2 (the ``ag2`` package, 1.x) lets middleware wrap each LLM call
(``on_llm_call``). `BudgetLLMMiddleware` estimates the call (the events
sent, counted as text by litellm, plus the agent's system prompt; output at
the model config's ``max_tokens`` or `default_max_tokens`), waits until the
budget admits it, and commits the usage the provider reported (AG2's
``ModelResponse.usage``); a call that raises is refunded (a timeout or a
cancellation keeps the estimate). Each call is charged to the AG2 agent's
name (cleaned to a budget name), else the `agent` given. Retries by AG2's
own retry middleware placed inside this one are metered one by one.

Needs the extra ``slowburn-redis[autogen]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ag2.middleware.base import BaseMiddleware, LLMCall, Middleware

from slowburn_redis.budget import Budget
from slowburn_redis.integrations.names import agent_name
from slowburn_redis.llm.estimate import CallEstimate, count_text_tokens
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage
from slowburn_redis.sync import SyncBudget

__all__ = ["BudgetLLMMiddleware", "budget_middleware"]

AGENT_KEY = "__ag2_agent__"
MODEL_CONFIG_KEY = "__ag2_model_config__"


class BudgetLLMMiddleware(BaseMiddleware):
    """AG2 middleware metering each LLM call on `meter` (built per turn by `budget_middleware`'s factory)."""

    def __init__(self, event: Any, context: Any, *, meter: Meter) -> None:
        super().__init__(event, context)
        self.meter = meter

    def _who(self, context: Any) -> str | None:
        agent = context.dependencies.get(AGENT_KEY)
        name = getattr(agent, "name", None)
        return agent_name(name) if isinstance(name, str) and name else self.meter.agent

    def _estimate(self, events: Sequence[Any], context: Any) -> CallEstimate:
        config = context.dependencies.get(MODEL_CONFIG_KEY)
        model = self.meter.model or getattr(config, "model", None)
        cap = getattr(config, "max_completion_tokens", None) or getattr(config, "max_tokens", None)
        texts = [event_text(e) for e in events]
        prompt = getattr(context, "prompt", None)
        if isinstance(prompt, (list, tuple)):
            texts.extend(str(p) for p in prompt)
        return self.meter.estimate_text(str(model or ""), texts, cap, per_item=4)

    async def on_llm_call(self, call_next: LLMCall, events: Sequence[Any], context: Any) -> Any:
        call = await self.meter.aopen(self._estimate(events, context), agent=self._who(context))
        try:
            response = await call_next(events, context)
        except BaseException as exc:
            await self.meter.afail(call, exc)
            raise
        await self.meter.asucceed(call, response_usage(call, response))
        return response


def budget_middleware(budget: Budget | SyncBudget, tenant: str, agent: str | None = None, **options: Any) -> Middleware:
    """The middleware factory to pass in an AG2 agent's ``middleware=[...]``; `options` are `Meter`'s."""
    meter = Meter(budget, tenant, agent, framework="autogen", **options)
    return Middleware(BudgetLLMMiddleware, meter=meter)


def event_text(event: Any) -> str:
    """The text of one AG2 event (its content, a tool call's arguments or a tool result)."""
    for name in ("content", "arguments", "result"):
        value = getattr(event, name, None)
        if isinstance(value, str) and value:
            return value
    message = getattr(event, "message", None)
    content = getattr(message, "content", None)
    if isinstance(content, str):
        return content
    return str(event)


def response_usage(call: MeteredCall, response: Any) -> Usage:
    """The usage AG2 reports for the response, else the tokens of its text."""
    usage = getattr(response, "usage", None)
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    completion = int(getattr(usage, "completion_tokens", 0) or 0)
    if prompt or completion:
        return Usage(prompt, completion, call.price.cost(prompt, completion))
    prompt = call.estimate.input_tokens
    completion = count_text_tokens(call.estimate.model, str(getattr(response, "content", "") or ""))
    return Usage(prompt, completion, call.price.cost(prompt, completion), reported=False)
