"""A per-test watchdog: a test still running after `LIMIT` seconds is shown and stopped, never left to hang CI.

When the limit passes, the watchdog thread prints the stack of every thread
and of every asyncio task of every running event loop to stderr (what a hung
``await`` is waiting on), then cancels the tasks of those loops, so the test
fails with CancelledError and the suite goes on. A test that hangs outside an
event loop only gets the thread stacks. `LIMIT` is far above what any test
takes on a loaded machine: it catches hangs, it is not a timing assertion.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading

LIMIT = float(os.environ.get("SLOWBURN_TEST_WATCHDOG", "600"))


def _running_loops() -> list[asyncio.AbstractEventLoop]:
    return [obj for obj in gc.get_objects() if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running()]


def _dump_and_cancel(name: str) -> None:
    sys.stderr.write(f"\n=== watchdog: {name} still running after {LIMIT:.0f}s; stacks follow ===\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for loop in _running_loops():

        def dump_and_cancel_tasks(loop: asyncio.AbstractEventLoop = loop) -> None:
            for task in asyncio.all_tasks(loop):
                sys.stderr.write(f"--- task {task.get_name()}: {task.get_coro()!r}\n")
                task.print_stack(file=sys.stderr)
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(dump_and_cancel_tasks)
    sys.stderr.flush()


class Watchdog:
    """Started before a test and stopped after it; fires once if the test outlives `LIMIT`."""

    def __init__(self, name: str) -> None:
        self._timer = threading.Timer(LIMIT, _dump_and_cancel, args=(name,))
        self._timer.daemon = True

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
