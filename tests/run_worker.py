"""A worker process that joins a run other processes share and acquires in it until told how many times.

Run as ``python -m tests.run_worker URL PREFIX TENANT RUN_ID COUNT``: it joins
run RUN_ID (caps taken from Redis), makes COUNT acquires of one request each
(wait mode: a spent run cap must raise, never wait), committing each, and
prints one JSON line: ``{"admitted": n, "exhausted": m, "other": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from slowburn_redis import Budget, RunExhausted


async def main(url: str, prefix: str, tenant: str, run_id: str, count: int) -> None:
    admitted, exhausted, other = 0, 0, []
    async with Budget.from_url(url, prefix=prefix) as budget, budget.run(tenant, agent="worker", run_id=run_id):
        for _ in range(count):
            try:
                reservation = await budget.acquire(tenant, agent="worker", tokens=10, timeout=60)
            except RunExhausted:
                exhausted += 1
                continue
            except Exception as exc:  # reported, so the test shows it
                other.append(f"{type(exc).__name__}: {exc}")
                continue
            admitted += 1
            await reservation.commit(tokens=10)
    print(json.dumps({"admitted": admitted, "exhausted": exhausted, "other": other}), flush=True)


if __name__ == "__main__":
    url, prefix, tenant, run_id, count = sys.argv[1:6]
    asyncio.run(main(url, prefix, tenant, run_id, int(count)))
