"""Section 4, memory: Redis bytes per limit after 1,000 and after 100,000 admissions, against sliding logs.

Also what a settled admission leaves in Redis beyond its ledger entry (its
tombstone, lua/lib.lua "reservation records"), against the goal of
`GOAL_BYTES_PER_ADMISSION`, and the bytes of one tenant by key kind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from bench.helpers import Settings, median, used_memory
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


GOAL_BYTES_PER_ADMISSION = 200
"""Redis bytes a settled admission may leave in steady state, beyond its ledger entry, whatever the rate."""

STEADY_LIMITS = ["usd 1000000/day", "tokens 1000000000000/hour", "requests 1000000000/min", "concurrency 100000"]
TENANT_LIMITS = ["usd 50/day", "tokens 2000000/hour", "requests 600/min"]  # as bench/tenants.py
SMALL_STREAM_NODE = 1024
"""A ``stream-node-max-bytes`` to compare with Redis's default (4096, which is also each stream's first allocation)."""


async def settle_many(*, index: int, url: str, tenant: str, count: int, tasks: int) -> int:
    """`count` acquire+commit calls on `tenant`, `tasks` at a time; returns how many were committed."""
    from slowburn_redis import Budget

    async with Budget.from_url(url, prefix="bench") as budget:
        done = 0

        async def worker(n: int) -> None:
            nonlocal done
            for _ in range(n):
                r = await budget.acquire(tenant, usd=0.0001, tokens=10, requests=1, mode="reject")
                await r.commit(usd=0.0001, tokens=8)
                done += 1

        await asyncio.gather(*(worker(count // tasks + (1 if i < count % tasks else 0)) for i in range(tasks)))
        return done


def bytes_by_kind(client: redis.Redis, tenant: str) -> dict[str, int]:
    """MEMORY USAGE of every key of `tenant` (prefix bench), summed by kind: the first part after the base."""
    out: dict[str, int] = {}
    for key, size in key_bytes(client, f"bench:{{{tenant}}}:*").items():
        kind = key.partition("}:")[2].split(":", 1)[0]
        out[kind] = out.get(kind, 0) + size
    return dict(sorted(out.items()))


def count_by_kind(client: redis.Redis, tenant: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for raw in client.scan_iter(match=f"bench:{{{tenant}}}:*", count=1000):
        kind = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition("}:")[2].split(":", 1)[0]
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items()))


def steady_state(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """Bytes per settled admission beyond the ledger: (used_memory growth - ledger growth) / admissions.

    Each repetition takes a tenant of its own, warms it up (one call per
    process: its windows, ledger, trail and clock exist, the scripts are
    loaded), then makes `count` acquire+commit calls. Every admission is
    settled, so what it leaves is its tombstone (and its ledger entry, taken
    out). The tombstones live 10 minutes: at R admissions/s Redis holds
    600 * R of them, so the steady state is this figure times 600 * R.
    """
    count = 4_000 if settings.quick else 10_000
    per_admission: list[float] = []
    keys_left: dict[str, int] = {}
    for rep in range(settings.reps):
        tenant = f"mem-steady-{rep}"
        settings.fleet.run(
            "bench.peers:set_slowburn_limits", n=1, url=settings.url, tenants=[tenant], limits=STEADY_LIMITS
        )
        settings.fleet.run("bench.memory:settle_many", url=settings.url, tenant=tenant, count=1, tasks=1)
        ledger_key = f"bench:{{{tenant}}}:ledger"
        mem0, ledger0 = used_memory(client), int(client.memory_usage(ledger_key, samples=0) or 0)
        share = count // settings.processes
        done = sum(
            settings.fleet.run(
                "bench.memory:settle_many",
                url=settings.url,
                tenant=tenant,
                count=share,
                tasks=settings.tasks,
                timeout=300,
            )
        )
        mem1, ledger1 = used_memory(client), int(client.memory_usage(ledger_key, samples=0) or 0)
        per_admission.append(((mem1 - mem0) - (ledger1 - ledger0)) / done)
        keys_left = count_by_kind(client, tenant)
    bytes_per_admission = median(per_admission)
    return {
        "admissions": count,
        "bytes_per_admission_beyond_ledger": bytes_per_admission,
        "bytes_per_admission_runs": per_admission,
        "keys_left_by_kind": keys_left,
        "goal_bytes": GOAL_BYTES_PER_ADMISSION,
        "goal_met": bytes_per_admission <= GOAL_BYTES_PER_ADMISSION,
        "at_1000_per_s_mb": bytes_per_admission * 600 * 1000 / 1e6,
    }


def per_tenant(settings: Settings, client: redis.Redis) -> dict[str, Any]:
    """One tenant's keys after its limits and one settled call, by kind (MEMORY USAGE), at two stream node sizes."""
    out: dict[str, Any] = {"limits": TENANT_LIMITS}
    default = client.config_get("stream-node-max-bytes")["stream-node-max-bytes"]
    for label, node in (("default", None), ("small_stream_node", SMALL_STREAM_NODE)):
        tenant = f"mem-tenant-{label}"
        if node is not None:
            client.config_set("stream-node-max-bytes", node)
        try:
            settings.fleet.run(
                "bench.peers:set_slowburn_limits", n=1, url=settings.url, tenants=[tenant], limits=TENANT_LIMITS
            )
            settings.fleet.run("bench.memory:settle_many", n=1, url=settings.url, tenant=tenant, count=1, tasks=1)
        finally:
            client.config_set("stream-node-max-bytes", default)
        kinds = bytes_by_kind(client, tenant)
        out[label] = {"stream_node_max_bytes": int(node or default), "by_kind": kinds, "total": sum(kinds.values())}
    return out


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
    out["steady_state"] = steady_state(settings, client)
    out["per_tenant"] = per_tenant(settings, client)
    client.close()
    return out
