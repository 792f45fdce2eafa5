"""How late past its deadline a call ends when Redis misbehaves: ``python -m bench.deadlines``.

Puts the suite's fault proxy (tests/faultproxy.py) between a Budget and a
private redis-server, provokes each fault, and measures on the event-loop
clock how long after its deadline each call ended (negative: before), and
with which error. Prints one row per fault with p50, p99 and max lateness in
milliseconds, and the ratio of p99 to the 0.25 s the design aims for. Not
part of ``python -m bench``.

Options: ``--samples N`` per row (default 10; p99 of few samples is their
max), ``--waiters N`` for the many-waiters row (default 2000), ``--burn N``
CPU-burning processes beside it (default 0), ``--quick`` (3 samples, 200
waiters, no 8 s row).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from slowburn_redis import Budget
from slowburn_redis.redis_server import RedisServer
from slowburn_redis.resilience import FINAL_ATTEMPT
from tests.faultproxy import FaultProxy

TENANT = "acme"
TARGET = 0.25
"""Seconds past the deadline the design aims for."""


@dataclass
class Row:
    fault: str
    late: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def rank(self, p: float) -> float:
        ordered = sorted(self.late)
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


async def measure(row: Row, call: Awaitable[Any], deadline: float) -> None:
    loop = asyncio.get_running_loop()
    if len(row.late) == 0:
        print(f"  {row.fault} ...", file=sys.stderr, flush=True)
    try:
        await call
        row.errors["returned"] += 1
    except Exception as exc:
        row.errors[type(exc).__name__] += 1
    row.late.append(loop.time() - deadline)


class Bench:
    def __init__(self, server: RedisServer, proxy: FaultProxy) -> None:
        self.server, self.proxy = server, proxy

    async def fresh(self, limit: str = "usd 1/hour", **options: Any) -> tuple[Budget, Budget]:
        """A prefix of its own: (direct Budget, Budget through the proxy), limits set."""
        prefix = "d" + secrets.token_hex(4)
        direct = Budget.from_url(self.server.url, prefix=prefix)
        await direct.set_limits(TENANT, [limit])
        budget = Budget.from_url(self.proxy.url, prefix=prefix, **options)
        await (await budget.acquire(TENANT, usd=0.001)).release()  # connected, scripts loaded
        return direct, budget

    async def close(self, *budgets: Budget) -> None:
        self.proxy.passthrough()
        for budget in budgets:
            await asyncio.wait_for(budget.aclose(), 30)

    async def acquire_row(self, fault: str, samples: int, timeout: float, start: Callable[[], None]) -> Row:
        row = Row(fault)
        loop = asyncio.get_running_loop()
        for _ in range(samples):
            direct, budget = await self.fresh()
            start()
            deadline = loop.time() + timeout
            await measure(row, budget.acquire(TENANT, usd=0.1, timeout=timeout), deadline)
            await self.close(budget, direct)
        return row

    async def waiter_row(self, samples: int) -> Row:
        row = Row("waiter during blackhole, timeout=1")
        loop = asyncio.get_running_loop()
        for _ in range(samples):
            direct, budget = await self.fresh()
            held = await budget.acquire(TENANT, usd=1.0)
            deadline = loop.time() + 1.0
            PAUSED.clear()
            task = asyncio.ensure_future(budget.acquire(TENANT, usd=0.5, timeout=1.0))
            await until(1, deadline)
            self.proxy.blackhole()
            await measure(row, task, deadline)
            self.proxy.passthrough()
            await held.release()
            await self.close(budget, direct)
        return row

    async def many_waiters_row(self, count: int) -> Row:
        row = Row(f"{count} waiters in one process, blackhole, timeout=10")
        loop = asyncio.get_running_loop()
        direct, budget = await self.fresh(heartbeat=60)
        held = await budget.acquire(TENANT, usd=1.0)
        deadline = loop.time() + 10.0
        PAUSED.clear()
        tasks = [asyncio.ensure_future(budget.acquire(TENANT, usd=0.5, timeout=10.0)) for _ in range(count)]
        await until(count, deadline - 2)
        self.proxy.blackhole()
        for task in tasks:
            await measure(row, task, deadline)
        self.proxy.passthrough()
        await held.release()
        await self.close(budget, direct)
        return row

    async def settle_row(self, kind: str, samples: int) -> Row:
        row = Row(f"{kind} on blackhole, retry_timeout=1")
        loop = asyncio.get_running_loop()
        for _ in range(samples):
            direct, budget = await self.fresh(retry_timeout=1.0)
            r = await budget.acquire(TENANT, usd=0.1)
            self.proxy.blackhole()
            deadline = loop.time() + 1.0
            if kind == "commit":
                await measure(row, r.commit(usd=0.05), deadline)
            elif kind == "release":
                await measure(row, r.release(), deadline)
            else:
                await measure(row, budget.status(TENANT), deadline)
            await self.close(budget, direct)
        return row


PAUSED = Counter[str]()
"""How many acquires logged "budget.paused" (logged once subscribed, so asleep as a waiter)."""


def record(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") == "budget.paused":
        PAUSED["paused"] += 1
    raise structlog.DropEvent


async def until(waiters: int, give_up: float) -> None:
    """Until `waiters` more acquires sleep as waiters (subscribed), or the loop time `give_up`."""
    loop = asyncio.get_running_loop()
    for _ in range(1_000_000):
        if PAUSED["paused"] >= waiters or loop.time() > give_up:
            return
        await asyncio.sleep(0.01)


def burn() -> None:
    while True:
        pass


async def run(args: argparse.Namespace) -> list[Row]:
    with RedisServer(None, "--maxclients", "10000") as server, FaultProxy(server.port) as proxy:
        bench = Bench(server, proxy)
        n = args.samples
        rows = [
            await bench.acquire_row("blackhole, acquire timeout=2", n, 2.0, proxy.blackhole),
            await bench.acquire_row("blackhole, acquire timeout=0.5", n, 0.5, proxy.blackhole),
            await bench.acquire_row("blackhole, acquire timeout=0", n, 0.0, proxy.blackhole),
        ]
        if not args.quick:
            rows.append(await bench.acquire_row("blackhole, acquire timeout=8", max(2, n // 4), 8.0, proxy.blackhole))
        rows += [
            await bench.waiter_row(n),
            await bench.many_waiters_row(args.waiters),
            await bench.settle_row("commit", n),
            await bench.settle_row("release", n),
            await bench.settle_row("status", n),
            await bench.acquire_row("cut every reply, acquire timeout=1", n, 1.0, proxy.cut),
            await bench.acquire_row("reset (RST), acquire timeout=1", n, 1.0, proxy.reset),
            await bench.acquire_row("delay 700 ms, acquire timeout=0.5", n, 0.5, lambda: proxy.delay(700)),
        ]
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.deadlines", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--waiters", type=int, default=2000)
    parser.add_argument("--burn", type=int, default=0, help="CPU-burning processes beside the bench")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.waiters = min(args.samples, 3), min(args.waiters, 200)
    structlog.configure(processors=[record])
    burners = [mp.Process(target=burn, daemon=True) for _ in range(args.burn)]
    for p in burners:
        p.start()
    started = time.monotonic()
    try:
        rows = asyncio.run(run(args))
    finally:
        for p in burners:
            p.terminate()
            p.join(5)
    print(f"\n# How late past the deadline (ms); FINAL_ATTEMPT = {FINAL_ATTEMPT * 1000:.0f} ms, {args.burn} burners\n")
    print("| fault | n | p50 | p99 | max | p99 / 250 ms | ended with |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        p50, p99, top = row.rank(0.5), row.rank(0.99), max(row.late)
        errors = ", ".join(f"{name} x{count}" for name, count in row.errors.most_common())
        print(
            f"| {row.fault} | {len(row.late)} | {p50 * 1000:.0f} | {p99 * 1000:.0f} | {top * 1000:.0f} "
            f"| {p99 / TARGET:.2f} | {errors} |"
        )
    worst = max(row.rank(0.99) for row in rows)
    print(f"\nworst p99 past the deadline: {worst * 1000:.0f} ms = {worst / TARGET:.2f} x the 250 ms aim")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
