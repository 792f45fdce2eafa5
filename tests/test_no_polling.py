"""Waiting costs Redis (almost) nothing: 50 waiters on a spent budget, commands counted.

A redis-server of this test's own, so that INFO commandstats counts nothing
but this test. Waiters sit in two worker processes on a budget spent for an
hour, with a 1 s heartbeat. By design, while nothing changes, each process
sends one `refresh` per tenant every two heartbeats (it refreshes the places
older than 1.5 heartbeats, see slowburn_redis.waiting.REFRESH_AGE); the
waiter standing first in the queue has a retry time of its own (the refill,
an hour away), so the heartbeat does not wake it, and the waiters behind it
sleep until a notification names them: nobody else sends anything.
commandstats also counts the commands a script runs inside Redis, so the
bound is built from the measured cost of one refresh (which must not grow
with the number of waiters). A polling loop (50 waiters retrying every
second) would send more than that by far.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from slowburn_redis import Budget, protocol
from slowburn_redis.acl import SCRIPT_COMMANDS
from slowburn_redis.scripts import Script
from tests.servers import RedisServer, redis_server_available
from tests.workers import Worker

T = "acme"
PROCESSES = 2
PER_PROCESS = 25
HEARTBEAT = 1.0
QUIET = 3.0  # seconds of measurement


REFRESH, ACQUIRE = Script("refresh"), Script("acquire")
AMOUNTS = {"concurrency": 1, "requests": 1, "usd": 10_000_000}
# Commands the scripts run inside Redis (counted by commandstats like any other).
# SCRIPT_COMMANDS is checked against every redis.call in lua/ by test_acl.
SCRIPT_ONLY = {"evalsha", *SCRIPT_COMMANDS}


def cost(client: redis.Redis, script: Script, base: str, *args: str | int) -> int:
    """How many commands (its own included) one run of `script` costs, by commandstats."""
    before, _ = total_calls(client)
    client.evalsha(script.sha, 1, base, *args)
    after, _ = total_calls(client)
    return after - before - 1  # minus the first INFO


@contextlib.contextmanager
def paused(workers: list[Worker]) -> Iterator[None]:
    """Freeze the worker processes (SIGSTOP) for the block, so that they send nothing."""
    for worker in workers:
        os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        time.sleep(0.2)  # a command already written reaches Redis before the block measures
        yield
    finally:
        for worker in workers:
            os.kill(worker.process.pid, signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_server_available():
        pytest.skip("needs redis-server on PATH")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def total_calls(client: redis.Redis) -> tuple[int, dict[str, int]]:
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}
    return sum(calls.values()), calls


@pytest.mark.realredis
def test_fifty_waiters_send_almost_nothing_while_nothing_changes(own_redis: RedisServer) -> None:
    url, prefix = own_redis.url, "np"
    base = f"{prefix}:{{{T}}}"
    control = Budget.from_url(url, prefix=prefix).sync()
    client = redis.Redis.from_url(url, decode_responses=True)
    workers: list[Worker] = []
    try:
        # Loaded up front: a first heartbeat that lands in the measured window
        # (a slow machine) would otherwise add its one-time SCRIPT LOAD.
        client.script_load(REFRESH.source)
        control.set_limits(T, ["usd 1/hour"])
        control.acquire(T, usd=1).commit()  # spent for an hour: no retry time falls in the test
        for p in range(PROCESSES):
            workers.append(
                Worker(
                    "waiters",
                    url,
                    prefix,
                    T,
                    "--count",
                    str(PER_PROCESS),
                    "--usd",
                    "0.01",
                    "--heartbeat",
                    str(HEARTBEAT),
                    "--label",
                    f"p{p}w",
                )
            )
        deadline = time.monotonic() + 60
        while client.hlen(base + ":q") < PROCESSES * PER_PROCESS:
            assert time.monotonic() < deadline, f"only {client.hlen(base + ':q')} waiters queued"
            for worker in workers:
                assert worker.process.poll() is None, worker.describe()
            time.sleep(0.05)
        time.sleep(HEARTBEAT)  # let the subscriptions' second tries finish

        before, calls_before = total_calls(client)
        time.sleep(QUIET)
        after, calls_after = total_calls(client)
        delta = after - before - 1  # the first INFO is counted too
        by_command = {name: calls_after[name] - calls_before.get(name, 0) for name in calls_after}
        by_command = {name: count for name, count in by_command.items() if count}

        # What each kind of traffic costs, commands run inside the script included. The
        # workers are stopped meanwhile: commandstats is server-wide, and a heartbeat landing
        # between two INFOs would be counted as part of the script measured.
        with paused(workers):
            queue = client.zrange(base + ":b:T:usd:3600000", 0, -1)  # tickets, first in line first
            ttl_ms = round(HEARTBEAT * 3000)
            refresh_all = cost(client, REFRESH, base, ttl_ms, *queue[:PER_PROCESS])
            refresh_one = cost(client, REFRESH, base, ttl_ms, queue[-1])
            retry = protocol.acquire_args(
                reservation_id="x1",
                agent="p0w0",
                mode="wait",
                priority=0,
                ticket=queue[0],
                lease_ms=60000,
                queue_ms=ttl_ms,
                estimate=AMOUNTS,
            )
            head_retry = cost(client, ACQUIRE, base, *ACQUIRE.request(retry))
        assert refresh_all == refresh_one, "a refresh must cost the same whatever the number of waiters"

        # Refreshes that can fall in the interval, per process: one every two heartbeats.
        beats = int(QUIET / (2 * HEARTBEAT)) + 1
        # By design: one refresh per tenant per process each time, and no retry at all
        # (the head's retry time is an hour away; the others wait for a notification).
        scripts_bound = beats * PROCESSES
        bound = beats * PROCESSES * refresh_all
        assert by_command.get("evalsha", 0) <= scripts_bound, by_command
        assert set(by_command) - {"info"} <= SCRIPT_ONLY, f"not only scripts: {by_command}"
        assert delta <= bound, f"{delta} commands in {QUIET}s (bound {bound}): {by_command}"
        # A polling loop (every waiter retrying once a second) would cost a retry per waiter per second.
        polling = PROCESSES * PER_PROCESS * QUIET * head_retry
        assert bound * 5 < polling, (bound, polling)
        # One pub/sub connection per process serves all its waiters.
        subscribers = [c for c in client.client_list() if int(c.get("sub", 0)) > 0]
        assert len(subscribers) == PROCESSES, subscribers
        # The heartbeats did run (so the count measured live waiters), and nobody was admitted.
        assert by_command.get("evalsha", 0) >= PROCESSES, by_command
        assert client.hlen(base + ":q") == PROCESSES * PER_PROCESS
        assert all(worker.process.poll() is None for worker in workers)
        assert all(worker.lines.empty() or worker.lines.get().get("event") == "started" for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
        control.close()
        client.close()
