"""OpenAI Agents SDK: every model call of a run waits on the shared budget, then commits or refunds.

    from slowburn_redis.integrations.openai_agents import BudgetedModelProvider

    provider = BudgetedModelProvider(budget, "acme", model="gpt-4o-mini")
    result = await Runner.run(agent, "...", run_config=RunConfig(model_provider=provider))

`BudgetedModelProvider` wraps another provider (default: the SDK's
``OpenAIProvider``, which takes ``base_url``/``api_key``/``openai_client``)
and hands out `BudgetedModel`s; `BudgetedModel` wraps any SDK ``Model``
(``OpenAIResponsesModel``, ``OpenAIChatCompletionsModel``...) and can be
set as one agent's ``model=`` directly.

Before each model call (``get_response`` and ``stream_response``, each
retry on its own) the call is estimated (instructions and input items
counted as text, output at ``ModelSettings.max_tokens`` or
`default_max_tokens`) and admitted; afterwards the usage the SDK reports is
committed (a stream asks the provider to report usage, ``include_usage``,
unless the model settings say otherwise). A call that raises is refunded (a timeout keeps the estimate);
a run cancelled while the provider works, or a stream closed early, keeps
the estimate (the provider may bill it) and frees the concurrency slot.
The agent a call is charged to is the model's `agent`, else the name of the
SDK agent running it (from the run's current agent span), else the meter's.

Needs the extra ``slowburn-redis[openai_agents]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from agents.models.interface import Model, ModelProvider
from agents.tracing import get_current_span
from agents.tracing.span_data import AgentSpanData

from slowburn_redis.budget import Budget
from slowburn_redis.integrations.names import agent_name
from slowburn_redis.llm.estimate import CallEstimate
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage
from slowburn_redis.llm.options import check_agent
from slowburn_redis.llm.usage import responses_usage
from slowburn_redis.sync import SyncBudget

__all__ = ["BudgetedModel", "BudgetedModelProvider", "running_agent"]

_KEEP = object()


def running_agent() -> str | None:
    """The name of the SDK agent whose turn is running (from the current agent span), if any."""
    data = getattr(get_current_span(), "span_data", None)
    if isinstance(data, AgentSpanData):
        return data.name
    name = getattr(data, "agent_name", None)  # a turn span (SDK 0.20+) names its agent
    return name if isinstance(name, str) and name else None


class BudgetedModel(Model):
    """An SDK ``Model`` whose every call is metered by `meter` (see the module docstring)."""

    def __init__(self, inner: Model, meter: Meter, *, agent: str | object | None = _KEEP, model: str | None = None):
        self.inner = inner
        self.meter = meter
        self.agent = agent if agent is _KEEP else check_agent(agent)  # type: ignore[arg-type]
        self.model = model or getattr(inner, "model", None) or meter.model

    def _who(self) -> str | None:
        if self.agent is not _KEEP:
            return self.agent  # type: ignore[return-value]
        name = running_agent()
        return check_agent(agent_name(name)) if name else self.meter.agent

    def _estimate(self, system_instructions: str | None, input: Any, settings: Any, tools: Any) -> CallEstimate:
        params: dict[str, Any] = {"instructions": system_instructions}
        if getattr(settings, "max_tokens", None):
            params["max_output_tokens"] = settings.max_tokens
        items = input if isinstance(input, str) else [_plain(i) for i in input]
        estimate = self.meter.estimate_responses(str(self.model), items, params)
        schemas = [getattr(t, "params_json_schema", None) for t in tools or []]
        extra = self.meter.estimate_text(str(self.model), [json.dumps(s) for s in schemas if s], 1).input_tokens
        if not extra:
            return estimate
        price = self.meter.price(str(self.model))
        tokens = estimate.input_tokens + extra
        return CallEstimate(estimate.model, tokens, estimate.output_tokens, price.cost(tokens, estimate.output_tokens))

    async def _open(self, args: tuple[Any, ...], kwargs: dict[str, Any], stream: bool) -> MeteredCall:
        names = ("system_instructions", "input", "model_settings", "tools")
        bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        estimate = self._estimate(
            bound.get("system_instructions"), bound.get("input") or "", bound.get("model_settings"), bound.get("tools")
        )
        meta: dict[str, Any] = {"stream": True} if stream else {}
        return await self.meter.aopen(estimate, agent=self._who(), metadata=meta)

    async def get_response(self, *args: Any, **kwargs: Any) -> Any:
        """Admit, call the wrapped model, commit its reported usage (refund or keep the estimate on failure)."""
        call = await self._open(args, kwargs, stream=False)
        try:
            response = await self.inner.get_response(*args, **kwargs)
        except BaseException as exc:
            await self.meter.afail(call, exc)
            raise
        await self.meter.asucceed(call, _usage(response.usage, call), extra={"response_id": response.response_id})
        return response

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Admit, stream the wrapped model's events, commit at ``response.completed`` (or settle on failure)."""
        args, kwargs = _with_stream_usage(args, kwargs)
        call = await self._open(args, kwargs, stream=True)
        settled = False
        try:
            async for event in self.inner.stream_response(*args, **kwargs):
                if getattr(event, "type", None) == "response.completed" and not settled:
                    settled = True
                    completed: Any = getattr(event, "response", None)
                    await self.meter.asucceed(call, responses_usage(completed, call), extra={"stream": True})
                yield event
        except BaseException as exc:
            if not settled:
                settled = True
                await self.meter.afail(call, exc, extra={"stream": True})
            raise
        finally:
            if not settled:  # closed early (GeneratorExit) or ended without a completed event
                await self.meter.afail(call, asyncio.CancelledError(), extra={"stream": True, "abandoned": True})

    async def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            await close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class BudgetedModelProvider(ModelProvider):
    """A ``ModelProvider`` whose models are `BudgetedModel`s on one meter.

    `inner` is the provider to wrap (default ``OpenAIProvider(**provider_options)``,
    e.g. ``base_url=``, ``api_key=``, ``use_responses=``). `options` are those
    of `slowburn_redis.llm.Meter` (model, price_per_token, mode, wait_timeout,
    priority, headroom, default_max_tokens).
    """

    def __init__(
        self,
        budget: Budget | SyncBudget,
        tenant: str,
        agent: str | None = None,
        *,
        inner: ModelProvider | None = None,
        provider_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if inner is None:
            from agents import OpenAIProvider

            inner = OpenAIProvider(**(provider_options or {}))
        self.inner = inner
        self.meter = Meter(budget, tenant, agent, framework="openai_agents", **options)

    def get_model(self, model_name: str | None) -> Model:
        inner = self.inner.get_model(model_name or self.meter.model)
        return BudgetedModel(inner, self.meter, model=model_name or self.meter.model)

    def model(self, inner: Model, *, agent: str | None = None) -> BudgetedModel:
        """Wrap one SDK model for one agent (``Agent(model=provider.model(m, agent="researcher"))``)."""
        return BudgetedModel(inner, self.meter, agent=agent)


def _with_stream_usage(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Ask the provider for usage in the stream (``include_usage``) unless the settings say otherwise.

    The SDK asks for it only from api.openai.com; without it a stream is
    committed at locally counted tokens.
    """
    settings = kwargs.get("model_settings", args[2] if len(args) > 2 else None)
    if settings is None or getattr(settings, "include_usage", False) is not None:
        return args, kwargs
    settings = dataclasses.replace(settings, include_usage=True)
    if "model_settings" in kwargs:
        return args, {**kwargs, "model_settings": settings}
    return (*args[:2], settings, *args[3:]), kwargs


def _usage(usage: Any, call: MeteredCall) -> Usage:
    prompt, output = int(getattr(usage, "input_tokens", 0) or 0), int(getattr(usage, "output_tokens", 0) or 0)
    if prompt or output:
        return Usage(prompt, output, call.price.cost(prompt, output))
    return responses_usage(None, call)


def _plain(item: Any) -> Any:
    return item.model_dump() if hasattr(item, "model_dump") else item
