"""The wire contract with the Lua scripts, network-free: ARGV builders and typed reply decoders.

Each script's header in ``lua/`` states its KEYS, ARGV and reply; this module
is the Python side of those headers and nothing else touches a raw reply.
Builders return the argument list of one request; decoders take the reply of
one request (a batched script answers a batch with one such reply per
request, see `slowburn_redis.batching`). Unit-tested without Redis in
``tests/test_protocol.py``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slowburn_redis.amounts import format_amounts, parse_amounts
from slowburn_redis.limits import Limit, stored_limit
from slowburn_redis.periods import offset_table

# Argument-list builders ---------------------------------------------------------


def acquire_args(
    *,
    reservation_id: str,
    agent: str | None,
    mode: str,
    priority: int,
    ticket: str,
    lease_ms: int,
    queue_ms: int,
    estimate: dict[str, int],
    model: str | None = None,
    run_id: str | None = None,
) -> list[Any]:
    """One acquire request (acquire.lua): the fields its header lists, in order (`ACQUIRE_FIELDS`)."""
    fields = {
        "reservation_id": reservation_id,
        "agent": agent or "",
        "model": model or "",
        "run": run_id or "",
        "mode": mode,
        "priority": priority,
        "ticket": ticket,
        "lease_ms": lease_ms,
        "queue_ms": queue_ms,
        "amounts": format_amounts(estimate),
    }
    return [fields[name] for name in ACQUIRE_FIELDS]


ACQUIRE_FIELDS = (
    "reservation_id",
    "agent",
    "model",
    "run",
    "mode",
    "priority",
    "ticket",
    "lease_ms",
    "queue_ms",
    "amounts",
)
"""The fields of one acquire request, in the order of acquire.lua's header (`acquire_args` builds them)."""


@dataclass(frozen=True)
class AcquireFields:
    """What the client itself needs back from an acquire request it built (failing open: `resilience`)."""

    reservation_id: str
    agent: str | None
    lease_ms: int
    amounts: str


def read_acquire_args(args: Sequence[Any]) -> AcquireFields:
    """The inverse of `acquire_args` for the fields a client reads back."""
    field_of = dict(zip(ACQUIRE_FIELDS, args, strict=True))
    return AcquireFields(
        reservation_id=str(field_of["reservation_id"]),
        agent=str(field_of["agent"]) or None,
        lease_ms=int(field_of["lease_ms"]),
        amounts=str(field_of["amounts"]),
    )


def quote_args(
    *, agent: str | None, model: str | None, priority: int, estimate: dict[str, int], run_id: str | None = None
) -> list[Any]:
    """One quote (quote.lua): agent, model, run, priority and amounts, joined by spaces as its header says."""
    return [f"{agent or ''} {model or ''} {run_id or ''} {priority} {format_amounts(estimate)}"]


def settle_args(
    *,
    reservation_id: str,
    kind: str,
    ledger_maxlen: int,
    actual: dict[str, int],
    model: str = "",
    outcome: str = "",
    metadata: dict[str, Any] | None = None,
) -> list[Any]:
    """One settlement (settle.lua): `kind` is ``commit`` or ``release``; `ledger_maxlen` 0 writes no entry."""
    meta = json.dumps(metadata, default=str, separators=(",", ":")) if metadata else ""
    return [reservation_id, kind, ledger_maxlen, format_amounts(actual), model, outcome, meta]


def tenants_args(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """The ARGV of one call of a batched script serving several tenants (lib.lua "tenants").

    `parts` holds each tenant's arguments, in the order of the call's KEYS:
    first how many of the arguments are each tenant's, space-joined, then
    all of them in that order.
    """
    return [" ".join(str(len(part)) for part in parts), *(arg for part in parts for arg in part)]


def limits_json(limits: list[Limit], *, now_ms: int | None = None) -> str:
    """The limits of one scope as set_limits.lua stores them; '' clears the scope.

    A calendar limit also carries its period ``c``, zone ``z`` and the zone's
    offset table ``o`` from a year before `now_ms` (default: now) to
    `slowburn_redis.periods.TABLE_YEARS` after (see that module).
    """
    if not limits:
        return ""
    items: list[dict[str, Any]] = []
    for lim in limits:
        item: dict[str, Any] = {"d": lim.dimension, "a": lim.units, "w": lim.window_ms}
        if lim.period is not None and lim.tz is not None:
            item |= {"c": lim.period, "z": lim.tz, "o": offset_table(lim.tz, now_ms=now_ms)}
        items.append(item)
    return json.dumps(items)


def decode_limits_json(text: str | None) -> list[tuple[str, int, int]]:
    """The stored limits of one scope as ``(dimension, amount_units, window_ms)``; [] when none are stored.

    A calendar limit has window_ms 0 here: `decode_stored_limits` keeps its period.
    """
    if not text:
        return []
    return [(item["d"], int(item["a"]), int(item["w"])) for item in json.loads(text)]


def decode_stored_limits(text: str | None) -> list[Limit]:
    """The stored limits of one scope as Limits, calendar periods included; [] when none are stored."""
    if not text:
        return []
    return [
        stored_limit(item["d"], int(item["a"]), f"{item['c']}@{item['z']}" if item.get("c") else int(item["w"]))
        for item in json.loads(text)
    ]


# Reply decoders -------------------------------------------------------------------


@dataclass(frozen=True)
class Admitted:
    """acquire.lua ``{1, id, now_ms, lease_expiry_ms, over}``."""

    reservation_id: str
    now_ms: int
    lease_expires_ms: int
    over_limits: list[str]


@dataclass(frozen=True)
class Denied:
    """acquire.lua ``{0, ticket, now_ms, retry_at_ms, limit_key, reason, limit_amount}``: denied, and why."""

    ticket: str
    now_ms: int
    retry_at_ms: int
    limit_key: str
    reason: str
    limit_amount: int

    @property
    def retry_in(self) -> float | None:
        """Seconds until enough of the window expires, by the script's clock."""
        return None if self.retry_at_ms < 0 else max(0.0, (self.retry_at_ms - self.now_ms) / 1000)


@dataclass(frozen=True)
class TooLarge:
    """acquire.lua ``{-1, limit_key, limit_amount, requested}``: the request exceeds the limit itself."""

    limit_key: str
    amount: int
    requested: int


@dataclass(frozen=True)
class Missing:
    """acquire.lua ``{-2, agent}``: no limits are stored for the tenant, its default agent or this agent."""

    agent: str


@dataclass(frozen=True)
class RunSpent:
    """acquire.lua ``{-3, reason, limit_key, limit_amount, used, requested}``: the run cannot take the request.

    `reason` is ``cap`` (`limit_key` is the run's cap), ``time`` (max_seconds
    passed; amounts in ms) or ``gone`` (the run's keys expired).
    """

    reason: str
    limit_key: str
    amount: int
    used: int
    requested: int


AcquireReply = Admitted | Denied | TooLarge | Missing | RunSpent

UNLIMITED_JSON = "[]"
"""What set_limits.lua stores for a scope deliberately left unlimited (an absent scope is missing, not unlimited)."""


def decode_acquire(reply: list[Any]) -> AcquireReply:
    """One acquire reply as `Admitted`, `Denied` or `TooLarge`; ValueError for anything else."""
    code = int(reply[0])
    if code == 1:
        _, rid, now_ms, expiry, over = reply
        return Admitted(str(rid), int(now_ms), int(expiry), str(over).split())
    if code == 0:
        _, ticket, now_ms, retry_at, limit_key, reason, amount = reply
        return Denied(str(ticket), int(now_ms), int(retry_at), str(limit_key), str(reason), int(amount))
    if code == -1:
        _, limit_key, amount, requested = reply
        return TooLarge(str(limit_key), int(amount), int(requested))
    if code == -2:
        return Missing(str(reply[1]))
    if code == -3:
        _, reason, limit_key, amount, used, requested = reply
        return RunSpent(str(reason), str(limit_key), int(amount), int(used), int(requested))
    raise ValueError(f"unexpected acquire reply {reply!r}")


def run_open_args(*, run_id: str, agent: str | None, caps_json: str, max_ms: int, ttl_ms: int) -> list[Any]:
    """run.lua ``open``: create the run, or join it (`caps_json` '' joins only a run that exists)."""
    return ["open", run_id, agent or "", caps_json, max_ms, ttl_ms]


@dataclass(frozen=True)
class RunOpened:
    """run.lua ``open``: `created` False when an existing run was joined; times in ms on the tenant clock."""

    created: bool
    agent: str | None
    caps_json: str
    started_ms: int
    deadline_ms: int | None
    now_ms: int


def decode_run_open(reply: list[Any]) -> RunOpened | None:
    """The run opened or joined; None when joining a run that does not exist."""
    if int(reply[0]) == -1:
        return None
    created, agent, caps, started, deadline, now = reply
    return RunOpened(bool(int(created)), str(agent) or None, str(caps), int(started), int(deadline) or None, int(now))


@dataclass(frozen=True)
class RunCounters:
    """run.lua ``summary``: the run hash's fields and each cap as ``(limit_key, amount, used)`` in units."""

    now_ms: int
    fields: dict[str, str]
    caps: list[tuple[str, int, int]]


def decode_run_summary(reply: list[Any]) -> RunCounters | None:
    """The run's counters; None when the run is gone."""
    if int(reply[0]) == -1:
        return None
    _, now, flat, caps = reply
    fields = {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}
    rows = [(str(caps[i]), int(caps[i + 1]), int(caps[i + 2])) for i in range(0, len(caps), 3)]
    return RunCounters(int(now), fields, rows)


@dataclass(frozen=True)
class Settled:
    """settle.lua: `settled` is False when nothing changed (`state` says why); overrun in units per dimension."""

    settled: bool
    state: str
    overrun: dict[str, int] = field(default_factory=dict)
    ledger_id: str | None = None


def decode_settle(reply: list[Any]) -> Settled:
    """One settle reply: ``{1, state, overrun, ledger_id}`` or ``{0, state}``."""
    if int(reply[0]) == 1:
        return Settled(True, str(reply[1]), parse_amounts(str(reply[2])), str(reply[3]) or None)
    return Settled(False, str(reply[1]))


def decode_extend(reply: list[Any]) -> int | None:
    """extend.lua: the new lease expiry in ms, or None when the reservation is no longer open."""
    return int(reply[1]) if int(reply[0]) == 1 else None


def decode_refresh(reply: list[Any]) -> tuple[list[str], list[str]]:
    """refresh.lua ``{first, missing}``: tickets first in every queue they wait in, and tickets the queue lost."""
    return [str(t) for t in reply[0]], [str(t) for t in reply[1]]


@dataclass(frozen=True)
class LimitRow:
    """One row of status.lua: amounts in the dimension's units; `total` includes `reserved`."""

    scope: str
    limit_key: str
    dimension: str
    amount: int
    window_ms: int
    total: int
    reserved: int
    overrun: int
    refill_at_ms: int
    waiters: int


@dataclass(frozen=True)
class StatusReply:
    """status.lua ``{now_ms, queue_length, rows}``."""

    now_ms: int
    queue_length: int
    rows: list[LimitRow]


def decode_status(reply: list[Any]) -> StatusReply:
    now_ms, queue_length, rows = reply
    decoded = [
        LimitRow(
            scope=str(scope),
            limit_key=str(key),
            dimension=str(dim),
            amount=int(amount),
            window_ms=int(window_ms),
            total=int(total),
            reserved=int(reserved),
            overrun=int(overrun),
            refill_at_ms=int(refill_at),
            waiters=int(waiters),
        )
        for scope, key, dim, amount, window_ms, total, reserved, overrun, refill_at, waiters in rows
    ]
    return StatusReply(int(now_ms), int(queue_length), decoded)
