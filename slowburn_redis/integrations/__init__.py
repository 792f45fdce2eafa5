"""Integrations with agent frameworks; each is an optional extra of the same name.

- ``langchain``: `BudgetCallbackHandler`, one handler for every way of running a chat model.
- ``langgraph``: `BudgetMiddleware` for ``create_agent``; per-node agents for hand-built graphs.
- ``crewai``: `budgeted(llm, ...)`, a CrewAI LLM metered in place, charged per crew role.
- ``autogen``: `budget_middleware(...)` for AG2 (``ag2`` 1.x) agents.
- ``openai_agents``: `BudgetedModelProvider` / `BudgetedModel` for the OpenAI Agents SDK.
- ``litellm_proxy``: `BudgetHook`, a LiteLLM Proxy ``CustomLogger`` (``budget_hook`` for ``config.yaml``).

All are built on `slowburn_redis.llm.Meter`. Nothing is imported here, so
``import slowburn_redis`` stays light. See docs/INTEGRATIONS.md.
"""
