"""Metrics: Prometheus text and OpenTelemetry data points of a budget, labelled in words; the CLI endpoint."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import generate_latest

from slowburn_redis import Budget, BudgetExhausted
from slowburn_redis.metrics import BudgetMetrics
from tests.servers import free_port

TENANT = "acme"


async def until(check: Callable[[], bool], what: str, tries: int = 1500) -> None:
    """Wait for a condition (polling every 20 ms, up to 30 s): tests wait for states, never for the clock."""
    for _ in range(tries):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def points(reader: InMemoryMetricReader) -> dict[str, list[object]]:
    data = reader.get_metrics_data()
    out: dict[str, list[object]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


async def test_prometheus_and_opentelemetry_show_limits_waits_denials_overruns(budget: Budget) -> None:
    await budget.set_limits(TENANT, ["usd 0.01/2s", "requests 100/min"])
    await budget.set_limits(TENANT, ["usd 1/hour"], agent="writer")
    metrics = BudgetMetrics(budget, [TENANT], interval=0.05)
    reader = InMemoryMetricReader()
    metrics.instrument_opentelemetry(MeterProvider(metric_readers=[reader]).get_meter("slowburn-test"))
    runner = asyncio.create_task(metrics.run())
    try:
        await asyncio.wait_for(metrics.refreshed.wait(), 60)
        for _ in range(1500):  # bounded: until the event follower is subscribed (events before it are not seen)
            if await budget.engine.subscribers(budget.keys(TENANT).events_channel):
                break
            await asyncio.sleep(0.02)
        r = await budget.acquire(TENANT, "writer", usd=0.006)
        await r.commit(usd=0.007, model="gpt-4o-mini")  # an overrun
        with pytest.raises(BudgetExhausted):
            await budget.acquire(TENANT, "writer", usd=0.005, mode="reject")
        waiter = asyncio.create_task(budget.acquire(TENANT, "writer", usd=0.004))
        await until(lambda: sum(metrics.counters["resumes"].values()) >= 1, "the waiter to resume")
        await (await asyncio.wait_for(waiter, 60)).commit(usd=0.001, model="gpt-4o-mini")
        await until(lambda: sum(metrics.counters["calls"].values()) >= 2, "both commits in the ledger")
        await metrics.refresh()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    text = generate_latest(metrics.prometheus_registry()).decode()
    assert "T:usd" not in text and "A:writer" not in text and ":ledger" not in text
    tenant_usd = 'agent="",dimension="usd",limit="usd 0.01/2s",tenant="acme"'
    assert f"slowburn_limit_amount{{{tenant_usd}}} 0.01" in text
    assert 'slowburn_limit_amount{agent="writer",dimension="usd",limit="usd 1/hour",tenant="acme"} 1.0' in text
    assert 'slowburn_pauses_total{agent="writer",limit="usd 0.01/2s",tenant="acme"} 1.0' in text
    assert 'slowburn_denials_total{agent="writer",limit="usd 0.01/2s",tenant="acme"}' in text
    assert 'slowburn_overruns_total{agent="writer",tenant="acme"} 1.0' in text
    assert 'slowburn_wait_seconds_count{agent="writer",tenant="acme"} 1.0' in text
    assert 'slowburn_calls_total{agent="writer",model="gpt-4o-mini",outcome="ok",tenant="acme"} 1.0' in text
    assert 'slowburn_spent_usd_total{agent="writer",model="gpt-4o-mini",tenant="acme"} 0.008' in text
    assert "slowburn_redis_errors_total" in text and "slowburn_redis_errors_total{" not in text

    found = points(reader)
    used = [p for p in found["slowburn.limit.used"] if p.attributes["limit"] == "usd 1/hour"]  # type: ignore[attr-defined]
    assert [p.value for p in used] == [pytest.approx(0.008)]  # type: ignore[attr-defined]
    (wait,) = found["slowburn.wait"]
    assert wait.count == 1 and wait.sum > 0  # type: ignore[attr-defined]
    assert {p.attributes["agent"] for p in found["slowburn.pauses"]} == {"writer"}  # type: ignore[attr-defined]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_the_cli_serves_a_prometheus_endpoint(server_url: str, prefix: str, tmp_path: Path) -> None:
    budget = Budget.from_url(server_url, prefix=prefix)
    sync = budget.sync()
    try:
        sync.set_limits(TENANT, ["usd 5/day", "concurrency 8"])
        port = free_port()
        exe = Path(sys.executable).with_name("slowburn-redis")
        cmd = [str(exe), "--redis-url", server_url, "--prefix", prefix, "metrics", "--port", str(port)]
        proc = subprocess.Popen([*cmd, "--interval", "0.1", "--duration", "120"], stderr=subprocess.PIPE, text=True)
        try:
            text = ""
            for _ in range(600):
                try:
                    text = scrape(port)
                except OSError:
                    text = ""
                if 'limit="usd 5/day"' in text:
                    break
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.05)
            assert 'slowburn_limit_remaining{agent="",dimension="usd",limit="usd 5/day",tenant="acme"} 5.0' in text
            assert 'slowburn_limit_amount{agent="",dimension="concurrency",limit="concurrency 8",tenant="acme"}' in text
        finally:
            proc.terminate()
            proc.wait(20)
    finally:
        sync.close()
