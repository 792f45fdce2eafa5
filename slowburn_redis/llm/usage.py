"""What a provider's response says it used, for each API shape (chat, embeddings, Responses).

Each function takes the response object (litellm's, the openai SDK's, or a
dict of the same shape) and the admitted call, and returns the `Usage` to
commit: the tokens the provider reported and their price, or, when it
reported none, the tokens counted locally (``reported=False``).
"""

from __future__ import annotations

from typing import Any

from slowburn_redis.llm.estimate import count_text_tokens
from slowburn_redis.llm.metering import MeteredCall, Usage, reported_usage


def field(source: Any, name: str) -> Any:
    """`name` of a dict or an object (None when missing)."""
    if source is None:
        return None
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)


def chat_usage(response: Any, call: MeteredCall) -> Usage:
    """A chat completion's usage (``prompt_tokens``/``completion_tokens``), priced as litellm prices it."""
    tokens = reported_usage(response)
    if tokens is None:
        prompt = call.estimate.input_tokens
        output = count_text_tokens(call.estimate.model, chat_text(response))
        return Usage(prompt, output, call.price.cost(prompt, output), reported=False)
    return Usage(tokens[0], tokens[1], call.price.response_cost(response, *tokens))


def chat_text(response: Any) -> str:
    """The text and tool-call arguments of a chat completion's choices."""
    parts: list[str] = []
    for choice in field(response, "choices") or []:
        message = field(choice, "message")
        content = field(message, "content")
        if isinstance(content, str):
            parts.append(content)
        for tool_call in field(message, "tool_calls") or []:
            function = field(tool_call, "function")
            parts.extend(str(field(function, name) or "") for name in ("name", "arguments"))
    return "".join(parts)


def embedding_usage(response: Any, call: MeteredCall) -> Usage:
    """An embeddings response's usage: ``prompt_tokens`` in, nothing out."""
    usage = field(response, "usage")
    prompt = field(usage, "prompt_tokens")
    if isinstance(prompt, int) and prompt > 0:
        return Usage(prompt, 0, call.price.cost(prompt, 0))
    prompt = call.estimate.input_tokens
    return Usage(prompt, 0, call.price.cost(prompt, 0), reported=False)


def responses_usage(response: Any, call: MeteredCall) -> Usage:
    """A Responses API response's usage (``input_tokens``/``output_tokens``)."""
    usage = field(response, "usage")
    prompt, output = field(usage, "input_tokens"), field(usage, "output_tokens")
    if isinstance(prompt, int) and isinstance(output, int) and (prompt or output):
        return Usage(prompt, output, call.price.cost(prompt, output))
    prompt = call.estimate.input_tokens
    produced = count_text_tokens(call.estimate.model, responses_text(response))
    return Usage(prompt, produced, call.price.cost(prompt, produced), reported=False)


def responses_text(response: Any) -> str:
    """The output text (and function-call arguments) of a Responses API response."""
    parts: list[str] = []
    for item in field(response, "output") or []:
        for content in field(item, "content") or []:
            text = field(content, "text")
            if isinstance(text, str):
                parts.append(text)
        for name in ("name", "arguments"):
            value = field(item, name)
            if isinstance(value, str):
                parts.append(value)
    return "".join(parts)
