"""The limits model: a dimension, an amount, and a sliding window or none.

``Limit.parse("usd 5/day")`` and ``Limit(dimension="usd", amount=5, window="1d")``
are the same limit. Amounts are kept as Decimal and stored in Redis as
integers of the dimension's unit (`UNITS`): nano-dollars for ``usd``.
"""

from __future__ import annotations

import math
import re
from decimal import MAX_EMAX, MIN_EMIN, ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from slowburn_redis.errors import InvalidInput, InvalidLimit

BuiltinDimension = Literal["usd", "tokens", "input_tokens", "output_tokens", "requests", "concurrency"]
DIMENSIONS: tuple[str, ...] = get_args(BuiltinDimension)
"""The built-in dimensions; any other name that `validate_dimension` accepts is a custom dimension."""

UNITS: dict[str, int] = {dim: 1 for dim in DIMENSIONS} | {"usd": 10**9}
"""Integer units per 1 of each built-in dimension as stored in Redis (usd: nano-dollars); custom ones count 1."""

MAX_DIMENSION_LENGTH = 32
_CUSTOM_DIMENSION = re.compile(r"[a-z][a-z_]*", re.ASCII)
RESERVED_WORDS = frozenset(
    {
        "agent",
        "tenant",
        "model",
        "timeout",
        "priority",
        "mode",
        "lease_ttl",
        "outcome",
        "metadata",
        "run",
        "messages",
        "max_tokens",
        "window",
        "amount",
        "dimension",
        "caps",
        "max_seconds",
    }
)
"""Names no custom dimension may take: they are keyword arguments of acquire, commit, quote or run."""
MONEY_WORDS = frozenset({"dollar", "dollars", "cost", "money", "spend", "price", "cents", "eur", "euro", "euros"})
"""Names that would read as money but count whole units: money is the ``usd`` dimension."""


def validate_dimension(name: object) -> str:
    """`name` if it is a built-in dimension or a valid custom one, else InvalidInput.

    A custom dimension (``tool_calls``, ``steps``, ``images``) is a lower-case
    ASCII name of letters and ``_`` (at most 32, starting with a letter),
    counted in whole units, and not one of `RESERVED_WORDS`.
    """
    if isinstance(name, str) and name in UNITS:
        return name
    if not isinstance(name, str):
        raise InvalidInput(f"a dimension is a name such as usd or tool_calls, not {type(name).__name__}")
    if len(name) > MAX_DIMENSION_LENGTH or not _CUSTOM_DIMENSION.fullmatch(name):
        raise InvalidInput(
            f"unknown dimension {_shown(name)}: one of {', '.join(DIMENSIONS)}, or a custom name of"
            f" lower-case letters and _ (at most {MAX_DIMENSION_LENGTH}, such as tool_calls)"
        )
    if name in MONEY_WORDS:
        raise InvalidInput(f"unknown dimension {name!r}: money is the usd dimension (usd 5/day)")
    if name in RESERVED_WORDS:
        raise InvalidInput(f"{name!r} cannot name a dimension: it is a keyword argument of acquire and commit")
    return name


def is_custom(dimension: str) -> bool:
    """True for a user-named dimension (not one of `DIMENSIONS`)."""
    return dimension not in UNITS


def unit_of(dimension: str) -> int:
    """Stored integer units per 1 of `dimension` (usd: 10**9; every other dimension: 1)."""
    return UNITS.get(dimension, 1)


MAX_UNITS = 2**53 - 1
"""Largest integer amount Lua (doubles) handles exactly: about $9M, or 9e15 tokens."""

_MAX_FAST_FLOAT = 1e15
_FAST = Context(prec=40)  # exact for any float up to _MAX_FAST_FLOAT times a unit scale

MIN_WINDOW = 1.0
MAX_WINDOW = 366 * 86400.0

_WINDOW_UNITS: dict[str, float] = {}
for _names, _seconds in (
    (("s", "sec", "secs", "second", "seconds"), 1.0),
    (("m", "min", "mins", "minute", "minutes"), 60.0),
    (("h", "hr", "hrs", "hour", "hours"), 3600.0),
    (("d", "day", "days"), 86400.0),
    (("w", "week", "weeks"), 7 * 86400.0),
):
    for _name in _names:
        _WINDOW_UNITS[_name] = _seconds

_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9}
_AMOUNT = re.compile(r"\$?(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?P<suffix>[A-Za-z]?)", re.ASCII)
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
"""The one grammar of an amount given as a string: ASCII digits, an optional fraction and exponent.

No surrounding spaces, no ``_`` separators, no other scripts' digits, no
``nan``/``inf``: ``"0.25"``, ``"12"``, ``"1e3"``, ``".5"``. (`Limit.parse`
has its own, richer grammar for the amount inside a limit string.)
"""
_WINDOW = re.compile(r"(?P<count>[0-9]+(?:\.[0-9]+)?)?[ ]*(?P<unit>[A-Za-z]+)", re.ASCII)
_NAMED_WINDOWS = {86400.0: "day", 3600.0: "hour", 60.0: "min", 1.0: "s", 7 * 86400.0: "week"}


def parse_window(text: str | float | int | None) -> float | None:
    """Seconds in a window given as ``"10s"``, ``"5 min"``, ``"day"``, or a number of seconds."""
    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, (int, float, Decimal, str)):
        raise InvalidLimit(f"window must be a duration, not {type(text).__name__}", part=_shown(text))
    if not isinstance(text, str):
        try:
            seconds = float(text)
        except (OverflowError, ValueError):  # an int too large for a float, a signaling NaN
            seconds = math.inf
    else:
        match = _WINDOW.fullmatch(text.strip(" "))
        if not match or match["unit"] not in _WINDOW_UNITS:
            raise InvalidLimit(
                f"bad window {_shown(text, 80)}: use a duration such as 10s, 5m, 1h, 1d, day, hour or min",
                part=text,
            )
        count = float(match["count"]) if match["count"] else 1.0
        seconds = count * _WINDOW_UNITS[match["unit"]]
    if not math.isfinite(seconds) or seconds < MIN_WINDOW or seconds > MAX_WINDOW:
        raise InvalidLimit(
            f"window {_shown(text)} is out of range: between {MIN_WINDOW:g}s and {MAX_WINDOW / 86400:g} days",
            part=text if isinstance(text, str) else _shown(text),
        )
    if round(seconds * 1000) != seconds * 1000:
        raise InvalidLimit(f"window {_shown(text, 80)} must be a whole number of milliseconds", part=str(text))
    return seconds


def format_window(seconds: float | None) -> str:
    """The shortest readable form of a window: ``day``, ``hour``, ``10s``..."""
    if seconds is None:
        return ""
    if seconds in _NAMED_WINDOWS:
        return _NAMED_WINDOWS[seconds]
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def to_units(dimension: str, amount: object, *, round_up: bool = False) -> int:
    """An amount of `dimension` as the integer stored in Redis.

    Raises InvalidInput for NaN, infinities, negatives, bools, amounts too
    large for Redis, and fractions of an indivisible unit (a token). With
    `round_up`, usd fractions of a nano-dollar round up (for estimates);
    otherwise to the nearest.
    """
    unit = unit_of(validate_dimension(dimension))
    if type(amount) is int and 0 <= amount <= MAX_UNITS // unit:
        return amount * unit  # the common case, exact without decimals
    if type(amount) is float and 0 <= amount <= _MAX_FAST_FLOAT:
        # repr() has at most 17 significant digits and a scale is at most 10
        # digits: the product is exact in a 40-digit context.
        scaled = _FAST.multiply(Decimal(repr(amount)), unit_of(dimension))
        if unit_of(dimension) == 1 and scaled != scaled.to_integral_value(context=_FAST):
            raise InvalidInput(f"{dimension} amount must be a whole number, got {_shown(amount)}")
        units = int(scaled.to_integral_value(rounding=ROUND_CEILING if round_up else ROUND_HALF_EVEN, context=_FAST))
        if units <= MAX_UNITS:
            return units
    if isinstance(amount, bool) or not isinstance(amount, (int, float, Decimal, str)):
        raise InvalidInput(f"{dimension} amount must be a number, not {type(amount).__name__}")
    if isinstance(amount, str):
        value = decimal_from_text(amount, what=f"{dimension} amount")
    else:
        try:
            value = Decimal(str(amount)) if isinstance(amount, float) else Decimal(amount)
        except InvalidOperation:
            raise InvalidInput(f"{dimension} amount {_shown(amount)} is not a number") from None
    if not value.is_finite():
        raise InvalidInput(f"{dimension} amount must be finite, not {_shown(amount)}")
    if value < 0:
        raise InvalidInput(f"{dimension} amount must not be negative, got {_shown(amount)}")
    if value > MAX_UNITS:  # before scaling: a huge exponent would overflow the decimal context
        raise InvalidInput(
            f"{dimension} amount {_shown(amount)} is too large (at most {MAX_UNITS // unit_of(dimension)})"
        )
    # Exact arithmetic whatever the number of digits or the exponent (the default context rounds to 28 digits).
    with localcontext(prec=len(value.as_tuple().digits) + 20, Emax=MAX_EMAX, Emin=MIN_EMIN):
        scaled = value * unit_of(dimension)
        if unit_of(dimension) == 1 and scaled != scaled.to_integral_value():
            raise InvalidInput(f"{dimension} amount must be a whole number, got {_shown(amount)}")
        units = int(scaled.to_integral_value(rounding=ROUND_CEILING) if round_up else scaled.to_integral_value())
    if units > MAX_UNITS:
        raise InvalidInput(
            f"{dimension} amount {_shown(amount)} is too large (at most {MAX_UNITS // unit_of(dimension)})"
        )
    return units


def decimal_from_text(text: str, *, what: str = "amount") -> Decimal:
    """The Decimal a string amount names, by `_DECIMAL_TEXT` exactly; else InvalidInput naming `what`."""
    if len(text) > 200 or not _DECIMAL_TEXT.fullmatch(text):
        raise InvalidInput(
            f"{what} {_shown(text)} is not a number: write ASCII digits with an optional fraction"
            " and exponent, such as 0.25, 12 or 1e3"
        )
    return Decimal(text)


def _shown(value: object, limit: int = 40) -> str:
    """`value` for an error message: short, on one line, and never failing (a 5000-digit int has no str)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{Decimal(value):.6e}"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decimal_from_units(dimension: str, units: int) -> Decimal:
    """Stored integer `units` of `dimension` as an exact Decimal amount (usd: nano-dollars to dollars)."""
    return Decimal(int(units)) / unit_of(dimension)


def from_units(dimension: str, units: int) -> float:
    """The human amount of an integer stored in Redis."""
    return units / unit_of(dimension)


class Limit(BaseModel):
    """An amount of one dimension over a sliding window, or a lifetime cap (no window).

    In every interval of length `window`, the amount admitted under this limit
    never exceeds `amount` (when actual costs stay within their estimates).
    ``concurrency`` counts calls in flight and takes no window. `dimension`
    is a built-in one (`DIMENSIONS`) or a custom name such as ``tool_calls``
    (see `validate_dimension`), counted in whole units.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dimension: str
    amount: Decimal
    window: float | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _as_invalid_limit(exc) from None

    @field_validator("dimension", mode="before")
    @classmethod
    def _known_dimension(cls, value: Any) -> Any:
        try:
            return validate_dimension(value)
        except InvalidInput as exc:
            raise InvalidLimit(str(exc), part=str(value)) from None

    @field_validator("amount", mode="before")
    @classmethod
    def _decimal_amount(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise InvalidLimit(f"amount must be a number, not {value!r}", part=str(value))
        if isinstance(value, float):
            return Decimal(str(value))
        if isinstance(value, str):
            try:
                return decimal_from_text(value)
            except InvalidInput as exc:
                raise InvalidLimit(str(exc), part=value) from None
        return value

    @field_validator("amount", mode="after")
    @classmethod
    def _no_negative_zero(cls, value: Decimal) -> Decimal:
        # "-0" is a valid zero, but would print as "usd -0", which does not parse back.
        return value.copy_abs() if value == 0 else value

    @field_validator("window", mode="before")
    @classmethod
    def _window_seconds(cls, value: Any) -> float | None:
        return parse_window(value)

    @model_validator(mode="after")
    def _consistent(self) -> Limit:
        try:
            to_units(self.dimension, self.amount)
        except InvalidInput as exc:
            raise InvalidLimit(str(exc), part=str(self.amount)) from None
        if self.dimension == "concurrency" and self.window is not None:
            raise InvalidLimit("concurrency counts calls in flight and takes no window", part="window")
        return self

    @classmethod
    def parse(cls, text: str) -> Limit:
        """Parse ``"usd 5/day"``, ``"tokens 1M/hour"``, ``"requests 60/min"``, ``"concurrency 8"``, ``"tokens 50k"``,
        ``"tool_calls 100/hour"`` (a custom dimension).

        Raises InvalidLimit naming the part that is wrong.
        """
        if not isinstance(text, str):
            raise InvalidLimit(f"a limit is a string like 'usd 5/day', not {type(text).__name__}")
        body, _, window = text.strip(" ").partition("/")
        parts = [part for part in body.split(" ") if part]
        if len(parts) != 2:
            raise InvalidLimit(
                f"bad limit {_shown(text, 80)}: expected '<dimension> <amount>[/<window>]', e.g. 'usd 5/day'",
                part=text,
            )
        dimension, amount_text = parts
        try:
            validate_dimension(dimension)
        except InvalidInput as exc:
            raise InvalidLimit(f"{exc} (in {_shown(text, 80)})", part=dimension) from None
        match = _AMOUNT.fullmatch(amount_text)
        if not match or match["suffix"] not in _SUFFIXES:
            raise InvalidLimit(
                f"bad amount {_shown(amount_text)} in {_shown(text, 80)}: a number, optionally with k, M or B",
                part=amount_text,
            )
        amount = Decimal(match["number"]) * _SUFFIXES[match["suffix"]]
        if "/" in text and not window.strip(" "):
            raise InvalidLimit(f"missing window after '/' in {_shown(text, 80)}", part="/")
        return cls(dimension=dimension, amount=amount, window=window.strip(" ") or None)

    @property
    def units(self) -> int:
        """The amount as the integer stored in Redis."""
        return to_units(self.dimension, self.amount)

    @property
    def window_ms(self) -> int:
        """The window in milliseconds; 0 for a lifetime cap."""
        return 0 if self.window is None else round(self.window * 1000)

    @property
    def key(self) -> str:
        """``<dimension>:<window_ms>``: one limit per dimension and window in a scope."""
        return f"{self.dimension}:{self.window_ms}"

    def __str__(self) -> str:
        amount = format(self.amount.normalize(), "f")
        return f"{self.dimension} {amount}" + (f"/{format_window(self.window)}" if self.window else "")


def _as_invalid_limit(exc: ValidationError) -> InvalidLimit:
    """The first error of a ValidationError as an InvalidLimit naming its field."""
    error = exc.errors()[0]
    original = (error.get("ctx") or {}).get("error")
    if isinstance(original, InvalidLimit):
        return original
    field = ".".join(str(part) for part in error["loc"]) or "limit"
    return InvalidLimit(f"bad {field}: {error['msg']}", part=field)


def coerce_limits(limits: Any) -> list[Limit]:
    """Turn strings and Limit objects into Limits; refuse two limits with one dimension and window."""
    if isinstance(limits, (str, Limit)):
        limits = [limits]
    try:
        items = list(limits)
    except TypeError:
        raise InvalidLimit(f"limits must be a list of strings or Limit, not {type(limits).__name__}") from None
    out: list[Limit] = []
    seen: set[str] = set()
    for item in items:
        limit = Limit.parse(item) if isinstance(item, str) else item
        if not isinstance(limit, Limit):
            raise InvalidLimit(f"not a limit: {item!r}", part=repr(item))
        if limit.key in seen:
            raise InvalidLimit(f"two limits for {limit.dimension} over the same window", part=str(limit))
        seen.add(limit.key)
        out.append(limit)
    return out
