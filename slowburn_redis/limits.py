"""The limits model: a dimension, an amount, and a sliding window, a calendar period, or neither.

``Limit.parse("usd 5/day")`` and ``Limit(dimension="usd", amount=5, window="1d")``
are the same limit; ``Limit.parse("usd 50/month@Europe/Berlin")`` and
``Limit(dimension="usd", amount=50, period="month", tz="Europe/Berlin")`` too.
Amounts are kept as Decimal and stored in Redis as integers of the
dimension's unit (`UNITS`): nano-dollars for ``usd``.
"""

from __future__ import annotations

import math
import re
from decimal import MAX_EMAX, MIN_EMIN, ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal, InvalidOperation, localcontext
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from slowburn_redis.errors import InvalidInput, InvalidLimit
from slowburn_redis.periods import PERIODS, Period, UnknownZone, zone

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
_MONTHS = re.compile(r"[0-9. ]*months?", re.ASCII)


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


def parse_per(text: str) -> dict[str, Any]:
    """The part of a limit string after ``/``: a sliding window, or a calendar period with an optional zone.

    ``day``, ``5 min``, ``week`` -> ``{"window": seconds}`` (sliding); ``month``,
    ``calendar day``, ``calendar week``, ``calendar month``, each optionally
    followed by ``@<IANA zone>`` -> ``{"period": ..., "tz": ...}`` (UTC when no
    zone is named). Raises InvalidLimit naming the bad part.
    """
    per, at, tz = text.partition("@")
    per, tz = per.strip(" "), tz.strip(" ")
    words = per.split()
    if words == ["month"] or (len(words) == 2 and words[0] == "calendar" and words[1] in PERIODS):
        if at and not tz:
            raise InvalidLimit(f"missing time zone after '@' in {_shown(text, 80)}", part="@")
        return {"period": words[-1], "tz": tz or None}
    if words[:1] == ["calendar"]:
        raise InvalidLimit(
            f"bad calendar period {_shown(per)}: 'calendar day', 'calendar week' or 'calendar month', with no count",
            part=per,
        )
    if _MONTHS.fullmatch(per):
        raise InvalidLimit(
            f"bad period {_shown(per)}: a month is a calendar period and takes no count; write 'month'", part=per
        )
    if at:
        raise InvalidLimit(
            f"a time zone needs a calendar period: {_shown(per)} is a sliding window; write"
            f" 'calendar day@{tz}' (resets at midnight) or '{per}' without a zone",
            part="@" + tz,
        )
    return {"window": per}


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
    """An amount of one dimension over a sliding window, a calendar period, or a lifetime cap (neither).

    Sliding (`window`, seconds): in every interval of length `window`, the
    amount admitted never exceeds `amount` (when actual costs stay within
    their estimates). ``usd 5/day`` is sliding: any 24 hours.

    Calendar (`period` ``day``, ``week`` or ``month``, in zone `tz`, UTC by
    default): the amount admitted within one calendar period never exceeds
    `amount`; at the period's boundary (local midnight; Monday for an ISO week;
    the 1st for a month; DST changes included) its usage resets to zero.
    Written ``usd 50/month``, ``usd 50/month@Europe/Berlin``,
    ``usd 5/calendar day@America/New_York``, ``requests 1000/calendar week@UTC``
    (``calendar month`` is the same as ``month``; a month has no sliding form
    and no count).

    ``concurrency`` counts calls in flight and takes neither. `dimension` is a
    built-in one (`DIMENSIONS`) or a custom name such as ``tool_calls`` (see
    `validate_dimension`), counted in whole units.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dimension: str
    amount: Decimal
    window: float | None = None
    period: Period | None = None
    """A calendar period: ``day``, ``week`` (ISO, from Monday) or ``month``; None for a sliding window or a cap."""
    tz: str | None = None
    """The IANA time zone of a calendar period (``UTC`` when a period is given without one)."""

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

    @model_serializer(mode="wrap")
    def _calendar_fields_only_when_set(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A sliding window or a cap dumps as it did before calendar periods existed.
        data = handler(self)
        if isinstance(data, dict) and self.period is None:
            data.pop("period", None)
            data.pop("tz", None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _utc_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("period") is not None and data.get("tz") is None:
            return {**data, "tz": "UTC"}
        return data

    @field_validator("period", mode="before")
    @classmethod
    def _known_period(cls, value: Any) -> Any:
        if value is not None and value not in PERIODS:
            raise InvalidLimit(f"unknown calendar period {_shown(value)}: one of {', '.join(PERIODS)}", part=str(value))
        return value

    @field_validator("tz", mode="before")
    @classmethod
    def _known_zone(cls, value: Any) -> Any:
        if value is not None:
            if not isinstance(value, str):
                raise InvalidLimit(f"tz must be a time zone name, not {type(value).__name__}", part="tz")
            try:
                zone(value)
            except UnknownZone as exc:
                raise InvalidLimit(str(exc), part=str(value)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Limit:
        try:
            to_units(self.dimension, self.amount)
        except InvalidInput as exc:
            raise InvalidLimit(str(exc), part=str(self.amount)) from None
        if self.dimension == "concurrency" and self.window is not None:
            raise InvalidLimit("concurrency counts calls in flight and takes no window", part="window")
        if self.period is not None and self.window is not None:
            raise InvalidLimit("a limit has a sliding window or a calendar period, not both", part="period")
        if self.period is None and self.tz is not None:
            raise InvalidLimit("a time zone needs a calendar period (period='day', 'week' or 'month')", part="tz")
        if self.dimension == "concurrency" and self.period is not None:
            raise InvalidLimit("concurrency counts calls in flight and takes no period", part="period")
        return self

    @classmethod
    def parse(cls, text: str) -> Limit:
        """Parse ``"usd 5/day"``, ``"tokens 1M/hour"``, ``"requests 60/min"``, ``"concurrency 8"``, ``"tokens 50k"``,
        ``"tool_calls 100/hour"`` (a custom dimension).

        The grammar (``[...]`` optional)::

            limit  = dimension " " amount ["/" per]
            per    = window                         sliding: "day", "5 min", "1h", "week"
                   | period ["@" zone]              calendar, UTC when no zone is named
            period = "month" | "calendar day" | "calendar week" | "calendar month"
            zone   = an IANA name zoneinfo knows: "Europe/Berlin", "America/New_York", "UTC"

        so ``usd 5/day`` stays a sliding 24 h window and a calendar day is named
        as one. ``str(limit)`` parses back to the same limit. Raises InvalidLimit
        naming the part that is wrong (an unknown zone, ``2 months``, a zone on a
        sliding window, ...).
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
        per = parse_per(window) if window.strip(" ") else {}
        return cls(dimension=dimension, amount=amount, **per)

    @property
    def units(self) -> int:
        """The amount as the integer stored in Redis."""
        return to_units(self.dimension, self.amount)

    @property
    def window_ms(self) -> int:
        """The sliding window in milliseconds; 0 for a lifetime cap or a calendar period."""
        return 0 if self.window is None else round(self.window * 1000)

    @property
    def period_token(self) -> str | None:
        """``<period>@<tz>`` (``month@Europe/Berlin``) for a calendar limit, the last part of its key; else None."""
        return None if self.period is None else f"{self.period}@{self.tz}"

    @property
    def key(self) -> str:
        """``<dimension>:<window_ms>`` or ``<dimension>:<period>@<tz>``: one limit of each per scope."""
        return f"{self.dimension}:{self.period_token or self.window_ms}"

    @property
    def words(self) -> str:
        """The limit for people: ``str(self)``, with a calendar zone said apart (``usd 50/month (Europe/Berlin)``)."""
        if self.period is None:
            return str(self)
        return f"{str(self).partition('@')[0]} ({self.tz})"

    def __str__(self) -> str:
        amount = format(self.amount.normalize(), "f")
        if self.period is not None:
            per = "month" if self.period == "month" else f"calendar {self.period}"
            return f"{self.dimension} {amount}/{per}" + ("" if self.tz == "UTC" else f"@{self.tz}")
        return f"{self.dimension} {amount}" + (f"/{format_window(self.window)}" if self.window else "")


def split_period_token(token: str) -> tuple[str, str]:
    """``month@Europe/Berlin`` (the last part of a calendar limit's key) -> ``("month", "Europe/Berlin")``.

    ValueError when `token` is not ``<period>@<zone>`` with a known period (the zone is not checked here).
    """
    period, at, tz = token.partition("@")
    if not at or period not in PERIODS or not tz:
        raise ValueError(f"not a calendar period token: {token!r}")
    return period, tz


def stored_limit(dimension: str, units: int, per: int | str) -> Limit:
    """The Limit stored as `units` of `dimension` over `per`: a window in ms (0: a cap) or a period token."""
    amount = decimal_from_units(dimension, units)
    if isinstance(per, str):
        period, tz = split_period_token(per)
        return Limit(dimension=dimension, amount=amount, period=period, tz=tz)
    return Limit(dimension=dimension, amount=amount, window=per / 1000 or None)


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
            raise InvalidLimit(f"two limits for {limit.dimension} over the same window or period", part=str(limit))
        seen.add(limit.key)
        out.append(limit)
    return out
