"""One worker process of the fleet test: tasks acquire, "call", and commit less than estimated.

Run as ``python -m tests.fleet_worker URL PREFIX TENANT SECONDS TASKS SEED``; prints
one JSON line per admission: server admission time (ms) and committed units.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

from slowburn_redis import Budget, BudgetTimeout, RedisUnavailable
from slowburn_redis.limits import to_units


async def main(url: str, prefix: str, tenant: str, seconds: float, tasks: int, seed: int) -> None:
    budget = Budget.from_url(url, prefix=prefix)
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + seconds
    records: list[dict[str, int]] = []

    async def work(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while loop.time() < stop_at:
            estimate = round(rng.uniform(0.01, 0.05), 6)
            try:
                r = await budget.acquire(tenant, f"w{seed}", usd=estimate, timeout=max(0.0, stop_at - loop.time()))
            except BudgetTimeout:
                return
            except RedisUnavailable:
                if loop.time() < stop_at:
                    raise  # Redis failed during the run: the test must see it
                return  # the run's end (the call's deadline) cut an answer a loaded machine was slow to give
            await asyncio.sleep(rng.uniform(0.005, 0.03))
            actual = round(estimate * rng.uniform(0.3, 1.0), 9)
            await r.commit(usd=actual)
            records.append({"t": r.admitted_at_ms, "usd": to_units("usd", actual), "requests": 1})

    await asyncio.gather(*(work(i) for i in range(tasks)))
    await budget.aclose()
    for record in records:
        sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    url, prefix, tenant, seconds, tasks, seed = sys.argv[1:7]
    asyncio.run(main(url, prefix, tenant, float(seconds), int(tasks), int(seed)))
