"""The blocking twin of Budget: the same async code, run on a shared event loop.

`SyncBudget` runs a Budget built by the same factory as the async one (same
options, same pub/sub factory, so a cluster Budget's twin waits on the
node-rotating pub/sub too) on the process's portal loop: one asyncio loop on
one daemon thread, shared by every twin of the process (Celery, RQ and
thread-pool workers included) and stopped when the last twin closes (or at
exit). Each method submits the async method to that loop and waits; its
signature is the async method's (``tests/test_structure.py`` compares them).

The hand-off is cheap: a call is queued in a deque and the loop is woken once
per turn however many threads submit in it (one self-pipe write, not one per
call), so the calls of many threads start in the same turn and the batcher
coalesces them into one script call, as it does for tasks. The caller waits
on a plain lock that the call's own task releases in its last step.

Interrupting a wait (KeyboardInterrupt) cancels the async call, whose own
cleanup leaves no reservation and no queue place behind. A blocking call made
from the portal's own thread (a callback of the async code) raises
`WrongThread` at once instead of deadlocking. A twin made before a `fork`
belongs to the parent: in the child its calls raise `BudgetClosed` (make a new
twin there; it gets the child's own portal loop).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import os
import selectors
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from slowburn_redis.errors import BudgetClosed, WrongThread
from slowburn_redis.events import Event
from slowburn_redis.limits import Limit
from slowburn_redis.reservation import Reservation, Settlement
from slowburn_redis.runs import SyncRunScope
from slowburn_redis.status import Status
from slowburn_redis.tasks import cancel_and_wait

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
STOP_GRACE = 5.0
"""Seconds closing a portal waits for its calls still running, once cancelled (and for the loop thread)."""
_STOP_ATTEMPTS = round(STOP_GRACE / 0.1)
"""`STOP_GRACE` in `tasks.cancel_and_wait` attempts (each cancels again and waits 0.1 s)."""


class _Call:
    """One `Portal.call` in flight: its coroutine, its task once started, its outcome, and the lock its caller waits on.

    `done` is held from creation until the call has ended (`finished`), then
    released by the task's last step. `abandoned` is set by a caller that gave
    up (before it reads `task`); the task (`Portal.serve`) checks it once `task` is set, so a
    call abandoned before it started never runs.
    """

    __slots__ = ("abandoned", "context", "coro", "done", "error", "finished", "task", "value")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.context = contextvars.copy_context()
        """The caller's context variables, which the task runs in (as `asyncio.run_coroutine_threadsafe` does)."""
        self.done = threading.Lock()
        self.done.acquire()
        self.task: asyncio.Task[None] | None = None
        self.abandoned = False
        self.finished = False
        self.value: Any = None
        self.error: BaseException | None = None


class _Selector(selectors.DefaultSelector):
    """The portal loop's selector: releases the callers of the calls that ended just before it polls.

    A caller woken while the loop still runs Python would wake only to wait
    for the GIL; released here, as the loop is about to block (or poll), it
    finds the GIL free and runs at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[threading.Lock] = []

    def release(self) -> None:
        finished, self.finished = self.finished, []
        for done in finished:
            done.release()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self.finished:
            self.release()
        return super().select(timeout)


class _Loop:
    """The process's portal loop: an asyncio loop on a daemon thread, fed by a queue of calls.

    Threads append calls to `inbox` and wake the loop with one
    ``call_soon_threadsafe(_drain)`` only when no drain is already due
    (`scheduled`); a drain clears the flag before it empties the queue, so no
    call is left behind and the calls of one turn start together.
    """

    def __init__(self) -> None:
        self.selector = _Selector()
        self.loop: asyncio.AbstractEventLoop = asyncio.SelectorEventLoop(self.selector)
        self.inbox: deque[tuple[_Call, Portal]] = deque()
        self.scheduled = False
        self.users = 0
        self.forked = False
        """True in a child process forked while this loop ran: its thread is not there."""
        self.thread = threading.Thread(target=self._run_forever, name="slowburn-portal", daemon=True)
        self.thread.start()

    def _run_forever(self) -> None:
        try:
            self.loop.run_forever()
        finally:  # calls that ended in the last turn
            self.selector.release()

    def submit(self, call: _Call, portal: Portal) -> None:
        self.inbox.append((call, portal))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self.scheduled = False  # before the queue is read: a call appended after the last read schedules again
        inbox, loop = self.inbox, self.loop
        while inbox:
            call, portal = inbox.popleft()
            loop.create_task(portal.serve(call), context=call.context)

    def stop(self) -> None:
        """Finish the loop's tasks, stop it, wait for its thread, and close the loop (once the thread has ended).

        Tasks still on the loop (a library's background worker started by a
        call, such as litellm's logging worker) are cancelled and given up to
        `STOP_GRACE` s to end, and async generators are closed, as
        `asyncio.run` does: nothing is left pending on a closed loop.
        """
        if self.forked:
            return
        if threading.get_ident() == self.thread.ident:  # from a callback of the loop itself: it stops after it
            self.loop.stop()
            return
        if self.loop.is_running() and self.thread.is_alive():
            self.loop.call_soon_threadsafe(self._finish_soon)
            self.thread.join(timeout=2 * STOP_GRACE + 1)
            if self.thread.is_alive():  # the tasks did not end: stop regardless
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(timeout=STOP_GRACE)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()

    def _finish_soon(self) -> None:
        self.loop.create_task(self._finish())

    async def _finish(self) -> None:
        """The loop's last task: cancel every other task, wait for them, close async generators, stop."""
        try:
            current = asyncio.current_task()
            await cancel_and_wait(
                [task for task in asyncio.all_tasks() if task is not current], attempts=_STOP_ATTEMPTS
            )
            await asyncio.wait_for(self.loop.shutdown_asyncgens(), STOP_GRACE)
        except Exception:  # a generator that would not close: stopping matters more
            pass
        finally:
            self.loop.stop()


_shared: _Loop | None = None
_shared_lock = threading.Lock()


def _take_loop() -> _Loop:
    """The process's portal loop, started if there is none, counted as one more user."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = _Loop()
        _shared.users += 1
        return _shared


def _leave_loop(shared: _Loop) -> None:
    """One user less; the last stops the loop and its thread (a later twin starts another)."""
    global _shared
    with _shared_lock:
        shared.users -= 1
        if shared.users > 0:
            return
        if _shared is shared:
            _shared = None
    shared.stop()


@atexit.register
def _stop_at_exit() -> None:
    """At interpreter exit, stop the portal loop of twins never closed (their calls are over by now)."""
    global _shared
    with _shared_lock:
        shared, _shared = _shared, None
    if shared is not None:
        shared.stop()


def _after_fork_in_child() -> None:
    """In a forked child the portal thread is gone: twins made before the fork refuse, new ones start afresh."""
    global _shared, _shared_lock
    _shared_lock = threading.Lock()  # it may have been held by another thread of the parent at the fork
    if _shared is not None:
        _shared.forked = True
        _shared = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Portal:
    """One twin's door to the process's portal loop (`loop`, shared by every twin), with a blocking `call`.

    `stop` closes this door only: its calls still running are cancelled (their
    callers raise BudgetClosed), later calls raise BudgetClosed, and the
    shared loop stops with the last door.
    """

    def __init__(self) -> None:
        self._closed = False
        self._shared = _take_loop()
        self.loop = self._shared.loop
        self._thread = self._shared.thread
        self._running: set[_Call] = set()
        """Calls of this portal started on the loop and not yet ended (touched on the loop thread only)."""

    @property
    def closed(self) -> bool:
        """True once `stop` was called (or in a child forked after this portal was made)."""
        return self._closed or self._shared.forked

    async def serve(self, call: _Call) -> None:
        """The task of one call (the loop's side of `call`): await its coroutine, keep the outcome, and
        hand the caller's release to the selector (see `_Selector`).

        The task is published in `call.task` by its own first step, so whoever
        cancels it finds it only once it runs (a task cancelled before its first
        step would never enter the ``try`` below); a call given up before that, or
        whose portal was closed, closes its coroutine unstarted.
        """
        try:
            call.task = asyncio.current_task()
            self._running.add(call)
            if call.abandoned or self._closed:  # both checks follow the line above: see call and stop
                call.coro.close()
                call.error = asyncio.CancelledError()
            else:
                call.value = await call.coro
        except BaseException as exc:  # every outcome goes to the caller; nothing is left for the loop to log
            call.error = exc
        finally:
            self._running.discard(call)
            call.finished = True
            self._shared.selector.finished.append(call.done)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the portal loop and wait for it.

        If the calling thread is interrupted (KeyboardInterrupt) at any moment,
        even before the coroutine started, the coroutine is cancelled (or never
        started) and this waits (up to `CANCEL_GRACE` s) for its cleanup to
        finish before re-raising, so an interrupted wait leaves nothing behind
        in Redis. A cancellation that asyncio lost (the ``wait_for`` race of
        Python 3.11) is delivered again until the coroutine ends. A call
        cancelled by `stop` raises BudgetClosed.
        """
        if threading.get_ident() == self._thread.ident:
            coro.close()
            raise WrongThread(
                "a blocking slowburn-redis call was made from the sync budget's own event-loop thread "
                "(it would wait for itself): use the async Budget there"
            )
        if self._closed or self._shared.forked:
            coro.close()
            raise BudgetClosed(
                "the sync budget was made in the parent process, before a fork: make a new one in this process"
                if self._shared.forked
                else "the sync budget is closed"
            )
        call = _Call(coro)
        try:
            self._shared.submit(call, self)
            call.done.acquire()
        except BaseException:
            call.abandoned = True  # before reading call.task: see serve
            self._cancel_and_wait(call)
            raise
        error = call.error
        if error is None:
            value: T = call.value
            return value
        call.error = None  # no reference cycle through the traceback
        if isinstance(error, asyncio.CancelledError) and self._closed:
            raise BudgetClosed("the sync budget is closed") from None
        raise error

    def _cancel_and_wait(self, call: _Call) -> None:
        for _ in range(int(CANCEL_GRACE / CANCEL_REPEAT)):
            if call.finished:
                return
            task = call.task
            if task is not None:  # cleanup code finishes despite repeats (tasks.finish_despite_cancel)
                self.loop.call_soon_threadsafe(task.cancel)
            if call.done.acquire(timeout=CANCEL_REPEAT):
                return

    def stop(self) -> None:
        """Close this portal: cancel its calls still running, wait for them (up to `STOP_GRACE` s), and
        leave the shared loop (the last portal stops it); later calls raise BudgetClosed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._shared.forked:
            return
        if threading.get_ident() != self._thread.ident and self.loop.is_running():
            cancelled = threading.Event()

            def cancel_running() -> None:
                tasks = [call.task for call in self._running if call.task is not None]
                waiter = asyncio.ensure_future(cancel_and_wait(tasks, attempts=_STOP_ATTEMPTS))
                waiter.add_done_callback(lambda _: cancelled.set())

            self.loop.call_soon_threadsafe(cancel_running)
            cancelled.wait(timeout=STOP_GRACE)
        _leave_loop(self._shared)


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
        """This twin's door to the portal loop; `call` submits any coroutine to it (for layers built on the
        async Budget)."""

        async def _build() -> Budget:
            return build()

        try:
            self.budget = self.portal.call(_build())
        except BaseException:
            self.portal.stop()
            raise

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

        return SyncReservation(self.portal, self.portal.call(call))

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
            if not self.portal.closed:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    self.portal.call(aclose())

    def close(self) -> None:
        """Close the connection and leave the portal loop (the last twin open stops it); later calls raise
        BudgetClosed."""
        try:
            self.portal.call(self.budget.aclose())
        finally:
            self.portal.stop()

    def __enter__(self) -> SyncBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
