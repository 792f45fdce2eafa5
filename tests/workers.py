"""Worker processes for the multi-process tests, and the test side that drives them.

Run as ``python -m tests.workers <command> --url URL --prefix P --tenant T ...``.
A worker reports on stdout, one JSON object per line (``{"event": ...}``), and
takes orders on stdin, one per line (``commit 0.1``, ``release``, ``exit``).

Commands:

- ``acquire``: one acquire (async Budget, or SyncBudget with ``--sync``); then,
  by ``--then``: ``commit`` at once (the estimate, or ``--commit-usd``),
  ``release`` at once, ``stdin`` (wait for orders), or ``hold`` (sleep forever
  without settling, to be killed).
- ``waiters``: ``--count`` concurrent acquires in one process; each commits at
  its estimate when admitted.
  ``--keepalive N`` extends the lease every N seconds while held.
- ``reset``: reset the tenant (wakes every waiter) and exit.

`Worker` (the test side) starts one and reads its lines with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from slowburn_redis import Budget, BudgetDenied, BudgetTimeout

ROOT = Path(__file__).resolve().parent.parent


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)


def _budget(args: argparse.Namespace) -> Budget:
    return Budget.from_url(args.url, prefix=args.prefix, heartbeat=args.heartbeat, lease_ttl=args.lease_ttl)


def _acquire_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"priority": args.priority, "mode": args.mode}
    if args.usd is not None:
        kwargs["usd"] = args.usd
    if args.timeout is not None:
        kwargs["timeout"] = args.timeout
    return kwargs


def _error(exc: BaseException) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, BudgetDenied):
        fields["limit"] = exc.limit
    if isinstance(exc, BudgetTimeout):
        fields["has_status"] = exc.status is not None
    return fields


async def _orders(reservation: Any) -> None:
    """Obey stdin until ``exit`` or end of input: commit/release/extend the reservation."""
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "exit":
            return
        verb, *rest = line.split()
        if verb == "commit":
            settlement = await reservation.commit(usd=rest[0]) if rest else await reservation.commit()
            emit("settled", state=settlement.state)
        elif verb == "release":
            settlement = await reservation.release()
            emit("settled", state=settlement.state)
        elif verb == "extend":
            emit("extended", ok=await reservation.extend(float(rest[0]) if rest else None))
        else:
            emit("unknown_order", order=line)


async def _keep_alive(reservation: Any, every: float, ttl: float) -> None:
    """Extend the lease every `every` seconds, as a long call's heartbeat would."""
    while True:
        await asyncio.sleep(every)
        emit("extended", ok=await reservation.extend(ttl))


async def _acquire_async(args: argparse.Namespace) -> int:
    budget = _budget(args)
    keepalive: asyncio.Task[None] | None = None
    try:
        emit("started", label=args.label)
        try:
            reservation = await budget.acquire(args.tenant, args.agent, **_acquire_kwargs(args))
        except BudgetDenied as exc:
            emit("denied", label=args.label, **_error(exc))
            return 3
        emit("admitted", label=args.label, id=reservation.id, at_ms=reservation.admitted_at_ms)
        if args.keepalive:
            keepalive = asyncio.create_task(_keep_alive(reservation, args.keepalive, args.lease_ttl))
        if args.then == "commit":
            usd = args.commit_usd
            settlement = await reservation.commit(usd=usd) if usd is not None else await reservation.commit()
            emit("settled", label=args.label, state=settlement.state)
        elif args.then == "release":
            settlement = await reservation.release()
            emit("settled", label=args.label, state=settlement.state)
        elif args.then == "stdin":
            await _orders(reservation)
        elif args.then == "hold":
            await asyncio.sleep(3600)
        return 0
    finally:
        if keepalive is not None:
            keepalive.cancel()
        await budget.aclose()


def _acquire_sync(args: argparse.Namespace) -> int:
    """The blocking twin; a SIGINT while waiting surfaces as KeyboardInterrupt from acquire.

    With ``--interrupts N`` the worker waits N times, each ended by a SIGINT
    (reported as ``interrupted`` with its round) and each after the first
    started by a ``next`` order on stdin; then it exits 0 without settling.
    """
    with _budget(args).sync() as budget:
        for round_ in range(args.interrupts):
            if round_ and sys.stdin.readline().strip() != "next":
                return 1
            try:
                emit("started", label=args.label, round=round_)
                budget.acquire(args.tenant, args.agent, **_acquire_kwargs(args))
            except KeyboardInterrupt:
                emit("interrupted", label=args.label, round=round_)
            else:
                emit("admitted", label=args.label, round=round_)
                return 1
        if args.interrupts:
            return 0
        emit("started", label=args.label)
        try:
            reservation = budget.acquire(args.tenant, args.agent, **_acquire_kwargs(args))
        except KeyboardInterrupt:
            emit("interrupted", label=args.label)
            raise
        emit("admitted", label=args.label, id=reservation.id)
        if args.then == "commit":
            reservation.commit()
        elif args.then == "release":
            reservation.release()
        elif args.then == "hold":
            time.sleep(3600)
    return 0


async def _waiters(args: argparse.Namespace) -> int:
    budget = _budget(args)

    async def one(i: int) -> None:
        reservation = await budget.acquire(args.tenant, f"{args.label}{i}", **_acquire_kwargs(args))
        emit("admitted", label=f"{args.label}{i}", id=reservation.id)
        await reservation.commit()

    try:
        emit("started", label=args.label, count=args.count)
        await asyncio.gather(*(one(i) for i in range(args.count)))
        return 0
    finally:
        await budget.aclose()


async def _reset(args: argparse.Namespace) -> int:
    async with _budget(args) as budget:
        windows = await budget.reset(args.tenant)
        emit("reset", windows=windows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.workers")
    parser.add_argument("command", choices=["acquire", "waiters", "reset"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--agent", default=None)
    parser.add_argument("--label", default="")
    parser.add_argument("--usd", default=None)
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--mode", default="wait")
    parser.add_argument("--lease-ttl", type=float, default=60.0)
    parser.add_argument("--heartbeat", type=float, default=60.0)
    parser.add_argument("--then", default="commit", choices=["commit", "release", "stdin", "hold"])
    parser.add_argument("--commit-usd", default=None)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--keepalive", type=float, default=0.0, help="extend the lease every N seconds")
    parser.add_argument("--sync", action="store_true")
    parser.add_argument("--interrupts", type=int, default=0, help="with --sync: wait N times, each ended by SIGINT")
    args = parser.parse_args(argv)
    # A process started in the background by a non-interactive shell inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: restore it, the tests send SIGINT on purpose.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.command == "acquire" and args.sync:
        return _acquire_sync(args)
    runner = {"acquire": _acquire_async, "waiters": _waiters, "reset": _reset}[args.command]
    return asyncio.run(runner(args))


# the test side -----------------------------------------------------------------


class Worker:
    """A worker subprocess; its stdout lines are parsed into a queue by a reader thread."""

    def __init__(self, command: str, url: str, prefix: str, tenant: str, *options: str) -> None:
        argv = [sys.executable, "-m", "tests.workers", command, "--url", url, "--prefix", prefix, "--tenant", tenant]
        self.process = subprocess.Popen(
            [*argv, *options],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.log: list[str] = []  # the worker's other stdout lines (its structlog output)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.log.append(line.rstrip())

    def expect(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        """The next line whose event is `event` (other lines are kept in `seen`); fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"worker {self.process.pid} sent no {event!r} in {timeout}s; {self.describe()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    raise AssertionError(f"worker exited before {event!r}; {self.describe()}") from None
                continue
            self.seen.append(line)
            if line["event"] == event:
                return line

    def send(self, order: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(order + "\n")
        self.process.stdin.flush()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout=timeout)

    def describe(self) -> str:
        stderr = ""
        if self.process.poll() is not None and self.process.stderr is not None:
            stderr = self.process.stderr.read()[-3000:]
        log = "\n".join(self.log[-40:])
        return f"exit={self.process.poll()} seen={self.seen} stderr={stderr} log=\n{log}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()


if __name__ == "__main__":
    sys.exit(main())
