"""Stopping asyncio tasks reliably."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(tasks: list[asyncio.Task[Any]], *, attempts: int = 100) -> None:
    """Cancel `tasks` and wait until they are done, cancelling again those still running.

    A cancellation that lands while redis-py subscribes can be lost (an
    ``asyncio.wait_for`` race in Python 3.11), leaving the task waiting on its
    socket: a second cancel ends it.
    """
    pending = [task for task in tasks if not task.done()]
    for _ in range(attempts):
        if not pending:
            break
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
        pending = [task for task in pending if not task.done()]
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn about it


async def finish_despite_cancel(awaitable: Awaitable[T]) -> T:
    """Await `awaitable` to its end even if the calling task is cancelled meanwhile; then re-raise that cancel.

    For cleanup that must reach Redis (giving up a queue place, releasing a
    reservation) from a task that is already being cancelled: a second
    cancellation (a second Ctrl-C, a portal re-delivering a lost cancel) must
    not abandon it half-way.
    """
    inner = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(inner)
        except asyncio.CancelledError:
            if inner.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
