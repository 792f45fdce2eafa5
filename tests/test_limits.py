"""The limits model: parsing, equality, units and typed errors."""

from __future__ import annotations

from decimal import Decimal

import pytest

from slowburn_redis import InvalidLimit, Limit
from slowburn_redis.amounts import amounts_to_units
from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import coerce_limits, to_units


@pytest.mark.parametrize(
    ("text", "dimension", "amount", "window"),
    [
        ("usd 5/day", "usd", Decimal(5), 86400.0),
        ("tokens 1M/hour", "tokens", Decimal(1_000_000), 3600.0),
        ("requests 60/min", "requests", Decimal(60), 60.0),
        ("concurrency 8", "concurrency", Decimal(8), None),
        ("tokens 50k", "tokens", Decimal(50_000), None),
        ("usd 0.50/hour", "usd", Decimal("0.5"), 3600.0),
        ("usd $1.25/10s", "usd", Decimal("1.25"), 10.0),
        ("input_tokens 2B/7d", "input_tokens", Decimal(2 * 10**9), 7 * 86400.0),
        ("output_tokens 300/ 5 min", "output_tokens", Decimal(300), 300.0),
        ("requests 10/2h", "requests", Decimal(10), 7200.0),
    ],
)
def test_parse_accepts_the_documented_forms(text: str, dimension: str, amount: Decimal, window: float | None) -> None:
    limit = Limit.parse(text)
    assert (limit.dimension, limit.amount, limit.window) == (dimension, amount, window)


def test_parse_and_constructor_give_the_same_limit() -> None:
    assert Limit.parse("usd 5/day") == Limit(dimension="usd", amount=5, window="1d")
    assert Limit.parse("requests 60/min") == Limit(dimension="requests", amount=60, window=60)
    assert Limit.parse("tokens 50k") == Limit(dimension="tokens", amount=50_000)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("usd", "usd"),
        ("dollars 5/day", "dollars"),
        ("usd -5/day", "-5"),
        ("usd five/day", "five"),
        ("usd 5/fortnight", "fortnight"),
        ("usd 5/", "/"),
        ("tokens 5m", "5m"),
        ("tokens 1.5", "1.5"),
        ("concurrency 8/min", "window"),
        ("usd nan/day", "nan"),
        ("usd inf", "inf"),
        ("usd 5/0.5s", "0.5s"),
        ("usd 5/400d", "400d"),
        ("usd 99999999999/day", "99999999999"),
        ("", ""),
    ],
)
def test_parse_rejects_with_the_bad_part_named(text: str, part: str) -> None:
    with pytest.raises(InvalidLimit) as caught:
        Limit.parse(text)
    assert caught.value.part == part
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "fields",
    [
        {"dimension": "usd", "amount": float("nan")},
        {"dimension": "usd", "amount": float("inf")},
        {"dimension": "usd", "amount": -1},
        {"dimension": "usd", "amount": True},
        {"dimension": "Gold", "amount": 1},
        {"dimension": "tokens", "amount": 1, "window": "soon"},
        {"dimension": "tokens", "amount": 1, "window": 0},
    ],
)
def test_constructor_raises_invalid_limit(fields: dict[str, object]) -> None:
    with pytest.raises(InvalidLimit):
        Limit(**fields)


def test_money_is_stored_as_integer_nano_dollars() -> None:
    assert Limit.parse("usd 0.1/day").units == 100_000_000
    assert to_units("usd", 0.1) + to_units("usd", 0.2) == to_units("usd", 0.3)
    assert to_units("usd", "0.0000000011", round_up=True) == 2
    assert to_units("usd", "0.0000000011") == 1


def test_str_round_trips_through_parse() -> None:
    for text in ["usd 5/day", "tokens 1M/hour", "requests 60/min", "concurrency 8", "usd 0.25/10s", "tokens 7/90m"]:
        limit = Limit.parse(text)
        assert Limit.parse(str(limit)) == limit


def test_two_limits_of_one_dimension_and_window_are_refused() -> None:
    with pytest.raises(InvalidLimit):
        coerce_limits(["usd 1/day", "usd 2/1d"])
    assert len(coerce_limits(["usd 1/min", "usd 20/day"])) == 2


def test_amounts_derive_tokens_from_input_and_output() -> None:
    assert amounts_to_units(input_tokens=100, output_tokens=20)["tokens"] == 120
    assert amounts_to_units(tokens=7, input_tokens=100)["tokens"] == 7
    with pytest.raises(InvalidInput):
        amounts_to_units(tokens=1.5)
    with pytest.raises(InvalidInput):
        amounts_to_units(usd=float("nan"))


@pytest.mark.parametrize(
    "text", [" 1", "1 ", "1_000", "\u0661", "\uff11", "1\u00a0", "nan", "inf", "0x10", "1,5", "", "+"]
)
def test_amount_strings_outside_the_documented_grammar_are_refused(text: str) -> None:
    """A string amount is ASCII digits with an optional fraction and exponent, nothing else."""
    with pytest.raises(InvalidInput, match="is not a number"):
        to_units("usd", text)
    with pytest.raises(InvalidLimit):
        Limit(dimension="tokens", amount=text)


@pytest.mark.parametrize(
    ("text", "units"), [("1", 10**9), ("0.25", 25 * 10**7), (".5", 5 * 10**8), ("1e3", 10**12), ("5.", 5 * 10**9)]
)
def test_amount_strings_in_the_documented_grammar_are_exact(text: str, units: int) -> None:
    assert to_units("usd", text) == units


@pytest.mark.parametrize(
    "text", ["usd 1_000/day", "usd \u0665/day", "usd\u00a05/day", "tokens 5k/\u0661h", "usd 5/\u3000day"]
)
def test_limit_strings_take_ascii_digits_and_spaces_only(text: str) -> None:
    with pytest.raises(InvalidLimit):
        Limit.parse(text)
