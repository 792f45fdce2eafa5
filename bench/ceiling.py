"""Section 1, the ceiling: slowburn acquire+commit against one trivial EVALSHA, same client, same concurrency.

slowburn sends the requests of one tenant that are ready together as one
script call (`slowburn_redis.batching`). The goal is stated against the trivial
script sent one call per request, as a plain client does; the same trivial
script sent through slowburn's batcher is reported beside it, as the ceiling
for batched traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.helpers import Settings, closed_loop, load_dict, median, merge_loads, ratio, script_server_time
from slowburn_redis.batching import MAX_BATCH

TRIVIAL_LUA = "return redis.call('HINCRBY', KEYS[1], 'n', 1)"
TRIVIAL_BATCHED_LUA = (
    "local out = {} for i = 1, #ARGV do out[i] = redis.call('HINCRBY', KEYS[1], 'n', 1) end return out"
)
LIMITS = ["usd 1000000/day", "tokens 1000000000000/hour", "requests 1000000000/min", "concurrency 100000"]
ALT_BATCH = 16
"""The other batch size measured beside the default (`slowburn_redis.batching.MAX_BATCH`)."""
KINDS = ("trivial", "trivial_batched", "acquire_commit", "acquire", "acquire_commit_alt")
REQUESTS_PER_OP = {"trivial": 1, "trivial_batched": 1, "acquire_commit": 2, "acquire": 1, "acquire_commit_alt": 2}


class _TrivialRequest:
    """The trivial script as the batcher sees one: each request is one argument."""

    name = "trivial"

    def request(self, args: Any) -> list[Any]:
        return list(args)


async def load_job(
    *, index: int, url: str, kind: str, tenant: str, tasks: int, start_at: float, duration: float
) -> dict[str, Any]:
    """One process's closed loop of `kind` against `tenant` (a job run by the fleet)."""
    from slowburn_redis import Budget

    if kind == "trivial_batched":
        from slowburn_redis.batching import Batcher

        client = aioredis.Redis.from_url(url, decode_responses=True)
        sha = await client.script_load(TRIVIAL_BATCHED_LUA)
        key = f"trivial:{{{tenant}}}"

        async def send(_: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
            return await client.evalsha(sha, len(keys), *keys, *args)

        batcher = Batcher(send)
        script: Any = _TrivialRequest()

        async def trivial_batched(_: int) -> None:
            await batcher.call(script, key, ["1"])

        try:
            return load_dict(await closed_loop(trivial_batched, tasks=tasks, start_at=start_at, duration=duration))
        finally:
            await client.aclose()

    if kind == "trivial":
        client = aioredis.Redis.from_url(url, decode_responses=True)
        sha = await client.script_load(TRIVIAL_LUA)
        key = f"trivial:{{{tenant}}}"

        async def trivial(_: int) -> None:
            await client.evalsha(sha, 1, key)

        try:
            return load_dict(await closed_loop(trivial, tasks=tasks, start_at=start_at, duration=duration))
        finally:
            await client.aclose()

    budget = Budget.from_url(url, prefix="bench", batch_size=ALT_BATCH if kind == "acquire_commit_alt" else MAX_BATCH)
    agent = f"w{index}"

    async def acquire_commit(_: int) -> None:
        r = await budget.acquire(tenant, agent, usd=0.001, tokens=1000, mode="reject")
        await r.commit(usd=0.0008, tokens=800)

    async def acquire(_: int) -> None:
        await budget.acquire(tenant, agent, usd=0.001, tokens=1000, mode="reject")

    try:
        op = acquire if kind == "acquire" else acquire_commit
        return load_dict(await closed_loop(op, tasks=tasks, start_at=start_at, duration=duration))
    finally:
        await budget.aclose()


async def setup_tenant(*, index: int, url: str, tenant: str) -> None:
    from slowburn_redis import Budget

    async with Budget.from_url(url, prefix="bench") as budget:
        await budget.set_limits(tenant, LIMITS)


def run(settings: Settings) -> dict[str, Any]:
    """Medians over `reps` interleaved repetitions of every kind, from 1 process and from the whole fleet."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"1p": {k: [] for k in KINDS}, "fleet": {k: [] for k in KINDS}}
    client = redis.Redis.from_url(settings.url)
    for rep in range(settings.reps):
        for procs_label, n in (("1p", 1), ("fleet", settings.processes)):
            for kind in KINDS:
                tenant = f"ceil-{procs_label}-{kind}-{rep}"
                settings.fleet.run("bench.ceiling:setup_tenant", n=1, url=settings.url, tenant=tenant)
                calls0, usec0 = script_server_time(client)
                results = settings.fleet.run(
                    "bench.ceiling:load_job",
                    n=n,
                    url=settings.url,
                    kind=kind,
                    tenant=tenant,
                    tasks=settings.tasks,
                    start_at=settings.start_at(1.0),
                    duration=settings.duration,
                )
                calls1, usec1 = script_server_time(client)
                merged = merge_loads(results)
                merged["server_us_per_script"] = ratio(usec1 - usec0, calls1 - calls0)
                requests = merged["ops"] * REQUESTS_PER_OP[kind]
                merged["server_us_per_request"] = ratio(usec1 - usec0, requests)
                merged["requests_per_script"] = ratio(requests, calls1 - calls0)
                runs[procs_label][kind].append(merged)
    out: dict[str, Any] = {
        "batch_size": MAX_BATCH,
        "alt_batch_size": ALT_BATCH,
        "limits": LIMITS,
        "tasks_per_process": settings.tasks,
        "runs": runs,
        "summary": {},
    }
    for procs_label in runs:
        summary: dict[str, Any] = {}
        for kind in KINDS:
            reps = runs[procs_label][kind]
            summary[kind] = {
                "per_s": median(r["per_s"] for r in reps),
                "p50_ms": median(r["p50_ms"] for r in reps),
                "p99_ms": median(r["p99_ms"] for r in reps),
                "errors": sum(r["errors"] for r in reps),
                "server_us_per_script": median(r["server_us_per_script"] for r in reps),
                "server_us_per_request": median(r["server_us_per_request"] for r in reps),
                "requests_per_script": median(r["requests_per_script"] for r in reps),
            }
        trivial = summary["trivial"]
        for kind in ("acquire_commit", "acquire", "acquire_commit_alt"):
            s = summary[kind]
            # cost as a multiple of one trivial round trip: by throughput and by latency, per repetition
            pairs = zip(runs[procs_label]["trivial"], runs[procs_label][kind], strict=True)
            per_rep = [ratio(t["per_s"], k["per_s"]) for t, k in pairs]
            s["cost_x_trivial"] = median(per_rep)
            s["p50_x_trivial"] = ratio(s["p50_ms"], trivial["p50_ms"])
            s["p99_x_trivial"] = ratio(s["p99_ms"], trivial["p99_ms"])
            s["throughput_share_of_trivial"] = ratio(s["per_s"], trivial["per_s"])
            batched = zip(runs[procs_label]["trivial_batched"], runs[procs_label][kind], strict=True)
            s["cost_x_trivial_batched"] = median(ratio(t["per_s"], k["per_s"]) for t, k in batched)
        out["summary"][procs_label] = summary
    client.close()
    ac1, acf = out["summary"]["1p"]["acquire_commit"], out["summary"]["fleet"]["acquire_commit"]
    out["goals"] = {
        "acquire_commit_at_most_2.5x_trivial": ac1["cost_x_trivial"] <= 2.5,
        "fleet_at_least_40pct_of_trivial": acf["throughput_share_of_trivial"] >= 0.40,
    }
    return out
