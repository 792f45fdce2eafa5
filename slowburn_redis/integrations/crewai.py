"""CrewAI: every LLM call of a crew waits on the shared budget, charged to the agent's role.

    from slowburn_redis.integrations.crewai import budgeted

    llm = budgeted(LLM(model="gpt-4o-mini"), budget, "acme")
    researcher = Agent(role="Researcher", goal="...", backstory="...", llm=llm)

`budgeted` meters an LLM object in place (the same object comes back, now
of a subclass of its own class, so CrewAI sees the LLM it knows). Each
``call`` (and ``acall``) is estimated (messages and tool schemas counted by
litellm, output at the LLM's ``max_tokens`` or `default_max_tokens`) and
waits until the budget admits it, before CrewAI's request is made; after it
the usage the provider reported (the tokens CrewAI tracks for the call) is
committed; a call that raises is refunded (a timeout keeps the estimate).
The agent a call is charged to is the calling CrewAI agent's ``role``
(cleaned to a budget name), else the `agent` given.

Why not CrewAI's ``before_llm_call``/``after_llm_call`` hooks: they swallow
exceptions (a budget refusal could not stop the call), see no token usage,
and have no failure hook (a failed call could not be refunded).

Needs the extra ``slowburn-redis[crewai]``.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any

from crewai.llms.base_llm import BaseLLM

from slowburn_redis.budget import Budget
from slowburn_redis.integrations.names import agent_name
from slowburn_redis.llm.estimate import CallEstimate
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage
from slowburn_redis.llm.usage import chat_text
from slowburn_redis.sync import SyncBudget

__all__ = ["budgeted", "call_agent"]

_USAGE: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar("slowburn_crewai", default=None)
_SUBCLASSES: dict[type[Any], type[Any]] = {}


def call_agent(meter: Meter, kwargs: dict[str, Any]) -> str | None:
    """The budget agent of a CrewAI call: the calling agent's role, else the meter's agent."""
    role = getattr(kwargs.get("from_agent"), "role", None)
    return agent_name(role) if isinstance(role, str) and role else meter.agent


def _estimate(llm: Any, meter: Meter, messages: Any, tools: Any) -> CallEstimate:
    checked = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    params: dict[str, Any] = {
        "max_tokens": getattr(llm, "max_tokens", None) or getattr(llm, "max_completion_tokens", None)
    }
    if tools:
        params["tools"] = [t for t in tools if isinstance(t, dict)]
    return meter.estimate_chat(meter.model or str(llm.model), checked, params)


def _usage(call: MeteredCall, tracked: list[dict[str, Any]], answer: Any) -> Usage:
    prompt = completion = 0
    for usage in tracked:
        prompt += int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        completion += int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
    if prompt or completion:
        return Usage(prompt, completion, call.price.cost(prompt, completion))
    from slowburn_redis.llm.estimate import count_text_tokens

    text = answer if isinstance(answer, str) else chat_text(answer) or json.dumps(answer, default=str)
    completion = count_text_tokens(call.estimate.model, text)
    prompt = call.estimate.input_tokens
    return Usage(prompt, completion, call.price.cost(prompt, completion), reported=False)


def _metered_class(cls: type[Any]) -> type[Any]:
    """A subclass of a CrewAI LLM class whose calls go through the instance's meter."""
    if cls in _SUBCLASSES:
        return _SUBCLASSES[cls]

    class Metered(cls):  # type: ignore[misc]
        slowburn_meter: Meter

        def _track_token_usage_internal(self, usage_data: dict[str, Any]) -> None:
            super()._track_token_usage_internal(usage_data)
            tracked = _USAGE.get()
            if tracked is not None:
                tracked.append(dict(usage_data))

        def call(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            meter = self.slowburn_meter
            tools = kwargs.get("tools", args[0] if args else None)
            call = meter.open(
                _estimate(self, meter, messages, tools), agent=call_agent(meter, kwargs), metadata=_meta(kwargs)
            )
            tracked: list[dict[str, Any]] = []
            token = _USAGE.set(tracked)
            try:
                answer = super().call(messages, *args, **kwargs)
            except BaseException as exc:
                meter.fail(call, exc)
                raise
            finally:
                _USAGE.reset(token)
            meter.succeed(call, _usage(call, tracked, answer))
            return answer

        async def acall(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            meter = self.slowburn_meter
            tools = kwargs.get("tools", args[0] if args else None)
            call = await meter.aopen(
                _estimate(self, meter, messages, tools), agent=call_agent(meter, kwargs), metadata=_meta(kwargs)
            )
            tracked: list[dict[str, Any]] = []
            token = _USAGE.set(tracked)
            try:
                answer = await super().acall(messages, *args, **kwargs)
            except BaseException as exc:
                await meter.afail(call, exc)
                raise
            finally:
                _USAGE.reset(token)
            await meter.asucceed(call, _usage(call, tracked, answer))
            return answer

    Metered.__name__ = Metered.__qualname__ = f"Budgeted{cls.__name__}"
    _SUBCLASSES[cls] = Metered
    return Metered


def _meta(kwargs: dict[str, Any]) -> dict[str, Any]:
    task = kwargs.get("from_task")
    name = getattr(task, "name", None) or getattr(task, "description", None)
    return {"task": str(name)[:80]} if name else {}


def budgeted(
    llm: BaseLLM, budget: Budget | SyncBudget, tenant: str, agent: str | None = None, **options: Any
) -> BaseLLM:
    """Meter `llm` (a CrewAI LLM) in place and return it; `options` are those of `slowburn_redis.llm.Meter`."""
    if not isinstance(llm, BaseLLM):
        raise TypeError(f"budgeted() takes a CrewAI LLM (crewai.LLM), not {type(llm).__name__}")
    meter = Meter(budget, tenant, agent, framework="crewai", **options)
    if type(llm) not in _SUBCLASSES.values():
        llm.__class__ = _metered_class(type(llm))
    llm.slowburn_meter = meter  # type: ignore[attr-defined]
    return llm
