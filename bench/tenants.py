"""Section 5, scale of tenants: throughput and memory with 10,000 tenants of 3 limits each.

acquire+commit on a random tenant per call against the same calls on one
tenant, in three ways side by side in one run: the default (the tenants ready
in one loop turn share script calls, each call serving up to
`slowburn_redis.batching.MAX_TENANTS` of them); one call per tenant in one
pipeline (``Engine.tenants_per_call = 1``, as on a Redis Cluster); and one
round trip per call (``Engine.pipeline_size = 1`` as well, as before issue
16). Redis's own time per request (INFO commandstats) for the whole load
and, from one process, per script.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import redis

from bench.helpers import (
    Settings,
    closed_loop,
    load_dict,
    median,
    merge_loads,
    ratio,
    script_server_time,
    used_memory,
)

LIMITS = ["usd 50/day", "tokens 2000000/hour", "requests 600/min"]
ONE_TENANT = "tn-one"  # the same three limits, never reached: the single-tenant baseline
ONE_TENANT_LIMITS = ["usd 1000000/day", "tokens 1000000000000/hour", "requests 1000000000/min"]


def tenant_name(i: int) -> str:
    return f"tn{i:05d}"


async def setup_job(*, index: int, url: str, first: int, count: int, tasks: int, prime: bool) -> None:
    """Set the limits of tenants [first, first+count) and, with `prime`, admit and commit one call on each."""
    from slowburn_redis import Budget

    budget = Budget.from_url(url, prefix="bench")
    names = [tenant_name(i) for i in range(first, first + count)]

    async def worker(chunk: list[str]) -> None:
        for name in chunk:
            if prime:
                r = await budget.acquire(name, usd=0.01, tokens=500, mode="reject")
                await r.commit(usd=0.008, tokens=400)
            else:
                await budget.set_limits(name, LIMITS)

    try:
        await asyncio.gather(*(worker(names[i::tasks]) for i in range(tasks)))
    finally:
        await budget.aclose()


KINDS: dict[str, tuple[int, bool, bool]] = {
    "one_tenant": (1, True, True),
    "all_tenants": (0, True, True),
    "all_tenants_call_per_tenant": (0, True, False),
    "all_tenants_unpipelined": (0, False, False),
}
"""Each load: (tenants, 0 for all of them; cross-tenant pipelining on; tenants sharing script calls).

One tenant needs no other runs: a slot's batches never share a pipeline or a
call with another batch of its tenant (`slowburn_redis.batching`), so its
calls go out the same either way."""
SPLIT_KINDS = ("one_tenant", "all_tenants", "all_tenants_call_per_tenant")
"""The loads measured per script."""


def configure(budget: Any, pipelined: bool, shared: bool) -> None:
    """Turn cross-tenant pipelining and calls shared by tenants off as `pipelined` and `shared` say."""
    if not pipelined:
        budget.engine.pipeline_size = 1
    if not shared:
        budget.engine.tenants_per_call = 1


async def load_job(
    *,
    index: int,
    url: str,
    tenants: int,
    tasks: int,
    start_at: float,
    duration: float,
    pipelined: bool = True,
    shared: bool = True,
) -> dict[str, Any]:
    """acquire+commit on a random tenant among the first `tenants` each call (1: always the same one)."""
    from slowburn_redis import Budget

    budget = Budget.from_url(url, prefix="bench")
    configure(budget, pipelined, shared)
    rng = random.Random(index)

    def pick() -> str:
        return ONE_TENANT if tenants == 1 else tenant_name(rng.randrange(tenants))

    async def op(_: int) -> None:
        r = await budget.acquire(pick(), usd=0.0001, tokens=10, mode="reject")
        await r.commit(usd=0.0001, tokens=8)

    try:
        return load_dict(await closed_loop(op, tasks=tasks, start_at=start_at, duration=duration))
    finally:
        await budget.aclose()


async def split_job(
    *, index: int, url: str, tenants: int, tasks: int, duration: float, pipelined: bool = True, shared: bool = True
) -> dict[str, Any]:
    """Redis's time per request of each script: acquires for `duration`, then their commits (run alone)."""
    from slowburn_redis import Budget

    budget = Budget.from_url(url, prefix="bench")
    configure(budget, pipelined, shared)
    info = redis.Redis.from_url(url)
    rng = random.Random(1000 + index)
    held: list[Any] = []

    def pick() -> str:
        return ONE_TENANT if tenants == 1 else tenant_name(rng.randrange(tenants))

    async def acquire(_: int) -> None:
        held.append(await budget.acquire(pick(), usd=0.0001, tokens=10, mode="reject"))

    try:
        await acquire(0)  # scripts loaded, connections open
        await held.pop().commit(usd=0.0001, tokens=8)
        calls0, usec0 = script_server_time(info)
        await closed_loop(acquire, tasks=tasks, start_at=0.0, duration=duration, warmup=0)
        calls1, usec1 = script_server_time(info)
        acquired = list(held)

        async def commit(i: int) -> None:
            for r in acquired[i::tasks]:
                await r.commit(usd=0.0001, tokens=8)

        await asyncio.gather(*(commit(i) for i in range(tasks)))
        calls2, usec2 = script_server_time(info)
        return {
            "acquire_us_per_request": ratio(usec1 - usec0, len(acquired)),
            "acquire_requests_per_call": ratio(len(acquired), calls1 - calls0),
            "commit_us_per_request": ratio(usec2 - usec1, len(acquired)),
            "commit_requests_per_call": ratio(len(acquired), calls2 - calls1),
        }
    finally:
        info.close()
        await budget.aclose()


def run(settings: Settings) -> dict[str, Any]:
    count = 2_000 if settings.quick else 10_000
    client = redis.Redis.from_url(settings.url)
    share = count // settings.processes
    mem0 = used_memory(client)
    for prime in (False, True):  # limits for every tenant, then one admitted and committed call on each
        settings.fleet.run(
            "bench.tenants:setup_job_fleet",
            url=settings.url,
            share=share,
            tasks=settings.tasks,
            prime=prime,
            timeout=300,
        )
        if not prime:
            mem_limits = used_memory(client)
    mem1 = used_memory(client)
    settings.fleet.run(
        "bench.peers:set_slowburn_limits", n=1, url=settings.url, tenants=[ONE_TENANT], limits=ONE_TENANT_LIMITS
    )
    # one SCAN pass over tenants tn00000..tn00009: bytes of each of their keys, by kind
    by_tenant: dict[str, dict[str, int]] = {}
    for raw in client.scan_iter(match="bench:{tn0000?}:*", count=5000):
        key = raw.decode()
        tenant, _, rest = key.partition("}:")
        by_tenant.setdefault(tenant, {})[rest] = int(client.memory_usage(key, samples=0) or 0)
    breakdown: dict[str, list[int]] = {}
    window_bytes = []
    for keys in by_tenant.values():
        window_bytes.append(sum(v for k, v in keys.items() if k.startswith("w:")))
        for k, v in keys.items():
            breakdown.setdefault(k.split(":", 1)[0], []).append(v)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        "1p": {kind: [] for kind in KINDS},
        "fleet": {kind: [] for kind in KINDS},
    }
    split: dict[str, list[dict[str, Any]]] = {kind: [] for kind in SPLIT_KINDS}
    for _ in range(settings.reps):
        for label, n in (("1p", 1), ("fleet", settings.processes)):
            for kind, (tenants, pipelined, shared) in KINDS.items():
                calls0, usec0 = script_server_time(client)
                results = settings.fleet.run(
                    "bench.tenants:load_job",
                    n=n,
                    url=settings.url,
                    tenants=tenants or count,
                    tasks=settings.tasks,
                    start_at=settings.start_at(1.0),
                    duration=settings.duration,
                    pipelined=pipelined,
                    shared=shared,
                )
                calls1, usec1 = script_server_time(client)
                merged = merge_loads(results)
                merged["server_us_per_request"] = ratio(usec1 - usec0, 2 * merged["ops"])
                merged["requests_per_script"] = ratio(2 * merged["ops"], calls1 - calls0)
                runs[label][kind].append(merged)
        for kind in SPLIT_KINDS:
            tenants, pipelined, shared = KINDS[kind]
            (result,) = settings.fleet.run(
                "bench.tenants:split_job",
                n=1,
                url=settings.url,
                tenants=tenants or count,
                tasks=settings.tasks,
                duration=min(1.0, settings.duration / 2),
                pipelined=pipelined,
                shared=shared,
            )
            split[kind].append(result)
    client.close()
    summary: dict[str, Any] = {}
    for label, kinds in runs.items():
        figures = {kind: median(r["per_s"] for r in kinds[kind]) for kind in KINDS}
        summary[label] = {
            "one_tenant_per_s": figures["one_tenant"],
            "all_tenants_per_s": figures["all_tenants"],
            "all_over_one": ratio(figures["all_tenants"], figures["one_tenant"]),
            "all_tenants_p99_ms": median(r["p99_ms"] for r in kinds["all_tenants"]),
            "all_tenants_call_per_tenant_per_s": figures["all_tenants_call_per_tenant"],
            "all_over_one_call_per_tenant": ratio(figures["all_tenants_call_per_tenant"], figures["one_tenant"]),
            "all_tenants_call_per_tenant_p99_ms": median(r["p99_ms"] for r in kinds["all_tenants_call_per_tenant"]),
            "all_tenants_unpipelined_per_s": figures["all_tenants_unpipelined"],
            "all_over_one_unpipelined": ratio(figures["all_tenants_unpipelined"], figures["one_tenant"]),
            "all_tenants_unpipelined_p99_ms": median(r["p99_ms"] for r in kinds["all_tenants_unpipelined"]),
            "server_us_per_request": {kind: median(r["server_us_per_request"] for r in kinds[kind]) for kind in KINDS},
            "requests_per_script": {kind: median(r["requests_per_script"] for r in kinds[kind]) for kind in KINDS},
        }
    summary["per_script_1p"] = {
        kind: {field: median(r[field] for r in results) for field in results[0]} for kind, results in split.items()
    }
    return {
        "tenants": count,
        "limits": LIMITS,
        "limits_config_bytes_per_tenant": (mem_limits - mem0) / count,
        "used_memory_per_tenant_after_one_call": (mem1 - mem0) / count,
        "window_bytes_per_tenant_median": median(window_bytes),
        "window_bytes_per_limit_median": median(window_bytes) / len(LIMITS),
        "key_bytes_median_by_kind": {kind: median(v) for kind, v in sorted(breakdown.items())},
        "summary": summary,
        "goals": {
            "random_tenant_at_least_0.8x_one_tenant": min(
                summary["1p"]["all_over_one"], summary["fleet"]["all_over_one"]
            )
            >= 0.8
        },
        "runs": runs,
        "per_script_runs": split,
    }


async def setup_job_fleet(*, index: int, url: str, share: int, tasks: int, prime: bool) -> None:
    await setup_job(index=index, url=url, first=index * share, count=share, tasks=tasks, prime=prime)
