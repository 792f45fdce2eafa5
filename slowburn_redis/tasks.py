"""Stopping asyncio tasks reliably."""

from __future__ import annotations

import asyncio
from typing import Any


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
