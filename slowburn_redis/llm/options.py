"""Validation shared by every caller that meters LLM calls (BudgetedLLM, the LangChain hooks)."""

from __future__ import annotations

from slowburn_redis.budget import MODES
from slowburn_redis.errors import InvalidInput
from slowburn_redis.names import EVERY_AGENT, validate_agent, validate_name


def check_call_options(*, tenant: str, agent: str | None, mode: str, default_max_tokens: int, who: str) -> str | None:
    """Validate the options of a metering caller (`who` names it in errors); returns the agent.

    Raises InvalidInput for a bad tenant or agent name, the every-agent
    wildcard, an unknown mode, or a default_max_tokens that is not a positive
    integer.
    """
    validate_name("tenant", tenant)
    agent = validate_agent(agent)
    if agent == EVERY_AGENT:
        raise InvalidInput(f"{who} needs a real agent name, not '*'")
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens <= 0:
        raise InvalidInput(f"default_max_tokens must be a positive integer, not {default_max_tokens!r}")
    return agent
