"""The fleet demo: workers pause when the shared window is spent, resume on refill, and end with the report."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner, Result

from slowburn_redis import Budget
from slowburn_redis.cli import cli
from slowburn_redis.demo import DemoConfig, DemoState, SimulatedCall, run_demo
from tests.cli_support import assert_bad_input

# A window small enough that a few calls spend it and short enough to refill within the run.
QUICK = ["--usd", "0.003", "--window", "2", "--plain"]


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ticks = 0

    def line(self, state: DemoState, text: str) -> None:
        self.lines.append(text)

    def tick(self, state: DemoState) -> None:
        self.ticks += 1


def demo(*args: str) -> Result:
    return CliRunner().invoke(cli, [*args], catch_exceptions=False)


def pids_in_table(output: str) -> set[str]:
    return set(re.findall(r"worker-\d+ +│ +(\d+) +│", output))


def test_simulated_calls_are_priced_like_gpt_4o_mini() -> None:
    call = SimulatedCall(input_tokens=1000, output_tokens=500, latency=0.1)
    assert call.usd == pytest.approx(1000 * 0.15e-6 + 500 * 0.60e-6)
    assert call.estimate_usd == pytest.approx(1000 * 0.15e-6 + 600 * 0.60e-6)
    assert call.estimate_usd >= call.usd


async def test_workers_pause_and_resume_and_the_ledger_agrees(prefix: str) -> None:
    config = DemoConfig(workers=3, seconds=4, usd=0.003, window=2)
    view = Recorder()
    async with Budget.embedded(prefix=prefix) as budget:
        state = await run_demo(budget, config, view)
        report = await budget.report("demo")
    assert any(line.endswith("is spent") for line in view.lines)
    assert any("resumed after" in line for line in view.lines)
    assert sum(w.pauses for w in state.workers.values()) > 0
    assert {w.state for w in state.workers.values()} == {"done"}
    assert all(w.calls > 0 for w in state.workers.values())
    assert report.to_json()  # the report covers exactly the calls the workers made
    assert report.totals.calls == state.calls
    assert report.totals.usd == pytest.approx(state.usd, abs=1e-8)


def test_cli_demo_on_the_embedded_store(prefix: str) -> None:
    result = demo("--prefix", prefix, "demo", "--seconds", "5", "--workers", "3", *QUICK)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3 workers share usd 0.003/2s for 5s" in out
    assert re.search(r"worker-\d paused: usd 0.003/2s is spent", out)
    assert re.search(r"worker-\d resumed after \d+\.\ds", out)
    assert "TOTAL" in out and "gpt-4o-mini" in out
    assert len(pids_in_table(out)) == 1


def test_cli_demo_on_a_server_across_processes(server_url: str, prefix: str) -> None:
    args = ["--redis-url", server_url, "--prefix", prefix, "demo", "--seconds", "6", "--workers", "4"]
    result = demo(*args, "--processes", "2", *QUICK)
    assert result.exit_code == 0, result.output
    assert len(pids_in_table(result.stdout)) == 2
    assert "is spent" in result.stdout and "resumed after" in result.stdout
    assert "TOTAL" in result.stdout


def test_cli_demo_embedded_across_processes(prefix: str) -> None:
    result = demo("--prefix", prefix, "demo", "--seconds", "5", "--workers", "2", "--processes", "2", *QUICK)
    assert result.exit_code == 0, result.output
    assert len(pids_in_table(result.stdout)) == 2
    assert "is spent" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--processes", "3", "--workers", "2"], ["--processes"]),
        (["--processes", "-1"], ["--processes"]),
        (["--workers", "0"], ["--workers"]),
        (["--usd", "-1"], ["--usd"]),
        (["--seconds", "0"], ["--seconds"]),
        (["--window", "0.5"], ["window"]),
        (["--tenant", "a b"], ["tenant name"]),
    ],
)
def test_cli_demo_bad_input(args: list[str], words: list[str]) -> None:
    assert_bad_input(CliRunner().invoke(cli, ["demo", *args]), *words)
