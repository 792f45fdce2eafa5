"""Amounts of a request as integer units, and their wire form ``"dim=int dim=int"``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import DIMENSIONS, RESERVED_WORDS, UNITS, to_units, validate_dimension


def amounts_to_units(
    *,
    usd: object = None,
    tokens: object = None,
    input_tokens: object = None,
    output_tokens: object = None,
    requests: object = None,
    custom: Mapping[str, object] | None = None,
    round_up: bool = False,
) -> dict[str, int]:
    """The given amounts (None: not given) as integer units, validated.

    `custom` holds amounts of custom dimensions (``{"tool_calls": 1}``; see
    `slowburn_redis.limits.validate_dimension`), whole units each. When
    `tokens` is not given but input or output tokens are, tokens is their
    sum. Raises InvalidInput for an unknown or reserved dimension name, NaN,
    infinities, negatives, fractions of a token and amounts too large for
    Redis.
    """
    given = {
        "usd": usd,
        "tokens": tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests": requests,
    }
    for name, value in (custom or {}).items():
        given[_custom_name(name)] = value
    units = {dim: to_units(dim, value, round_up=round_up) for dim, value in given.items() if value is not None}
    if "tokens" not in units and ("input_tokens" in units or "output_tokens" in units):
        units["tokens"] = units.get("input_tokens", 0) + units.get("output_tokens", 0)
    return units


def _custom_name(name: str) -> str:
    """`name` as a custom dimension of a request; a near miss of a built-in name or keyword is refused as a typo."""
    if validate_dimension(name) in UNITS:
        raise InvalidInput(f"{name} is a built-in dimension: pass it as {name}=, not as a custom one")
    near = difflib.get_close_matches(name, [*DIMENSIONS, *RESERVED_WORDS], n=1, cutoff=0.8)
    if near:
        raise InvalidInput(
            f"unknown argument {name}= (did you mean {near[0]}=?): a custom dimension may not be a near miss"
            " of a built-in name"
        )
    return name


def format_amounts(units: dict[str, int]) -> str:
    """``{"usd": 5, "tokens": 3}`` -> ``"usd=5 tokens=3"``."""
    return " ".join(f"{dim}={value}" for dim, value in units.items())


def parse_amounts(text: str) -> dict[str, int]:
    """The inverse of `format_amounts`."""
    out: dict[str, int] = {}
    for pair in text.split():
        dim, _, value = pair.partition("=")
        out[dim] = int(value)
    return out
