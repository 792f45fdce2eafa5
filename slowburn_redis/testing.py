"""Helpers for tests of code that uses slowburn-redis.

A Budget built with ``test_clock=True`` loads scripts whose clock reads
``<base>:testclock`` when that key exists. `freeze_clock` sets it, after which
the tenant's time stands still until `advance_clock` moves it.
"""

from __future__ import annotations

from slowburn_redis.budget import Budget


def _clock_key(budget: Budget, tenant: str) -> str:
    if budget.engine.clock != "test":
        raise RuntimeError("the test clock needs a Budget built with test_clock=True")
    return budget.keys(tenant).test_clock


async def freeze_clock(budget: Budget, tenant: str, at_ms: int | None = None) -> int:
    """Stop `tenant`'s clock at `at_ms` (default: the server's time now); returns it."""
    key = _clock_key(budget, tenant)
    if at_ms is None:
        at_ms = await budget.engine.server_time_ms()
    await budget.engine.set(key, int(at_ms))
    return int(at_ms)


async def advance_clock(budget: Budget, tenant: str, seconds: float) -> int:
    """Move `tenant`'s clock forward (freezing it first if it runs); returns the new time in ms."""
    key = _clock_key(budget, tenant)
    if await budget.engine.get(key) is None:
        await freeze_clock(budget, tenant)
    return await budget.engine.incrby(key, round(seconds * 1000))
