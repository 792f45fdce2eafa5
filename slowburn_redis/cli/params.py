"""Click callbacks that validate arguments before anything touches Redis (bad input: exit 2, one line)."""

from __future__ import annotations

from typing import Any

import click

from slowburn_redis.cli.runtime import BadInput
from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import Limit, coerce_limits, parse_window, validate_dimension
from slowburn_redis.names import EVERY_AGENT, validate_model, validate_name


def tenant_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A valid tenant name, or None when the argument is optional and absent."""
    if value is None:
        return None
    try:
        return validate_name("tenant", value)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None


def agent_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A valid agent name, ``"*"`` (every agent) where the command allows it, or None."""
    if value is None:
        return None
    if value == EVERY_AGENT and param.name == "agent" and getattr(ctx.command, "allow_every_agent", False):
        return value
    try:
        return validate_name("agent", value)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None


def model_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A valid model name, or None."""
    if value is None:
        return None
    try:
        return validate_model(value)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None


def dimension(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A built-in or custom dimension name, or None."""
    if value is None:
        return None
    try:
        return validate_dimension(value)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None


def limits(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[Limit]:
    """Every LIMIT argument parsed; the first bad one stops the command.

    A limit is one argument (``"usd 5/day"``) or, unquoted, two (``usd 5/day``).
    """
    texts: list[str] = []
    for word in value:
        if texts and " " not in texts[-1] and word[:1] in "0123456789$.":  # an amount after a dimension
            texts[-1] += " " + word
        else:
            texts.append(word)
    try:
        return coerce_limits(texts)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None


def duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """A duration such as 90s, 30m, 1h, 2d as seconds, or None."""
    if value is None:
        return None
    try:
        seconds = parse_window(value.strip())
    except InvalidInput:
        raise BadInput(f"bad --{param.name} {value!r}: a duration such as 90s, 30m, 1h or 2d") from None
    return seconds


def positive(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A number that must be greater than zero."""
    if value is not None and not value > 0:
        raise BadInput(f"--{str(param.name).replace('_', '-')} must be greater than 0, not {value}")
    return value
