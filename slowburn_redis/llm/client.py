"""BudgetedLLM: every litellm call estimated, admitted by the shared budget, made, and committed.

    llm = BudgetedLLM(budget, "acme", agent="researcher", model="gpt-4o-mini")
    response = await llm.acompletion([{"role": "user", "content": "hi"}], max_tokens=300)

Chat completions (streamed or not), embeddings and the Responses API, through
litellm or a litellm ``Router``. Everything goes through one `Meter`; the
blocking methods (`completion`, `batch`, `embedding`, `responses`) run the
same async code on the budget's blocking twin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import litellm
from pydantic import BaseModel

from slowburn_redis.budget import Budget, Mode
from slowburn_redis.errors import InvalidInput
from slowburn_redis.llm.bridge import stop_litellm_worker
from slowburn_redis.llm.estimate import CallEstimate
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall, Usage
from slowburn_redis.llm.options import split_budget_options
from slowburn_redis.llm.pricing import Price, PricePerToken, resolve_price
from slowburn_redis.llm.stream import BudgetedStream, SyncBudgetedStream
from slowburn_redis.llm.usage import chat_usage, embedding_usage, responses_usage
from slowburn_redis.quote import Quote
from slowburn_redis.sync import SyncBudget


class CallQuote(BaseModel):
    """One call's estimate (what `acompletion` would reserve) and the budget's verdict on it (`quote`)."""

    model: str
    input_tokens: int
    output_tokens: int
    """Reserved at ``max_tokens`` (or the LLM's default)."""
    usd: float
    """The estimated cost in dollars: input tokens counted, output at its cap, priced by litellm."""
    quote: Quote

    @property
    def admitted(self) -> bool:
        """Would the call be admitted now?"""
        return self.quote.admitted

    def __str__(self) -> str:
        return f"{self.model}: ${self.usd:.4f} ({self.input_tokens}+{self.output_tokens} tokens); {self.quote}"


@dataclass(frozen=True)
class _Plan:
    """A validated call: what to send and what to reserve, and the budget options it takes."""

    model: str
    params: dict[str, Any]
    estimate: CallEstimate
    options: dict[str, Any]
    metadata: dict[str, Any]


class BudgetedLLM:
    """litellm calls that wait on a shared budget and commit what they cost.

    `budget` is a `Budget` or a `SyncBudget`; either way both the async and
    the blocking methods work, from any thread or loop. `model` is any
    litellm model name (or, with `router`, a model group of that
    ``litellm.Router``, priced at its most expensive deployment until the
    reply says which one served); it must have a price (litellm's map,
    ``litellm.register_model``) unless `price_per_token` is given. Output
    tokens are reserved at ``max_tokens`` or `default_max_tokens`.

    `wait_timeout`, `priority`, `mode` and `headroom` say how calls wait on
    the budget (`slowburn_redis.llm.options.CallOptions`); each call may
    override them as keyword arguments, which are then taken out: no budget
    option ever reaches the provider. Other keyword arguments are defaults
    for every litellm call (``temperature``, ``api_base``...).

    Each call reserves usd, tokens, input and output tokens, one request and
    one concurrency slot, and commits the actual usage and cost to the
    tenant's ledger with the model and call metadata (``ledger_metadata=``
    on a call adds to it).
    """

    def __init__(
        self,
        budget: Budget | SyncBudget,
        tenant: str,
        agent: str | None = None,
        *,
        model: str,
        router: Any = None,
        price_per_token: PricePerToken | None = None,
        default_max_tokens: int = 1024,
        wait_timeout: float | None = None,
        priority: int = 0,
        mode: Mode = "wait",
        headroom: bool = False,
        **defaults: Any,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise InvalidInput(f"model must be a non-empty string, not {model!r}")
        if price_per_token is not None:
            resolve_price(model, price_per_token)  # validates the price now
        self.router = router
        if router is not None and price_per_token is None:
            price_per_token = router_price(router, model)
        self.meter = Meter(
            budget,
            tenant,
            agent,
            price_per_token=price_per_token,
            default_max_tokens=default_max_tokens,
            mode=mode,
            wait_timeout=wait_timeout,
            priority=priority,
            headroom=headroom,
        )
        self._source = budget
        self.model = model
        self.price_per_token = price_per_token
        self.defaults = defaults

    @property
    def budget(self) -> Budget:
        return self.meter.budget

    @property
    def tenant(self) -> str:
        return self.meter.tenant

    @property
    def agent(self) -> str | None:
        return self.meter.agent

    def for_agent(self, agent: str | None) -> BudgetedLLM:
        """The same LLM (same budget, model, options and defaults) spending as another agent of the tenant."""
        o = self.meter.options
        return BudgetedLLM(
            self._source,
            self.tenant,
            agent,
            model=self.model,
            router=self.router,
            price_per_token=self.price_per_token,
            default_max_tokens=self.meter.default_max_tokens,
            wait_timeout=o.wait_timeout,
            priority=o.priority,
            mode=o.mode,
            headroom=o.headroom,
            **self.defaults,
        )

    # planning --------------------------------------------------------------

    def _plan(self, kind: str, payload: object, kwargs: dict[str, Any]) -> _Plan:
        options, params = split_budget_options({**self.defaults, **kwargs})
        self.meter.options.merged(options)  # bad options fail before anything is sent
        model = params.pop("model", None) or self.model
        metadata = params.pop("ledger_metadata", None) or {}
        if not isinstance(metadata, dict):
            raise InvalidInput("ledger_metadata must be a dict")
        meta: dict[str, Any] = {}
        if kind == "chat":
            estimate = self.meter.estimate_chat(model, payload, params)
            if params.get("tools"):
                meta["tools"] = len(params["tools"])
            images = _count_images(payload)
            if images:
                meta["images"] = images
        elif kind == "embedding":
            estimate = self.meter.estimate_embedding(model, payload)
        else:
            estimate = self.meter.estimate_responses(model, payload, params)
        if kind != "chat":
            meta["api"] = kind
        if self.router is not None:
            meta["router"] = True
        meta.update(metadata)
        return _Plan(model, params, estimate, options, meta)

    # quoting ---------------------------------------------------------------

    async def aquote(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> CallQuote:
        """What a chat call would reserve, and whether the budget would admit it now (read-only).

        The arguments are those of `acompletion` (``max_tokens`` bounds the
        output reserved; a ``model=`` overrides this LLM's). Nothing is sent to
        the provider, nothing is charged or queued: the answer is the estimate
        (`CallQuote.usd`, tokens) and `Budget.quote`'s verdict for it.
        """
        plan = self._plan("chat", messages, kwargs)
        est, priority = plan.estimate, self.meter.options.merged(plan.options).priority

        async def ask(budget: Budget) -> Quote:
            return await budget.quote(
                self.tenant,
                self.agent,
                model=est.model,
                priority=priority,
                usd=est.usd,
                tokens=est.tokens,
                input_tokens=est.input_tokens,
                output_tokens=est.output_tokens,
                requests=1,
            )

        verdict = await self.meter.bridge.arun(ask)
        return CallQuote(
            model=est.model, input_tokens=est.input_tokens, output_tokens=est.output_tokens, usd=est.usd, quote=verdict
        )

    # async -----------------------------------------------------------------

    async def acompletion(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Estimate, wait for the budget, call the provider, commit the actual cost.

        Returns litellm's ModelResponse, or a `BudgetedStream` with ``stream=True``.
        Raises UnpricedModel (before any call) for a model without a price,
        InvalidInput for bad arguments, the budget's errors (BudgetTimeout,
        BudgetExhausted in ``mode="reject"``, RequestTooLarge), and whatever
        the provider raises (after settling the reservation).
        """
        plan = self._plan("chat", messages, kwargs)
        if plan.params.get("stream"):
            return await self._stream(plan, list(messages))
        return await self._run(plan, lambda: self._chat(plan, list(messages)), chat_usage)

    async def _chat(self, plan: _Plan, messages: list[dict[str, Any]]) -> Any:
        call = self.router.acompletion if self.router is not None else litellm.acompletion
        return await call(model=plan.model, messages=messages, **plan.params)

    async def _run(
        self, plan: _Plan, send: Callable[[], Awaitable[Any]], usage_of: Callable[[Any, MeteredCall], Usage]
    ) -> Any:
        meter = self.meter
        call = await meter.aopen(plan.estimate, options=plan.options, metadata=plan.metadata)
        try:
            response = await send()
        except BaseException as exc:
            await meter.afail(call, exc)
            raise
        usage = usage_of(response, call)
        if self.router is not None:
            usage = _served_cost(response, usage)
        await meter.asucceed(call, usage, extra=_response_meta(response))
        return response

    async def _stream(self, plan: _Plan, messages: list[dict[str, Any]]) -> BudgetedStream:
        call = await self.meter.aopen(plan.estimate, options=plan.options, metadata=plan.metadata, keep_lease=False)
        params = dict(plan.params)
        params.setdefault("stream_options", {"include_usage": True})
        try:
            send = self.router.acompletion if self.router is not None else litellm.acompletion
            inner = await send(model=plan.model, messages=messages, **params)
        except BaseException as exc:
            await self.meter.afail(call, exc, extra={"stream": True})
            raise
        return BudgetedStream(inner, call, lease_ttl=self.budget.lease_ttl)

    async def aembedding(self, input: str | Sequence[str], **kwargs: Any) -> Any:
        """Embeddings, metered the same way (input tokens reserved and committed, no output tokens)."""
        plan = self._plan("embedding", input, kwargs)

        async def send() -> Any:
            call = self.router.aembedding if self.router is not None else litellm.aembedding
            return await call(model=plan.model, input=input, **plan.params)

        return await self._run(plan, send, embedding_usage)

    async def aresponses(self, input: str | Sequence[Any], **kwargs: Any) -> Any:
        """The Responses API (``litellm.aresponses``), metered the same way; ``max_output_tokens`` caps the estimate."""
        plan = self._plan("responses", input, kwargs)

        async def send() -> Any:
            call = self.router.aresponses if self.router is not None else litellm.aresponses
            return await call(model=plan.model, input=input, **plan.params)

        return await self._run(plan, send, responses_usage)

    async def abatch(
        self, list_of_messages: Sequence[Sequence[dict[str, Any]]], *, return_exceptions: bool = False, **kwargs: Any
    ) -> list[Any]:
        """Run one call per message list, concurrently, all sharing the budget; results in order.

        Every call is validated and priced before any is made. The budget's
        limits pace the calls (waiting ones sleep until capacity returns).
        Without `return_exceptions`, the first error cancels the calls still
        pending (each settles its reservation) and is raised.
        """
        if kwargs.get("stream"):
            raise InvalidInput("abatch does not stream; call acompletion(stream=True) per request")
        if isinstance(list_of_messages, (str, bytes)) or not isinstance(list_of_messages, Sequence):
            raise InvalidInput("abatch takes a list of message lists")
        plans = [(self._plan("chat", m, dict(kwargs)), list(m)) for m in list_of_messages]
        tasks = [
            asyncio.ensure_future(self._run(plan, lambda p=plan, m=msgs: self._chat(p, m), chat_usage))  # type: ignore[misc]
            for plan, msgs in plans
        ]
        if return_exceptions:
            return list(await asyncio.gather(*tasks, return_exceptions=True))
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # blocking --------------------------------------------------------------

    def _block(self, coro: Any) -> Any:
        return self.meter.bridge.twin().portal.call(coro)

    def completion(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Blocking `acompletion` (same code, run on the blocking twin's loop); streams come back as iterators."""
        result = self._block(self.acompletion(messages, **kwargs))
        if isinstance(result, BudgetedStream):
            return SyncBudgetedStream(self.meter.bridge.twin().portal, result)
        return result

    def quote(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> CallQuote:
        """Blocking `aquote`."""
        result: CallQuote = self._block(self.aquote(messages, **kwargs))
        return result

    def batch(self, list_of_messages: Sequence[Sequence[dict[str, Any]]], **kwargs: Any) -> list[Any]:
        """Blocking `abatch`."""
        return list(self._block(self.abatch(list_of_messages, **kwargs)))

    def embedding(self, input: str | Sequence[str], **kwargs: Any) -> Any:
        """Blocking `aembedding`."""
        return self._block(self.aembedding(input, **kwargs))

    def responses(self, input: str | Sequence[Any], **kwargs: Any) -> Any:
        """Blocking `aresponses`."""
        return self._block(self.aresponses(input, **kwargs))

    def close(self) -> None:
        """Stop litellm's background logging on the blocking side's loop; close the twin this object opened."""
        bridge = self.meter.bridge
        if bridge.has_twin():
            bridge.twin().portal.call(stop_litellm_worker())
        bridge.close()

    def __repr__(self) -> str:
        who = self.tenant + (f"/{self.agent}" if self.agent else "")
        return f"<BudgetedLLM {self.model} {who}>"


def router_price(router: Any, model: str) -> tuple[float, float]:
    """The highest (input, output) price per token over the deployments of `model` in a litellm Router."""
    deployments = [d for d in router.model_list if d.get("model_name") == model]
    if not deployments:
        raise InvalidInput(f"the router has no deployment of model group {model!r}")
    prices: list[Price] = []
    for deployment in deployments:
        params = deployment.get("litellm_params") or {}
        info = deployment.get("model_info") or {}
        if info.get("input_cost_per_token") is not None or info.get("output_cost_per_token") is not None:
            pair = (float(info.get("input_cost_per_token") or 0), float(info.get("output_cost_per_token") or 0))
            prices.append(resolve_price(params.get("model", model), pair))
        else:
            prices.append(resolve_price(params.get("model", model)))
    return max(p.input_per_token for p in prices), max(p.output_per_token for p in prices)


def _served_cost(response: Any, usage: Usage) -> Usage:
    """A router reply is priced by the deployment that served it (litellm's own ``response_cost``)."""
    hidden = getattr(response, "_hidden_params", None) or {}
    cost = hidden.get("response_cost")
    if cost is None or not usage.reported:
        return usage
    return Usage(usage.input_tokens, usage.output_tokens, float(cost), reported=True)


def _response_meta(response: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if getattr(response, "id", None):
        meta["response_id"] = response.id
    if getattr(response, "model", None):
        meta["response_model"] = response.model
    choices = getattr(response, "choices", None) or []
    if choices and getattr(choices[0], "finish_reason", None):
        meta["finish_reason"] = choices[0].finish_reason
    tool_calls = sum(len(getattr(getattr(c, "message", None), "tool_calls", None) or []) for c in choices)
    if tool_calls:
        meta["tool_calls"] = tool_calls
    return meta


def _count_images(messages: object) -> int:
    count = 0
    for message in messages if isinstance(messages, Sequence) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
    return count
