"""examples/fleet.py and examples/multi_tenant.py run as written, as subprocesses, against a real Redis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
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


def test_fleet_shares_one_budget_across_processes(real_url: str, prefix: str) -> None:
    # The test holds the fleet's budget, so every process must wait, whatever the machine's speed; it lets go
    # once all three wait (a condition, not a time), and each process then makes its one call.
    budget = Budget.from_url(real_url, prefix=prefix).sync()
    try:
        budget.set_limits("fleet", ["usd 0.003/hour"])
        hold = budget.acquire("fleet", usd=0.0029)
        command = [sys.executable, str(EXAMPLES / "fleet.py"), "--redis-url", real_url, "--prefix", prefix]
        options = ["--processes", "3", "--calls", "1", "--seconds", "0", "--usd", "0.003", "--window", "1h"]
        fleet = subprocess.Popen([*command, *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(6000):
                if budget.status("fleet").queue_length == 3 or fleet.poll() is not None:
                    break
                time.sleep(0.02)
            assert budget.status("fleet").queue_length == 3, "the three processes never all waited"
            time.sleep(0.2)  # not a race: each has then waited at least 0.2 s, past the example's 0.05 s
            hold.release()
            out, err = fleet.communicate(timeout=120)
        finally:
            fleet.kill()
        assert fleet.returncode == 0, err
        assert "Traceback" not in err
        report = budget.report("fleet")
        status = budget.status("fleet")
    finally:
        budget.close()
    summary = re.search(r"fleet: 3 processes, (\d+) calls, \$(\d+\.\d+) spent under usd 0.003/1h", out)
    assert summary, out
    calls, spent = int(summary[1]), float(summary[2])
    assert calls == 3
    workers = set(re.findall(r"^(worker-\d+-\d+): call 1 cost \$\S+ after waiting", out, re.MULTILINE))
    assert len(workers) == 3, out  # three processes, each waited for the budget, then made its call
    assert report.totals.calls == calls
    assert report.totals.usd == pytest.approx(spent, abs=1e-4)
    (usd,) = status.limits
    assert usd.used + usd.reserved <= 0.003 + 1e-9


async def test_multi_tenant_one_exhausted_the_other_goes_on(real_url: str, prefix: str) -> None:
    async with Budget.from_url(real_url, prefix=prefix) as budget:  # the README tour's tenant, on the same Redis
        await budget.set_limits("acme", ["usd 5/day"])
        await (await budget.acquire("acme", usd=0.25)).commit(usd=0.25)
    # It ends by a condition (the startup spent, then 5 more enterprise calls); --seconds 0: no time limit.
    args = ["--redis-url", real_url, "--prefix", prefix, "--seconds", "0"]
    out = run_example("multi_tenant.py", *args)
    limit = r"usd 0\.00(4 \(tenant|15 \(agent researcher)\)"  # in words, not an internal key
    spent = rf"^example-startup/(researcher|writer): budget spent \({limit}\), waiting$"
    assert re.search(spent, out, re.MULTILINE), out
    assert not re.search(r"^example-enterprise/\w+: budget spent", out, re.MULTILINE)
    kept = re.search(r"example-enterprise kept going: (\d+) calls after example-startup's last call", out)
    assert kept and int(kept[1]) >= 5, out
    async with Budget.from_url(real_url, prefix=prefix) as budget:
        small, roomy = await budget.status("example-startup"), await budget.status("example-enterprise")
        assert await budget.get_limits("example-startup", agent="researcher") == [Limit.parse("usd 0.0015")]
        acme = await budget.status("acme")
        assert await budget.get_limits("acme") == [Limit.parse("usd 5/day")]  # untouched: neither reset nor set
    assert [(row.used, row.limit) for row in acme.limits] == [(0.25, Limit.parse("usd 5/day"))]
    small_rows = {row.key: row for row in small.limits}
    assert small_rows["T:usd:0"].used <= 0.004
    # Exhausted: less is left than the largest estimate of one call (2500 input + 600 output tokens).
    assert small_rows["T:usd:0"].remaining < 2500 * 0.15e-6 + 600 * 0.60e-6
    assert small_rows["A:researcher:usd:0"].used <= 0.0015
    roomy_rows = {row.key: row for row in roomy.limits}
    assert roomy_rows["T:usd:60000"].remaining > 0.5  # the enterprise never came near its quota

    out_again = run_example("multi_tenant.py", *args)  # rerunnable: usage is reset at the start
    assert "example-enterprise kept going" in out_again


@pytest.mark.parametrize("store", ["embedded", "real"])
def test_planning_quotes_both_plans_and_runs_the_one_that_fits(store: str, request: pytest.FixtureRequest) -> None:
    args = ["--redis-url", request.getfixturevalue("real_url")] if store == "real" else []
    out = run_example("planning.py", *args)
    result = json.loads(out.rsplit("RESULT ", 1)[1])
    deep, quick = result["quotes"]["deep"], result["quotes"]["quick"]
    # $0.03 already spent of usd 0.05/hour: the deep plan's estimate does not fit now, the quick one does
    assert deep["usd"] > 0.02 and (deep["admitted"], deep["reason"], deep["limit"]) == (
        False,
        "capacity",
        "usd 0.05/hour (tenant)",
    )
    assert quick["admitted"] and quick["usd"] < 0.02
    assert result["chosen"] == "quick" and result["tool_calls_used"] == 2
    assert 0.03 < result["spent_usd"] < 0.03 + quick["usd"]
    assert re.search(r"plan deep: estimated \$0\.03\d+; .*does not fit now .*; fits in \d+(\.\d+)?s", out)
