"""examples/fleet.py and examples/multi_tenant.py run as written, as subprocesses, against a real Redis."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from slowburn_redis import Budget, Limit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.realredis


def run_example(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


async def test_fleet_shares_one_budget_across_processes(real_url: str, prefix: str) -> None:
    out = run_example(
        "fleet.py", "--redis-url", real_url, "--prefix", prefix, "--processes", "3", "--seconds", "5",
        "--usd", "0.003", "--window", "2s",
    )  # fmt: skip
    summary = re.search(r"fleet: 3 processes, (\d+) calls, \$(\d+\.\d+) spent under usd 0.003/2s", out)
    assert summary, out
    calls, spent = int(summary[1]), float(summary[2])
    workers = set(re.findall(r"^(worker-\d+-\d+): call", out, re.MULTILINE))
    assert len(workers) == 3  # three processes, each made calls
    assert "after waiting" in out  # the window was spent and workers waited for it
    async with Budget.from_url(real_url, prefix=prefix) as budget:
        report = await budget.report("fleet")
        status = await budget.status("fleet")
    assert report.totals.calls == calls
    assert report.totals.usd == pytest.approx(spent, abs=1e-4)
    (usd,) = status.limits
    assert usd.used + usd.reserved <= 0.003 + 1e-9


async def test_multi_tenant_one_exhausted_the_other_goes_on(real_url: str, prefix: str) -> None:
    args = ["--redis-url", real_url, "--prefix", prefix, "--seconds", "4"]
    out = run_example("multi_tenant.py", *args)
    assert re.search(r"^acme/(researcher|writer): budget spent \(\S+\), waiting$", out, re.MULTILINE)
    assert not re.search(r"^globex/\w+: budget spent", out, re.MULTILINE)
    kept = re.search(r"globex kept going: (\d+) calls after acme's last call", out)
    assert kept and int(kept[1]) > 0, out
    async with Budget.from_url(real_url, prefix=prefix) as budget:
        acme, globex = await budget.status("acme"), await budget.status("globex")
        assert await budget.get_limits("acme", agent="researcher") == [Limit.parse("usd 0.0015")]
    acme_rows = {row.key: row for row in acme.limits}
    assert acme_rows["T:usd:0"].used <= 0.004
    # Exhausted: less is left than the largest estimate of one call (2500 input + 600 output tokens).
    assert acme_rows["T:usd:0"].remaining < 2500 * 0.15e-6 + 600 * 0.60e-6
    assert acme_rows["A:researcher:usd:0"].used <= 0.0015
    globex_rows = {row.key: row for row in globex.limits}
    assert globex_rows["T:usd:60000"].remaining > 0.5  # globex never came near its quota

    out_again = run_example("multi_tenant.py", *args)  # rerunnable: usage is reset at the start
    assert "globex kept going" in out_again
