"""Pydantic snapshots of a budget: what each limit has used, reserved and left."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from slowburn_redis.keys import LimitKey
from slowburn_redis.limits import Limit, from_units, stored_limit
from slowburn_redis.periods import format_reset, zone
from slowburn_redis.protocol import LimitRow, StatusReply


class LimitStatus(BaseModel):
    """One limit as it stands: amounts in the dimension's unit (usd in dollars)."""

    scope: Literal["tenant", "agent", "model"]
    agent: str | None
    limit: Limit
    key: str
    used: float
    """Committed usage in the window (open reservations excluded)."""
    reserved: float
    """Estimates of reservations still open."""
    remaining: float
    """What an acquire could still take now: amount - used - reserved, never below 0."""
    overrun: float
    """Usage charged beyond the estimates, in the window (or lifetime)."""
    refill_in: float | None
    """Seconds until some of the sliding window expires; None when nothing will (and for a calendar period)."""
    resets_at: datetime | None = None
    """When a calendar period ends and its usage resets to zero, in the limit's zone; None for the others."""
    waiters: int
    """Waiters queued on this limit."""
    model: str | None = None
    """The model of a per-model limit (scope ``model``), else None."""

    @property
    def label(self) -> str:
        """The limit in words: ``usd 0.5/hour (agent researcher)``, ``usd 5/day (tenant)``, ``... (model gpt-4o)``."""
        if self.model is not None:
            return f"{self.limit} (model {self.model})"
        return f"{self.limit} ({'tenant' if self.agent is None else 'agent ' + self.agent})"

    @property
    def resets(self) -> str | None:
        """When a calendar period resets, for people: ``2027-01-01 00:00 Europe/Berlin``; None for the others."""
        if self.resets_at is None or self.limit.tz is None:
            return None
        return format_reset(round(self.resets_at.timestamp() * 1000), self.limit.tz)

    @property
    def fraction(self) -> float:
        """(used + reserved) / amount; 1.0 or more when spent."""
        amount = float(self.limit.amount)
        return (self.used + self.reserved) / amount if amount else 1.0


class Status(BaseModel):
    """Every limit that applies to a tenant (and agent), read atomically on the server."""

    tenant: str
    agent: str | None
    at: datetime
    queue_length: int
    limits: list[LimitStatus]

    def remaining(self, dimension: str) -> float | None:
        """The smallest remaining amount over every limit of `dimension`; None if none applies."""
        values = [s.remaining for s in self.limits if s.limit.dimension == dimension]
        return min(values) if values else None

    @classmethod
    def from_reply(cls, tenant: str, agent: str | None, reply: StatusReply) -> Status:
        """Build a Status from the decoded status.lua reply."""
        limits = [_limit_status(row, reply.now_ms) for row in reply.rows]
        at = datetime.fromtimestamp(reply.now_ms / 1000, tz=UTC)
        return cls(tenant=tenant, agent=agent, at=at, queue_length=reply.queue_length, limits=limits)


def _limit_status(row: LimitRow, now_ms: int) -> LimitStatus:
    dim = row.dimension
    key = LimitKey.parse(row.limit_key)
    period = key.period
    limit = stored_limit(dim, row.amount, period or row.window_ms)
    resets_at = None
    if period is not None and limit.tz is not None and row.refill_at_ms >= 0:
        resets_at = datetime.fromtimestamp(row.refill_at_ms / 1000, tz=zone(limit.tz))
    return LimitStatus(
        scope="model" if key.model is not None else "agent" if key.agent is not None else "tenant",
        agent=key.agent,
        model=key.model,
        limit=limit,
        key=row.limit_key,
        used=from_units(dim, max(0, row.total - row.reserved)),
        reserved=from_units(dim, max(0, row.reserved)),
        remaining=from_units(dim, max(0, row.amount - row.total)),
        overrun=from_units(dim, row.overrun),
        refill_in=None if row.refill_at_ms < 0 or period else max(0.0, (row.refill_at_ms - now_ms) / 1000),
        resets_at=resets_at,
        waiters=row.waiters,
    )
