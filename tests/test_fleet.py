"""A fleet of OS processes shares one budget exactly, and uses what it allows.

4 processes x 8 tasks hammer one tenant with usd and requests limits on a 2 s
window for about four windows, committing less than they estimated. From
every admission (server time, committed amount): no window-length interval
exceeds a limit, and some window reached at least half of the binding limit
(the share used over the run is printed; it depends on the machine's speed).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slowburn_redis import Budget
from slowburn_redis.limits import UNITS

ROOT = Path(__file__).resolve().parent.parent
WINDOW_MS = 2000
USD_LIMIT = 0.4
REQUESTS_LIMIT = 30
SECONDS = 8.0


def max_in_any_window(records: list[dict[str, int]], field: str, window_ms: int) -> int:
    """The largest total of `field` over admissions in any closed interval of `window_ms`."""
    times = sorted((r["t"], r[field]) for r in records)
    best, j, running = 0, 0, 0
    for i, (start, _) in enumerate(times):
        if i > 0:
            running -= times[i - 1][1]
        j = max(j, i)
        while j < len(times) and times[j][0] <= start + window_ms:
            running += times[j][1]
            j += 1
        best = max(best, running)
    return best


def used_fraction(records: list[dict[str, int]], field: str, limit: int) -> float:
    """Mean share of the limit admitted in consecutive full windows from the first admission."""
    start, end = min(r["t"] for r in records), max(r["t"] for r in records)
    full = (end - start) // WINDOW_MS
    assert full >= 2, "the run must span at least two full windows"
    totals = [0] * full
    for r in records:
        i = (r["t"] - start) // WINDOW_MS
        if i < full:
            totals[i] += r[field]
    return sum(totals) / (limit * full)


@pytest.mark.slow
def test_fleet_of_processes_never_exceeds_and_uses_the_budget(server_url: str, prefix: str) -> None:
    async def configure() -> None:
        async with Budget.from_url(server_url, prefix=prefix) as budget:
            await budget.set_limits("fleet", [f"usd {USD_LIMIT}/2s", f"requests {REQUESTS_LIMIT}/2s"])

    asyncio.run(configure())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.fleet_worker", server_url, prefix, "fleet", str(SECONDS), "8", str(seed)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    records: list[dict[str, int]] = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err[-3000:]
        mine = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert mine, "every process was admitted at least once"
        records += mine

    usd_limit = round(USD_LIMIT * UNITS["usd"])
    usd_peak = max_in_any_window(records, "usd", WINDOW_MS)
    requests_peak = max_in_any_window(records, "requests", WINDOW_MS)
    assert usd_peak <= usd_limit, (usd_peak, usd_limit)
    assert requests_peak <= REQUESTS_LIMIT, (requests_peak, REQUESTS_LIMIT)

    # How much of the budget a loaded machine gets through depends on its
    # speed (bench/ measures it); what must hold is that the limit was
    # reached, so the check above was made under real contention.
    usd_used = used_fraction(records, "usd", usd_limit)
    requests_used = used_fraction(records, "requests", REQUESTS_LIMIT)
    print(f"fleet: {len(records)} admissions; usd used {usd_used:.1%}, requests used {requests_used:.1%}")
    assert max(usd_peak / usd_limit, requests_peak / REQUESTS_LIMIT) >= 0.5, (usd_peak, requests_peak, len(records))
