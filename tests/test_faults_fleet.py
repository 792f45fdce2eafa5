"""Faults under a fleet: several worker processes on one real redis-server the test breaks on purpose.

Each test runs `WORKERS` processes x `TASKS` tasks of `tests.fault_worker`
(acquire, call, commit, again) against a redis-server of its own, breaks
Redis while they run, and then checks, from the record of every admission:
no window-length interval exceeds a limit, every error the workers saw is a
typed `SlowburnError`, and every worker stops when told (none hangs).
"""

from __future__ import annotations

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

from slowburn_redis.limits import UNITS
from tests.servers import RedisServer, redis_server_available
from tests.test_fleet import max_in_any_window

ROOT = Path(__file__).resolve().parent.parent
PREFIX, TENANT = "faults", "fleet"
WORKERS, TASKS = 3, 4
USD_LIMIT, WINDOW_MS = 0.5, 10_000
LIMITS = [f"usd {USD_LIMIT}/10s", "concurrency 6"]


class Fleet:
    """The worker processes of one test and their live outcome files (closing a worker's stdin stops it)."""

    def __init__(
        self, url: str, directory: Path, desired: dict[str, Any] | None = None, *, test_clock: bool = False
    ) -> None:
        self.directory = directory
        self.outs = [directory / f"worker-{n}.jsonl" for n in range(WORKERS)]
        extra = [json.dumps(desired)] if desired is not None else []
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULT_WORKER_TEST_CLOCK": "1" if test_clock else "0"}
        self.logs = [directory / f"worker-{n}.log" for n in range(WORKERS)]
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fault_worker",
                    url,
                    PREFIX,
                    TENANT,
                    str(TASKS),
                    str(n),
                    str(out),
                    *extra,
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=self.logs[n].open("w"),  # a file, not a pipe: a full pipe would block a worker
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n, out in enumerate(self.outs)
        ]

    def records(self) -> list[list[dict[str, Any]]]:
        """Each worker's outcomes so far."""
        out = []
        for path in self.outs:
            lines = path.read_text().splitlines() if path.exists() else []
            out.append([json.loads(line) for line in lines if line.endswith("}")])
        return out

    def wait_for(self, condition: Callable[[list[list[dict[str, Any]]]], bool], what: str) -> None:
        """Poll the outcome files until `condition` holds (bounded: a fault test must not hang)."""
        for _ in range(3000):
            if condition(self.records()):
                return
            for process in self.processes:
                assert process.poll() is None, f"a worker died while waiting for {what}: {self.log_texts()}"
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}: {self.records()!r:.2000}")

    def stop(self) -> list[str]:
        """Tell every worker to stop and wait for it (a hang fails the test); their log output."""
        for process in self.processes:
            process.stdin.close()  # type: ignore[union-attr]
        for process in self.processes:
            process.wait(timeout=90)
            assert process.returncode == 0, self.log_texts()
        return self.log_texts()

    def log_texts(self) -> list[str]:
        return [path.read_text() for path in self.logs]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_server(tmp_path)  # no persistence: a restart comes back empty


def running_server(tmp_path: Path, *args: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own with `args`, stopped after it."""
    if not redis_server_available():
        pytest.fail("redis-server is required on PATH for this test")
    running = RedisServer(tmp_path / "redis", *args)
    running.start()
    yield running
    running.stop()


def set_limits(server: RedisServer, limits: list[str] = LIMITS) -> None:
    """Set `limits` as an operator would (in a short-lived process of its own)."""
    script = (
        "import asyncio, sys; from slowburn_redis import Budget\n"
        "async def main():\n"
        f"    async with Budget.from_url({server.url!r}, prefix={PREFIX!r}) as b:\n"
        f"        await b.set_limits({TENANT!r}, {limits!r})\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)


def server_ms(server: RedisServer) -> int:
    client = redis.Redis(port=server.port)
    seconds, micros = client.time()
    client.close()
    return int(seconds) * 1000 + int(micros) // 1000


def restart_empty(server: RedisServer) -> int:
    """SIGKILL the server and start it again with nothing; the time of the kill, in ms.

    Read from this host's clock once the process is dead, so no admission of
    the old server comes after it, and every admission of the new one (same
    host, same clock, started later) comes after it. (The new server's time,
    read once it answers, would come after admissions a loaded machine let
    the workers make first.)
    """
    server.kill()
    killed_at = int(time.time() * 1000)
    server.start()
    return killed_at


def flat(records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [r for worker in records for r in worker]


def admissions(records: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [{"t": r["admitted"], "usd": r["usd"]} for r in flat(records) if "admitted" in r]


def every_worker_admitted(records: list[list[dict[str, Any]]]) -> bool:
    return all(any("admitted" in r for r in worker) for worker in records)


def every_worker_refused(error: str, times: int) -> Callable[[list[list[dict[str, Any]]]], bool]:
    """A condition: every worker saw `error` at least `times` times."""
    return lambda records: all(sum(r.get("error") == error for r in worker) >= times for worker in records)


def assert_typed(records: list[list[dict[str, Any]]]) -> None:
    untyped = [r for r in flat(records) if "untyped" in r]
    assert not untyped, untyped[:5]


def test_an_empty_restart_refuses_the_fleet_instead_of_admitting_it(server: RedisServer, tmp_path: Path) -> None:
    set_limits(server)
    fleet = Fleet(server.url, tmp_path)
    try:
        fleet.wait_for(every_worker_admitted, "every worker to be admitted")
        killed_at = restart_empty(server)
        fleet.wait_for(every_worker_refused("LimitsMissing", 3), "every worker to be refused three times")
        logs = fleet.stop()
    finally:
        fleet.kill()
    records = fleet.records()
    assert_typed(records)
    after = [a for a in admissions(records) if a["t"] > killed_at]
    refused = sum(r.get("error") == "LimitsMissing" for r in flat(records))
    print(f"empty restart: {len(admissions(records))} admitted before, {len(after)} after; {refused} LimitsMissing")
    assert after == [], "nothing is admitted once the limits are gone"
    assert max_in_any_window(admissions(records), "usd", WINDOW_MS) <= round(USD_LIMIT * UNITS["usd"])
    assert all("limits.vanished" in log for log in logs), "each process that saw the limits says they vanished"
    client = redis.Redis(port=server.port)
    assert client.keys(f"{PREFIX}:*r:*") == [], "no reservation was made after the restart"
    client.close()


def test_an_empty_restart_with_declared_limits_reseeds_once_and_holds_the_limit_again(
    server: RedisServer, tmp_path: Path
) -> None:
    set_limits(server)
    fleet = Fleet(server.url, tmp_path, desired={TENANT: LIMITS})
    try:
        fleet.wait_for(every_worker_admitted, "every worker to be admitted")
        killed_at = restart_empty(server)
        fleet.wait_for(
            lambda rs: sum(r.get("admitted", 0) > killed_at for r in flat(rs)) >= 20,
            "20 admissions after the restart",
        )
        logs = fleet.stop()
    finally:
        fleet.kill()
    records = fleet.records()
    assert_typed(records)
    limit = round(USD_LIMIT * UNITS["usd"])
    before = [a for a in admissions(records) if a["t"] <= killed_at]
    after = [a for a in admissions(records) if a["t"] > killed_at]
    # The history before the restart is gone (and said so): each side holds the limit on its own.
    assert max_in_any_window(before, "usd", WINDOW_MS) <= limit
    assert max_in_any_window(after, "usd", WINDOW_MS) <= limit
    reseeded = sum(log.count("limits.reseeded") for log in logs)
    peak = max_in_any_window(after, "usd", WINDOW_MS) / limit
    print(f"re-seeded restart: {len(before)} before, {len(after)} after; {reseeded} re-seed(s); peak after {peak:.2f}")
    assert 1 <= reseeded <= WORKERS, "re-seeded, by at most one call per process"
    assert all("history_lost=True" in line for log in logs for line in log.splitlines() if "limits.reseeded" in line)
    client = redis.Redis(port=server.port, decode_responses=True)
    assert client.hlen(f"{PREFIX}:{{{TENANT}}}:limits") == 1
    client.close()


def fill_memory(server: RedisServer) -> int:
    """Make Redis full: 12 MB of junk, then ``maxmemory`` below what it holds (noeviction); the server time then.

    (Filling up to a fixed ``maxmemory`` would leave Redis hovering at the
    boundary, where a small write can still pass.)
    """
    client = redis.Redis(port=server.port)
    for n in range(200):
        client.set(f"junk:{n}", b"x" * 65536)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used // 2)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("junk:probe", "1")
    client.close()
    return server_ms(server)


def free_memory(server: RedisServer) -> int:
    """Drop the junk and give Redis room again; the server time then."""
    client = redis.Redis(port=server.port)
    client.delete(*(f"junk:{n}" for n in range(200)))
    client.config_set("maxmemory", "64mb")
    client.close()
    return server_ms(server)


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from running_server(tmp_path, "--maxmemory", "64mb", "--maxmemory-policy", "noeviction")


def test_a_full_redis_refuses_the_fleet_with_a_typed_error_and_forgets_nothing(
    small_server: RedisServer, tmp_path: Path
) -> None:
    server = small_server
    set_limits(server)
    fleet = Fleet(server.url, tmp_path)
    try:
        fleet.wait_for(every_worker_admitted, "every worker to be admitted")
        full_at = fill_memory(server)
        fleet.wait_for(every_worker_refused("RedisOutOfMemory", 2), "every worker to be refused twice")
        freed_at = free_memory(server)
        fleet.wait_for(
            lambda rs: all(any(r.get("admitted", 0) > freed_at for r in w) for w in rs),
            "every worker to be admitted again once memory is free",
        )
        fleet.stop()
    finally:
        fleet.kill()
    records = fleet.records()
    assert_typed(records)
    oom = sum(r.get("error") == "RedisOutOfMemory" for r in flat(records))
    during = [a for a in admissions(records) if full_at < a["t"] < freed_at]
    print(f"full Redis: {oom} RedisOutOfMemory, {len(during)} admitted while full")
    assert not during, "nothing admitted while full"
    assert max_in_any_window(admissions(records), "usd", WINDOW_MS) <= round(USD_LIMIT * UNITS["usd"])
    client = redis.Redis(port=server.port, decode_responses=True)
    assert client.hlen(f"{PREFIX}:{{{TENANT}}}:limits") == 1, "the limits were never evicted"
    client.close()


def test_clock_steps_under_a_fleet_never_let_a_window_past_its_limit(server: RedisServer, tmp_path: Path) -> None:
    """The tenant's test clock walks on in 30 s steps, jumps 20 min ahead, walks, steps 20 min back, walks.

    The window is 10 minutes, so real time (which runs the keys' TTLs) stays
    far inside it while the test clock stands between steps.
    """
    window_ms = 600_000
    set_limits(server, [f"usd {USD_LIMIT}/10m", "concurrency 6"])
    clock_key = f"{PREFIX}:{{{TENANT}}}:testclock"
    client = redis.Redis(port=server.port)
    now = server_ms(server)
    client.set(clock_key, now)
    fleet = Fleet(server.url, tmp_path, test_clock=True)
    steps = [30_000] * 20 + [1_200_000] + [30_000] * 20 + [-1_200_000] + [30_000] * 20
    try:
        fleet.wait_for(lambda rs: any("admitted" in r for r in flat(rs)), "a first admission")
        for step in steps:
            now += step
            client.set(clock_key, now)
            seen = len(flat(fleet.records()))
            fleet.wait_for(lambda rs, seen=seen: len(flat(rs)) > seen, "the fleet to act at this instant")
        fleet.stop()
    finally:
        fleet.kill()
        client.close()
    records = fleet.records()
    assert_typed(records)
    found = admissions(records)
    peak = max_in_any_window(found, "usd", window_ms)
    print(f"clock steps: {len(found)} admissions, peak {peak / (USD_LIMIT * UNITS['usd']):.2f} of the limit")
    assert peak <= round(USD_LIMIT * UNITS["usd"])
