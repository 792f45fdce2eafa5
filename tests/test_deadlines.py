"""``timeout=`` is a deadline, whatever Redis does: the fault proxy between the Budget and a real redis-server.

Each test ends a call by blackholing, cutting or resetting the proxy, and
asserts that the call ends with a typed error by its deadline, then reads
the real server directly (around the proxy) to check that nothing was
admitted silently.

Timing is measured on the event-loop clock of the process that made the
call. The bound asserted is the deadline plus `SLACK` (1.5 s), generous on
purpose: the suite must pass on a loaded 2-core machine (two CPU-burning
processes beside it). The precise figure (how late past the deadline, p50
and p99) is measured by ``python -m bench.deadlines``; by design it is about
``3 * FINAL_ATTEMPT`` (0.3 s) for an acquire (see slowburn_redis.resilience).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from slowburn_redis import Budget, BudgetTimeout
from slowburn_redis.connection import connect_url
from slowburn_redis.errors import RedisUnavailable
from slowburn_redis.status import LimitStatus
from slowburn_redis.tasks import abandoned
from tests.faultproxy import FaultProxy
from tests.servers import RedisServer, redis_server_available

ROOT = Path(__file__).resolve().parent.parent
TENANT = "acme"
SLACK = 1.5
"""Seconds past a deadline the tests accept (a loaded machine); the real figure is in bench/deadlines.py."""

TYPED = (BudgetTimeout, RedisUnavailable)
HANG = 10.0
"""Seconds past a deadline after which a call counts as hung (the tests' socket timeouts are 30 s)."""


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    if not redis_server_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("SLOWBURN_REQUIRE_REAL_REDIS is set but redis-server is missing")
        pytest.skip("needs redis-server")
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as p:
        yield p


@pytest.fixture
async def direct(server: RedisServer, prefix: str) -> AsyncIterator[Budget]:
    """A Budget on the real server, around the proxy: what Redis really holds."""
    budget = Budget.from_url(server.url, prefix=prefix)
    await budget.set_limits(TENANT, ["usd 1/hour", "requests 100/hour"])
    yield budget
    await budget.aclose()


@pytest.fixture
async def through(proxy: FaultProxy, prefix: str) -> AsyncIterator[Callable[..., Budget]]:
    """Builds Budgets that reach Redis through the proxy; closed at the end with the proxy passing again."""
    built: list[Budget] = []

    def make(**options: Any) -> Budget:
        budget = Budget.from_url(proxy.url, prefix=prefix, **options)
        built.append(budget)
        return budget

    yield make
    proxy.passthrough()
    for budget in built:
        await budget.aclose()


async def limits(budget: Budget) -> dict[str, LimitStatus]:
    return {lim.key.split(":")[1]: lim for lim in (await budget.status(TENANT)).limits}


async def ends_by(call: Awaitable[Any], deadline: float) -> BaseException:
    """Await `call`, which must fail with a typed error; returns it, and checks the time against `deadline`."""
    loop = asyncio.get_running_loop()
    with pytest.raises(TYPED) as caught:
        await asyncio.wait_for(call, deadline - loop.time() + SLACK + 5)  # a hang fails here, not forever
    late = loop.time() - deadline
    assert late <= SLACK, f"{type(caught.value).__name__} came {late:.3f}s after the deadline"
    assert late >= -0.05, f"gave up {-late:.3f}s before the deadline"
    return caught.value


async def warm(budget: Budget) -> None:
    """One acquire and release through the proxy: connections open, scripts loaded."""
    await (await budget.acquire(TENANT, usd=0.01)).release()


# blackhole -------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.5, 2.0])
@pytest.mark.parametrize("connected", [True, False], ids=["connected", "cold"])
async def test_a_blackholed_acquire_ends_by_its_timeout(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget], timeout: float, connected: bool
) -> None:
    budget = through()
    if connected:
        await warm(budget)
    proxy.blackhole()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    error = await ends_by(budget.acquire(TENANT, usd=0.1, timeout=timeout), deadline)
    assert isinstance(error, RedisUnavailable) and "deadline" in str(error)
    assert proxy.stats.swallowed_up > 0, "the acquire was sent into the blackhole"
    proxy.passthrough()
    held = await limits(direct)
    assert held["usd"].used == held["usd"].reserved == 0, "nothing reached Redis, nothing is charged"
    assert held["requests"].used + held["requests"].reserved == 0


async def test_two_hundred_blackholed_acquires_all_end_typed_and_leave_nothing_reading(
    proxy: FaultProxy, direct: Budget, prefix: str
) -> None:
    """Cut at the deadline, abandoned, cleaned up: no caller pending after the slack, no send left on the wire.

    The socket timeout is 30 s, so a caller or a send still reading its
    blackholed connection would outlive the `HANG` (10 s) the test waits for
    them all to end: a hang, not a timing (200 callers each cleaning up
    with three short attempts need more than `SLACK` on a loaded 2-core
    machine; the lateness itself is measured by bench/deadlines.py).
    """
    budget = Budget.from_url(proxy.url + "?socket_timeout=30", prefix=prefix)
    try:
        await warm(budget)
        proxy.blackhole()
        loop = asyncio.get_running_loop()
        timeout = 1.0
        deadline = loop.time() + timeout
        calls = [asyncio.ensure_future(budget.acquire(TENANT, usd=0.001, timeout=timeout)) for _ in range(200)]
        done, pending = await asyncio.wait(calls, timeout=deadline + HANG - loop.time())
        for call in pending:
            call.cancel()
        assert not pending, f"{len(pending)} of 200 still pending {HANG}s past their deadline"
        errors = [call.exception() for call in done]
        assert all(isinstance(e, RedisUnavailable) for e in errors), {type(e).__name__ for e in errors}
        batcher = budget.engine._batcher
        for _ in range(int(HANG * 100)):
            if not batcher._sending and not abandoned():
                break
            await asyncio.sleep(0.01)
        assert not batcher._sending, [script.name for script, _ in batcher._sending.values()]
        assert not abandoned(), "cut attempts never finished unwinding"
        proxy.passthrough()
        held = await limits(direct)
        assert held["usd"].reserved == 0 and held["requests"].reserved == 0, "nothing reached Redis"
    finally:
        proxy.passthrough()
        await budget.aclose()


async def test_blackholed_commit_release_and_status_obey_retry_timeout(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget]
) -> None:
    budget = through(retry_timeout=1.0)
    to_commit = await budget.acquire(TENANT, usd=0.2)
    to_release = await budget.acquire(TENANT, usd=0.3)
    proxy.blackhole()
    loop = asyncio.get_running_loop()
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "commit": lambda: to_commit.commit(usd=0.1),
        "release": to_release.release,
        "extend": to_commit.extend,
        "status": lambda: budget.status(TENANT),
        "get_limits": lambda: budget.get_limits(TENANT),
        "set_limits": lambda: budget.set_limits("other", ["usd 1/day"]),
        "reset": lambda: budget.reset("other"),
    }
    for name, call in calls.items():
        error = await ends_by(call(), loop.time() + 1.0)
        assert isinstance(error, RedisUnavailable), name
    proxy.passthrough()
    # Nothing was lost: the reservations are still open, and settle now, once.
    assert (await to_commit.commit(usd=0.1)).state == "committed"
    assert (await to_release.release()).state == "released"
    held = await limits(direct)
    assert held["usd"].used == pytest.approx(0.1) and held["usd"].reserved == 0
    assert await direct.engine.client.xlen(direct.key(TENANT) + ":ledger") == 1


async def test_a_waiter_already_waiting_when_redis_blackholes_ends_by_its_deadline(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget]
) -> None:
    budget = through()
    spent = await budget.acquire(TENANT, usd=1.0)  # the whole budget: the next acquire waits
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    with capture_logs() as logs:
        waiting = asyncio.ensure_future(budget.acquire(TENANT, usd=0.5, timeout=3.0))
        for _ in range(1000):  # "budget.paused" is logged once subscribed: the waiter sleeps
            if any(e["event"] == "budget.paused" for e in logs):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the acquire never paused")
        assert not waiting.done()
        proxy.blackhole()
        await ends_by(waiting, deadline)
    proxy.passthrough()
    held = await limits(direct)
    assert held["usd"].reserved == pytest.approx(1.0), "only the first reservation is held"
    assert held["requests"].used + held["requests"].reserved == 1
    assert (await spent.release()).state == "released"


async def test_a_waiter_whose_subscription_is_lost_ends_by_its_deadline(
    server: RedisServer, direct: Budget, prefix: str
) -> None:
    """Commands pass; the pub/sub path is blackholed before the waiter subscribes: its join must not hang."""
    with FaultProxy(server.port) as pubsub_proxy:
        connect, _, _ = connect_url(server.url)
        subscribe_via = connect_url(pubsub_proxy.url)[0]
        budget = Budget(connect(), connect=connect, open_pubsub=lambda: subscribe_via().pubsub(), prefix=prefix)
        try:
            spent = await budget.acquire(TENANT, usd=1.0)
            pubsub_proxy.blackhole()
            loop = asyncio.get_running_loop()
            await ends_by(budget.acquire(TENANT, usd=0.5, timeout=1.0), loop.time() + 1.0)
            await spent.release()
        finally:
            pubsub_proxy.passthrough()
            await budget.aclose()


async def test_a_waiter_timing_out_as_redis_blackholes_ends_by_its_deadline(
    server: RedisServer, proxy: FaultProxy, direct: Budget, prefix: str
) -> None:
    """The last denial passes, then the blackhole: the timeout's status snapshot must not hang."""
    connect, _, _ = connect_url(proxy.url)
    subscribe_direct = connect_url(server.url)[0]
    budget = Budget(connect(), connect=connect, open_pubsub=lambda: subscribe_direct().pubsub(), prefix=prefix)
    try:
        spent = await budget.acquire(TENANT, usd=1.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        with capture_logs() as logs:
            waiting = asyncio.ensure_future(budget.acquire(TENANT, usd=0.5, timeout=1.0))
            for _ in range(1000):
                if any(e["event"] == "budget.paused" for e in logs):
                    break
                await asyncio.sleep(0.01)
            proxy.blackhole(after=1)  # the denial at the deadline passes; the status after it does not
            await ends_by(waiting, deadline)
        proxy.passthrough()
        await spent.release()
    finally:
        proxy.passthrough()
        await budget.aclose()


def _worker_main(argv: list[str]) -> int:
    """A worker process: `count` acquires that wait, each reporting how late past its deadline it ended."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "pid": os.getpid(), **fields}), flush=True)

    async def main() -> None:
        budget = Budget.from_url(args.url, prefix=args.prefix, heartbeat=60)
        loop = asyncio.get_running_loop()

        async def one() -> None:
            deadline = loop.time() + args.timeout
            try:
                reservation = await budget.acquire(TENANT, usd=0.5, timeout=args.timeout)
            except Exception as exc:
                emit("ended", type=type(exc).__name__, typed=isinstance(exc, TYPED), late=loop.time() - deadline)
            else:
                emit("ended", type="admitted", typed=False, late=loop.time() - deadline, id=reservation.id)

        emit("started")
        await asyncio.gather(*(one() for _ in range(args.count)))
        emit("done")
        await asyncio.wait_for(budget.aclose(), 30)

    asyncio.run(main())
    return 0


def test_waiting_worker_processes_all_end_by_their_deadlines(
    server: RedisServer, proxy: FaultProxy, prefix: str
) -> None:
    processes, each, timeout = 3, 4, 4.0

    async def spend() -> None:
        async with Budget.from_url(server.url, prefix=prefix) as budget:
            await budget.set_limits(TENANT, ["usd 1/hour"])
            await (await budget.acquire(TENANT, usd=1.0)).commit()

    async def queued(workers: list[subprocess.Popen[str]]) -> None:
        """Until every acquire of every worker waits in the queue (or a worker died)."""
        async with Budget.from_url(server.url, prefix=prefix) as budget:
            for _ in range(2000):
                if (await budget.status(TENANT)).limits[0].waiters == processes * each:
                    return
                if any(w.poll() is not None for w in workers):
                    return
                await asyncio.sleep(0.01)

    async def window() -> LimitStatus:
        async with Budget.from_url(server.url, prefix=prefix) as budget:
            return (await budget.status(TENANT)).limits[0]

    asyncio.run(spend())
    command = [sys.executable, "-m", "tests.test_deadlines", proxy.url, prefix, "--count", str(each)]
    workers = [
        subprocess.Popen(
            [*command, "--timeout", str(timeout)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        asyncio.run(queued(workers))
        proxy.blackhole()
        outputs = [w.communicate(timeout=timeout + 60) for w in workers]
    finally:
        proxy.passthrough()
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
    ended = []
    for (out, err), worker in zip(outputs, workers, strict=True):
        assert worker.returncode == 0, err[-3000:]
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        ended += [line for line in lines if line["event"] == "ended"]
    assert len(ended) == processes * each
    assert all(e["typed"] for e in ended), [e["type"] for e in ended]
    assert max(e["late"] for e in ended) <= SLACK, sorted(e["late"] for e in ended)
    assert min(e["late"] for e in ended) >= -0.05, "none gave up early"
    limit = asyncio.run(window())
    assert (limit.used, limit.reserved) == (pytest.approx(1.0), 0), "no waiter was admitted"


async def test_an_acquire_cut_at_its_deadline_is_never_resent_after_the_caller_got_its_error(
    proxy: FaultProxy, direct: Budget, prefix: str
) -> None:
    """The batch's send outlives the caller (it reads until its socket timeout): no one may resend it later.

    A client-level retry (redis-py's Retry) would resend the acquire once
    the blackholed read timed out, on a new connection that then passes,
    and Redis would admit it after the caller's error and its cleanup release.
    """
    budget = Budget.from_url(proxy.url + "?socket_timeout=1", prefix=prefix)
    try:
        await warm(budget)
        proxy.blackhole()
        loop = asyncio.get_running_loop()
        with capture_logs() as logs:
            await ends_by(budget.acquire(TENANT, usd=0.4, timeout=0.3), loop.time() + 0.3)
        (rid,) = {e["reservation"] for e in logs if e["event"] == "acquire.release_failed"}
        proxy.passthrough()  # resets the blackholed connections: a resend from now on would reach Redis
        batcher = budget.engine._batcher
        for _ in range(3000):  # until the send still reading its blackholed connection has ended
            if not batcher._sending:
                break
            await asyncio.sleep(0.01)
        assert not batcher._sending, "the cut send never ended"
        await proxy.wait_for_async(lambda s: s.held == 0, what="the proxy to deliver what it holds")
        # Its reservation record would exist even if a resent release had settled it again.
        assert not await direct.engine.client.exists(f"{direct.key(TENANT)}:r:{rid}"), "ran after the caller's error"
        held = await limits(direct)
        assert held["usd"].reserved == 0 and held["requests"].reserved == 0
    finally:
        proxy.passthrough()
        await budget.aclose()


# cut and reset ---------------------------------------------------------------------------


async def test_a_reply_cut_once_is_retried_and_charged_once(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget]
) -> None:
    budget = through()
    await warm(budget)
    proxy.cut(times=1)  # the acquire's reply is the next chunk the server sends
    r = await budget.acquire(TENANT, usd=0.4, timeout=5)
    assert proxy.stats.cuts == 1
    held = await limits(direct)
    assert held["usd"].reserved == pytest.approx(0.4) and held["requests"].reserved == 1, "charged once"
    proxy.cut(times=1)
    assert (await r.commit(usd=0.1)).state == "committed"
    assert proxy.stats.cuts == 2
    held = await limits(direct)
    assert held["usd"].used == pytest.approx(0.1) and held["usd"].reserved == 0
    assert await direct.engine.client.xlen(direct.key(TENANT) + ":ledger") == 1, "committed once"


async def test_replies_cut_until_the_deadline_give_a_typed_error_and_nothing_silent(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget]
) -> None:
    budget = through()
    await warm(budget)
    proxy.cut()  # every reply, from now on
    loop = asyncio.get_running_loop()
    error = await ends_by(budget.acquire(TENANT, usd=0.4, timeout=1.0), loop.time() + 1.0)
    assert isinstance(error, RedisUnavailable)
    assert proxy.stats.cuts >= 1
    proxy.passthrough()
    # The acquire may have run on Redis (only its replies were lost), so it may
    # hold its estimate until its lease ends: but once at most, never more.
    held = await limits(direct)
    assert held["usd"].used == 0
    assert held["usd"].reserved in (0, pytest.approx(0.4))
    assert held["requests"].used + held["requests"].reserved <= 1
    leases = await direct.engine.client.zcard(direct.key(TENANT) + ":leases")
    assert leases == held["requests"].reserved, "whatever is charged is an open lease, that expires"


async def test_reset_connections_give_a_typed_error_by_the_deadline(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget]
) -> None:
    budget = through(retry_timeout=1.0)
    await warm(budget)
    open_one = await budget.acquire(TENANT, usd=0.2)
    proxy.reset()  # RST the open connections, and every new one
    loop = asyncio.get_running_loop()
    error = await ends_by(budget.acquire(TENANT, usd=0.1, timeout=1.0), loop.time() + 1.0)
    # Retried until the deadline: it ends either between attempts ("after
    # retrying") or inside the last one ("did not answer ... deadline").
    assert isinstance(error, RedisUnavailable), error
    assert "after retrying" in str(error) or "the call's deadline" in str(error), error
    await ends_by(open_one.commit(usd=0.1), loop.time() + 1.0)
    assert proxy.stats.resets >= 2
    proxy.passthrough()
    held = await limits(direct)
    assert held["usd"].reserved == pytest.approx(0.2), "only the reservation made before the reset"
    assert held["requests"].used + held["requests"].reserved == 1
    assert (await open_one.commit(usd=0.1)).state == "committed"
    assert (await limits(direct))["usd"].used == pytest.approx(0.1)


async def test_a_delayed_redis_is_cut_at_the_deadline_and_leaks_nothing_unaccounted(
    proxy: FaultProxy, direct: Budget, through: Callable[..., Budget]
) -> None:
    budget = through()
    await warm(budget)
    proxy.delay(700)  # a round trip takes 1.4 s: longer than the timeout
    loop = asyncio.get_running_loop()
    await ends_by(budget.acquire(TENANT, usd=0.3, timeout=0.5), loop.time() + 0.5)
    proxy.passthrough()
    # The acquire reached Redis late and was admitted there, or not at all;
    # either way what is charged is an open lease, never more than once.
    await proxy.wait_for_async(lambda s: s.held == 0, what="the delayed chunks to be delivered")
    held = await limits(direct)
    assert held["usd"].used == 0 and held["usd"].reserved in (0, pytest.approx(0.3))
    assert held["requests"].used + held["requests"].reserved <= 1
    assert await direct.engine.client.zcard(direct.key(TENANT) + ":leases") <= 1


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
