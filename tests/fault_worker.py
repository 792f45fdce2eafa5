"""One worker process of the fault tests: tasks acquire, "call" and commit until its stdin is closed.

Run as ``python -m tests.fault_worker URL PREFIX TENANT TASKS SEED OUT [DESIRED_JSON]``.
Every outcome is appended to the JSON-lines file OUT as it happens (so a test
can wait for conditions while the worker runs):

- ``{"admitted": t_ms, "usd": units, "acked": bool}``: an admission (server time) and what
  it charged: the actual cost when Redis acknowledged the commit, else the estimate;
- ``{"error": "LimitsMissing", "late_ms": ...}``: a SlowburnError, by class, with how long
  after the call's own deadline it ended (negative: before);
- ``{"untyped": "..."}``: any other exception (a test fails on one).

DESIRED_JSON, when given, is the ``desired_limits`` mapping of the worker's Budget;
``FAULT_WORKER_TEST_CLOCK=1`` builds it with ``test_clock=True``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

from slowburn_redis import Budget, SlowburnError
from slowburn_redis.limits import to_units

TIMEOUT = 2.0
"""Each acquire's own deadline, in seconds."""


async def main(url: str, prefix: str, tenant: str, tasks: int, seed: int, out: Path, desired: Any) -> None:
    test_clock = os.environ.get("FAULT_WORKER_TEST_CLOCK") == "1"  # scripts read the test's frozen clock
    budget = Budget.from_url(url, prefix=prefix, desired_limits=desired, retry_timeout=TIMEOUT, test_clock=test_clock)
    loop = asyncio.get_running_loop()
    sink = out.open("a", buffering=1)

    def emit(**fields: Any) -> None:
        sink.write(json.dumps(fields) + "\n")

    stopping = asyncio.Event()

    async def watch_stdin() -> None:
        await asyncio.to_thread(sys.stdin.read)  # returns when the test closes our stdin
        stopping.set()

    async def work(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while not stopping.is_set():
            estimate = round(rng.uniform(0.01, 0.05), 6)
            deadline = loop.time() + TIMEOUT
            try:
                reservation = await budget.acquire(tenant, f"w{seed}", usd=estimate, timeout=TIMEOUT)
                await asyncio.sleep(rng.uniform(0.005, 0.03))
                actual = round(estimate * rng.uniform(0.3, 1.0), 9)
                try:
                    settled = await reservation.commit(usd=actual)
                except BaseException:  # the estimate stays charged
                    emit(admitted=reservation.admitted_at_ms, usd=to_units("usd", estimate), acked=False)
                    raise
                acked = settled.state == "committed"
                emit(
                    admitted=reservation.admitted_at_ms, usd=to_units("usd", actual if acked else estimate), acked=acked
                )
            except SlowburnError as exc:
                emit(error=type(exc).__name__, late_ms=round((loop.time() - deadline) * 1000))
                await asyncio.sleep(0.05)  # a refused worker retries, but not in a hot loop
            except Exception as exc:  # what the fault tests must never see
                emit(untyped=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)

    await asyncio.gather(watch_stdin(), *(work(i) for i in range(tasks)))
    await budget.aclose()
    sink.close()


if __name__ == "__main__":
    url, prefix, tenant, tasks, seed, out = sys.argv[1:7]
    desired = json.loads(sys.argv[7]) if len(sys.argv) > 7 else None
    asyncio.run(main(url, prefix, tenant, int(tasks), int(seed), Path(out), desired))
