"""Budget options of metered calls: validated once, split from the provider's arguments.

`mode`, `wait_timeout`, `priority` and `headroom` are the budget's business:
a call that accepts them per call (``llm.acompletion(msgs, mode="reject")``)
takes them out of its keyword arguments with `split_budget_options` before
anything is sent, so no budget option ever reaches a provider's request body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from slowburn_redis.budget import MODES, Mode
from slowburn_redis.errors import InvalidInput
from slowburn_redis.names import EVERY_AGENT, validate_agent, validate_name

BUDGET_OPTIONS = ("mode", "wait_timeout", "priority", "headroom")
"""Keyword arguments that configure the budget, never the provider."""


@dataclass(frozen=True)
class CallOptions:
    """How one call waits on the budget.

    `mode` and `priority` go to `Budget.acquire`; `wait_timeout` is its
    ``timeout`` (None: wait as long as it takes). With `headroom` a call's
    cost is moved, when it settles, to the moment it returned (see
    `slowburn_redis.llm.metering`), so a provider-side window of the same
    length never sees more than the limit.
    """

    mode: Mode = "wait"
    wait_timeout: float | None = None
    priority: int = 0
    headroom: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.wait_timeout is not None and (
            isinstance(self.wait_timeout, bool)
            or not isinstance(self.wait_timeout, (int, float))
            or not self.wait_timeout >= 0
        ):
            raise InvalidInput(f"wait_timeout must be a non-negative number of seconds, not {self.wait_timeout!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) or not -100 <= self.priority <= 100:
            raise InvalidInput(f"priority must be an integer from -100 to 100, not {self.priority!r}")
        if not isinstance(self.headroom, bool):
            raise InvalidInput(f"headroom must be True or False, not {self.headroom!r}")

    def merged(self, overrides: Mapping[str, Any]) -> CallOptions:
        """These options with the per-call `overrides` (only keys of BUDGET_OPTIONS) applied and checked."""
        if not overrides:
            return self
        return replace(self, **dict(overrides))


def split_budget_options(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(budget options, everything else) of a call's keyword arguments; the input is not changed."""
    budget = {k: v for k, v in kwargs.items() if k in BUDGET_OPTIONS}
    rest = {k: v for k, v in kwargs.items() if k not in BUDGET_OPTIONS}
    return budget, rest


def check_call_options(*, tenant: str, agent: str | None, mode: str, default_max_tokens: int, who: str) -> str | None:
    """Validate the options of a metering caller (`who` names it in errors); returns the agent.

    Raises InvalidInput for a bad tenant or agent name, the every-agent
    wildcard, an unknown mode, or a default_max_tokens that is not a positive
    integer.
    """
    validate_name("tenant", tenant)
    agent = check_agent(agent, who)
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if isinstance(default_max_tokens, bool) or not isinstance(default_max_tokens, int) or default_max_tokens <= 0:
        raise InvalidInput(f"default_max_tokens must be a positive integer, not {default_max_tokens!r}")
    return agent


def check_agent(agent: str | None, who: str = "a metered call") -> str | None:
    """A valid agent name (or None); the every-agent wildcard is refused."""
    agent = validate_agent(agent)
    if agent == EVERY_AGENT:
        raise InvalidInput(f"{who} needs a real agent name, not '*'")
    return agent
