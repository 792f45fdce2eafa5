"""Helpers for tests of code that uses slowburn-redis."""

from __future__ import annotations

from slowburn_redis.budget import Budget


async def advance_clock(budget: Budget, tenant: str, seconds: float) -> None:
    """Move `tenant`'s clock forward; only for a Budget built with ``test_clock=True``."""
    if budget._clock != "test":
        raise RuntimeError("advance_clock needs a Budget built with test_clock=True")
    await budget.client.incrby(budget.key(tenant) + ":testclock", round(seconds * 1000))
