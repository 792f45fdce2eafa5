"""The fleet demo: workers pause when the shared window is spent, resume on refill, and end with the report."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from slowburn_redis import Budget, Event, Limit, LimitStatus, Status
from slowburn_redis.cli import cli, render
from slowburn_redis.demo import DemoConfig, DemoState, SimulatedCall, _Fleet, run_demo
from tests.cli_support import assert_bad_input
from tests.conftest import sync_client

# Deterministic whatever the machine's speed: one call reserves at least $0.00048 (800 input + 600 output
# tokens), so two workers of one process, whose first acquires are in flight together, cannot both fit in
# $0.0009: one of them waits, every time. Any single estimate (at most $0.000735) fits once the 1 s window has
# drained, so the waiter resumes; and each worker must make its calls, so the run ends only after that.
QUICK = ["--usd", "0.0009", "--window", "1", "--calls", "2", "--plain"]
QUICK_CONFIG = {"usd": 0.0009, "window": 1.0, "calls": 2, "seconds": None}


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
    config = DemoConfig(workers=3, **QUICK_CONFIG)  # type: ignore[arg-type]
    view = Recorder()
    async with Budget.embedded(prefix=prefix) as budget:
        state = await run_demo(budget, config, view)
        report = await budget.report("demo")
    assert any(line.endswith("is spent") for line in view.lines)
    assert any("resumed after" in line for line in view.lines)
    assert sum(w.pauses for w in state.workers.values()) > 0
    assert {w.state for w in state.workers.values()} == {"done"}
    assert [w.calls for w in state.workers.values()] == [2, 2, 2]
    assert report.to_json()  # the report covers exactly the calls the workers made
    assert report.totals.calls == state.calls
    assert report.totals.usd == pytest.approx(state.usd, abs=1e-8)


def total_calls(output: str) -> int:
    match = re.search(r"│ total +│ +│ +(\d+) │", output)
    assert match, output
    return int(match[1])


def test_cli_demo_on_the_embedded_store(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLOWBURN_REDIS_URL", raising=False)
    result = demo("--prefix", prefix, "demo", "--workers", "3", *QUICK)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "3 workers share usd 0.0009/1s for 2 calls each" in out
    assert re.search(r"worker-\d paused: usd 0.0009/1s is spent", out)
    assert re.search(r"worker-\d resumed after \d+\.\ds", out)
    assert "TOTAL" in out and "gpt-4o-mini" in out
    assert len(pids_in_table(out)) == 1
    assert total_calls(out) == 6
    assert out.count("┃ worker") == 1  # the table of workers, once


def test_cli_demo_on_a_server_across_processes(server_url: str, prefix: str) -> None:
    args = ["--redis-url", server_url, "--prefix", prefix, "demo", "--workers", "4"]
    result = demo(*args, "--processes", "2", *QUICK)
    assert result.exit_code == 0, result.output
    assert len(pids_in_table(result.stdout)) == 2
    assert "is spent" in result.stdout and "resumed after" in result.stdout
    assert "TOTAL" in result.stdout
    assert total_calls(result.stdout) == 8


def test_cli_demo_embedded_across_processes(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLOWBURN_REDIS_URL", raising=False)
    result = demo("--prefix", prefix, "demo", "--workers", "4", "--processes", "2", *QUICK)
    assert result.exit_code == 0, result.output
    assert len(pids_in_table(result.stdout)) == 2
    assert "is spent" in result.stdout
    assert total_calls(result.stdout) == 8


def test_cli_demo_honours_slowburn_redis_url(server_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = sync_client(server_url)
    limits_key = f"{prefix}:{{demo}}:limits"
    monkeypatch.delenv("SLOWBURN_REDIS_URL", raising=False)
    assert demo("--prefix", prefix, "demo", "--workers", "2", *QUICK).exit_code == 0
    assert not client.exists(limits_key)  # nothing named: the embedded store
    monkeypatch.setenv("SLOWBURN_REDIS_URL", server_url)
    result = demo("--prefix", prefix, "demo", "--workers", "2", *QUICK)
    assert result.exit_code == 0, result.output
    assert client.exists(limits_key)  # the demo ran on the server the environment names
    assert client.xlen(f"{prefix}:{{demo}}:ledger") == 4
    client.close()


def threshold(level: int) -> Event:
    return Event(type="threshold", tenant="demo", ts=0, agent="worker-1", limit="T:usd:1000", level=level)


def status_at(fraction: float) -> Status:
    row = LimitStatus(
        scope="tenant", agent=None, limit=Limit.parse("usd 1/s"), key="T:usd:1000", used=fraction, reserved=0,
        remaining=max(0.0, 1 - fraction), overrun=0, refill_in=None, waiters=0,
    )  # fmt: skip
    return Status(tenant="demo", agent=None, at=datetime.now(UTC), queue_length=0, limits=[row])


def test_each_threshold_is_shown_once_per_crossing() -> None:
    view = Recorder()
    fleet = _Fleet(DemoConfig(workers=1), view)
    for _ in range(20):  # refunds dip the window under 90 % and the next acquire crosses it again
        fleet.event(threshold(90))
        fleet.rearm(status_at(0.85))
    fleet.event(threshold(100))
    assert [line for line in view.lines if "% used" in line] == ["usd 0.01/5s: 90 % used", "usd 0.01/5s: 100 % used"]
    fleet.rearm(status_at(0.3))  # the window drained: a new crossing is news again
    fleet.event(threshold(90))
    assert sum("90 % used" in line for line in view.lines) == 2


def test_a_live_view_leaves_one_table(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.delenv("SLOWBURN_REDIS_URL", raising=False)
    monkeypatch.setattr(render, "console", lambda: Console(file=out, force_terminal=True, width=100))
    result = demo("--prefix", prefix, "demo", "--workers", "2", "--usd", "0.0009", "--window", "1", "--calls", "1")
    assert result.exit_code == 0, result.output
    text = out.getvalue()
    final = text[text.rindex("\x1b[2K") :]  # what is left on the screen after the last redraw
    assert final.count("│ worker-1 ") == 1 and "calls, $" in final  # one table row, not two tables


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
        (["--workers", "1000000"], ["--workers", "1000"]),
        (["--workers", "100", "--processes", "100"], ["--processes", "32"]),
        (["--seconds", "1e9"], ["--seconds"]),
        (["--calls", "0"], ["--calls"]),
        (["--calls", "10000000"], ["--calls"]),
        (["--redis-url", "redis://h:99999/0"], ["Port out of range"]),
    ],
)
def test_cli_demo_bad_input(args: list[str], words: list[str]) -> None:
    assert_bad_input(CliRunner().invoke(cli, ["demo", *args]), *words)
