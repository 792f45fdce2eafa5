"""Section "sync": the blocking twin (`budget.sync()`) against the async Budget, same server, same process.

In one worker process of the fleet, each repetition runs, interleaved:
acquire+commit in a closed loop on one tenant whose limits are never reached,
from 16 asyncio tasks on the async Budget, from 16 threads on the sync twin,
and from 16 threads on the twin with the baseline portal (the hand-off of
slowburn-redis before issue 16, kept below for the comparison only); then the
same three with 1 task / 1 thread, for the latency. The goals are ratios
within a repetition: the twin's p50 (1 thread) within 1.25x of the async p50
(1 task), and 16 threads at >= 80% of the throughput of 16 tasks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.helpers import LoadResult, Settings, closed_loop, load_dict, median, merge_loads, ratio
from slowburn_redis.errors import BudgetClosed, WrongThread

T = TypeVar("T")

LIMITS = ["usd 1000000/day", "tokens 1000000000000/hour", "requests 1000000000/min", "concurrency 100000"]
KINDS = ("async", "sync", "sync_baseline")
WIDE = 16
"""Tasks (async) or threads (sync) in the throughput runs."""
P50_GOAL = 1.25
THROUGHPUT_GOAL = 0.80


# --- the baseline: the portal as it was before issue 16, for the before/after comparison only ------------


@dataclass
class _BaselineCall:
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    abandoned: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class BaselinePortal:
    """BASELINE, not the library's code: slowburn_redis.sync.Portal before issue 16 (one private loop per
    twin, every call submitted with `asyncio.run_coroutine_threadsafe`), copied here so that one bench run
    measures the old hand-off beside the new one."""

    def __init__(self) -> None:
        self._closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="baseline-portal", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise WrongThread("baseline portal: called from its own thread")
        if self._closed:
            coro.close()
            raise BudgetClosed("the sync budget is closed")
        call = _BaselineCall()

        async def run() -> T:
            task = asyncio.current_task()
            assert task is not None
            call.tasks.append(task)
            try:
                if call.abandoned:
                    coro.close()
                    raise asyncio.CancelledError
                return await coro
            finally:
                call.finished.set()

        try:
            return asyncio.run_coroutine_threadsafe(run(), self.loop).result()
        except BaseException:
            call.abandoned = True
            for _ in range(40):
                if call.finished.is_set():
                    break
                for task in list(call.tasks):
                    self.loop.call_soon_threadsafe(task.cancel)
                call.finished.wait(timeout=0.25)
            raise

    def stop(self) -> None:
        self._closed = True
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


def _baseline_twin(url: str) -> Any:
    """A SyncBudget whose portal is the baseline one (its methods only use `portal` and `budget`)."""
    from slowburn_redis import Budget, SyncBudget

    twin = SyncBudget.__new__(SyncBudget)
    twin.portal = BaselinePortal()  # type: ignore[assignment]

    async def build() -> Budget:
        return Budget.from_url(url, prefix="bench")

    twin.budget = twin.portal.call(build())
    return twin


# --- loads ----------------------------------------------------------------------------------------


def thread_loop(op: Callable[[], Any], *, threads: int, start_at: float, duration: float) -> LoadResult:
    """`threads` threads each calling `op()` back to back from `start_at` (time.time()) for `duration` s."""
    result = LoadResult()
    lock = threading.Lock()
    for _ in range(10):  # warm connections and script caches before the clock starts
        op()
    ready = threading.Barrier(threads + 1)

    def worker() -> None:
        lat: list[float] = []
        errors, first = 0, ""
        ready.wait()
        delay = start_at - time.time()
        if delay > 0:
            time.sleep(delay)
        stop = time.perf_counter() + duration
        while True:
            start = time.perf_counter()
            if start >= stop:
                break
            try:
                op()
            except Exception as exc:  # counted, never fatal: a benchmark reports what happened
                errors += 1
                first = first or f"{type(exc).__name__}: {exc}"
                if errors > 1000:
                    break
                continue
            end = time.perf_counter()
            if end <= stop:
                lat.append((end - start) * 1000)
        with lock:
            result.ops += len(lat)
            result.latencies_ms.extend(lat)
            result.errors += errors
            result.first_error = result.first_error or first

    pool = [threading.Thread(target=worker, name=f"bench-sync-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    ready.wait()
    for thread in pool:
        thread.join()
    result.elapsed = duration
    return result


async def load_job(
    *, index: int, url: str, kind: str, tenant: str, workers: int, start_at: float, duration: float
) -> dict[str, Any]:
    """One closed loop of acquire+commit on `tenant`: `workers` tasks (kind "async") or threads (the twins)."""
    from slowburn_redis import Budget

    agent = f"w{index}"
    if kind == "async":
        budget = Budget.from_url(url, prefix="bench")

        async def acquire_commit(_: int) -> None:
            r = await budget.acquire(tenant, agent, usd=0.001, tokens=1000, mode="reject")
            await r.commit(usd=0.0008, tokens=800)

        try:
            return load_dict(await closed_loop(acquire_commit, tasks=workers, start_at=start_at, duration=duration))
        finally:
            await budget.aclose()

    twin = Budget.from_url(url, prefix="bench").sync() if kind == "sync" else _baseline_twin(url)

    def sync_acquire_commit() -> None:
        r = twin.acquire(tenant, agent, usd=0.001, tokens=1000, mode="reject")
        r.commit(usd=0.0008, tokens=800)

    try:  # the threads block; this job's own loop has nothing else to do meanwhile
        return load_dict(thread_loop(sync_acquire_commit, threads=workers, start_at=start_at, duration=duration))
    finally:
        if kind == "sync":
            twin.close()
        else:
            twin.portal.call(twin.budget.aclose())
            twin.portal.stop()


async def setup_tenant(*, index: int, url: str, tenant: str) -> None:
    from slowburn_redis import Budget

    async with Budget.from_url(url, prefix="bench") as budget:
        await budget.set_limits(tenant, LIMITS)


def run(settings: Settings) -> dict[str, Any]:
    """Medians over `reps` repetitions, each running every kind wide (16) then narrow (1), interleaved."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"wide": {k: [] for k in KINDS}, "one": {k: [] for k in KINDS}}
    for rep in range(settings.reps):
        for width_label, workers in (("wide", WIDE), ("one", 1)):
            order = KINDS if rep % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                tenant = f"sync-{width_label}-{kind}-{rep}"
                settings.fleet.run("bench.sync_twin:setup_tenant", n=1, url=settings.url, tenant=tenant)
                results = settings.fleet.run(
                    "bench.sync_twin:load_job",
                    n=1,
                    url=settings.url,
                    kind=kind,
                    tenant=tenant,
                    workers=workers,
                    start_at=settings.start_at(0.5),
                    duration=settings.duration,
                )
                runs[width_label][kind].append(merge_loads(results))
    summary: dict[str, Any] = {}
    for width_label in runs:
        summary[width_label] = {
            kind: {
                "per_s": median(r["per_s"] for r in reps),
                "p50_ms": median(r["p50_ms"] for r in reps),
                "p99_ms": median(r["p99_ms"] for r in reps),
                "errors": sum(r["errors"] for r in reps),
            }
            for kind, reps in runs[width_label].items()
        }
    ratios: dict[str, float] = {}
    for kind in ("sync", "sync_baseline"):  # per repetition, then the median
        one = zip(runs["one"]["async"], runs["one"][kind], strict=True)
        ratios[f"{kind}_p50_x_async"] = median(ratio(s["p50_ms"], a["p50_ms"]) for a, s in one)
        wide = zip(runs["wide"]["async"], runs["wide"][kind], strict=True)
        ratios[f"{kind}_threads_share_of_tasks"] = median(ratio(s["per_s"], a["per_s"]) for a, s in wide)
    return {
        "limits": LIMITS,
        "wide": WIDE,
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "goals": {
            "p50_within_1.25x_of_async": ratios["sync_p50_x_async"] <= P50_GOAL,
            "threads_at_least_80pct_of_tasks": ratios["sync_threads_share_of_tasks"] >= THROUGHPUT_GOAL,
        },
    }
