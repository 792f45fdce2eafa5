"""Internal limit keys, stored units and events, said in the operator's words.

The scripts name a limit by its key ``<scope>:<dimension>:<window_ms>``
(scope ``T`` the tenant, ``D`` the default of every agent, ``A:<agent>`` one
agent; window 0 a lifetime cap; see docs/ARCHITECTURE.md "Keys") and store
money as integer nano-dollars. People read ``usd 0.5/hour (agent
researcher)`` and ``$0.45``: every human-facing line of the CLI goes through
here, and internal keys appear only under ``--json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from slowburn_redis import keys
from slowburn_redis.errors import InvalidInput
from slowburn_redis.events import Event
from slowburn_redis.limits import UNITS, Limit, stored_limit
from slowburn_redis.names import EVERY_AGENT


@dataclass(frozen=True)
class LimitKey:
    """A parsed limit key: `scope` is "tenant", "every agent", "agent" or "model <name>"."""

    scope: str
    agent: str | None
    dimension: str
    window_ms: int


def parse_limit_key(key: str) -> LimitKey | None:
    """``T:usd:86400000`` -> LimitKey("tenant", None, "usd", 86400000); None when `key` is not a limit key."""
    try:
        parsed = keys.LimitKey.parse(key)
    except ValueError:
        return None
    if parsed.model is not None:
        return LimitKey(f"model {parsed.model}", None, parsed.dimension, parsed.window_ms)
    agent = parsed.agent
    if parsed.scope.count(":") > 1 or agent == "" or (agent is None and parsed.scope != keys.TENANT_SCOPE):
        return None
    if agent is None:
        return LimitKey("tenant", None, parsed.dimension, parsed.window_ms)
    if agent == EVERY_AGENT:
        return LimitKey("every agent", None, parsed.dimension, parsed.window_ms)
    return LimitKey("agent", agent, parsed.dimension, parsed.window_ms)


def scope_words(field: str) -> str:
    """A scope field (``T``, ``D``, ``A:<agent>``, ``M:<model>``) as words: ``tenant``, ``agent bot``, ``model x``."""
    if field == "T":
        return "tenant"
    if field == "D":
        return "every agent"
    if field.startswith("M:"):
        return f"model {field[2:]}"
    return f"agent {field[2:]}" if field.startswith("A:") else field


def _unit(dimension: str) -> int:
    return UNITS.get(dimension, 1)


def amount_words(dimension: str, units: int | float | str) -> str:
    """A stored amount in its unit: usd as dollars (``$0.4500``; cents from $1,000), counts as ``1,500``."""
    value = Decimal(str(units)) / _unit(dimension)
    if dimension == "usd":
        return f"${value:,.4f}" if abs(value) < 1000 else f"${value:,.2f}"
    return f"{value:,.0f}" if value == value.to_integral_value() else f"{value:,.2f}"


def _limit(dimension: str, units: int | None, per: int | str) -> Limit | None:
    """The limit of `units` over `per` (a window in ms, or a calendar ``<period>@<zone>`` token); None if not one."""
    if units is None:
        return None
    try:
        if isinstance(per, str):
            return stored_limit(dimension, units, per)
        return Limit(dimension=dimension, amount=Decimal(units) / _unit(dimension), window=per / 1000 or None)
    except (InvalidInput, ValueError):
        return None


def limit_words(key: str, amount: int | None = None, known: dict[str, Limit] | None = None) -> str:
    """A limit key as ``usd 0.5/hour (agent researcher)``.

    The amount comes from `known` (limit key -> Limit, e.g. from a Status) or
    from `amount` (stored units, as events carry it); without either the limit
    reads ``usd per hour (agent researcher)``. A string that is not a limit key
    is returned as it is.
    """
    parsed = parse_limit_key(key)
    if parsed is None:
        return key
    limit = (known or {}).get(key)
    if limit is None:
        return keys.describe_limit_key(key, amount)
    who = parsed.scope if parsed.agent is None else f"agent {parsed.agent}"
    return f"{limit} ({who})"


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _seconds(ms: Any) -> str:
    value = _int(ms)
    return "?" if value is None else f"{value / 1000:.1f}s"


def _amounts(text: str) -> str:
    """``usd=450000000 tokens=12`` (stored units) as ``$0.4500, 12 tokens``."""
    out = []
    for part in str(text).split():
        dimension, _, units = part.partition("=")
        if _int(units) is None:
            out.append(part)
        elif dimension == "usd":
            out.append(amount_words("usd", units))
        else:
            out.append(f"{amount_words(dimension, units)} {dimension}")
    return ", ".join(out)


def _limits_json(text: Any) -> str:
    if not text:
        return "cleared"
    try:
        items = json.loads(text)
        limits = [
            _limit(str(i["d"]), int(i["a"]), f"{i['c']}@{i['z']}" if i.get("c") else int(i.get("w") or 0))
            for i in items
        ]
    except (ValueError, TypeError, KeyError):
        return "changed"
    return "set: " + ", ".join(str(lim) for lim in limits if lim is not None)


def event_words(event: Event, known: dict[str, Limit] | None = None) -> str:
    """What an event says, for people: no limit keys, no nano-dollars, no reservation ids.

    ``exhausted usd 0.5/hour (agent researcher): $0.4900 used, $0.0200 requested``;
    ``threshold usd 5/day (tenant): 90 % used``; ``resumed after 3.2s``...
    """
    extra = event.model_extra or {}
    limit = limit_words(event.limit, _int(extra.get("amount")), known) if event.limit else ""
    parsed = parse_limit_key(event.limit or "")
    dimension = str(extra.get("dimension") or (parsed.dimension if parsed else ""))
    kind = event.type
    if kind == "threshold":
        return f"{limit}: {extra.get('level')} % used"
    if kind == "exhausted":
        used, requested = _int(extra.get("used")), _int(extra.get("requested"))
        parts = [f"{amount_words(dimension, used)} used" if used is not None else ""]
        parts.append(f"{amount_words(dimension, requested)} requested" if requested is not None else "")
        details = ", ".join(p for p in parts if p)
        return f"exhausted {limit}" + (f": {details}" if details else "")
    if kind == "waiting":
        why = " (behind earlier waiters)" if extra.get("reason") == "queue" else ""
        return f"waiting on {limit}{why}" if limit else "waiting"
    if kind == "resumed":
        return f"resumed after {_seconds(extra.get('waited_ms'))}"
    if kind == "overrun":
        return f"overrun: charged {_amounts(str(extra.get('overrun', '')))} beyond the estimate"
    if kind == "lease_expired":
        return "a lease expired (its worker stopped before settling; its estimate stays charged)"
    if kind == "reset":
        what = str(extra.get("dimension") or "")
        return f"reset {extra.get('windows', '?')} window(s)" + (f" of {what}" if what else "")
    if kind == "clock_jump":
        jump = _int(extra.get("jump_ms"))
        if jump is not None and jump < 0:
            back = _seconds(-jump)
            return (
                f"the Redis clock stepped back {back}: the budget kept its own time (nothing refills twice or is lost)"
            )
        leases = _int(extra.get("leases")) or 0
        return (
            f"the Redis clock jumped {_seconds(jump)} ahead (or the tenant was silent that long): "
            f"{leases} lease(s) in flight aged 30s at most"
        )
    if kind == "limits_changed":
        return f"limits of {scope_words(str(extra.get('scope', '')))} {_limits_json(extra.get('limits'))}"
    if kind == "limits_reseeded":
        given = extra.get("limits")
        scopes: dict[str, Any] = given if isinstance(given, dict) else {}
        written = "; ".join(f"{scope} {', '.join(map(str, limits))}" for scope, limits in scopes.items())
        lost = ": its spend history was lost, spend before now is not counted" if extra.get("history_lost") else ""
        return f"limits re-seeded from declared state after Redis lost them ({written}){lost}"
    return f"{kind} {limit}".rstrip()
