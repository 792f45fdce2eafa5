"""LangChain: make any chat model wait on the shared budget before each call, and commit after.

    from slowburn_redis.integrations.langchain import BudgetCallbackHandler

    handler = BudgetCallbackHandler(budget, "acme", agent="researcher", model="gpt-4o-mini")
    await chat_model.ainvoke("...", config={"callbacks": [handler]})

Before each chat-model call the handler estimates it (prompt tokens counted
by litellm, output at the call's ``max_tokens`` or `default_max_tokens`,
priced from litellm's map or `price_per_token`) and acquires it, waiting
while the budget is spent. After the call it commits the usage the model
reported (``usage_metadata``, or ``llm_output["token_usage"]``), or the
counted tokens when it reported none; on an error it releases (a timeout
keeps the estimate). The handler sets ``raise_error``, so a budget error
(BudgetTimeout, BudgetExhausted, UnpricedModel) stops the call before it is
made.

`BudgetCallbackHandler` is for async code (``ainvoke``, ``astream``) on a
`Budget`; `SyncBudgetCallbackHandler` is for blocking code (``invoke``) on a
`SyncBudget`. Both run the same code.

Needs the extra ``slowburn-redis[langchain]`` (langchain-core and litellm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage, convert_to_openai_messages
from langchain_core.outputs import LLMResult

from slowburn_redis.budget import Budget, Mode
from slowburn_redis.errors import InvalidInput
from slowburn_redis.llm.estimate import CallEstimate, count_input_tokens, count_text_tokens, output_cap
from slowburn_redis.llm.metering import MeteredCall, Usage, open_call
from slowburn_redis.llm.options import check_call_options
from slowburn_redis.llm.pricing import PricePerToken, resolve_price
from slowburn_redis.sync import SyncBudget

__all__ = ["BudgetCallbackHandler", "BudgetHooks", "SyncBudgetCallbackHandler"]


class BudgetHooks:
    """The budget side of a chat-model call, keyed by LangChain's run id (shared by both handlers)."""

    def __init__(
        self,
        budget: Budget,
        tenant: str,
        agent: str | None = None,
        *,
        model: str | None = None,
        price_per_token: PricePerToken | None = None,
        default_max_tokens: int = 1024,
        wait_timeout: float | None = None,
        priority: int = 0,
        mode: Mode = "wait",
    ) -> None:
        agent = check_call_options(
            tenant=tenant, agent=agent, mode=mode, default_max_tokens=default_max_tokens, who="the handler"
        )
        if model is not None:
            resolve_price(model, price_per_token)  # an unpriced model fails now, not at the first call
        self.budget = budget
        self.tenant = tenant
        self.agent = agent
        self.model = model
        self.price_per_token = price_per_token
        self.default_max_tokens = default_max_tokens
        self.wait_timeout = wait_timeout
        self.priority = priority
        self.mode: Mode = mode
        self.calls: dict[UUID, MeteredCall] = {}

    def _model_of(self, serialized: dict[str, Any] | None, params: dict[str, Any]) -> str:
        if self.model is not None:
            return self.model
        for source in (params, (serialized or {}).get("kwargs") or {}):
            for key in ("model", "model_name"):
                if isinstance(source.get(key), str) and source[key]:
                    return str(source[key])
        raise InvalidInput("cannot tell which model this chat model calls: pass model= to the handler")

    async def start(
        self,
        run_id: UUID,
        serialized: dict[str, Any] | None,
        messages: Sequence[Sequence[BaseMessage]],
        invocation_params: dict[str, Any] | None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Estimate the call and wait until the budget admits it."""
        params = dict(invocation_params or {})
        model = self._model_of(serialized, params)
        price = resolve_price(model, self.price_per_token)
        input_tokens = sum(
            count_input_tokens(model, convert_to_openai_messages(list(batch)), params) for batch in messages
        )
        output_tokens = output_cap(params, self.default_max_tokens) * max(1, len(messages))
        estimate = CallEstimate(model, input_tokens, output_tokens, price.cost(input_tokens, output_tokens))
        meta: dict[str, Any] = {"framework": "langchain", "run_id": str(run_id)}
        if metadata and metadata.get("ls_provider"):
            meta["provider"] = metadata["ls_provider"]
        call = await open_call(
            self.budget,
            self.tenant,
            self.agent,
            estimate,
            price,
            wait_timeout=self.wait_timeout,
            priority=self.priority,
            mode=self.mode,
            metadata=meta,
        )
        call.keep_lease(self.budget.lease_ttl)
        self.calls[run_id] = call

    async def end(self, run_id: UUID, response: LLMResult) -> None:
        """Commit what the call used."""
        call = self.calls.pop(run_id, None)
        if call is not None:
            await call.succeed(_usage(call, response))

    async def error(self, run_id: UUID, error: BaseException) -> None:
        """Refund the call (a timeout keeps the estimate)."""
        call = self.calls.pop(run_id, None)
        if call is not None:
            await call.fail(error)


def _usage(call: MeteredCall, response: LLMResult) -> Usage:
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


class BudgetCallbackHandler(AsyncCallbackHandler):
    """Async LangChain callback handler on a `Budget` (see the module docstring)."""

    raise_error = True
    run_inline = True

    def __init__(self, budget: Budget, tenant: str, agent: str | None = None, **options: Any) -> None:
        self.hooks = BudgetHooks(budget, tenant, agent, **options)

    async def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self.hooks.start(run_id, serialized, messages, kwargs.get("invocation_params"), metadata)

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self.hooks.end(run_id, response)

    async def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        await self.hooks.error(run_id, error)


class SyncBudgetCallbackHandler(BaseCallbackHandler):
    """Blocking LangChain callback handler on a `SyncBudget`: the same hooks, run on its loop."""

    raise_error = True

    def __init__(self, budget: SyncBudget, tenant: str, agent: str | None = None, **options: Any) -> None:
        if not isinstance(budget, SyncBudget):
            raise InvalidInput(
                "SyncBudgetCallbackHandler takes a SyncBudget (budget.sync()); use BudgetCallbackHandler"
            )
        self._portal = budget.portal
        self.hooks = BudgetHooks(budget.budget, tenant, agent, **options)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self._portal.call(self.hooks.start(run_id, serialized, messages, kwargs.get("invocation_params"), metadata))

    def on_llm_end(
        self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._portal.call(self.hooks.end(run_id, response))

    def on_llm_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._portal.call(self.hooks.error(run_id, error))
