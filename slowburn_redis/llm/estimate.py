"""What an LLM call is reserved at before it is made: input tokens counted, output tokens capped.

Input tokens come from ``litellm.token_counter`` (text, images and tool
schemas, as litellm counts them). Output tokens are the call's
``max_completion_tokens`` or ``max_tokens`` (times ``n``), or a configured
default when it sets neither. When ``max_tokens`` is set the estimate bounds
the real cost, so the budget's window guarantee is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import litellm

from slowburn_redis.errors import InvalidInput
from slowburn_redis.llm.pricing import Price


@dataclass(frozen=True)
class CallEstimate:
    """The reserved size of one call."""

    model: str
    input_tokens: int
    output_tokens: int
    usd: float

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def check_messages(messages: object) -> list[dict[str, Any]]:
    """`messages` as a list of chat messages (dicts with a role), or InvalidInput."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidInput("messages must be a non-empty list of chat messages ({'role': ..., 'content': ...})")
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise InvalidInput(f"each message must be a dict with a 'role', not {message!r:.80}")
    return [dict(message) for message in messages]


def count_input_tokens(model: str, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> int:
    """Prompt tokens of a call as litellm counts them, tools included.

    An image litellm cannot size (a remote URL on an offline host) counts at
    litellm's default image size instead of failing the call.
    """
    tools, tool_choice = params.get("tools"), params.get("tool_choice")
    try:
        return int(litellm.token_counter(model=model, messages=messages, tools=tools, tool_choice=tool_choice))
    except Exception:
        try:
            return int(
                litellm.token_counter(
                    model=model,
                    messages=messages,
                    tools=tools,
                    tool_choice=tool_choice,
                    use_default_image_token_count=True,
                )
            )
        except Exception as exc:
            raise InvalidInput(f"cannot count the tokens of these messages: {exc}") from None


def count_text_tokens(model: str, text: str) -> int:
    """Tokens of generated text (used when a provider reports no usage)."""
    if not text:
        return 0
    return int(litellm.token_counter(model=model, text=text, count_response_tokens=True))


def output_cap(params: Mapping[str, Any], default_max_tokens: int) -> int:
    """Output tokens to reserve: ``max_completion_tokens`` or ``max_tokens`` (times ``n``), else the default."""
    cap: object = default_max_tokens
    for key in ("max_completion_tokens", "max_tokens"):
        if params.get(key) is not None:
            cap = params[key]
            break
    if isinstance(cap, bool) or not isinstance(cap, int) or cap <= 0:
        raise InvalidInput(f"max_tokens must be a positive integer, not {cap!r}")
    n = params.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InvalidInput(f"n must be a positive integer, not {n!r}")
    return cap * n


def estimate_call(
    price: Price, messages: list[dict[str, Any]], params: Mapping[str, Any], default_max_tokens: int
) -> CallEstimate:
    """Tokens and dollars to reserve for one call of `price.model`."""
    input_tokens = count_input_tokens(price.model, messages, params)
    output_tokens = output_cap(params, default_max_tokens)
    usd = price.cost(input_tokens, output_tokens)
    return CallEstimate(price.model, input_tokens, output_tokens, usd)
