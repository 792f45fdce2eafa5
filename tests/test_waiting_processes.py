"""Waiting across real OS processes, on a real Redis and on a fakeredis TCP server.

Waiters run in worker subprocesses (`tests.workers`) with a 60 s heartbeat and
windows of an hour: only a notification published by another process can
wake them within the test's deadlines. Admission order is read from the
``resumed`` events, which the acquire script publishes atomically as it
admits, so the order is the server's, not the order in which stdout lines
happened to arrive.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from slowburn_redis import Budget, SyncBudget
from tests.conftest import sync_client
from tests.workers import Worker

T = "acme"


def eventually(check: Callable[[], Any], within: float = 60.0, what: str = "condition") -> Any:
    """Poll `check` until it returns a truthy value; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.02)


class Fleet:
    """The test's view of one tenant: a control budget, a raw client, and the worker processes."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.base = f"{prefix}:{{{T}}}"
        self.redis: redis.Redis = sync_client(url)
        self.budget: SyncBudget = Budget.from_url(url, prefix=prefix).sync()
        self.workers: list[Worker] = []

    def start(self, command: str = "acquire", *options: str) -> Worker:
        worker = Worker(command, self.url, self.prefix, T, *options)
        self.workers.append(worker)
        return worker

    def queued(self) -> int:
        return int(self.redis.hlen(self.base + ":q"))

    def wait_queued(self, count: int) -> None:
        eventually(lambda: self.queued() == count, what=f"{count} queued waiters (have {self.queued()})")

    def leftovers(self) -> dict[str, Any]:
        return {
            "q": self.redis.hgetall(self.base + ":q"),
            "qexp": self.redis.zrange(self.base + ":qexp", 0, -1),
            "blocked": list(self.redis.scan_iter(match=self.base + ":b:*")),
            "leases": self.redis.zrange(self.base + ":leases", 0, -1),
        }

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.budget.close()
        self.redis.close()


@pytest.fixture
def fleet(server_url: str, prefix: str) -> Iterator[Fleet]:
    f = Fleet(server_url, prefix)
    try:
        yield f
    finally:
        f.close()


class EventLog:
    """The tenant's event channel, read by a thread on a plain redis-py connection."""

    def __init__(self, fleet: Fleet) -> None:
        self.items: list[dict[str, Any]] = []
        self._pubsub = fleet.redis.pubsub()
        self._pubsub.subscribe(fleet.base + ":events")
        eventually(lambda: self._pubsub.get_message(timeout=0.1), what="the subscription")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message and message["type"] == "message":
                self.items.append(json.loads(message["data"]))

    def agents(self, kind: str) -> list[str]:
        return [e["agent"] for e in list(self.items) if e["type"] == kind]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()


@pytest.fixture
def events(fleet: Fleet) -> Iterator[EventLog]:
    log = EventLog(fleet)
    try:
        yield log
    finally:
        log.close()


def test_waiter_resumes_when_another_process_commits_lower(fleet: Fleet) -> None:
    fleet.budget.set_limits(T, ["usd 1/hour"])
    holder = fleet.start("acquire", "--usd", "1", "--then", "stdin")
    holder.expect("admitted")
    waiter = fleet.start("acquire", "--usd", "0.5", "--label", "waiter")
    fleet.wait_queued(1)
    assert [line["event"] for line in waiter.seen] == []
    holder.send("commit 0.2")
    assert holder.expect("settled")["state"] == "committed"
    assert waiter.expect("admitted")["label"] == "waiter"
    assert waiter.expect("settled")["state"] == "committed"
    assert waiter.wait() == 0
    holder.send("exit")
    assert holder.wait() == 0
    status = fleet.budget.status(T)
    assert status.limits[0].used == pytest.approx(0.7)
    assert status.limits[0].reserved == 0
    assert fleet.leftovers() == {"q": {}, "qexp": [], "blocked": [], "leases": []}


def test_reset_from_a_third_process_wakes_every_waiter(fleet: Fleet, events: EventLog) -> None:
    fleet.budget.set_limits(T, ["usd 1/hour"])
    holder = fleet.start("acquire", "--usd", "1", "--then", "hold")
    holder.expect("admitted")
    single = fleet.start("acquire", "--usd", "0.3", "--agent", "single")
    fleet.wait_queued(1)
    pair = fleet.start("waiters", "--usd", "0.3", "--count", "2", "--label", "pair")
    fleet.wait_queued(3)
    resetter = fleet.start("reset")
    assert resetter.expect("reset")["windows"] == 1
    assert single.expect("admitted")
    admitted = {pair.expect("admitted")["label"], pair.expect("admitted")["label"]}
    assert admitted == {"pair0", "pair1"}
    assert single.wait() == 0 and pair.wait() == 0
    eventually(lambda: len(events.agents("resumed")) == 3, what="three resumed events")
    assert sorted(events.agents("resumed")) == ["pair0", "pair1", "single"]
    assert events.agents("reset") == [""]
    assert fleet.queued() == 0


def test_fifo_order_across_processes_higher_priority_first(fleet: Fleet, events: EventLog) -> None:
    fleet.budget.set_limits(T, ["concurrency 1"])
    holder = fleet.budget.acquire(T)
    arrivals = [("a", 0), ("b", 0), ("hi", 5), ("c", 0), ("lo", -3)]
    workers = []
    for count, (name, priority) in enumerate(arrivals, start=1):
        workers.append(fleet.start("acquire", "--agent", name, "--priority", str(priority), "--then", "release"))
        fleet.wait_queued(count)
    eventually(lambda: len(events.agents("waiting")) == 5, what="five waiting events")
    assert events.agents("waiting") == ["a", "b", "hi", "c", "lo"]
    holder.release()
    for worker in workers:
        worker.expect("settled")
        assert worker.wait() == 0
    eventually(lambda: len(events.agents("resumed")) == 5, what="five resumed events")
    assert events.agents("resumed") == ["hi", "a", "b", "c", "lo"]
    assert fleet.leftovers() == {"q": {}, "qexp": [], "blocked": [], "leases": []}


def test_large_request_is_not_starved_by_small_ones_from_other_processes(fleet: Fleet, events: EventLog) -> None:
    fleet.budget.set_limits(T, ["usd 1/hour"])
    first = fleet.start("acquire", "--usd", "0.5", "--then", "stdin")
    second = fleet.start("acquire", "--usd", "0.5", "--then", "stdin")
    first.expect("admitted")
    second.expect("admitted")
    large = fleet.start("acquire", "--agent", "large", "--usd", "0.8")
    fleet.wait_queued(1)
    first.send("release")  # 0.5 free: not enough for the large one, plenty for a small one
    first.expect("settled")
    smalls = []
    for i in range(3):  # a stream of small requests arriving after the large one
        smalls.append(fleet.start("acquire", "--agent", f"s{i}", "--usd", "0.1"))
        fleet.wait_queued(2 + i)
    assert events.agents("resumed") == []
    assert fleet.budget.status(T).limits[0].remaining == pytest.approx(0.5)
    second.send("commit 0.1")  # 0.9 free: the large one, then one small one
    large.expect("admitted")
    smalls[0].expect("admitted")
    eventually(lambda: len(events.agents("resumed")) == 2, what="two resumed events")
    assert events.agents("resumed") == ["large", "s0"]
    assert fleet.queued() == 2
    fleet.budget.reset(T)
    for worker in smalls[1:]:
        worker.expect("admitted")
    eventually(lambda: len(events.agents("resumed")) == 4, what="four resumed events")
    assert events.agents("resumed") == ["large", "s0", "s1", "s2"]


def test_dead_waiter_leaves_the_queue_and_does_not_block_the_others(fleet: Fleet) -> None:
    fleet.budget.set_limits(T, ["concurrency 1"])
    holder = fleet.budget.acquire(T)
    # Places expire after three heartbeats: 1.5 s here.
    dead = fleet.start("acquire", "--agent", "dead", "--heartbeat", "0.5")
    fleet.wait_queued(1)
    dead_ticket = next(iter(fleet.redis.hkeys(fleet.base + ":q")))
    alive = fleet.start("acquire", "--agent", "alive", "--heartbeat", "0.5", "--then", "release")
    fleet.wait_queued(2)
    dead.kill()
    holder.release()  # wakes the dead head, which will never retry
    alive.expect("admitted")
    assert alive.wait() == 0
    assert dead_ticket not in fleet.redis.hkeys(fleet.base + ":q")
    assert fleet.leftovers() == {"q": {}, "qexp": [], "blocked": [], "leases": []}


def test_timeout_in_another_process_raises_budget_timeout_and_leaves_the_queue(fleet: Fleet) -> None:
    fleet.budget.set_limits(T, ["usd 1/hour"])
    fleet.budget.acquire(T, usd=1).commit()
    waiter = fleet.start("acquire", "--usd", "0.5", "--timeout", "0.5")
    denied = waiter.expect("denied")
    assert denied["type"] == "BudgetTimeout"
    assert denied["has_status"] is True
    assert denied["limit"] == "T:usd:3600000"
    assert waiter.wait() == 3
    assert fleet.leftovers() == {"q": {}, "qexp": [], "blocked": [], "leases": []}


def test_sigint_on_a_sync_wait_leaves_no_reservation_and_no_queue_entry(fleet: Fleet) -> None:
    fleet.budget.set_limits(T, ["usd 1/hour", "concurrency 2"])
    holder = fleet.budget.acquire(T, usd=0.9)
    waiter = fleet.start("acquire", "--sync", "--usd", "0.5", "--agent", "interrupted")
    waiter.expect("started")
    fleet.wait_queued(1)
    waiter.signal(signal.SIGINT)
    waiter.expect("interrupted")
    assert waiter.wait() != 0
    leftovers = fleet.leftovers()
    assert leftovers == {"q": {}, "qexp": [], "blocked": [], "leases": [holder.id]}, waiter.describe()
    assert fleet.redis.keys(fleet.base + ":r:*") == [f"{fleet.base}:r:{holder.id}"]
    holder.release()


ROUNDS = 40


def test_sigint_at_random_moments_of_a_sync_wait_never_leaves_a_queue_entry(fleet: Fleet) -> None:
    """One sync worker waits ROUNDS times; each wait is ended by a SIGINT at a random moment after it queued.

    The moments cover the subscription, the retry right after it (an acquire in
    flight: its cleanup must reach Redis after it) and the sleep. After every
    round: no queue place, no blocked entry, no reservation but the holder's.
    """
    rng = random.Random(20261202)
    fleet.budget.set_limits(T, ["usd 1/hour", "concurrency 2"])
    holder = fleet.budget.acquire(T, usd=0.9)
    waiter = fleet.start("acquire", "--sync", "--usd", "0.5", "--agent", "interrupted", "--interrupts", str(ROUNDS))
    for round_ in range(ROUNDS):
        if round_:
            waiter.send("next")
        started = waiter.expect("started")
        assert started["round"] == round_
        fleet.wait_queued(1)
        time.sleep(rng.choice([0.0, 0.0, rng.uniform(0, 0.005), rng.uniform(0, 0.05)]))
        waiter.signal(signal.SIGINT)
        assert waiter.expect("interrupted")["round"] == round_
        leftovers = fleet.leftovers()
        assert leftovers == {"q": {}, "qexp": [], "blocked": [], "leases": [holder.id]}, (
            f"round {round_}: {waiter.describe()}"
        )
        assert fleet.redis.keys(fleet.base + ":r:*") == [f"{fleet.base}:r:{holder.id}"], round_
    assert waiter.wait() == 0, waiter.describe()
    holder.release()
