"""The fleet demo: N workers share one small dollar window, pause when it is spent, resume on refill.

Each worker is an agent of the demo tenant making simulated LLM calls (random
token counts priced like gpt-4o-mini, no network): it reserves an estimate
(``max_tokens`` of output), "calls", and commits the actual cost. Workers run
as tasks of this process, or spread over OS processes (`DemoConfig.processes`)
that reach the same Redis by URL. The parent follows the tenant's event
channel: a ``waiting`` event pauses a worker in the view, ``resumed`` resumes
it. `run_demo` drives it all and reports to a `DemoView`.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from slowburn_redis.budget import Budget
from slowburn_redis.errors import BudgetTimeout
from slowburn_redis.events import Event
from slowburn_redis.status import Status
from slowburn_redis.tasks import cancel_and_wait

MODEL = "gpt-4o-mini"
USD_PER_INPUT_TOKEN = 0.15 / 1_000_000
USD_PER_OUTPUT_TOKEN = 0.60 / 1_000_000
MAX_OUTPUT_TOKENS = 600


MAX_WORKERS = 1000
MAX_PROCESSES = 32
MAX_SECONDS = 86400.0
MAX_CALLS = 1_000_000
REARM_POINTS = 25
"""A threshold level shown once is shown again only after usage fell this many points below it."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs: `workers` sharing ``usd <usd>/<window>s`` for `seconds`, or `calls` each.

    With `calls` each worker stops after that many calls, however long they
    take (and at `seconds` too, when that is given); without it the run lasts
    `seconds`. Sizes are bounded (`MAX_WORKERS`, `MAX_PROCESSES`,
    `MAX_SECONDS`, `MAX_CALLS`): `check` raises ValueError beyond them.
    """

    tenant: str = "demo"
    workers: int = 4
    seconds: float | None = 15.0
    usd: float = 0.01
    window: float = 5.0
    processes: int = 0
    """0: every worker is a task of this process; N: workers spread over N OS processes."""
    calls: int | None = None
    """Calls per worker; None: as many as fit in `seconds`."""
    latency: tuple[float, float] = (0.15, 0.45)
    """Range of the simulated call's duration, in seconds."""

    @property
    def limit(self) -> str:
        return f"usd {self.usd}/{self.window:g}s"

    def check(self) -> None:
        """Raise ValueError naming the option when a size is out of bounds."""
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}, not {self.workers}")
        if not 0 <= self.processes <= min(MAX_PROCESSES, self.workers):
            raise ValueError(
                f"--processes must be between 0 and {MAX_PROCESSES} and at most --workers ({self.workers}), "
                f"not {self.processes}"
            )
        if self.seconds is not None and not 0 < self.seconds <= MAX_SECONDS:
            raise ValueError(f"--seconds must be greater than 0 and at most {MAX_SECONDS:g}, not {self.seconds:g}")
        if self.calls is not None and not 1 <= self.calls <= MAX_CALLS:
            raise ValueError(f"--calls must be between 1 and {MAX_CALLS}, not {self.calls}")
        if self.seconds is None and self.calls is None:
            raise ValueError("the demo needs --seconds or --calls to end")

    @property
    def length(self) -> str:
        """``for 15s``, ``for 3 calls each`` or ``for 3 calls each (at most 15s)``."""
        if self.calls is None:
            return f"for {self.seconds:g}s"
        return f"for {self.calls} calls each" + ("" if self.seconds is None else f" (at most {self.seconds:g}s)")

    def worker_names(self) -> list[str]:
        return [f"worker-{i + 1}" for i in range(self.workers)]


@dataclass(frozen=True)
class SimulatedCall:
    """One simulated LLM call: its tokens, its price and how long it takes."""

    input_tokens: int
    output_tokens: int
    latency: float

    @property
    def usd(self) -> float:
        return self.input_tokens * USD_PER_INPUT_TOKEN + self.output_tokens * USD_PER_OUTPUT_TOKEN

    @property
    def estimate_usd(self) -> float:
        """What a caller reserves before the call: the prompt plus `MAX_OUTPUT_TOKENS` of output."""
        return self.input_tokens * USD_PER_INPUT_TOKEN + MAX_OUTPUT_TOKENS * USD_PER_OUTPUT_TOKEN

    @classmethod
    def draw(cls, rng: random.Random, latency: tuple[float, float]) -> SimulatedCall:
        return cls(rng.randint(800, 2500), rng.randint(100, MAX_OUTPUT_TOKENS), rng.uniform(*latency))


@dataclass
class WorkerState:
    """What the view shows of one worker."""

    name: str
    pid: int = 0
    calls: int = 0
    usd: float = 0.0
    state: str = "starting"
    """starting, working, paused or done."""
    pauses: int = 0
    waited: float = 0.0
    paused_at: float | None = None


@dataclass
class DemoState:
    """The whole fleet as the parent sees it."""

    config: DemoConfig
    started: float = field(default_factory=time.monotonic)
    workers: dict[str, WorkerState] = field(default_factory=dict)
    status: Status | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def calls(self) -> int:
        return sum(w.calls for w in self.workers.values())

    @property
    def usd(self) -> float:
        return sum(w.usd for w in self.workers.values())


class DemoView(Protocol):
    """Where the demo reports: a state change as a line, and the whole state on every tick."""

    def line(self, state: DemoState, text: str) -> None: ...

    def tick(self, state: DemoState) -> None: ...


Progress = Callable[[str, int, int, float], None]
"""progress(worker, pid, calls, usd): a worker finished a call."""


async def run_worker(budget: Budget, config: DemoConfig, name: str, deadline: float | None, progress: Progress) -> None:
    """Call, commit, repeat until `config.calls` calls or `deadline` (wall clock; None: none).

    A wait past the deadline ends the worker.
    """
    rng = random.Random()
    calls, spent = 0, 0.0
    while config.calls is None or calls < config.calls:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            break
        call = SimulatedCall.draw(rng, config.latency)
        try:
            reservation = await budget.acquire(
                config.tenant,
                name,
                usd=call.estimate_usd,
                input_tokens=call.input_tokens,
                output_tokens=MAX_OUTPUT_TOKENS,
                timeout=left,
            )
        except BudgetTimeout:
            break
        try:
            await asyncio.sleep(call.latency)
        except BaseException:
            await reservation.release()
            raise
        await reservation.commit(
            usd=call.usd, input_tokens=call.input_tokens, output_tokens=call.output_tokens, model=MODEL
        )
        calls, spent = calls + 1, spent + call.usd
        progress(name, os.getpid(), calls, spent)


async def _run_workers(
    budget: Budget, config: DemoConfig, names: list[str], deadline: float | None, progress: Progress
) -> None:
    await asyncio.gather(*(run_worker(budget, config, name, deadline, progress) for name in names))


def _child(url: str, prefix: str, config: DemoConfig, names: list[str], deadline: float | None, out: Any) -> None:
    """Entry point of a worker process: its share of the workers, reporting progress on `out`."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

    def progress(name: str, pid: int, calls: int, usd: float) -> None:
        out.put((name, pid, calls, usd))

    async def main() -> None:
        async with Budget.from_url(url, prefix=prefix) as budget:
            await _run_workers(budget, config, names, deadline, progress)

    asyncio.run(main())


@contextlib.contextmanager
def tcp_fake_server() -> Iterator[str]:
    """A fakeredis server on a free local TCP port for the duration (so other processes can share it)."""
    import fakeredis

    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="slowburn-demo-redis", daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"redis://{host!s}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()


class _Fleet:
    """The parent's bookkeeping: applies progress and events to a DemoState and tells the view."""

    def __init__(self, config: DemoConfig, view: DemoView) -> None:
        self.state = DemoState(config, workers={n: WorkerState(n) for n in config.worker_names()})
        self.view = view
        self.announced: set[int] = set()
        """Threshold levels shown and not yet re-armed."""

    def rearm(self, status: Status) -> None:
        """Re-arm each shown threshold level once usage fell `REARM_POINTS` below it.

        The scripts announce a level again whenever a refund dips the window
        under it and the next acquire rises past it again; the view shows each
        level once per real crossing.
        """
        if status.limits:
            percent = status.limits[0].fraction * 100
            self.announced = {level for level in self.announced if percent >= level - REARM_POINTS}

    def progress(self, name: str, pid: int, calls: int, usd: float) -> None:
        worker = self.state.workers[name]
        worker.pid, worker.calls, worker.usd = pid, calls, usd
        if worker.state == "starting":
            worker.state = "working"

    def event(self, event: Event) -> None:
        worker = self.state.workers.get(event.agent or "")
        if event.type == "threshold":
            level = int((event.model_extra or {}).get("level") or 0)
            if level not in self.announced:
                self.announced.add(level)
                self.view.line(self.state, f"{self.state.config.limit}: {level} % used")
        if worker is None:
            return
        if event.type == "waiting":
            worker.state, worker.paused_at = "paused", time.monotonic()
            worker.pauses += 1
            self.view.line(self.state, f"{worker.name} paused: {self.state.config.limit} is spent")
        elif event.type == "resumed":
            waited = 0.0 if worker.paused_at is None else time.monotonic() - worker.paused_at
            worker.state, worker.paused_at = "working", None
            worker.waited += waited
            self.view.line(self.state, f"{worker.name} resumed after {waited:.1f}s")

    def finish(self) -> None:
        for worker in self.state.workers.values():
            if worker.paused_at is not None:
                worker.waited += time.monotonic() - worker.paused_at
                worker.paused_at = None
            worker.state = "done"


async def _follow_events(budget: Budget, tenant: str, fleet: _Fleet, subscribed: asyncio.Event) -> None:
    channel = budget.key(tenant) + ":events"
    events = budget.events(tenant)
    first = asyncio.ensure_future(anext(events))  # subscribes, then waits for the first event
    try:
        for _ in range(500):  # wait until Redis counts the subscription
            if await budget.engine.subscribers(channel) > 0:
                break
            await asyncio.sleep(0.01)
        subscribed.set()
        fleet.event(await first)
        async for event in events:
            fleet.event(event)
    finally:
        await cancel_and_wait([first])
        close = getattr(events, "aclose", None)  # an async generator: close its pub/sub now
        if close is not None:
            await close()


async def run_demo(budget: Budget, config: DemoConfig, view: DemoView, *, url: str | None = None) -> DemoState:
    """Set the demo limit, run the fleet for `config.seconds` (or `config.calls` each), return the final state.

    `budget` is the parent's (events, status); with `config.processes` the
    workers run in OS processes that reach the same store at `url`.
    """
    if config.processes and url is None:
        raise ValueError("workers in other processes need the store's URL")
    await budget.set_limits(config.tenant, [config.limit])
    await budget.reset(config.tenant)
    fleet = _Fleet(config, view)
    subscribed = asyncio.Event()
    follower = asyncio.create_task(_follow_events(budget, config.tenant, fleet, subscribed))
    await subscribed.wait()
    fleet.state.started = time.monotonic()
    deadline = None if config.seconds is None else time.time() + config.seconds
    view.line(fleet.state, f"{config.workers} workers share {config.limit} {config.length}")
    if config.processes:
        assert url is not None
        runner = asyncio.create_task(_run_processes(config, url, budget.prefix, deadline, fleet))
    else:
        runner = asyncio.create_task(_run_workers(budget, config, config.worker_names(), deadline, fleet.progress))
    try:
        while not runner.done():
            fleet.state.status = await budget.status(config.tenant)
            fleet.rearm(fleet.state.status)
            view.tick(fleet.state)
            await asyncio.wait({runner}, timeout=0.25)
        await runner
    finally:
        await cancel_and_wait([runner, follower])
    fleet.finish()
    fleet.state.status = await budget.status(config.tenant)
    view.tick(fleet.state)
    return fleet.state


async def _run_processes(config: DemoConfig, url: str, prefix: str, deadline: float | None, fleet: _Fleet) -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    names = config.worker_names()
    shares = [names[i :: config.processes] for i in range(config.processes)]
    children = [
        context.Process(target=_child, args=(url, prefix, config, share, deadline, out), daemon=True)
        for share in shares
        if share
    ]
    for child in children:
        child.start()

    def drain(wait: float) -> None:
        try:
            while True:
                fleet.progress(*out.get(timeout=wait))
        except queue.Empty:
            pass

    try:
        while any(child.is_alive() for child in children):
            await asyncio.to_thread(drain, 0.1)
        drain(0.05)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join(timeout=5)
    failed = [child.exitcode for child in children if child.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) failed (exit codes {failed})")
