"""Pydantic snapshots of a budget: what each limit has used, reserved and left."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel

from slowburn_redis.limits import UNITS, Limit, from_units


class LimitStatus(BaseModel):
    """One limit as it stands: amounts in the dimension's unit (usd in dollars)."""

    scope: Literal["tenant", "agent"]
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
    """Seconds until some of the window expires; None when nothing will."""
    waiters: int
    """Waiters queued on this limit."""

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
    def from_reply(cls, tenant: str, agent: str | None, reply: list[Any]) -> Status:
        """Build a Status from the status.lua reply."""
        now_ms, queue_length, rows = reply
        limits = []
        for scope, key, dim, amount, window_ms, total, reserved, overrun, refill_at, waiters in rows:
            total, reserved, amount = int(total), int(reserved), int(amount)
            limit = Limit(
                dimension=dim,
                amount=Decimal(amount) / UNITS[dim],
                window=int(window_ms) / 1000 if int(window_ms) else None,
            )
            limits.append(
                LimitStatus(
                    scope="tenant" if scope == "T" else "agent",
                    agent=None if scope == "T" else scope[2:],
                    limit=limit,
                    key=key,
                    used=from_units(dim, max(0, total - reserved)),
                    reserved=from_units(dim, max(0, reserved)),
                    remaining=from_units(dim, max(0, amount - total)),
                    overrun=from_units(dim, int(overrun)),
                    refill_in=None if int(refill_at) < 0 else max(0.0, (int(refill_at) - int(now_ms)) / 1000),
                    waiters=int(waiters),
                )
            )
        at = datetime.fromtimestamp(int(now_ms) / 1000, tz=UTC)
        return cls(tenant=tenant, agent=agent, at=at, queue_length=int(queue_length), limits=limits)
