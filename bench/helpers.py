"""Shared machinery: a private redis-server, a fleet of spawned worker processes, statistics."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import multiprocessing as mp
import os
import platform
import queue
import statistics
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from slowburn_redis.redis_server import RedisServer as _RedisServer

Job = Callable[..., Awaitable[Any]]


# --- redis-server ---------------------------------------------------------------------------------


class RedisServer(_RedisServer):
    """The bench's private redis-server: loopback, temp dir, no persistence, room for many clients."""

    def __init__(self) -> None:
        super().__init__(None, "--maxclients", "10000")


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command from INFO commandstats (the ``info`` calls themselves included)."""
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands run between two `command_calls` snapshots, without the INFO of the snapshots."""
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    delta["info"] = max(0, delta.get("info", 0) - 1)
    return {name: n for name, n in delta.items() if n > 0}


def script_server_time(client: redis.Redis) -> tuple[int, int]:
    """(calls, microseconds) spent by the server in EVALSHA so far."""
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    entry = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return int(entry["calls"]), int(entry["usec"])


class ClientRequests:
    """Counts the requests clients send (not the commands scripts run inside Redis) with MONITOR.

    Use as a context manager around the part to count; `counts` maps command name to calls.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._client = redis.Redis.from_url(url)
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._ready = threading.Event()

    def _read(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    item = monitor.next_command()
                except (redis.exceptions.RedisError, OSError, ValueError, AttributeError):
                    return
                if item.get("client_type") == "lua" or item.get("client_address") == "lua":
                    continue
                name = str(item.get("command", "")).split(" ", 1)[0].lower().strip('"')
                if name not in ("info", "hello", "client", "monitor", "echo"):  # this harness's own connections
                    self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> ClientRequests:
        self._thread.start()
        self._ready.wait(5)
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)
        self._stop.set()
        poke = redis.Redis.from_url(self._url)  # any command wakes the blocked MONITOR reader
        try:
            poke.echo("monitor-stop")
        finally:
            poke.close()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self._client.close()


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])  # type: ignore[index]


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in load],
    }


# --- statistics -----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


def median(values: Iterable[float]) -> float:
    items = list(values)
    return float(statistics.median(items)) if items else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": percentile(samples_ms, 50), "p99_ms": percentile(samples_ms, 99), "n": float(len(samples_ms))}


def sample(values: Sequence[float], limit: int = 5000) -> list[float]:
    """An evenly spaced subset of at most `limit` values (latency lists shipped back from workers)."""
    if len(values) <= limit:
        return list(values)
    step = len(values) / limit
    return [values[int(i * step)] for i in range(limit)]


# --- timed asyncio loops --------------------------------------------------------------------------


async def sleep_until(wall_time: float) -> None:
    """Sleep until `wall_time` (time.time() seconds): how spawned processes start a run together."""
    delay = wall_time - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


@dataclass
class LoadResult:
    """What one process measured in a closed-loop run: operations done and their latencies."""

    ops: int = 0
    elapsed: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""


async def closed_loop(
    op: Callable[[int], Awaitable[Any]], *, tasks: int, start_at: float, duration: float, warmup: int = 10
) -> LoadResult:
    """`tasks` coroutines each calling `op(task_index)` back to back from `start_at` for `duration` seconds."""
    result = LoadResult()
    for i in range(tasks):  # warm connections and script caches before the clock starts
        for _ in range(max(1, warmup // tasks)):
            await op(i)
    await sleep_until(start_at)
    t0 = time.perf_counter()
    stop = t0 + duration
    lat = result.latencies_ms

    async def worker(i: int) -> None:
        while True:
            start = time.perf_counter()
            if start >= stop:
                return
            try:
                await op(i)
            except Exception as exc:  # counted, never fatal: a benchmark reports what happened
                result.errors += 1
                if not result.first_error:
                    result.first_error = f"{type(exc).__name__}: {exc}"
                if result.errors > 1000:
                    return
                continue
            end = time.perf_counter()
            if end <= stop:
                result.ops += 1
                lat.append((end - start) * 1000)

    await asyncio.gather(*(worker(i) for i in range(tasks)))
    result.elapsed = duration
    return result


def merge_loads(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency of one run over every process that took part."""
    ops = sum(int(r["ops"]) for r in results)
    elapsed = max(float(r["elapsed"]) for r in results)
    latencies = [x for r in results for x in r["latencies_ms"]]
    errors = sum(int(r["errors"]) for r in results)
    out: dict[str, Any] = {"ops": ops, "per_s": ops / elapsed if elapsed else 0.0, "errors": errors}
    out.update(latency_summary(latencies))
    first = next((r["first_error"] for r in results if r.get("first_error")), "")
    if first:
        out["first_error"] = first
    return out


def load_dict(result: LoadResult) -> dict[str, Any]:
    return {
        "ops": result.ops,
        "elapsed": result.elapsed,
        "latencies_ms": sample(result.latencies_ms),
        "errors": result.errors,
        "first_error": result.first_error,
    }


# --- a fleet of spawned processes -----------------------------------------------------------------


def quiet_logs() -> None:
    """Drop the library's structlog output below ERROR (per-call debug lines, and the warnings that the
    benchmark counts itself, such as failed queue leaves) so that logging does not skew the figures."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def _worker_main(index: int, inbox: Any, outbox: Any) -> None:
    quiet_logs()
    while True:
        item = inbox.get()
        if item is None:
            return
        job_id, path, kwargs = item
        module_name, _, name = path.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), name)
            value = asyncio.run(fn(index=index, **kwargs))
            outbox.put((job_id, index, True, value))
        except BaseException:
            outbox.put((job_id, index, False, traceback.format_exc()))


class Fleet:
    """`size` long-lived worker processes (multiprocessing spawn) that run async jobs on request.

    A job is ``"module:function"``; each chosen worker runs ``asyncio.run(function(index=i, **kwargs))``
    and the results come back in worker order.
    """

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        self._outbox: Any = ctx.Queue()
        self._inboxes: list[Any] = [ctx.Queue() for _ in range(size)]
        self._procs = [
            ctx.Process(target=_worker_main, args=(i, self._inboxes[i], self._outbox), daemon=True) for i in range(size)
        ]
        for proc in self._procs:
            proc.start()
        self._next = 0

    def run(self, job: str, *, n: int | None = None, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run `job` on the first `n` workers (default: all) and return their results, worker 0 first."""
        count = self.size if n is None else n
        self._next += 1
        job_id = self._next
        for i in range(count):
            self._inboxes[i].put((job_id, job, kwargs))
        results: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(results) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job} did not finish within {timeout:.0f}s")
            try:
                got_id, index, ok, value = self._outbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs[:count]):
                    raise RuntimeError(f"a worker died while running {job}") from None
                continue
            if got_id != job_id:
                continue
            if not ok:
                raise RuntimeError(f"job {job} failed in worker {index}:\n{value}")
            results[index] = value
        return [results[i] for i in range(count)]

    def start(self, job: str, *, n: int | None = None, timeout: float = 120.0, **kwargs: Any) -> Callable[[float], Any]:
        """Run `job` as `run` does, from a background thread, so the caller can sample Redis meanwhile.

        Returns `wait(limit)`: it waits up to `limit` seconds for the job and
        gives its results, or None if it failed or did not end (the thread
        reports the error).
        """
        result: list[Any] = []
        thread = threading.Thread(
            target=lambda: result.append(self.run(job, n=n, timeout=timeout, **kwargs)), daemon=True
        )
        thread.start()

        def wait(limit: float) -> Any:
            thread.join(timeout=limit)
            return result[0] if result else None

        return wait

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Settings:
    """What every section needs: the server, the fleet, and how long to spend."""

    url: str
    fleet: Fleet
    quick: bool
    reps: int
    duration: float
    tasks: int = 16
    processes: int = 4

    def start_at(self, slack: float = 0.6) -> float:
        """A common start time, far enough ahead for every worker to connect and warm up."""
        return time.time() + slack
