"""BudgetedLLM: every litellm call estimated, admitted by the shared budget, made, and committed.

    llm = BudgetedLLM(budget, "acme", agent="researcher", model="gpt-4o-mini")
    response = await llm.acompletion([{"role": "user", "content": "hi"}], max_tokens=300)

One async implementation; the blocking methods (`completion`, `batch`) run
it on the private loop of a `SyncBudget` (the budget's sync twin).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import litellm

from slowburn_redis.budget import Budget, Mode
from slowburn_redis.errors import InvalidInput
from slowburn_redis.llm.estimate import CallEstimate, check_messages, count_text_tokens, estimate_call
from slowburn_redis.llm.metering import MeteredCall, Usage, open_call, reported_usage
from slowburn_redis.llm.options import check_call_options
from slowburn_redis.llm.pricing import Price, PricePerToken, resolve_price
from slowburn_redis.llm.stream import BudgetedStream, SyncBudgetedStream
from slowburn_redis.sync import Portal, SyncBudget


@dataclass(frozen=True)
class _Plan:
    """A validated call: what to send to litellm and what to reserve."""

    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    price: Price
    estimate: CallEstimate
    metadata: dict[str, Any]


class BudgetedLLM:
    """litellm chat completions that wait on a shared budget and commit what they cost.

    `budget` is a `Budget` (asyncio) or a `SyncBudget` (then only the
    blocking methods are offered). `model` is any litellm model name; it must
    have a price (litellm's map, ``litellm.register_model``) unless
    `price_per_token` is given (dollars per token, or an ``(input, output)``
    pair; it then prices every call of this object). Output tokens are
    reserved at ``max_tokens`` or `default_max_tokens`. `wait_timeout`,
    `priority` and `mode` go to `Budget.acquire`. Other keyword arguments
    are defaults for every litellm call (``temperature``, ``api_base``...).

    Each call reserves usd, tokens, input_tokens, output_tokens, one request
    and one concurrency slot, and commits the actual usage and cost to the
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
        price_per_token: PricePerToken | None = None,
        default_max_tokens: int = 1024,
        wait_timeout: float | None = None,
        priority: int = 0,
        mode: Mode = "wait",
        **defaults: Any,
    ) -> None:
        agent = check_call_options(
            tenant=tenant, agent=agent, mode=mode, default_max_tokens=default_max_tokens, who="a BudgetedLLM"
        )
        if not isinstance(model, str) or not model:
            raise InvalidInput(f"model must be a non-empty string, not {model!r}")
        if price_per_token is not None:
            resolve_price(model, price_per_token)  # validates the price now
        self.tenant = tenant
        self.agent = agent
        self.model = model
        self.price_per_token = price_per_token
        self.default_max_tokens = default_max_tokens
        self.wait_timeout = wait_timeout
        self.priority = priority
        self.mode: Mode = mode
        self.defaults = defaults
        self._portal: Portal | None = None
        self._twin: BudgetedLLM | None = None
        self._own_sync: SyncBudget | None = None
        self._source = budget
        if isinstance(budget, SyncBudget):
            self.budget = budget.budget
            self._portal = budget.portal
            self._twin = self
        else:
            self.budget = budget

    def _config(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "price_per_token": self.price_per_token,
            "default_max_tokens": self.default_max_tokens,
            "wait_timeout": self.wait_timeout,
            "priority": self.priority,
            "mode": self.mode,
            **self.defaults,
        }

    def for_agent(self, agent: str | None) -> BudgetedLLM:
        """The same LLM (same budget, model and defaults) spending as another agent of the tenant."""
        return BudgetedLLM(self._source, self.tenant, agent, **self._config())

    # async -----------------------------------------------------------------

    def _plan(self, messages: object, kwargs: dict[str, Any]) -> _Plan:
        params = {**self.defaults, **kwargs}
        model = params.pop("model", self.model)
        metadata = params.pop("ledger_metadata", None) or {}
        if not isinstance(metadata, dict):
            raise InvalidInput("ledger_metadata must be a dict")
        checked = check_messages(messages)
        price = resolve_price(model, self.price_per_token)
        estimate = estimate_call(price, checked, params, self.default_max_tokens)
        meta: dict[str, Any] = {}
        if params.get("tools"):
            meta["tools"] = len(params["tools"])
        images = _count_images(checked)
        if images:
            meta["images"] = images
        meta.update(metadata)
        return _Plan(model, checked, params, price, estimate, meta)

    def _check_loop(self) -> None:
        if self._portal is not None and asyncio.get_running_loop() is not self._portal.loop:
            raise InvalidInput("this BudgetedLLM is built on a SyncBudget: use completion()/batch(), or pass a Budget")

    async def acompletion(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Estimate, wait for the budget, call ``litellm.acompletion``, commit the actual cost.

        Returns litellm's ModelResponse, or a `BudgetedStream` with ``stream=True``.
        Raises UnpricedModel (before any call) for a model without a price,
        InvalidInput for bad arguments, the budget's errors (BudgetTimeout,
        BudgetExhausted, RequestTooLarge), and whatever the provider raises
        (after settling the reservation).
        """
        self._check_loop()
        return await self._run(self._plan(messages, kwargs))

    async def _run(self, plan: _Plan) -> Any:
        call = await open_call(
            self.budget,
            self.tenant,
            self.agent,
            plan.estimate,
            plan.price,
            wait_timeout=self.wait_timeout,
            priority=self.priority,
            mode=self.mode,
            metadata=plan.metadata,
        )
        if plan.params.get("stream"):
            return await self._stream(call, plan)
        call.keep_lease(self.budget.lease_ttl)
        try:
            response = await litellm.acompletion(model=plan.model, messages=plan.messages, **plan.params)
        except BaseException as exc:
            await call.fail(exc)
            raise
        await call.succeed(_response_usage(response, plan, call), extra=_response_meta(response))
        return response

    async def _stream(self, call: MeteredCall, plan: _Plan) -> BudgetedStream:
        params = dict(plan.params)
        params.setdefault("stream_options", {"include_usage": True})
        try:
            inner = await litellm.acompletion(model=plan.model, messages=plan.messages, **params)
        except BaseException as exc:
            await call.fail(exc, extra={"stream": True})
            raise
        return BudgetedStream(inner, call, lease_ttl=self.budget.lease_ttl)

    async def abatch(
        self, list_of_messages: Sequence[Sequence[dict[str, Any]]], *, return_exceptions: bool = False, **kwargs: Any
    ) -> list[Any]:
        """Run one call per message list, concurrently, all sharing the budget; results in order.

        Every call is validated and priced before any is made. The budget's
        limits pace the calls (waiting ones sleep until capacity returns).
        Without `return_exceptions`, the first error cancels the calls still
        pending (each settles its reservation) and is raised.
        """
        self._check_loop()
        if kwargs.get("stream"):
            raise InvalidInput("abatch does not stream; call acompletion(stream=True) per request")
        if isinstance(list_of_messages, (str, bytes)) or not isinstance(list_of_messages, Sequence):
            raise InvalidInput("abatch takes a list of message lists")
        plans = [self._plan(messages, dict(kwargs)) for messages in list_of_messages]
        tasks = [asyncio.ensure_future(self._run(plan)) for plan in plans]
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

    def _sync_side(self) -> tuple[BudgetedLLM, Portal]:
        if self._twin is None or self._portal is None:
            self._own_sync = self.budget.sync()
            self._portal = self._own_sync.portal
            self._twin = BudgetedLLM(self._own_sync, self.tenant, self.agent, **self._config())
        return self._twin, self._portal

    def completion(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """Blocking `acompletion` (same code, run on the sync twin's loop); streams come back as iterators."""
        twin, portal = self._sync_side()
        result = portal.call(twin.acompletion(messages, **kwargs))
        if isinstance(result, BudgetedStream):
            return SyncBudgetedStream(portal, result)
        return result

    def batch(self, list_of_messages: Sequence[Sequence[dict[str, Any]]], **kwargs: Any) -> list[Any]:
        """Blocking `abatch`."""
        twin, portal = self._sync_side()
        return portal.call(twin.abatch(list_of_messages, **kwargs))

    def close(self) -> None:
        """Stop litellm's background logging on the blocking side's loop; close the twin this object opened."""
        if self._portal is not None:
            self._portal.call(stop_litellm_worker())
        if self._own_sync is not None:
            self._own_sync.close()
            self._own_sync = None
            self._twin = None
            self._portal = None

    def __repr__(self) -> str:
        who = self.tenant + (f"/{self.agent}" if self.agent else "")
        return f"<BudgetedLLM {self.model} {who}>"


async def stop_litellm_worker() -> None:
    """Stop litellm's background logging task if it runs on this loop.

    litellm starts one on every loop it is used from; on a private loop that
    is about to stop, a pending task would otherwise be left behind.
    """
    try:
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
    except ImportError:  # another litellm version: nothing to stop
        return
    if getattr(GLOBAL_LOGGING_WORKER, "_bound_loop", None) is asyncio.get_running_loop():
        await GLOBAL_LOGGING_WORKER.stop()


def _response_usage(response: Any, plan: _Plan, call: MeteredCall) -> Usage:
    tokens = reported_usage(response)
    if tokens is None:
        prompt = plan.estimate.input_tokens
        output = count_text_tokens(plan.model, _response_text(response))
        return Usage(prompt, output, plan.price.cost(prompt, output), reported=False)
    return Usage(tokens[0], tokens[1], plan.price.response_cost(response, *tokens))


def _response_text(response: Any) -> str:
    parts: list[str] = []
    for choice in getattr(response, "choices", None) or []:
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None)
        if isinstance(content, str):
            parts.append(content)
        for tool_call in getattr(message, "tool_calls", None) or []:
            function = getattr(tool_call, "function", None)
            parts.extend(str(getattr(function, name, "") or "") for name in ("name", "arguments"))
    return "".join(parts)


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


def _count_images(messages: list[dict[str, Any]]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
    return count
