"""Section 2, peers on the same Redis: throughput of one admission, and accuracy under concurrency.

Every limiter sits behind the same small adapter: ``await admit(key, cost) -> bool`` (never waits).
"""

from __future__ import annotations

import random
import time
from datetime import timedelta
from typing import Any, Protocol

from bench.helpers import Settings, closed_loop, load_dict, median, merge_loads, ratio, sleep_until
from slowburn_redis.connection import MAX_CONNECTIONS

# name -> (algorithm, takes weighted costs)
PEERS: dict[str, tuple[str, bool]] = {
    "slowburn": ("sliding window, 60 buckets + running total; acquire+commit", True),
    "slowburn-acquire": ("same, acquire alone (the admission)", True),
    "slowburn-b16": ("same, acquire+commit with batch_size=16", True),
    "limits-moving-window": ("sliding log (Redis list)", True),
    "limits-sliding-window-counter": ("two fixed windows, weighted", True),
    "pyrate-limiter-redis": ("sliding log (Redis sorted set)", True),
    "throttled-py-sliding-window": ("two fixed windows, weighted", True),
}
SLOWBURN_THROUGHPUT_LIMITS = [
    "usd 1000000/day",
    "tokens 1000000000000/hour",
    "requests 1000000000/min",
    "concurrency 100000",
]
ACCURACY_AMOUNT, ACCURACY_WINDOW = 100, 10  # 100 units per 10 s
THROUGHPUT_AMOUNT, THROUGHPUT_WINDOW = 1_000_000, 60


class Admitter(Protocol):
    async def admit(self, key: str, cost: int) -> bool: ...

    async def close(self) -> None: ...


class SlowburnAdmitter:
    def __init__(self, url: str, *, commit: bool, batch_size: int | None = None) -> None:
        from slowburn_redis import Budget
        from slowburn_redis.batching import MAX_BATCH

        self.budget = Budget.from_url(url, prefix="bench", batch_size=batch_size or MAX_BATCH)
        self.commit = commit

    async def admit(self, key: str, cost: int) -> bool:
        from slowburn_redis import BudgetExhausted

        try:
            r = await self.budget.acquire(key, usd=0.001, tokens=cost, mode="reject")
        except BudgetExhausted:
            return False
        if self.commit:
            await r.commit(usd=0.001, tokens=cost)
        return True

    async def close(self) -> None:
        await self.budget.aclose()


class LimitsAdmitter:
    def __init__(self, url: str, strategy: str, amount: int, window: int) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

        self.storage = RedisStorage("async+" + url, implementation="redispy")
        cls = MovingWindowRateLimiter if strategy == "moving" else SlidingWindowCounterRateLimiter
        self.limiter = cls(self.storage)
        self.item = RateLimitItemPerSecond(amount, window)

    async def admit(self, key: str, cost: int) -> bool:
        return bool(await self.limiter.hit(self.item, key, cost=cost))

    async def close(self) -> None:
        pass


class PyrateAdmitter:
    def __init__(self, url: str, amount: int, window: int) -> None:
        import redis.asyncio as aioredis
        from pyrate_limiter import Rate

        self.client = aioredis.Redis.from_url(url)
        self.rates = [Rate(amount, window * 1000)]
        self.limiters: dict[str, Any] = {}

    async def limiter(self, key: str) -> Any:
        from pyrate_limiter import Limiter, RedisBucket

        if key not in self.limiters:
            bucket = await RedisBucket.init(self.rates, self.client, "pyrate:" + key)
            self.limiters[key] = Limiter(bucket)
        return self.limiters[key]

    async def admit(self, key: str, cost: int) -> bool:
        limiter = await self.limiter(key)
        return bool(await limiter.try_acquire_async(key, weight=cost, blocking=False))

    async def wait(self, key: str, cost: int, limit_s: float) -> bool:
        limiter = await self.limiter(key)
        return bool(await limiter.try_acquire_async(key, weight=cost, blocking=True, timeout=limit_s))

    async def close(self) -> None:
        for limiter in self.limiters.values():
            limiter.close()
        await self.client.aclose()


class ThrottledAdmitter:
    def __init__(self, url: str, amount: int, window: int) -> None:
        from throttled.asyncio import RedisStore, Throttled, per_duration

        self.throttle = Throttled(
            using="sliding_window",
            quota=per_duration(timedelta(seconds=window), limit=amount),
            # Its default pool refuses a call past 100 connections ("Too many
            # connections"); give it the same connection budget as slowburn's.
            store=RedisStore(
                server=url,
                options={
                    "CONNECTION_POOL_CLASS": "redis.asyncio.BlockingConnectionPool",
                    "CONNECTION_POOL_KWARGS": {"max_connections": MAX_CONNECTIONS},
                },
            ),
        )

    async def admit(self, key: str, cost: int) -> bool:
        result = await self.throttle.limit(key, cost=cost, timeout=-1)
        return not result.limited

    async def wait(self, key: str, cost: int, limit_s: float) -> bool:
        result = await self.throttle.limit(key, cost=cost, timeout=limit_s)
        return not result.limited

    async def close(self) -> None:
        pass


def make_admitter(name: str, url: str, amount: int, window: int) -> Admitter:
    if name == "slowburn":
        return SlowburnAdmitter(url, commit=True)
    if name == "slowburn-acquire":
        return SlowburnAdmitter(url, commit=False)
    if name == "slowburn-b16":
        return SlowburnAdmitter(url, commit=True, batch_size=16)
    if name == "limits-moving-window":
        return LimitsAdmitter(url, "moving", amount, window)
    if name == "limits-sliding-window-counter":
        return LimitsAdmitter(url, "counter", amount, window)
    if name == "pyrate-limiter-redis":
        return PyrateAdmitter(url, amount, window)
    if name == "throttled-py-sliding-window":
        return ThrottledAdmitter(url, amount, window)
    raise KeyError(name)


# --- jobs run in the fleet ------------------------------------------------------------------------


async def set_slowburn_limits(*, index: int, url: str, tenants: list[str], limits: list[str]) -> None:
    from slowburn_redis import Budget

    async with Budget.from_url(url, prefix="bench") as budget:
        for tenant in tenants:
            await budget.set_limits(tenant, limits)


async def throughput_job(
    *, index: int, url: str, peer: str, key: str, tasks: int, start_at: float, duration: float
) -> dict[str, Any]:
    admitter = make_admitter(peer, url, THROUGHPUT_AMOUNT, THROUGHPUT_WINDOW)
    denied = 0

    async def op(_: int) -> None:
        nonlocal denied
        if not await admitter.admit(key, 1):
            denied += 1

    try:
        out = load_dict(await closed_loop(op, tasks=tasks, start_at=start_at, duration=duration))
    finally:
        await admitter.close()
    out["denied"] = denied
    return out


async def accuracy_job(
    *, index: int, url: str, keys: dict[str, str], tasks: int, start_at: float, duration: float, seed: int
) -> dict[str, Any]:
    """Every task hammers every limiter in turn with random costs 1..5; returns units admitted per limiter."""
    import asyncio

    admitters = {name: make_admitter(name, url, ACCURACY_AMOUNT, ACCURACY_WINDOW) for name in keys}
    admitted = dict.fromkeys(keys, 0)
    attempts = dict.fromkeys(keys, 0)
    errors: dict[str, str] = {}
    names = list(keys)
    # warm each limiter on a throwaway key (connections, script loads)
    for name, admitter in admitters.items():
        await admitter.admit(keys[name] + "-warm", 1)
    await sleep_until(start_at)
    stop = time.perf_counter() + duration

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + index * 100 + i)
        turn = i
        while time.perf_counter() < stop:
            name = names[turn % len(names)]
            turn += 1
            cost = rng.randint(1, 5) if PEERS[name][1] else 1
            try:
                ok = await admitters[name].admit(keys[name], cost)
            except Exception as exc:
                errors.setdefault(name, f"{type(exc).__name__}: {exc}")
                continue
            attempts[name] += 1
            if ok:
                admitted[name] += cost

    await asyncio.gather(*(worker(i) for i in range(tasks)))
    for admitter in admitters.values():
        await admitter.close()
    return {"admitted": admitted, "attempts": attempts, "errors": errors}


# --- the section ----------------------------------------------------------------------------------


def run(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "peers": {name: {"algorithm": algo, "weighted": weighted} for name, (algo, weighted) in PEERS.items()},
        "versions": versions(),
    }
    out["throughput"] = throughput(settings)
    out["accuracy"] = accuracy(settings)
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("slowburn-redis", "limits", "pyrate-limiter", "throttled-py", "redis")}


def throughput(settings: Settings) -> dict[str, Any]:
    """One process, `tasks` concurrent tasks, one admission (cost 1) per call; peers check one limit."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in PEERS}
    for rep in range(settings.reps):
        for name in PEERS:
            key = f"tp-{name}-{rep}"
            if name.startswith("slowburn"):
                settings.fleet.run(
                    "bench.peers:set_slowburn_limits",
                    n=1,
                    url=settings.url,
                    tenants=[key],
                    limits=SLOWBURN_THROUGHPUT_LIMITS,
                )
            results = settings.fleet.run(
                "bench.peers:throughput_job",
                n=1,
                url=settings.url,
                peer=name,
                key=key,
                tasks=settings.tasks,
                start_at=settings.start_at(1.0),
                duration=settings.duration,
            )
            merged = merge_loads(results)
            merged["denied"] = sum(r["denied"] for r in results)
            runs[name].append(merged)
    summary: dict[str, Any] = {}
    for name, reps in runs.items():
        summary[name] = {
            "per_s": median(r["per_s"] for r in reps),
            "p50_ms": median(r["p50_ms"] for r in reps),
            "p99_ms": median(r["p99_ms"] for r in reps),
            "errors": sum(r["errors"] for r in reps),
            "denied": sum(r["denied"] for r in reps),
        }
    peers_only = {n: s["per_s"] for n, s in summary.items() if not n.startswith("slowburn")}
    fastest = max(peers_only, key=lambda n: peers_only[n])
    for s in summary.values():
        s["x_fastest_peer"] = ratio(s["per_s"], peers_only[fastest])
    return {
        "tasks": settings.tasks,
        "slowburn_limits": SLOWBURN_THROUGHPUT_LIMITS,
        "peer_limit": f"{THROUGHPUT_AMOUNT} per {THROUGHPUT_WINDOW}s",
        "fastest_peer": fastest,
        "summary": summary,
        "runs": runs,
        "goal_slowburn_acquire_within_1.5x_of_fastest_peer": summary["slowburn-acquire"]["per_s"] * 1.5
        >= peers_only[fastest],
        "goal_slowburn_acquire_commit_within_1.5x_of_fastest_peer": summary["slowburn"]["per_s"] * 1.5
        >= peers_only[fastest],
        "slowburn_b16_acquire_commit_within_1.5x_of_fastest_peer": summary["slowburn-b16"]["per_s"] * 1.5
        >= peers_only[fastest],
    }


def accuracy(settings: Settings) -> dict[str, Any]:
    """4 processes x 16 tasks against 100 units per 10 s, every limiter in the same run.

    Each run lasts 3 s and straddles a multiple of 10 s of the Unix clock (the boundary of the
    fixed windows the counter algorithms use), so it sees their worst case as well as races.
    """
    names = [n for n in PEERS if n not in ("slowburn-acquire", "slowburn-b16")]
    runs: list[dict[str, Any]] = []
    span = 3.0
    for rep in range(settings.reps):
        keys = {name: f"acc-{name}-{rep}-{int(time.time())}" for name in names}
        settings.fleet.run(
            "bench.peers:set_slowburn_limits",
            n=1,
            url=settings.url,
            tenants=[keys["slowburn"], keys["slowburn"] + "-warm"],
            limits=[f"tokens {ACCURACY_AMOUNT}/{ACCURACY_WINDOW}s"],
        )
        boundary = (time.time() // ACCURACY_WINDOW + 1) * ACCURACY_WINDOW
        start = boundary - span / 2
        if start < time.time() + 1.5:
            start += ACCURACY_WINDOW
        results = settings.fleet.run(
            "bench.peers:accuracy_job",
            url=settings.url,
            keys=keys,
            tasks=settings.tasks,
            start_at=start,
            duration=span,
            seed=rep,
            timeout=60,
        )
        admitted = {name: sum(r["admitted"][name] for r in results) for name in names}
        attempts = {name: sum(r["attempts"][name] for r in results) for name in names}
        errors = {name: e for r in results for name, e in r["errors"].items()}
        runs.append({"admitted": admitted, "attempts": attempts, "errors": errors})
    summary = {
        name: {
            "admitted_over_limit_median": median(r["admitted"][name] / ACCURACY_AMOUNT for r in runs),
            "admitted_over_limit_max": max(r["admitted"][name] / ACCURACY_AMOUNT for r in runs),
            "attempts_median": median(r["attempts"][name] for r in runs),
        }
        for name in names
    }
    return {
        "limit": f"{ACCURACY_AMOUNT} units per {ACCURACY_WINDOW}s",
        "costs": "uniform random 1..5 per attempt",
        "processes": settings.processes,
        "tasks_per_process": settings.tasks,
        "span_s": span,
        "summary": summary,
        "runs": runs,
        "goal_slowburn_exactly_1.00_never_above": all(r["admitted"]["slowburn"] == ACCURACY_AMOUNT for r in runs),
    }
