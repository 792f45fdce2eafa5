"""The one piece every integration is built on: estimate a call, admit it, settle it.

    meter = Meter(budget, "acme", agent="researcher", model="gpt-4o-mini")
    call = await meter.aopen(meter.estimate_chat(model, messages, params))
    try:
        response = await provider(...)
    except BaseException as exc:
        await meter.afail(call, exc)
        raise
    await meter.asucceed(call, chat_usage(response, call))

`BudgetedLLM`, the LangChain handler, the LangGraph middleware, the CrewAI
hook, the AG2 client, the OpenAI Agents model and the LiteLLM Proxy hook all
go through `Meter`, so a fix to estimating, admitting or settling lands once.

Every method works from any thread and any loop (`slowburn_redis.llm.bridge`):
the async ones never block their loop, the blocking ones never wait on a loop
that cannot run. Per-call budget options (`mode`, `wait_timeout`,
`priority`, `headroom`) override the meter's; they are never sent anywhere
but to the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import litellm

from slowburn_redis.budget import Budget, Mode
from slowburn_redis.errors import InvalidInput
from slowburn_redis.llm.bridge import LoopBridge, arun_on, run_on
from slowburn_redis.llm.estimate import CallEstimate, check_messages, count_input_tokens, output_cap
from slowburn_redis.llm.metering import MeteredCall, Usage, open_call
from slowburn_redis.llm.options import CallOptions, check_agent, check_call_options
from slowburn_redis.llm.pricing import Price, PricePerToken, resolve_price
from slowburn_redis.reservation import Settlement
from slowburn_redis.sync import SyncBudget

_UNSET: Any = object()


class Meter:
    """Meters the LLM calls of one tenant (and a default agent) on a shared budget.

    `budget` is a `Budget` or a `SyncBudget`. `model` is the default model
    (also used for pricing when a framework does not say which model it
    calls); `price_per_token` prices every call instead of litellm's map.
    Output tokens are reserved at the call's ``max_tokens`` (or
    ``max_output_tokens``), else `default_max_tokens`. `mode`,
    `wait_timeout`, `priority` and `headroom` are the defaults of
    `CallOptions`.
    """

    def __init__(
        self,
        budget: Budget | SyncBudget,
        tenant: str,
        agent: str | None = None,
        *,
        model: str | None = None,
        price_per_token: PricePerToken | None = None,
        default_max_tokens: int = 1024,
        mode: Mode = "wait",
        wait_timeout: float | None = None,
        priority: int = 0,
        headroom: bool = False,
        framework: str | None = None,
    ) -> None:
        self.agent = check_call_options(
            tenant=tenant, agent=agent, mode=mode, default_max_tokens=default_max_tokens, who="a metered caller"
        )
        if model is not None:
            resolve_price(model, price_per_token)  # an unpriced model fails now, not at the first call
        self.tenant = tenant
        self.model = model
        self.price_per_token = price_per_token
        self.default_max_tokens = default_max_tokens
        self.options = CallOptions(mode=mode, wait_timeout=wait_timeout, priority=priority, headroom=headroom)
        self.framework = framework
        self.bridge = LoopBridge(budget)

    @property
    def budget(self) -> Budget:
        return self.bridge.budget

    # estimating ------------------------------------------------------------

    def price(self, model: str | None = None) -> Price:
        """The price of `model` (or the meter's model); UnpricedModel when it has none."""
        model = model or self.model
        if not model:
            raise InvalidInput("cannot tell which model this call uses: pass model=")
        return resolve_price(model, self.price_per_token)

    def estimate_chat(self, model: str | None, messages: object, params: Mapping[str, Any]) -> CallEstimate:
        """Input tokens of chat `messages` (tools included) and output at the call's max_tokens."""
        price = self.price(model)
        checked = check_messages(messages)
        input_tokens = count_input_tokens(price.model, checked, params)
        output_tokens = output_cap(params, self.default_max_tokens)
        return CallEstimate(price.model, input_tokens, output_tokens, price.cost(input_tokens, output_tokens))

    def estimate_text(
        self, model: str | None, texts: Sequence[str], max_output_tokens: int | None, *, per_item: int = 0
    ) -> CallEstimate:
        """Input tokens of plain `texts` (plus `per_item` each) and output at `max_output_tokens`."""
        price = self.price(model)
        input_tokens = sum(count_text(price.model, text) + per_item for text in texts)
        output_tokens = output_cap({"max_tokens": max_output_tokens}, self.default_max_tokens)
        return CallEstimate(price.model, input_tokens, output_tokens, price.cost(input_tokens, output_tokens))

    def estimate_embedding(self, model: str | None, input: object) -> CallEstimate:
        """Input tokens of an embeddings input (a string or a list of strings); no output tokens."""
        price = self.price(model)
        items = [input] if isinstance(input, str) else input
        if not isinstance(items, Sequence) or not items or not all(isinstance(i, str) for i in items):
            raise InvalidInput("embedding input must be a non-empty string or list of strings")
        input_tokens = sum(max(1, count_text(price.model, item)) for item in items)
        return CallEstimate(price.model, input_tokens, 0, price.cost(input_tokens, 0))

    def estimate_responses(self, model: str | None, input: object, params: Mapping[str, Any]) -> CallEstimate:
        """A Responses API call: instructions and input items as chat messages, output at max_output_tokens."""
        messages = responses_messages(input, params.get("instructions"))
        price = self.price(model)
        input_tokens = count_input_tokens(price.model, messages, {})
        cap = params.get("max_output_tokens")
        output_tokens = output_cap({"max_tokens": cap}, self.default_max_tokens)
        return CallEstimate(price.model, input_tokens, output_tokens, price.cost(input_tokens, output_tokens))

    # admitting -------------------------------------------------------------

    def _args(
        self, estimate: CallEstimate, agent: str | None, overrides: Mapping[str, Any] | None, meta: dict[str, Any]
    ) -> tuple[str | None, CallOptions, Price, dict[str, Any]]:
        who = self.agent if agent is _UNSET else check_agent(agent)
        options = self.options.merged(overrides or {})
        price = resolve_price(estimate.model, self.price_per_token)
        metadata = {"framework": self.framework} if self.framework else {}
        metadata.update(meta)
        return who, options, price, metadata

    async def aopen(
        self,
        estimate: CallEstimate,
        *,
        agent: str | None = _UNSET,
        options: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        keep_lease: bool = True,
    ) -> MeteredCall:
        """Wait until the budget admits `estimate` (as `agent`, default the meter's); never blocks this loop.

        Raises the budget's errors (BudgetExhausted in reject mode,
        BudgetTimeout, RequestTooLarge, LimitsMissing...) before any call is made.
        """
        who, opts, price, meta = self._args(estimate, agent, options, metadata or {})

        async def admit(budget: Budget) -> MeteredCall:
            call = await open_call(budget, self.tenant, who, estimate, price, options=opts, metadata=meta)
            if keep_lease:
                call.keep_lease(budget.lease_ttl)
            return call

        return await self.bridge.arun(admit)

    def open(
        self,
        estimate: CallEstimate,
        *,
        agent: str | None = _UNSET,
        options: Mapping[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        keep_lease: bool = True,
    ) -> MeteredCall:
        """Blocking `aopen` (on the twin's loop: safe from any thread, even inside a running loop)."""
        who, opts, price, meta = self._args(estimate, agent, options, metadata or {})

        async def admit(budget: Budget) -> MeteredCall:
            call = await open_call(budget, self.tenant, who, estimate, price, options=opts, metadata=meta)
            if keep_lease:
                call.keep_lease(budget.lease_ttl)
            return call

        return self.bridge.run(admit)

    # settling --------------------------------------------------------------

    async def asucceed(
        self, call: MeteredCall, usage: Usage, *, outcome: str | None = None, extra: dict[str, Any] | None = None
    ) -> Settlement:
        """Commit what the call used (on the loop it was admitted on)."""
        return await arun_on(call.loop, call.succeed(usage, outcome=outcome, extra=extra))

    async def afail(
        self,
        call: MeteredCall,
        exc: BaseException,
        *,
        produced: Usage | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Settlement:
        """Settle a call that raised: refund, or keep the estimate on a timeout or cancellation."""
        return await arun_on(call.loop, call.fail(exc, produced=produced, extra=extra))

    def succeed(
        self, call: MeteredCall, usage: Usage, *, outcome: str | None = None, extra: dict[str, Any] | None = None
    ) -> Settlement:
        """Blocking `asucceed`."""
        return run_on(call.loop, call.succeed(usage, outcome=outcome, extra=extra))

    def fail(
        self,
        call: MeteredCall,
        exc: BaseException,
        *,
        produced: Usage | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Settlement:
        """Blocking `afail`."""
        return run_on(call.loop, call.fail(exc, produced=produced, extra=extra))

    def close(self) -> None:
        """Close the budget's shared blocking twin, if one was built (closing the Budget does it too)."""
        self.bridge.close()

    def __repr__(self) -> str:
        who = self.tenant + (f"/{self.agent}" if self.agent else "")
        return f"<Meter {who} {self.options}>"


def count_text(model: str, text: str) -> int:
    """Tokens of a plain text as a prompt (0 for an empty one)."""
    if not text:
        return 0
    return int(litellm.token_counter(model=model, text=text))


def responses_messages(input: object, instructions: object = None) -> list[dict[str, Any]]:
    """Responses API input (a string or a list of items) as chat messages, for counting."""
    messages: list[dict[str, Any]] = []
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(input, str):
        messages.append({"role": "user", "content": input})
    elif isinstance(input, Sequence):
        for item in input:
            messages.append({"role": _field(item, "role") or "user", "content": item_text(item)})
    else:
        raise InvalidInput("Responses input must be a string or a list of input items")
    if not messages:
        raise InvalidInput("Responses input is empty")
    return messages


def item_text(item: Any) -> str:
    """The text of one Responses input item (message content parts, function output, arguments)."""
    content = _field(item, "content")
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content or []:
        text = _field(part, "text")
        if isinstance(text, str):
            parts.append(text)
    for name in ("output", "arguments", "name"):
        value = _field(item, name)
        if isinstance(value, str):
            parts.append(value)
    return " ".join(parts)


def _field(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)
