"""Calendar periods: a day, an ISO week or a month in a named time zone.

Lua in Redis has no time zone data, so a calendar limit is stored with a
compact *offset table* computed here by zoneinfo at ``set_limits`` time:
``[off0, t1, off1, t2, off2, ...]`` (milliseconds), meaning the zone's UTC
offset is ``off0`` before the UTC instant ``t1``, ``off1`` from ``t1`` until
``t2``, and so on; the last offset holds for ever after. The table covers
from about a year before it was built to `TABLE_YEARS` after (about two
dozen numbers for a zone with DST, one for a fixed offset). Past its end the
last offset holds: a DST change more than `TABLE_YEARS` after the last
``set_limits`` is not seen until limits are set again (which rebuilds it).

`period_bounds` is the one definition of a period, mirrored line by line by
``period_bounds`` in ``lua/lib.lua`` (tests check both against zoneinfo):
the period of an instant is the calendar day, ISO week (from Monday) or
month that contains its local wall time; it starts at the earliest instant
from which the local time stayed inside that day/week/month, and ends at the
first later instant at which it leaves it. A period is therefore 23 or 25 h
long across a DST change, and a month has its 28 to 31 days.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Period = Literal["day", "week", "month"]
PERIODS: tuple[str, ...] = get_args(Period)

TABLE_YEARS = 10
"""How far ahead of its building the offset table of a zone reaches."""

DAY_MS = 86_400_000
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(?:/[A-Za-z0-9][A-Za-z0-9_+-]*){0,3}", re.ASCII)


class UnknownZone(ValueError):
    """A time zone name zoneinfo does not know (or that is not a well-formed IANA name)."""


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The ZoneInfo of an IANA name such as ``Europe/Berlin`` or ``UTC``; UnknownZone otherwise."""
    if not isinstance(name, str) or len(name) > 64 or not _ZONE_NAME.fullmatch(name):
        raise UnknownZone(f"not a time zone name: {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise UnknownZone(f"unknown time zone {name!r}: use an IANA name such as Europe/Berlin or UTC") from None


def _offset_ms(tz: ZoneInfo, at_ms: int) -> int:
    offset = datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(tz).utcoffset()
    return 0 if offset is None else round(offset.total_seconds() * 1000)


def offset_table(name: str, *, now_ms: int | None = None, years: int = TABLE_YEARS) -> list[int]:
    """The offset table of zone `name` from a year before `now_ms` (default: now) to `years` after.

    Transitions are found by sampling every 6 hours and bisecting to the
    millisecond (no zone changes its offset twice within 6 hours).
    """
    tz = zone(name)
    if now_ms is None:
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
    step = 6 * 3_600_000
    start = now_ms - 366 * DAY_MS
    end = now_ms + years * 366 * DAY_MS
    table = [_offset_ms(tz, start)]
    at, current = start, table[0]
    while at < end:
        nxt = at + step
        off = _offset_ms(tz, nxt)
        if off != current:
            low, high = at, nxt  # offset(low) == current, offset(high) == off
            while high - low > 1:
                mid = (low + high) // 2
                if _offset_ms(tz, mid) == current:
                    low = mid
                else:
                    high = mid
            table += [high, off]
            current = off
        at = nxt
    return table


def _segment(table: list[int], at_ms: int) -> int:
    """The index (into offsets, 0-based) of the segment of the table that holds `at_ms`."""
    i = 0
    while 2 * i + 1 < len(table) and table[2 * i + 1] <= at_ms:
        i += 1
    return i


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(z: int) -> tuple[int, int, int]:
    z += 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (m <= 2), m, d


def local_period(period: str, local_ms: int) -> tuple[int, int]:
    """The local start and end (ms of local wall time since 1970-01-01) of the period holding `local_ms`."""
    day = local_ms // DAY_MS
    if period == "day":
        return day * DAY_MS, (day + 1) * DAY_MS
    if period == "week":
        first = day - (day + 3) % 7  # 1970-01-01 was a Thursday; ISO weeks start on Monday
        return first * DAY_MS, (first + 7) * DAY_MS
    y, m, _ = _civil_from_days(day)
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    return _days_from_civil(y, m, 1) * DAY_MS, _days_from_civil(ny, nm, 1) * DAY_MS


def period_bounds(period: str, table: list[int], at_ms: int) -> tuple[int, int]:
    """The UTC start and end (ms) of the calendar period holding instant `at_ms` (see the module docstring)."""
    last = len(table) // 2  # segments 0..last
    i = _segment(table, at_ms)
    low, high = local_period(period, at_ms + table[2 * i])
    # start: walk back while the local time just before a segment's first instant stayed in the period
    j = i
    start = low - table[2 * j]
    while j > 0 and start <= table[2 * j - 1]:
        before = table[2 * j - 1] + table[2 * j - 2] - 1
        if before < low or before >= high:
            start = table[2 * j - 1]
            break
        j -= 1
        start = low - table[2 * j]
    # end: walk forward while the local time at the next segment's first instant stays in the period
    k = i
    end = high - table[2 * k]
    while k < last and end >= table[2 * k + 1]:
        after = table[2 * k + 1] + table[2 * k + 2]
        if after < low or after >= high:
            end = table[2 * k + 1]
            break
        k += 1
        end = high - table[2 * k]
    return start, end


def format_reset(at_ms: int, tz_name: str) -> str:
    """A period end for people: ``2027-01-01 00:00 Europe/Berlin``."""
    local = datetime.fromtimestamp(at_ms / 1000, tz=UTC).astimezone(zone(tz_name))
    return f"{local.strftime('%Y-%m-%d %H:%M' if local.second == 0 else '%Y-%m-%d %H:%M:%S')} {tz_name}"
