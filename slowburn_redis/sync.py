"""The blocking twin of Budget: the same async code, run on a private event loop.

`SyncBudget` owns a thread running an asyncio loop (a portal) and a Budget
built inside it by the same factory as the async one (same options, same
pub/sub factory, so a cluster Budget's twin waits on the node-rotating
pub/sub too). Each method submits the async method to that loop and waits;
its signature is the async method's (``tests/test_structure.py`` compares
them). Interrupting a wait (KeyboardInterrupt) cancels the async call, whose
own cleanup leaves no reservation and no queue place behind. A blocking call
made from the portal's own thread (a callback of the async code) raises
`WrongThread` at once instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from slowburn_redis.errors import BudgetClosed, WrongThread
from slowburn_redis.events import Event
from slowburn_redis.limits import Limit
from slowburn_redis.reservation import Reservation, Settlement
from slowburn_redis.runs import SyncRunScope
from slowburn_redis.status import Status

if TYPE_CHECKING:
    from slowburn_redis.budget import Budget, Mode
    from slowburn_redis.quote import Quote
    from slowburn_redis.report import Report
    from slowburn_redis.trail import Since

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
        self._closed = False
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
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise WrongThread(
                "a blocking slowburn-redis call was made from the sync budget's own event-loop thread "
                "(it would wait for itself): use the async Budget there"
            )
        if self._closed:
            coro.close()
            raise BudgetClosed("the sync budget is closed")
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
        """Stop the loop, wait for its thread, and close the loop; later calls raise BudgetClosed."""
        self._closed = True
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


class SyncReservation:
    """The blocking face of a Reservation; a context manager (release on error, else commit)."""

    def __init__(self, portal: Portal, reservation: Reservation) -> None:
        self._portal = portal
        self.reservation = reservation

    @property
    def id(self) -> str:
        return self.reservation.id

    @property
    def tenant(self) -> str:
        return self.reservation.tenant

    @property
    def agent(self) -> str | None:
        return self.reservation.agent

    @property
    def state(self) -> str:
        return self.reservation.state

    @property
    def settled(self) -> bool:
        return self.reservation.settled

    @property
    def settlement(self) -> Settlement | None:
        return self.reservation.settlement

    @property
    def backed(self) -> bool:
        return self.reservation.backed

    @property
    def estimate(self) -> dict[str, float]:
        return self.reservation.estimate

    @property
    def estimate_units(self) -> dict[str, int]:
        return self.reservation.estimate_units

    @property
    def over_limits(self) -> list[str]:
        return self.reservation.over_limits

    @property
    def lease_expires_ms(self) -> int:
        return self.reservation.lease_expires_ms

    @property
    def admitted_at_ms(self) -> int:
        return self.reservation.admitted_at_ms

    def commit(
        self,
        usd: float | str | None = None,
        tokens: int | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        requests: int | None = None,
        model: str | None = None,
        outcome: str | None = None,
        metadata: dict[str, Any] | None = None,
        **custom: int,
    ) -> Settlement:
        """See `Reservation.commit`."""
        return self._portal.call(
            self.reservation.commit(
                usd,
                tokens,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                requests=requests,
                model=model,
                outcome=outcome,
                metadata=metadata,
                **custom,
            )
        )

    def release(self, *, outcome: str | None = None, metadata: dict[str, Any] | None = None) -> Settlement:
        """See `Reservation.release`."""
        return self._portal.call(self.reservation.release(outcome=outcome, metadata=metadata))

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
    """Blocking twin of `Budget`, with the same methods and signatures (see there for their contracts)."""

    def __init__(self, build: Callable[[], Budget]) -> None:
        self.portal = Portal()
        """The private loop; `call` submits any coroutine to it (for layers built on the async Budget)."""

        async def _build() -> Budget:
            return build()

        self.budget = self.portal.call(_build())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine of the async layer on this twin's loop and wait for it (see `Portal.call`)."""
        return self.portal.call(coro)

    def key(self, tenant: str) -> str:
        return self.budget.key(tenant)

    def set_limits(
        self,
        tenant: str,
        limits: Iterable[Limit | str] | str,
        *,
        agent: str | None = None,
        model: str | None = None,
    ) -> None:
        self.portal.call(self.budget.set_limits(tenant, limits, agent=agent, model=model))

    def clear_limits(self, tenant: str, *, agent: str | None = None, model: str | None = None) -> None:
        self.portal.call(self.budget.clear_limits(tenant, agent=agent, model=model))

    def set_unlimited(self, tenant: str, *, agent: str | None = None) -> None:
        self.portal.call(self.budget.set_unlimited(tenant, agent=agent))

    def get_limits(self, tenant: str, *, agent: str | None = None, model: str | None = None) -> list[Limit]:
        return self.portal.call(self.budget.get_limits(tenant, agent=agent, model=model))

    def acquire(
        self,
        tenant: str,
        agent: str | None = None,
        *,
        usd: float | str | None = None,
        tokens: int | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        requests: int = 1,
        timeout: float | None = None,
        priority: int = 0,
        mode: Mode = "wait",
        lease_ttl: float | None = None,
        model: str | None = None,
        **custom: int,
    ) -> SyncReservation:
        """Blocks until admitted; the result is also a context manager."""
        call = self.budget.acquire(
            tenant,
            agent,
            usd=usd,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            requests=requests,
            timeout=timeout,
            priority=priority,
            mode=mode,
            lease_ttl=lease_ttl,
            model=model,
            **custom,
        )

        async def _run() -> Reservation:
            return await call

        return SyncReservation(self.portal, self.portal.call(_run()))

    def quote(
        self,
        tenant: str,
        agent: str | None = None,
        *,
        model: str | None = None,
        priority: int = 0,
        usd: float | str | None = None,
        tokens: int | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        requests: int = 1,
        **custom: int,
    ) -> Quote:
        """See `Budget.quote`."""
        return self.portal.call(
            self.budget.quote(
                tenant,
                agent,
                model=model,
                priority=priority,
                usd=usd,
                tokens=tokens,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                requests=requests,
                **custom,
            )
        )

    def run(
        self,
        tenant: str,
        agent: str | None = None,
        *,
        caps: Iterable[Limit | str] | str | None = None,
        max_seconds: float | None = None,
        run_id: str | None = None,
    ) -> SyncRunScope:
        """See `Budget.run`: ``with twin.run(...) as run:``; the run is current in the calling thread."""
        return SyncRunScope(
            self.portal, self.budget.run(tenant, agent, caps=caps, max_seconds=max_seconds, run_id=run_id)
        )

    def status(self, tenant: str, *, agent: str | None = None) -> Status:
        return self.portal.call(self.budget.status(tenant, agent=agent))

    def reset(self, tenant: str, *, agent: str | None = None, dimension: str | None = None) -> int:
        return self.portal.call(self.budget.reset(tenant, agent=agent, dimension=dimension))

    def report(self, tenant: str, *, since: float | str | None = None) -> Report:
        return self.portal.call(self.budget.report(tenant, since=since))

    def events(self, tenant: str, since: Since = None) -> Iterator[Event]:
        """Events of `tenant` (the trail from `since`, then live), blocking until each arrives (no polling);
        close the iterator to unsubscribe."""
        stream: AsyncIterator[Event] = self.budget.events(tenant, since)

        async def next_event() -> Event:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self.portal.call(next_event())
                except StopAsyncIteration:
                    return
        finally:
            if not self.portal.loop.is_closed():
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    self.portal.call(aclose())

    def close(self) -> None:
        """Close the connection, stop the private loop and close it; later calls raise BudgetClosed."""
        try:
            self.portal.call(self.budget.aclose())
        finally:
            self.portal.stop()

    def __enter__(self) -> SyncBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
