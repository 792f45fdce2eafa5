"""The durable event trail: every event kept in ``<base>:trail``, replayed, then followed live without gap or duplicate.

Every behaviour test runs on fakeredis and on a real Redis. Readers and
producers synchronise on conditions (events received, ids seen); the only
timeouts are safety nets against a hang.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from slowburn_redis import Budget, InvalidInput
from slowburn_redis.events import Event
from slowburn_redis.trail import TRAIL_MAXLEN, parse_id
from tests.cli_support import Cli, assert_bad_input, assert_exit
from tests.test_waiting import eventually

T = "acme"
LIB = Path(__file__).resolve().parent.parent / "lua" / "lib.lua"
SAFETY = 60.0
"""Seconds before a test that waits for events gives up (a hang, never a synchronisation)."""


async def take(stream: AsyncIterator[Event], count: int) -> list[Event]:
    """The next `count` events of `stream`."""

    async def go() -> list[Event]:
        return [await anext(stream) for _ in range(count)]

    return await asyncio.wait_for(go(), SAFETY)


async def trail_ids(budget: Budget, tenant: str = T) -> list[str]:
    return [entry_id for entry_id, _ in await budget.engine.client.xrange(budget.keys(tenant).trail)]


async def test_an_event_published_while_nobody_listened_is_replayed(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    await (await budget.acquire(T, usd=0.6)).commit()  # crosses 50 %: published to nobody
    stream = budget.events(T, since="1h")
    try:
        changed, threshold = await take(stream, 2)
    finally:
        await stream.aclose()
    assert changed.type == "limits_changed"
    assert threshold.type == "threshold" and threshold.model_extra["level"] == 50
    assert threshold.limit == "T:usd:3600000" and threshold.tenant == T
    assert [changed.id, threshold.id] == await trail_ids(budget)


async def test_the_published_message_carries_the_trail_entry_and_its_id(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    pubsub = budget.engine.open_pubsub()
    await pubsub.subscribe(budget.keys(T).events_channel)
    try:
        await eventually(lambda: budget.engine.subscribers(budget.keys(T).events_channel))
        await budget.reset(T)
        # The reset's message. On a cluster a PUBLISH reaches the other nodes over the cluster bus, later:
        # set_limits' limits_changed, published before this subscription, may still arrive after it.
        published: dict[str, Any] = {}
        while published.get("type") != "reset":
            message = await asyncio.wait_for(pubsub.get_message(timeout=None), SAFETY)
            if message is not None and message["type"] == "message":
                published = json.loads(message["data"])
    finally:
        await pubsub.aclose()
    ((entry_id, entry),) = (await budget.engine.client.xrange(budget.keys(T).trail))[-1:]
    assert published.pop("id") == entry_id
    assert published == json.loads(entry["event"])
    assert set(entry) == {"event"}


async def test_replay_then_live_has_no_gap_and_no_duplicate_across_the_seam(budget: Budget) -> None:
    """A producer resets (one event each) all along while the reader replays and crosses over to live."""
    await budget.set_limits(T, ["usd 1/hour"])
    produced = 0
    stop = asyncio.Event()

    async def produce() -> None:
        nonlocal produced
        while not stop.is_set():
            await budget.reset(T)
            produced += 1

    producer = asyncio.create_task(produce())
    received: list[Event] = []
    stream = budget.events(T, since="0-0")
    try:
        await eventually(lambda: produced >= 20)  # the reader starts mid-production
        while len(received) < 40:  # ... and production goes on while it replays and switches over
            received.extend(await take(stream, 1))
        stop.set()
        await producer
        ids = await trail_ids(budget)
        assert produced >= 40
        received.extend(await take(stream, len(ids) - len(received)))
    finally:
        stop.set()
        await producer
        await stream.aclose()
    assert [event.id for event in received] == ids
    assert [event.type for event in received] == ["limits_changed"] + ["reset"] * produced


async def test_a_pubsub_reconnect_loses_nothing(budget: Budget, backend: str) -> None:
    """The reader's connection is cut, events are made while it reconnects: each arrives once, in order."""
    opened: list[Any] = []
    confirmations: list[str] = []

    def open_pubsub() -> Any:
        pubsub = budget.engine.client.pubsub()
        opened.append(pubsub)
        get_message = pubsub.get_message

        async def counting(**options: Any) -> Any:
            message = await get_message(**options)
            if message is not None and message["type"] == "subscribe":
                confirmations.append(message["type"])
            return message

        pubsub.get_message = counting
        return pubsub

    budget.engine.open_pubsub_factory = open_pubsub
    await budget.set_limits(T, ["usd 1/hour"])
    stream = budget.events(T)  # live only
    received: list[Event] = []
    try:
        first = asyncio.ensure_future(take(stream, 1))
        await eventually(lambda: budget.engine.subscribers(budget.keys(T).events_channel))
        await budget.reset(T)
        received += await first
        await cut(budget, opened[-1], backend)
        for _ in range(10):  # while the reader is cut off, and while it reconnects
            await budget.reset(T)
        received += await take(stream, 10)
        await budget.reset(T)
        received += await take(stream, 1)
    finally:
        await stream.aclose()
    ids = await trail_ids(budget)
    assert [event.id for event in received] == ids[1:]  # everything after limits_changed, once, in order
    assert len(received) == 12
    # It did reconnect: redis-py subscribed again by itself (a second confirmation), or the reader reopened.
    assert len(confirmations) >= 2


async def test_a_connection_error_reopens_the_pubsub_and_rereads_the_trail(budget: Budget) -> None:
    """A message lost with its connection (the read raises) is read again from the trail on a new connection."""
    opened: list[Any] = []
    drop_next = asyncio.Event()

    def open_pubsub() -> Any:
        pubsub = budget.engine.client.pubsub()
        opened.append(pubsub)
        get_message = pubsub.get_message

        async def dropping(**options: Any) -> Any:
            message = await get_message(**options)
            if drop_next.is_set() and message is not None and message["type"] == "message":
                drop_next.clear()
                raise RedisConnectionError("connection lost (test)")
            return message

        pubsub.get_message = dropping
        return pubsub

    budget.engine.open_pubsub_factory = open_pubsub
    await budget.set_limits(T, ["usd 1/hour"])
    stream = budget.events(T)
    try:
        first = asyncio.ensure_future(take(stream, 1))
        await eventually(lambda: budget.engine.subscribers(budget.keys(T).events_channel))
        await budget.reset(T)
        received = await first
        drop_next.set()
        await budget.reset(T)  # its message is dropped with the connection
        await budget.reset(T)
        received += await take(stream, 2)
    finally:
        await stream.aclose()
    assert [event.id for event in received] == (await trail_ids(budget))[1:]
    assert len(opened) == 2


async def cut(budget: Budget, pubsub: Any, backend: str) -> None:
    """Drop the reader's pub/sub connection: CLIENT KILL on a real Redis, a closed connection on fakeredis."""
    if backend == "real":
        listing = await budget.engine.client.execute_command("CLIENT", "LIST", "TYPE", "pubsub")
        lines = listing.splitlines() if isinstance(listing, str) else [str(line) for line in listing]
        killed = 0
        for line in lines:
            client_id = re.search(r"\bid=(\d+)", line)
            if client_id:
                killed += await budget.engine.client.execute_command("CLIENT", "KILL", "ID", client_id[1])
        assert killed >= 1
    else:
        await pubsub.connection.disconnect()


def test_lib_lua_keeps_the_documented_bound() -> None:
    assert f"local TRAIL_MAXLEN = {TRAIL_MAXLEN}\n" in LIB.read_text()


async def test_the_trail_is_bounded(budget: Budget) -> None:
    trail = budget.keys(T).trail
    await budget.set_limits(T, ["usd 1/hour"])
    pipe = budget.engine.client.pipeline(transaction=False)
    for _ in range(TRAIL_MAXLEN):
        pipe.xadd(trail, {"event": json.dumps({"type": "reset", "ts": 0})})
    await pipe.execute()
    await budget.reset(T)
    client = budget.engine.client
    assert await client.xlen(trail) == TRAIL_MAXLEN
    ((_, newest),) = await client.xrevrange(trail, count=1)
    assert json.loads(newest["event"])["type"] == "reset" and json.loads(newest["event"])["ts"] > 0


async def test_since_filters_on_the_servers_clock(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    await budget.reset(T, dimension="usd")
    (first,) = (await trail_ids(budget))[-1:]
    first_ms = parse_id(first)[0]
    await eventually(lambda: _server_ms_above(budget, first_ms))
    await budget.reset(T)
    changed, first_id, second = await trail_ids(budget)

    async def replayed(since: Any, count: int) -> list[str | None]:
        stream = budget.events(T, since=since)
        try:
            return [event.id for event in await take(stream, count)]
        finally:
            await stream.aclose()

    assert await replayed("1h", 3) == [changed, first_id, second]
    assert await replayed(3600, 3) == [changed, first_id, second]
    assert await replayed(first_id, 1) == [second]  # a stream id: entries after it
    assert await replayed(datetime.fromtimestamp((first_ms + 1) / 1000, tz=UTC), 1) == [second]

    # After the history, live: the next event and nothing twice.
    stream = budget.events(T, since=first_id)
    try:
        assert [e.id for e in await take(stream, 1)] == [second]
        await budget.reset(T)
        (live,) = await take(stream, 1)
    finally:
        await stream.aclose()
    assert live.type == "reset" and live.id == (await trail_ids(budget))[-1]


async def _server_ms_above(budget: Budget, ms: int) -> bool:
    return await budget.engine.server_time_ms() > ms


@pytest.mark.parametrize(
    "since", ["garbage", "", "-1h", -5, 0, True, object(), datetime(2026, 1, 1), "12-x", float("nan")]
)
async def test_a_bad_since_is_invalid_input(budget: Budget, since: Any) -> None:
    with pytest.raises(InvalidInput):
        await anext(budget.events(T, since=since))


async def test_a_reseed_is_in_the_trail_in_the_same_format(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget(desired_limits={T: ["usd 1/hour"]})
    try:
        await (await budget.acquire(T, usd=0.1)).commit()
        stream = budget.events(T, since=timedelta(hours=1).total_seconds())
        try:
            events = await take(stream, 2)
        finally:
            await stream.aclose()
    finally:
        await budget.aclose()
    reseeded = next(event for event in events if event.type == "limits_reseeded")
    assert reseeded.model_extra["limits"] == {"tenant": ["usd 1/hour"]}
    assert reseeded.model_extra["history_lost"] is True
    assert isinstance(reseeded.ts, int) and reseeded.id in await trail_ids(budget)


# the CLI --------------------------------------------------------------------------------


@pytest.fixture
def run(server_url: str, prefix: str) -> Cli:
    return Cli(server_url, prefix)


def test_cli_events_prints_the_history_in_peoples_words(run: Cli) -> None:
    assert_exit(run("limits", "set", T, "usd 5/day"))
    assert_exit(run("limits", "set", T, "--agent", "researcher", "usd 0.50/hour"))
    budget = Budget.from_url(run.url, prefix=run.prefix).sync()
    try:
        budget.acquire(T, agent="researcher", usd=0.45).commit(usd=0.45)
    finally:
        budget.close()

    result = run("events", T, "--since", "1h", "--no-follow")
    assert_exit(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 5, lines  # two limit changes, 50/75/90 % of usd 0.5/hour
    assert lines[0].endswith(f"{T} limits of tenant set: usd 5/day")
    assert lines[2].endswith(f"{T} threshold usd 0.5/hour (agent researcher): 50 % used")
    assert lines[4].endswith("90 % used")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", lines[0])
    for internal in ("A:researcher", "T:usd", "500000000", "ticket", '"'):
        assert internal not in result.stdout, internal

    as_json = run("events", T, "--json", "--no-follow")
    assert_exit(as_json)
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["event"]["type"] for e in events] == ["limits_changed"] * 2 + ["threshold"] * 3
    assert all(e["type"] == "event" and re.fullmatch(r"\d+-\d+", e["event"]["id"]) for e in events)
    assert events[2]["event"]["limit"] == "A:researcher:usd:3600000"  # internal keys: only under --json

    after = run("events", T, "--json", "--no-follow", "--since", events[3]["event"]["id"])
    assert [json.loads(line)["event"]["level"] for line in after.stdout.splitlines()] == [90]


def test_cli_events_bad_input_and_unknown_tenant(run: Cli) -> None:
    assert_bad_input(run("events", T, "--since", "yesterday"), "--since")
    assert_bad_input(run("events", T, "--since", "-1h"), "--since")
    assert_bad_input(run("events", "a b"), "tenant name")
    missing = run("events", "nobody", "--no-follow")
    assert missing.exit_code == 3, missing.output
