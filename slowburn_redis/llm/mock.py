"""Offline stand-ins for provider responses, with usage that matches the messages and the reply.

litellm's ``mock_response="text"`` reports a fixed 10/20 tokens whatever the
call; `mock_reply` builds a ModelResponse whose usage is counted the way
litellm counts (prompt from the messages and tools, completion from the
reply text or tool-call arguments). Pass it as ``mock_response=`` to any
call: no network, no paid API.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

import litellm

from slowburn_redis.llm.estimate import count_text_tokens


def mock_reply(
    model: str,
    messages: Sequence[dict[str, Any]],
    text: str | None = None,
    *,
    tool_calls: Sequence[dict[str, Any]] | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    finish_reason: str | None = None,
) -> litellm.ModelResponse:
    """A ModelResponse answering `messages` with `text` (or `tool_calls`: ``{"name", "arguments"}`` dicts)."""
    tool_specs: list[Any] | None = list(tools) if tools else None  # litellm types them as openai's tool params
    prompt = int(litellm.token_counter(model=model, messages=list(messages), tools=tool_specs))
    message: dict[str, Any] = {"role": "assistant", "content": text}
    produced = text or ""
    if tool_calls:
        calls = []
        for call in tool_calls:
            arguments = call.get("arguments", {})
            arguments_text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            calls.append(
                {
                    "id": "call_" + secrets.token_hex(8),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": arguments_text},
                }
            )
            produced += call["name"] + arguments_text
        message["tool_calls"] = calls
    completion = count_text_tokens(model, produced)
    return litellm.ModelResponse(
        id="chatcmpl-mock-" + secrets.token_hex(6),
        created=int(time.time()),
        model=model,
        choices=[
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason or ("tool_calls" if tool_calls else "stop"),
            }
        ],
        usage={"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    )
