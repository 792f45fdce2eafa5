"""LiteLLM Proxy: requests queue on the shared budget instead of failing, and are committed or refunded.

In the proxy's ``config.yaml``::

    litellm_settings:
      callbacks: slowburn_redis.integrations.litellm_proxy.budget_hook

and in its environment ``SLOWBURN_REDIS_URL=redis://...`` (see `BudgetHook.from_env`
for the other variables). Or build your own instance in a file next to the
config (``callbacks: my_budget.hook``, with ``hook = BudgetHook(...)`` in
``my_budget.py``).

`BudgetHook` is a LiteLLM ``CustomLogger``:

- ``async_pre_call_hook``: estimates the request (chat, text completion,
  embeddings or Responses) and waits until the budget admits it; in
  ``mode="reject"`` a spent budget answers HTTP 429 with ``Retry-After``
  (seconds until the window has room); other budget refusals (a request
  larger than a limit, a tenant without limits, a wait that timed out)
  answer 429 or 400 with the reason.
- ``async_log_success_event``: commits the usage and cost LiteLLM computed.
- ``async_log_failure_event`` / ``async_post_call_failure_hook``: refunds
  (a provider timeout keeps the estimate).

Which budget a request spends is `tenant_from` / `agent_from`: the proxy's
virtual key (``key_alias``, else its hashed token), its team (``team_alias``
or ``team_id``), its user (``user_id``), the OpenAI ``user`` field of the
request, a request metadata field (``metadata:NAME``), or none (the fixed
`tenant` / no agent). Names are cleaned to the budget's name rules
(`slowburn_redis.integrations.names.agent_name`).

Needs the extra ``slowburn-redis[litellm_proxy]``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import structlog
from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

from slowburn_redis.budget import Budget, Mode
from slowburn_redis.errors import BudgetDenied, BudgetExhausted, BudgetTimeout, InvalidInput, RequestTooLarge
from slowburn_redis.integrations.names import agent_name
from slowburn_redis.llm.estimate import CallEstimate
from slowburn_redis.llm.meter import Meter
from slowburn_redis.llm.metering import MeteredCall
from slowburn_redis.llm.options import CallOptions
from slowburn_redis.llm.pricing import UnpricedModel, resolve_price
from slowburn_redis.llm.usage import chat_usage, embedding_usage, responses_usage

__all__ = ["SOURCES", "BudgetHook", "budget_hook"]

log = structlog.get_logger("slowburn_redis")

SOURCES = ("key", "team", "user", "end_user", "none")
"""Where a tenant or agent name comes from (or ``metadata:FIELD``)."""

_CHAT = {"completion", "acompletion", "text_completion", "atext_completion"}
_EMBEDDING = {"embeddings", "aembedding", "embedding"}
_RESPONSES = {"responses", "aresponses"}


class BudgetHook(CustomLogger):
    """A LiteLLM Proxy hook metering every request on a shared budget (see the module docstring).

    `budget` is a `Budget`, or a callable returning one (called once, on the
    proxy's event loop, at the first request: so the proxy's own loop owns
    the connections). `tenant` is used when `tenant_from` yields nothing.
    `options` are those of `slowburn_redis.llm.Meter`.
    """

    def __init__(
        self,
        budget: Budget | Any,
        *,
        tenant: str = "default",
        tenant_from: str = "team",
        agent_from: str = "key",
        mode: Mode = "wait",
        **options: Any,
    ) -> None:
        super().__init__()
        for source in (tenant_from, agent_from):
            if source not in SOURCES and not source.startswith("metadata:"):
                raise InvalidInput(f"a name source is one of {', '.join(SOURCES)} or metadata:FIELD, not {source!r}")
        CallOptions(mode=mode)  # validates the mode now
        self._budget = budget
        self.tenant = tenant
        self.tenant_from = tenant_from
        self.agent_from = agent_from
        self.mode: Mode = mode
        self.options = options
        self.meters: dict[str, Meter] = {}
        self.calls: dict[str, MeteredCall] = {}

    @classmethod
    def from_env(cls) -> BudgetHook:
        """A hook configured by the environment.

        ``SLOWBURN_REDIS_URL`` (required at the first request),
        ``SLOWBURN_PREFIX`` (key prefix, default ``sb``), ``SLOWBURN_TENANT``
        (default ``default``), ``SLOWBURN_TENANT_FROM`` (default ``team``),
        ``SLOWBURN_AGENT_FROM`` (default ``key``), ``SLOWBURN_MODE``
        (``wait`` or ``reject``), ``SLOWBURN_WAIT_TIMEOUT`` (seconds),
        ``SLOWBURN_DEFAULT_MAX_TOKENS``, ``SLOWBURN_HEADROOM`` (``1``).
        """

        def build() -> Budget:
            url = os.environ.get("SLOWBURN_REDIS_URL")
            if not url:
                raise InvalidInput("set SLOWBURN_REDIS_URL for the slowburn-redis proxy hook")
            return Budget.from_url(url, prefix=os.environ.get("SLOWBURN_PREFIX", "sb"))

        options: dict[str, Any] = {}
        if os.environ.get("SLOWBURN_WAIT_TIMEOUT"):
            options["wait_timeout"] = float(os.environ["SLOWBURN_WAIT_TIMEOUT"])
        if os.environ.get("SLOWBURN_DEFAULT_MAX_TOKENS"):
            options["default_max_tokens"] = int(os.environ["SLOWBURN_DEFAULT_MAX_TOKENS"])
        if os.environ.get("SLOWBURN_HEADROOM", "") not in ("", "0", "false"):
            options["headroom"] = True
        mode: Any = os.environ.get("SLOWBURN_MODE", "wait")
        return cls(
            build,
            tenant=os.environ.get("SLOWBURN_TENANT", "default"),
            tenant_from=os.environ.get("SLOWBURN_TENANT_FROM", "team"),
            agent_from=os.environ.get("SLOWBURN_AGENT_FROM", "key"),
            mode=mode,
            **options,
        )

    # names ---------------------------------------------------------------

    def _name(self, source: str, key: Any, data: dict[str, Any]) -> str | None:
        value: Any = None
        if source == "key":
            value = getattr(key, "key_alias", None) or getattr(key, "token", None)
            if value and not getattr(key, "key_alias", None):
                value = "key-" + str(value)[:12]
        elif source == "team":
            value = getattr(key, "team_alias", None) or getattr(key, "team_id", None)
        elif source == "user":
            value = getattr(key, "user_id", None)
        elif source == "end_user":
            value = data.get("user") or getattr(key, "end_user_id", None)
        elif source.startswith("metadata:"):
            field = source.split(":", 1)[1]
            for meta in (data.get("metadata"), data.get("litellm_metadata")):
                if isinstance(meta, dict) and meta.get(field):
                    value = meta[field]
                    break
        return agent_name(str(value)) if value else None

    def _meter(self, tenant: str) -> Meter:
        meter = self.meters.get(tenant)
        if meter is None:
            if not isinstance(self._budget, Budget):
                self._budget = self._budget()
            meter = Meter(self._budget, tenant, mode=self.mode, framework="litellm_proxy", **self.options)
            self.meters[tenant] = meter
        return meter

    # estimating --------------------------------------------------------------

    def _estimate(self, meter: Meter, data: dict[str, Any], call_type: str) -> CallEstimate:
        model = str(data.get("model") or "")
        price_model = _priced_model(model)
        params: dict[str, Any] = {
            k: data[k] for k in ("max_tokens", "max_completion_tokens", "n", "tools", "tool_choice") if k in data
        }
        if call_type in _EMBEDDING:
            return meter.estimate_embedding(price_model, data.get("input"))
        if call_type in _RESPONSES:
            return meter.estimate_responses(price_model, data.get("input"), data)
        if data.get("messages"):
            return meter.estimate_chat(price_model, data["messages"], params)
        prompt = data.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt or []]
        return meter.estimate_text(price_model, texts, data.get("max_tokens"))

    # hooks -------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> Any:
        """Wait until the budget admits the request (or answer 429/400); returns the request unchanged."""
        tenant = self._name(self.tenant_from, user_api_key_dict, data) or self.tenant
        agent = self._name(self.agent_from, user_api_key_dict, data)
        meter = self._meter(tenant)
        call_id = str(data.get("litellm_call_id") or "")
        try:
            estimate = self._estimate(meter, data, str(call_type))
            call = await meter.aopen(estimate, agent=agent, metadata={"call_type": str(call_type)})
        except BudgetExhausted as exc:
            retry = max(1, math.ceil(exc.retry_after or 1))
            raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(retry)}) from None
        except (BudgetTimeout, RequestTooLarge) as exc:
            raise HTTPException(429 if isinstance(exc, BudgetTimeout) else 400, detail=str(exc)) from None
        except (BudgetDenied, InvalidInput) as exc:
            raise HTTPException(400, detail=str(exc)) from None
        call.metadata["api"] = (
            "embedding" if call_type in _EMBEDDING else "responses" if call_type in _RESPONSES else "chat"
        )
        if call_id:
            self.calls[call_id] = call
        return data

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """Commit the usage and cost of a finished request."""
        call = self.calls.pop(str(kwargs.get("litellm_call_id") or ""), None)
        if call is None:
            return
        api = call.metadata.get("api")
        usage_of = embedding_usage if api == "embedding" else responses_usage if api == "responses" else chat_usage
        usage = usage_of(response_obj, call)
        cost = kwargs.get("response_cost")
        if usage.reported and isinstance(cost, (int, float)) and api == "chat" and not call.price.explicit:
            usage = type(usage)(usage.input_tokens, usage.output_tokens, float(cost))
        meter = self.meters[call.reservation.tenant]
        await meter.asucceed(call, usage, extra={"model_group": kwargs.get("model")})

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """Refund a request the provider failed (a timeout keeps the estimate)."""
        call = self.calls.pop(str(kwargs.get("litellm_call_id") or ""), None)
        if call is not None:
            error = kwargs.get("exception")
            exc = error if isinstance(error, BaseException) else RuntimeError(str(error))
            await self.meters[call.reservation.tenant].afail(call, exc)

    async def async_post_call_failure_hook(
        self, request_data: dict[str, Any], original_exception: Exception, user_api_key_dict: Any, *args: Any
    ) -> Any:
        """Refund a request that failed anywhere after admission (another hook, routing...)."""
        call = self.calls.pop(str(request_data.get("litellm_call_id") or ""), None)
        if call is not None:
            await self.meters[call.reservation.tenant].afail(call, original_exception)
        return None


def _priced_model(model: str) -> str:
    """The model to price a proxy model group by: itself when priced, else its first priced deployment."""
    try:
        resolve_price(model)
        return model
    except (UnpricedModel, InvalidInput):
        pass
    try:
        from litellm.proxy.proxy_server import llm_router
    except ImportError:  # not inside a proxy
        return model
    for deployment in getattr(llm_router, "model_list", None) or []:
        if deployment.get("model_name") == model:
            return str((deployment.get("litellm_params") or {}).get("model") or model)
    return model


budget_hook = BudgetHook.from_env()
"""The instance ``config.yaml`` names: configured from the environment, connected at the first request."""
