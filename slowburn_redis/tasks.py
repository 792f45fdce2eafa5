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


_ABANDONED: set[asyncio.Future[Any]] = set()
"""Tasks cancelled by `abandon` that have not finished unwinding yet (a strong reference keeps them alive)."""


def abandon(task: asyncio.Future[Any], *, every: float = 0.1, attempts: int = 100) -> None:
    """Cancel `task` without waiting for it, cancelling again every `every` s while it still runs.

    For work nobody waits for any more (an attempt cut at its deadline, a
    batch whose callers all gave up). redis-py can lose a cancellation that
    lands while it sets up a connection (measured with redis-py 8.1 on
    Python 3.11: the task stays "cancelling", reading its socket until the
    socket timeout); the repeated cancel ends it. Its outcome is retrieved,
    and dropped, when it ends.
    """
    if task.done():
        _retrieve(task)
        return
    _ABANDONED.add(task)
    task.add_done_callback(_forget)
    _cancel_again(task, every, attempts)


def _cancel_again(task: asyncio.Future[Any], every: float, attempts: int) -> None:
    if task.done():
        return
    task.cancel()
    if attempts > 1:
        asyncio.get_running_loop().call_later(every, _cancel_again, task, every, attempts - 1)


def _forget(task: asyncio.Future[Any]) -> None:
    _ABANDONED.discard(task)
    _retrieve(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not warn about it


def abandoned() -> int:
    """How many abandoned tasks are still unwinding."""
    return len(_ABANDONED)
