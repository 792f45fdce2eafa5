"""Amounts of a request as integer units, and their wire form ``"dim=int dim=int"``."""

from __future__ import annotations

from slowburn_redis.limits import to_units


def amounts_to_units(
    *,
    usd: object = None,
    tokens: object = None,
    input_tokens: object = None,
    output_tokens: object = None,
    requests: object = None,
    round_up: bool = False,
) -> dict[str, int]:
    """The given amounts (None: not given) as integer units, validated.

    When `tokens` is not given but input or output tokens are, tokens is
    their sum. Raises InvalidInput for NaN, infinities, negatives, fractions
    of a token and amounts too large for Redis.
    """
    given = {
        "usd": usd,
        "tokens": tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests": requests,
    }
    units = {dim: to_units(dim, value, round_up=round_up) for dim, value in given.items() if value is not None}
    if "tokens" not in units and ("input_tokens" in units or "output_tokens" in units):
        units["tokens"] = units.get("input_tokens", 0) + units.get("output_tokens", 0)
    return units


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
