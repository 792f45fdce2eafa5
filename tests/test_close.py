"""Closing a Budget ends its waits: waiters raise BudgetClosed and give their queue place up; nothing more is sent."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from slowburn_redis import Budget, BudgetClosed, SyncBudget
from tests import test_waiting
from tests.statecheck import glob_escape, snapshot

T = "acme"


async def test_closing_ends_every_wait_and_frees_the_queue_places(make_budget: Callable[..., Budget]) -> None:
    holder, closing = make_budget(heartbeat=60.0), make_budget(heartbeat=60.0)
    await holder.set_limits(T, ["usd 1/hour"])
    held = await holder.acquire(T, usd=0.9)
    # Neither a refill (an hour away) nor a heartbeat (60 s) can end these waits.
    waits = [asyncio.ensure_future(closing.acquire(T, usd=0.5, agent=f"a{i}")) for i in range(3)]
    await test_waiting.wait_queued(holder, 3, T)

    await closing.aclose()

    for wait in waits:
        assert wait.done(), "aclose returns once every wait has ended"
        with pytest.raises(BudgetClosed, match="closed while tenant 'acme' waited"):
            wait.result()
    assert await test_waiting.queued(holder, T) == 0, "each waiter gave its queue place up"
    # The places are gone, not merely expired: a waiter of another client is admitted by the next refund.
    other = asyncio.ensure_future(holder.acquire(T, usd=0.5, timeout=10))
    await test_waiting.wait_queued(holder, 1, T)
    await held.commit(usd=0.1)
    await (await other).commit(usd=0.5)


async def test_a_closed_budget_sends_nothing_and_raises(make_budget: Callable[..., Budget]) -> None:
    observer, closed = make_budget(), make_budget()
    await observer.set_limits(T, ["usd 1/hour"])
    reservation = await closed.acquire(T, usd=0.2)
    await closed.aclose()
    before = await snapshot(observer.engine.client, glob_escape(observer.key(T)) + "*")
    for call in (
        closed.acquire(T, usd=0.1),
        reservation.commit(usd=0.1),
        closed.status(T),
        closed.set_limits(T, ["usd 2/hour"]),
        closed.reset(T),
    ):
        with pytest.raises(BudgetClosed):
            await call
    assert await snapshot(observer.engine.client, glob_escape(observer.key(T)) + "*") == before
    await closed.aclose()  # closing twice is harmless


def test_closing_the_sync_twin_ends_a_blocked_acquire_in_another_thread(make_budget: Callable[..., Budget]) -> None:
    setup = make_budget()
    twin: SyncBudget = setup.sync()
    caught: list[BaseException] = []
    try:
        twin.set_limits(T, ["usd 1/hour"])
        twin.acquire(T, usd=1)

        def wait() -> None:
            try:
                twin.acquire(T, usd=0.5)
            except BaseException as exc:
                caught.append(exc)

        thread = threading.Thread(target=wait)
        thread.start()
        deadline = time.monotonic() + 30
        while twin.status(T).limits[0].waiters < 1:
            assert thread.is_alive() and time.monotonic() < deadline, caught
            time.sleep(0.02)
    finally:
        twin.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], BudgetClosed), caught
