"""Run budget coroutines on the loop that owns the budget's connections, from any thread or loop.

A `Budget`'s Redis connections belong to the event loop they were opened on.
Frameworks call hooks from elsewhere: LangChain runs an async callback of a
blocking ``invoke`` in a fresh ``asyncio.Runner``, CrewAI and AG2 call from
worker threads, a blocking call may even run inside a coroutine and stall
its own loop. `LoopBridge` picks, per call:

- on the budget's home loop (the loop running when the bridge was built, or
  the portal loop of a `SyncBudget`): the budget itself, awaited in place;
- anywhere else (another loop, a thread, blocking code): a private blocking
  twin (``budget.sync()``, built once, on its own thread), which no caller
  can stall. From a coroutine it is awaited without blocking that loop.

So no combination waits on a loop that cannot run: nothing hangs. A call
opened on one side is settled on the same side (`MeteredCall` remembers its
loop; `run_on` sends a coroutine there).

One twin per Budget, shared by every bridge on it (one thread, one
connection pool, one pub/sub connection per process, as the budget's own
waiting design wants). It is closed with the Budget (``await budget.aclose()``
closes it too) or by `close_twin`; the next blocking use builds a new one.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from slowburn_redis.budget import Budget
from slowburn_redis.errors import InvalidInput
from slowburn_redis.sync import SyncBudget

T = TypeVar("T")


_TWINS: weakref.WeakKeyDictionary[Budget, SyncBudget] = weakref.WeakKeyDictionary()
_TWINS_LOCK = threading.Lock()


def twin_of(budget: Budget) -> SyncBudget:
    """The blocking twin of `budget`, built once and shared; closed when the budget is closed."""
    with _TWINS_LOCK:
        twin = _TWINS.get(budget)
        if twin is not None:
            return twin
        twin = budget.sync()
        _TWINS[budget] = twin
        if not getattr(budget, "_slowburn_twin_aclose", False):
            original = budget.aclose

            async def aclose() -> None:
                try:
                    await original()
                finally:
                    await asyncio.to_thread(close_twin, budget)

            setattr(budget, "aclose", aclose)  # noqa: B010 - the instance closes its twin with itself
            setattr(budget, "_slowburn_twin_aclose", True)  # noqa: B010
        return twin


def close_twin(budget: Budget) -> None:
    """Close the shared blocking twin of `budget`, if one was built (the next blocking use builds another)."""
    with _TWINS_LOCK:
        twin = _TWINS.pop(budget, None)
    if twin is not None:
        try:
            twin.portal.call(stop_litellm_worker())  # litellm's logging task, if it ran on the twin's loop
        finally:
            twin.close()


class LoopMismatch(InvalidInput):
    """A blocking settle was asked on the very thread whose loop must run it: it could never finish."""


class LoopBridge:
    """The budget a coroutine may use here and now, and a way to run it there (see the module docstring)."""

    def __init__(self, budget: Budget | SyncBudget) -> None:
        self._twin: SyncBudget | None = None
        if isinstance(budget, SyncBudget):
            self.budget = budget.budget
            self.home: asyncio.AbstractEventLoop | None = budget.portal.loop
            self._twin = budget
        elif isinstance(budget, Budget):
            self.budget = budget
            try:
                self.home = asyncio.get_running_loop()
            except RuntimeError:
                self.home = None
        else:
            raise InvalidInput(f"expected a Budget or a SyncBudget, not {type(budget).__name__}")

    def twin(self) -> SyncBudget:
        """The blocking side: the SyncBudget given, or the Budget's shared twin (`twin_of`)."""
        return self._twin if self._twin is not None else twin_of(self.budget)

    def has_twin(self) -> bool:
        """True when a blocking side exists now (given, or built by some blocking use)."""
        return self._twin is not None or self.budget in _TWINS

    def _here(self) -> asyncio.AbstractEventLoop | None:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def on_home(self) -> bool:
        """True when the running loop is the budget's own (the budget may be awaited in place)."""
        here = self._here()
        return here is not None and here is self.home

    async def arun(self, make: Callable[[Budget], Coroutine[Any, Any, T]]) -> T:
        """Await ``make(budget)`` on the home loop in place, else on the twin's loop without blocking this one."""
        if self.on_home():
            return await make(self.budget)
        twin = self.twin()
        if self._here() is twin.portal.loop:
            return await make(twin.budget)
        return await _await_on(twin.portal.loop, make(twin.budget))

    def run(self, make: Callable[[Budget], Coroutine[Any, Any, T]]) -> T:
        """Block until ``make(budget)`` has run on the twin's loop (from any thread, even a loop's own)."""
        twin = self.twin()
        return twin.portal.call(make(twin.budget))

    def close(self) -> None:
        """Close the Budget's shared twin, if built (a SyncBudget passed in stays the caller's to close)."""
        if self._twin is None:
            close_twin(self.budget)


async def _await_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on `loop` (another thread's) and await it here; cancelling here cancels it there."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    return await asyncio.wrap_future(future)


async def arun_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on `loop`: in place when it is the running loop, else across threads."""
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        return await coro
    return await _await_on(loop, coro)


def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Block until `coro` ran on `loop`; LoopMismatch (at once) when this thread is the one running `loop`."""
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is loop:
        coro.close()
        raise LoopMismatch(
            "a call admitted on this thread's running event loop cannot be settled by blocking it: "
            "settle it with the async method (await), or admit it from blocking code"
        )
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


async def stop_litellm_worker() -> None:
    """Stop litellm's background logging task if it runs on this loop.

    litellm starts one on every loop it is used from; on a private loop that
    is about to stop, a pending task would otherwise be left behind.
    """
    try:
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
    except ImportError:  # another litellm version: nothing to stop
        return
    if getattr(GLOBAL_LOGGING_WORKER, "_bound_loop", None) is asyncio.get_running_loop():
        await GLOBAL_LOGGING_WORKER.stop()
