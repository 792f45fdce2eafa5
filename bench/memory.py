"""Section 4, memory: Redis bytes per limit after 1,000 and after 100,000 admissions, against sliding logs."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from bench.helpers import Settings, used_memory
from bench.peers import make_admitter

LIMITS = ["usd 1000000/day", "tokens 1000000000000/hour", "requests 1000000000/min", "concurrency 100000"]
PEER_AMOUNT, PEER_WINDOW = 10_000_000, 86400  # one day, never reached: every admission stays in the log


async def admit_many(*, index: int, url: str, peer: str, key: str, count: int, tasks: int) -> dict[str, Any]:
    """`count` admissions (cost 1) of `peer` on `key`, `tasks` at a time: how many were admitted, how many failed."""
    admitter = make_admitter(peer, url, PEER_AMOUNT, PEER_WINDOW)
    admitted = failed = 0
    first_error = ""
    per_task = [count // tasks + (1 if i < count % tasks else 0) for i in range(tasks)]

    async def worker(n: int) -> None:
        nonlocal admitted, failed, first_error
        for _ in range(n):
            try:
                if await admitter.admit(key, 1):
                    admitted += 1
            except Exception as exc:  # reported, not fatal: a slow peer must not lose the section
                failed += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(worker(n) for n in per_task))
    finally:
        await admitter.close()
    return {"admitted": admitted, "failed": failed, "first_error": first_error}


WINDOW_BOUND_BYTES = 2048
"""A window hash with all 61 buckets in use stays under this (listpack fields of ~20 bytes)."""


def key_bytes(client: redis.Redis, pattern: str) -> dict[str, int]:
    """MEMORY USAGE (every element sampled) of each key matching `pattern`."""
    return {
        key.decode() if isinstance(key, bytes) else str(key): int(client.memory_usage(key, samples=0) or 0)
        for key in client.scan_iter(match=pattern, count=1000)
    }


def run(settings: Settings) -> dict[str, Any]:
    checkpoints = [1_000, 10_000] if settings.quick else [1_000, 100_000]
    client = redis.Redis.from_url(settings.url)
    out: dict[str, Any] = {"checkpoints": checkpoints, "slowburn_limits": LIMITS}
    subjects = {
        "slowburn": ("bench:{mem-slowburn}:w:*", "mem-slowburn"),
        "limits-moving-window": ("*mem-limits*", "mem-limits"),
        "pyrate-limiter-redis": ("pyrate:mem-pyrate*", "mem-pyrate"),
    }
    settings.fleet.run(
        "bench.peers:set_slowburn_limits", n=1, url=settings.url, tenants=["mem-slowburn"], limits=LIMITS
    )
    for name, (pattern, key) in subjects.items():
        rows = []
        done = 0
        mem0 = used_memory(client)
        for target in checkpoints:
            share = (target - done) // settings.processes  # checkpoints are multiples of the fleet size
            results = settings.fleet.run(
                "bench.memory:admit_many",
                url=settings.url,
                peer=name,
                key=key,
                count=share,
                tasks=settings.tasks,
                timeout=300,
            )
            done = target
            sizes = key_bytes(client, pattern)
            windows = {k: v for k, v in sizes.items() if name != "slowburn" or ":w:T:concurrency" not in k}
            limits_count = 3 if name == "slowburn" else 1
            rows.append(
                {
                    "admissions": target,
                    "failed_calls": sum(r["failed"] for r in results),
                    "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
                    "keys": sizes,
                    "bytes_per_limit": sum(windows.values()) / limits_count,
                    "used_memory_growth_per_admission": (used_memory(client) - mem0) / target,
                }
            )
        out[name] = {
            "rows": rows,
            "growth": rows[-1]["bytes_per_limit"] / rows[0]["bytes_per_limit"] if rows[0]["bytes_per_limit"] else None,
        }
    # Flat means independent of the number of admissions: a window holds at most 61
    # buckets, so its size is bounded however many calls it has seen. It grows only
    # while more of its buckets come into use (a function of elapsed time).
    out["bound_bytes_per_limit"] = WINDOW_BOUND_BYTES
    out["goal_slowburn_flat"] = out["slowburn"]["rows"][-1]["bytes_per_limit"] <= WINDOW_BOUND_BYTES
    client.close()
    return out
