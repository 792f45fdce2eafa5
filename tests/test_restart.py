"""Redis killed (SIGKILL) and restarted on the same port while worker processes wait and commit.

The server runs with an append-only file and ``appendfsync always``. Worker
processes (tests/restart_worker.py) record every commit Redis acknowledged.
After the run: no worker crashed or hung, every acknowledged commit is in the
ledger exactly once with its amount, the window total equals the sum of the
acknowledged commits, and nothing is left reserved or queued. The restarted
server shows that the workers loaded the scripts again (NOSCRIPT path) and
subscribed again to the tenant's wake channel.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from slowburn_redis import Budget
from slowburn_redis.limits import UNITS
from tests.servers import RedisServer, redis_server_available
from tests.workers import Worker

ROOT = Path(__file__).resolve().parent.parent
TENANT = "acme"
PROCESSES, TASKS = 3, 2


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_server_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("SLOWBURN_REQUIRE_REAL_REDIS is set but redis-server is missing")
        pytest.skip("needs redis-server")
    server = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    yield server
    server.stop()


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` every 50 ms until truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def acknowledged(files: list[Path]) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in files:
        if path.exists():
            lines += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return lines


def restart(server: RedisServer) -> None:
    server.kill()
    time.sleep(0.3)  # workers see refused connections for a while
    server.start()


def wake_subscribers(client: redis.Redis, prefix: str) -> int:
    return int(client.pubsub_numsub(f"{prefix}:{{{TENANT}}}:wake")[0][1])


@pytest.mark.slow
def test_workers_survive_a_restart_and_no_acknowledged_commit_is_lost(
    aof_server: RedisServer, tmp_path: Path, prefix: str
) -> None:
    async def configure() -> None:
        async with Budget.from_url(aof_server.url, prefix=prefix) as budget:
            # Two calls in flight for six tasks: most of the fleet is waiting at any moment.
            await budget.set_limits(TENANT, ["usd 1000/hour", "concurrency 2"])

    asyncio.run(configure())
    stop = tmp_path / "stop"
    outs = [tmp_path / f"acks{i}.jsonl" for i in range(PROCESSES)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.restart_worker",
                aof_server.url,
                prefix,
                TENANT,
                str(out),
                str(stop),
                str(TASKS),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    client = redis.Redis.from_url(aof_server.url, decode_responses=True)
    try:
        until(lambda: len(acknowledged(outs)) >= 15, 60, "commits before the restart")
        restart(aof_server)
        at_restart = len(acknowledged(outs))
        client = redis.Redis.from_url(aof_server.url, decode_responses=True)
        until(lambda: wake_subscribers(client, prefix) >= 1, 30, "a worker to subscribe again")
        until(lambda: len(acknowledged(outs)) >= at_restart + 20, 60, "commits after the restart")
        reloaded = client.info("commandstats").get("cmdstat_script|load", {}).get("calls", 0)
        assert reloaded >= 1, "workers loaded their scripts again after NOSCRIPT"
        restart(aof_server)  # a second time, for good measure
        at_second = len(acknowledged(outs))
        until(lambda: len(acknowledged(outs)) >= at_second + 10, 60, "commits after the second restart")
        stop.touch()
        for worker in workers:
            _, err = worker.communicate(timeout=60)
            assert worker.returncode == 0, err[-3000:]
            assert "Traceback" not in err, err[-3000:]
    finally:
        stop.touch()
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)

    acks = acknowledged(outs)
    assert all(a["state"] == "committed" for a in acks)
    base = f"{prefix}:{{{TENANT}}}"
    ledger = {fields["reservation"]: fields for _, fields in client.xrange(base + ":ledger")}
    assert len(ledger) == client.xlen(base + ":ledger"), "one ledger entry per reservation"
    assert {a["id"] for a in acks} == set(ledger), "the ledger holds exactly the acknowledged commits"
    for a in acks:
        assert int(ledger[a["id"]]["usd"]) == a["usd"], a

    async def window() -> dict[str, Any]:
        async with Budget.from_url(aof_server.url, prefix=prefix) as budget:
            return {s.key: s for s in (await budget.status(TENANT)).limits}

    limits = asyncio.run(window())
    assert round(limits["T:usd:3600000"].used * UNITS["usd"]) == sum(a["usd"] for a in acks)
    assert limits["T:usd:3600000"].reserved == 0
    assert limits["T:concurrency:0"].used + limits["T:concurrency:0"].reserved == 0
    assert client.zcard(base + ":leases") == 0
    assert client.hlen(base + ":q") == 0
    client.close()


async def test_a_waiter_in_another_process_is_woken_by_a_notification_after_a_restart(
    aof_server: RedisServer, prefix: str
) -> None:
    budget = Budget.from_url(aof_server.url, prefix=prefix)
    await budget.set_limits(TENANT, ["usd 1/hour"])
    held = await budget.acquire(TENANT, usd=0.8)
    # Heartbeat 60 s and a window of an hour: only a wake notification can admit it within its 30 s.
    worker = Worker("acquire", aof_server.url, prefix, TENANT, "--usd", "0.5", "--timeout", "30", "--heartbeat", "60")
    queue = f"{prefix}:{{{TENANT}}}:q"
    client = redis.Redis.from_url(aof_server.url, decode_responses=True)
    try:
        await asyncio.to_thread(worker.expect, "started")
        await asyncio.to_thread(until, lambda: client.hlen(queue) == 1, 20, "the waiter to queue")
        client.close()
        restart(aof_server)
        client = redis.Redis.from_url(aof_server.url, decode_responses=True)
        await asyncio.to_thread(until, lambda: wake_subscribers(client, prefix) >= 1, 20, "a new subscription")
        assert client.hlen(queue) == 1, "its queue place survived the restart"
        # This process's client reconnects too; its commit refunds and publishes the wake.
        assert (await held.commit(usd=0.1)).state == "committed"
        await asyncio.to_thread(worker.expect, "admitted")
        assert (await asyncio.to_thread(worker.expect, "settled"))["state"] == "committed"
        assert await asyncio.to_thread(worker.wait) == 0
        assert (await budget.status(TENANT)).limits[0].used == pytest.approx(0.6)
    finally:
        worker.stop()
        client.close()
        await budget.aclose()
