"""The sync twin's portal: one loop per process shared by every twin, its hand-off, and its ends."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from slowburn_redis import Budget, BudgetClosed, SyncBudget
from slowburn_redis import sync as sync_module
from slowburn_redis.errors import WrongThread

T = "acme"


def portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "slowburn-portal"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def no_twin_open() -> Iterator[None]:
    """The test starts with no portal loop (twins of earlier tests closed) and must end with none."""
    wait_for(lambda: sync_module._shared is None and not portal_threads(), "earlier twins to close")
    yield
    assert sync_module._shared is None
    wait_for(lambda: not portal_threads(), "the portal thread to end")


def test_twins_share_one_portal_loop_which_the_last_close_stops(no_twin_open: None) -> None:
    first = Budget.embedded().sync()
    second = Budget.embedded().sync()
    assert first.portal is not second.portal
    assert first.portal.loop is second.portal.loop
    assert len(portal_threads()) == 1
    first.set_limits(T, ["usd 1/hour"])
    first.close()
    assert first.portal.closed and not second.portal.closed
    with pytest.raises(BudgetClosed):
        first.status(T)
    second.set_limits(T, ["usd 2/hour"])  # the other twin's loop still runs
    assert second.get_limits(T)[0].units > 0
    loop = second.portal.loop
    second.close()
    assert not portal_threads()
    assert loop.is_closed()
    third = Budget.embedded().sync()  # a later twin starts a loop of its own
    try:
        assert third.portal.loop is not loop
        third.set_limits(T, ["usd 1/hour"])
    finally:
        third.close()


def test_closing_twice_is_harmless(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    twin.close()
    twin.portal.stop()
    with pytest.raises(BudgetClosed):
        twin.status(T)


def test_a_call_from_the_portal_thread_raises_wrong_thread(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    try:

        async def nested() -> None:
            twin.status(T)  # a blocking call from a callback of the async code

        with pytest.raises(WrongThread):
            twin.call(nested())
        twin.set_limits(T, ["usd 1/hour"])  # the portal is unharmed
    finally:
        twin.close()


def test_threads_calling_at_once_all_get_their_own_replies(make_budget: Callable[..., Budget]) -> None:
    twin = make_budget().sync()
    threads, rounds = 16, 20
    errors: list[BaseException] = []
    ids: list[str] = []
    lock = threading.Lock()
    try:
        twin.set_limits(T, ["requests 100000/hour", "concurrency 1000"])
        start = threading.Barrier(threads)

        def work(i: int) -> None:
            try:
                start.wait()
                for _ in range(rounds):
                    r = twin.acquire(T, f"a{i}", requests=1)
                    assert r.agent == f"a{i}"
                    r.commit(requests=1)
                    with lock:
                        ids.append(r.id)
            except BaseException as exc:
                errors.append(exc)

        pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=60)
        assert not errors, errors
        assert len(set(ids)) == threads * rounds
        status = twin.status(T)
        assert [lim.used for lim in status.limits if lim.limit.dimension == "requests"] == [threads * rounds]
    finally:
        twin.close()


def test_errors_reach_the_caller_and_the_call_runs_in_the_callers_context(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    try:

        async def read() -> str:
            return var.get()

        async def fail() -> None:
            raise ValueError("from the loop")

        token = var.set("caller")
        try:
            assert twin.call(read()) == "caller"
        finally:
            var.reset(token)
        assert twin.call(read()) == "unset"
        with pytest.raises(ValueError, match="from the loop"):
            twin.call(fail())
    finally:
        twin.close()


def test_closing_a_twin_ends_its_calls_in_flight_with_budget_closed(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    other = Budget.embedded().sync()
    started = threading.Event()
    caught: list[BaseException] = []

    async def forever() -> None:
        started.set()
        await asyncio.sleep(3600)

    def wait() -> None:
        try:
            twin.call(forever())
        except BaseException as exc:
            caught.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    try:
        assert started.wait(30)
        twin.close()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert len(caught) == 1 and isinstance(caught[0], BudgetClosed), caught
        other.set_limits(T, ["usd 1/hour"])  # the shared loop still serves the other twin
    finally:
        other.close()


def test_a_call_given_up_before_it_started_never_runs(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    ran: list[bool] = []
    try:

        async def body() -> None:
            ran.append(True)

        coro = body()
        call = sync_module._Call(coro)
        call.abandoned = True
        twin.portal._shared.submit(call, twin.portal)
        assert call.done.acquire(timeout=30)
        assert call.finished and isinstance(call.error, asyncio.CancelledError)
        assert ran == []
        assert twin.call(body()) is None and ran == [True]
    finally:
        twin.close()


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_interrupting_a_wait_cancels_the_call_and_waits_for_its_cleanup(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    started = threading.Event()
    events: list[str] = []
    main = threading.main_thread().ident
    assert threading.get_ident() == main and main is not None

    async def body() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            events.append("cancelled")
            await asyncio.sleep(0.05)  # cleanup that itself awaits
            events.append("cleaned up")
            raise

    def interrupt() -> None:
        if started.wait(30):
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    killer = threading.Thread(target=interrupt)
    killer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            twin.call(body())
        assert events == ["cancelled", "cleaned up"]  # done before KeyboardInterrupt reached the caller
        twin.set_limits(T, ["usd 1/hour"])
    finally:
        killer.join(timeout=30)
        signal.signal(signal.SIGINT, previous)
        twin.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_twin_made_before_a_fork_refuses_in_the_child_and_a_new_one_works(no_twin_open: None) -> None:
    twin = Budget.embedded().sync()
    try:
        twin.set_limits(T, ["usd 1/hour"])
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                try:
                    twin.status(T)
                except BudgetClosed:
                    fresh = Budget.embedded().sync()
                    fresh.set_limits(T, ["usd 1/hour"])
                    code = 0 if fresh.portal.loop is not twin.portal.loop else 2
                    fresh.close()
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
        twin.set_limits(T, ["usd 2/hour"])  # the parent's twin is unaffected
    finally:
        twin.close()


def test_a_twin_that_fails_to_build_leaves_no_loop_behind(no_twin_open: None) -> None:
    def broken() -> Budget:
        raise RuntimeError("cannot build")

    with pytest.raises(RuntimeError, match="cannot build"):
        SyncBudget(broken)


def test_the_last_close_ends_the_tasks_a_call_left_on_the_loop(no_twin_open: None) -> None:
    """A task a call started on the portal loop (a library's worker) is cancelled and ends before the loop closes."""
    twin = Budget.embedded().sync()
    ended = threading.Event()

    async def worker() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    async def start_worker() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(worker())

    task = twin.call(start_worker())
    loop = twin.portal.loop
    twin.close()
    assert ended.is_set(), "the worker's cleanup ran before the loop closed"
    assert task.cancelled()
    assert loop.is_closed()
