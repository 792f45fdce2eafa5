"""A worker process for the Redis restart test: acquire, "call", commit, record the acknowledgement.

Run as ``python -m tests.restart_worker URL PREFIX TENANT OUTFILE STOPFILE TASKS``.
Each of TASKS tasks loops until STOPFILE exists (at most 5000 rounds): acquire
(waiting when the concurrency limit is full), sleep a little, commit an actual
cost below the estimate, then append one JSON line to OUTFILE: reservation id,
committed usd in units, and the settlement state. A line is written only after
the commit returned, so OUTFILE lists exactly the commits Redis acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path

from slowburn_redis import Budget
from slowburn_redis.limits import to_units


async def main(url: str, prefix: str, tenant: str, outfile: Path, stopfile: Path, tasks: int) -> None:
    budget = Budget.from_url(url, prefix=prefix, heartbeat=1.0)
    out = outfile.open("a", encoding="utf-8")

    async def work(index: int) -> None:
        rng = random.Random(os.getpid() * 100 + index)
        for _ in range(5000):
            if await asyncio.to_thread(stopfile.exists):
                return
            r = await budget.acquire(tenant, f"w{os.getpid()}", usd=0.05, timeout=60)
            await asyncio.sleep(rng.uniform(0.002, 0.02))
            usd = round(rng.uniform(0.001, 0.05), 6)
            settlement = await r.commit(usd=usd)
            line = {"id": r.id, "usd": to_units("usd", usd), "state": settlement.state, "settled": settlement.settled}
            out.write(json.dumps(line) + "\n")
            out.flush()

    try:
        await asyncio.gather(*(work(i) for i in range(tasks)))
    finally:
        out.close()
        await budget.aclose()


if __name__ == "__main__":
    url, prefix, tenant, outfile, stopfile, tasks = sys.argv[1:7]
    asyncio.run(main(url, prefix, tenant, Path(outfile), Path(stopfile), int(tasks)))
