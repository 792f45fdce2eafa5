"""The blocking twin of Budget: the same async code, run on a private event loop.

`SyncBudget` owns a thread running an asyncio loop (a portal) and a Budget
built inside it. Each method submits the async method to that loop and waits.
Interrupting a wait (KeyboardInterrupt) cancels the async call, whose own
cleanup leaves no reservation and no queue place behind.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from slowburn_redis.events import Event
from slowburn_redis.limits import Limit
from slowburn_redis.reservation import Reservation, Settlement
from slowburn_redis.status import Status

if TYPE_CHECKING:
    from slowburn_redis.budget import Budget
    from slowburn_redis.report import Report

T = TypeVar("T")

CANCEL_GRACE = 10.0
"""Seconds an interrupted call waits for the cancelled coroutine's cleanup."""
CANCEL_REPEAT = 0.25
"""Seconds between deliveries of a cancellation the coroutine has not acted on."""


@dataclass
class _PortalCall:
    """One `Portal.call`: the task running it (once started), whether its caller gave up, and its end."""

    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    abandoned: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class Portal:
    """An event loop on a daemon thread, with a blocking `call`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="slowburn-portal", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the portal loop and wait for it.

        If the calling thread is interrupted (KeyboardInterrupt) at any moment,
        even before the coroutine started, the coroutine is cancelled (or never
        started) and this waits (up to `CANCEL_GRACE` s) for its cleanup to
        finish before re-raising, so an interrupted wait leaves nothing behind
        in Redis. A cancellation that asyncio lost (the ``wait_for`` race of
        Python 3.11) is delivered again until the coroutine ends.
        """
        call = _PortalCall()

        async def run() -> T:
            task = asyncio.current_task()
            assert task is not None
            call.tasks.append(task)
            try:
                if call.abandoned:  # interrupted before it started: the check follows the append
                    coro.close()
                    raise asyncio.CancelledError
                return await coro
            finally:
                call.finished.set()

        try:
            return asyncio.run_coroutine_threadsafe(run(), self.loop).result()
        except BaseException:
            call.abandoned = True  # before reading call.tasks: see run()
            self._cancel_and_wait(call)
            raise

    def _cancel_and_wait(self, call: _PortalCall) -> None:
        for _ in range(int(CANCEL_GRACE / CANCEL_REPEAT)):
            if call.finished.is_set():
                return
            for task in list(call.tasks):  # cleanup code finishes despite repeats (tasks.finish_despite_cancel)
                self.loop.call_soon_threadsafe(task.cancel)
            call.finished.wait(timeout=CANCEL_REPEAT)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


class SyncReservation:
    """The blocking face of a Reservation; a context manager (release on error, else commit)."""

    def __init__(self, portal: Portal, reservation: Reservation) -> None:
        self._portal = portal
        self.reservation = reservation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reservation, name)

    def commit(self, usd: float | str | None = None, tokens: int | None = None, **kwargs: Any) -> Settlement:
        """See `Reservation.commit`."""
        return self._portal.call(self.reservation.commit(usd, tokens, **kwargs))

    def release(self, **kwargs: Any) -> Settlement:
        """See `Reservation.release`."""
        return self._portal.call(self.reservation.release(**kwargs))

    def extend(self, ttl: float | None = None) -> bool:
        """See `Reservation.extend`."""
        return self._portal.call(self.reservation.extend(ttl))

    def __enter__(self) -> SyncReservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._portal.call(self.reservation.__aexit__(exc_type, exc, tb))

    def __repr__(self) -> str:
        return repr(self.reservation)


class SyncBudget:
    """Blocking twin of `Budget`, with the same methods (see there for their contracts)."""

    def __init__(self, build: Callable[[], Budget]) -> None:
        self._portal = Portal()

        async def _build() -> Budget:
            return build()

        self.budget = self._portal.call(_build())

    def set_limits(self, tenant: str, limits: Iterable[Limit | str] | str, *, agent: str | None = None) -> None:
        self._portal.call(self.budget.set_limits(tenant, limits, agent=agent))

    def clear_limits(self, tenant: str, *, agent: str | None = None) -> None:
        self._portal.call(self.budget.clear_limits(tenant, agent=agent))

    def get_limits(self, tenant: str, *, agent: str | None = None) -> list[Limit]:
        return self._portal.call(self.budget.get_limits(tenant, agent=agent))

    def acquire(self, tenant: str, agent: str | None = None, **kwargs: Any) -> SyncReservation:
        """Blocks until admitted; the result is also a context manager."""
        call = self.budget.acquire(tenant, agent, **kwargs)

        async def _run() -> Reservation:
            return await call

        return SyncReservation(self._portal, self._portal.call(_run()))

    def status(self, tenant: str, *, agent: str | None = None) -> Status:
        return self._portal.call(self.budget.status(tenant, agent=agent))

    def reset(self, tenant: str, *, agent: str | None = None, dimension: str | None = None) -> int:
        return self._portal.call(self.budget.reset(tenant, agent=agent, dimension=dimension))

    def report(self, tenant: str, *, since: float | str | None = None) -> Report:
        return self._portal.call(self.budget.report(tenant, since=since))

    def events(self, tenant: str) -> Iterator[Event]:
        """Events of `tenant`, blocking between them; close the iterator to unsubscribe."""
        inbox: queue.Queue[Event] = queue.Queue()

        async def _pump() -> None:
            async for event in self.budget.events(tenant):
                inbox.put(event)

        future = asyncio.run_coroutine_threadsafe(_pump(), self._portal.loop)
        try:
            while True:
                try:
                    yield inbox.get(timeout=0.5)
                except queue.Empty:
                    if future.done():
                        future.result()
                        return
        finally:
            future.cancel()

    def close(self) -> None:
        """Close the connection and stop the private loop."""
        try:
            self._portal.call(self.budget.aclose())
        finally:
            self._portal.stop()

    def __enter__(self) -> SyncBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
