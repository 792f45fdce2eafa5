"""A tenant's durable event trail, replayed and then followed live with no gap and no duplicate.

Every event is appended to the stream ``<base>:trail`` and published on
``<base>:events`` by the script that causes it, in one step (lua/lib.lua,
``publish_event``); the published message carries the entry's stream id. The
trail keeps the last `TRAIL_MAXLEN` events (an exact trim, one entry out per
event in once full; a replay that falls behind the trim loses the oldest).

`follow` reads it the only way that is gap-free and duplicate-free at the seam:

1. subscribe to the channel, and wait for Redis to confirm the subscription;
2. read the trail (XRANGE, in pages) after the starting point;
3. deliver live messages whose id is greater than the last id delivered
   (an event appended during step 2 comes both ways, and is dropped once).

A lost pub/sub connection is reopened (backoff 0.05 s doubling to 2 s); a
reconnect that redis-py made by itself shows as a second confirmation. Either
way the trail is read again from the last id delivered, so a reconnect loses
nothing the trail still holds. Reads of the trail follow the Budget's
``on_unavailable`` policy.

Where to start (`since`):

- None: live only. The trail's last id is read before subscribing, and
  everything after it is delivered: nothing published after the call
  started is lost, even across a reconnect.
- a duration (``"1h"``, ``"30m"``; or a number of seconds): entries of the last
  so long, on the **Redis server's clock** (stream ids are the server's time
  in ms), not on the events' ``ts`` (the tenant's clock, which runs ahead of
  the server's after a clock step back and is frozen under the test clock).
- a `datetime` with a time zone: entries at or after that moment (server clock).
- a stream id ``"<ms>-<seq>"``: entries *after* that id (pass the last id
  you saw to resume); ``"0-0"`` replays the whole trail.

Anything else raises InvalidInput before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slowburn_redis.errors import InvalidInput
from slowburn_redis.events import Event
from slowburn_redis.report import since_seconds

if TYPE_CHECKING:
    from slowburn_redis.engine import Engine
    from slowburn_redis.keys import TenantKeys

log = structlog.get_logger("slowburn_redis")

TRAIL_MAXLEN = 10_000
"""Events kept in each tenant's trail (lua/lib.lua ``TRAIL_MAXLEN`` says the same; a test checks it)."""
PAGE = 500
"""Trail entries read per XRANGE round trip."""
_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")

Since = float | int | str | datetime | None
StreamId = tuple[int, int]


def is_stream_id(text: str) -> bool:
    """Whether `text` is a stream id ``<ms>-<seq>`` (a duration never is)."""
    return _STREAM_ID.fullmatch(text) is not None


def parse_id(text: str) -> StreamId:
    """``"1700000000000-3"`` -> ``(1700000000000, 3)``; compares as stream ids do."""
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Position:
    """Where the reader stands: deliver only ids above `floor`; the next XRANGE starts at `low`."""

    low: str
    floor: StreamId

    def passed(self, event_id: str) -> None:
        self.floor = parse_id(event_id)
        self.low = "(" + event_id

    def is_new(self, event: Event) -> bool:
        """An event not delivered yet (one with no id, from a version without a trail, always is)."""
        return event.id is None or parse_id(event.id) > self.floor


async def start_position(engine: Engine, keys: TenantKeys, since: Since) -> Position:
    """The position `since` names (see the module docstring); InvalidInput for anything else."""
    if since is None:
        last = await engine.xrevrange(keys.trail, "+", "-", 1)
        tip = last[0][0] if last else "0-0"
        return Position("(" + tip, parse_id(tip))
    if isinstance(since, datetime):
        if since.tzinfo is None:
            raise InvalidInput("since as a datetime needs a time zone (e.g. datetime.now(UTC) - timedelta(hours=1))")
        return _from_ms(int(since.timestamp() * 1000))
    if isinstance(since, str) and is_stream_id(since.strip()):
        text = since.strip()
        return Position("(" + text, parse_id(text))
    try:
        seconds = since_seconds(since)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc} (or a datetime with a time zone, or a stream id like 1700000000000-0)") from None
    assert seconds is not None
    return _from_ms(await engine.server_time_ms() - int(seconds * 1000))


def _from_ms(ms: int) -> Position:
    ms = max(ms, 0)
    return Position(f"{ms}-0", (ms, -1))


async def replay(engine: Engine, keys: TenantKeys, tenant: str, position: Position) -> AsyncIterator[Event]:
    """The trail's entries after `position`, in order, moving it past each one delivered."""
    while True:
        entries = await engine.xrange(keys.trail, position.low, "+", PAGE)
        for entry_id, fields in entries:
            event = _entry_event(tenant, entry_id, fields)
            position.passed(entry_id)
            if event is not None:
                yield event
        if len(entries) < PAGE:
            return


async def recent(engine: Engine, keys: TenantKeys, count: int) -> tuple[str, str]:
    """``(since, tip)``: `since` the stream id after which the last `count` events of the trail lie (a
    `since` for `follow`), `tip` the trail's last id now (``"0-0"`` for an empty trail)."""
    entries = await engine.xrevrange(keys.trail, "+", "-", count + 1)
    tip = entries[0][0] if entries else "0-0"
    return (entries[count][0] if len(entries) > count else "0-0"), tip


async def history(engine: Engine, keys: TenantKeys, tenant: str, since: Since = "0-0") -> AsyncIterator[Event]:
    """The trail's events from `since` (default: all of it) up to now, in order; nothing live."""
    position = await start_position(engine, keys, since)
    async for event in replay(engine, keys, tenant, position):
        yield event


def _entry_event(tenant: str, entry_id: str, fields: dict[str, str]) -> Event | None:
    try:
        return Event.from_entry(tenant, entry_id, fields)
    except (KeyError, ValueError) as exc:  # not written by this library: skipped, not fatal
        log.warning("trail.bad_entry", tenant=tenant, id=entry_id, error=str(exc))
        return None


async def follow(engine: Engine, keys: TenantKeys, tenant: str, since: Since = None) -> AsyncIterator[Event]:
    """Events of `tenant` from `since` on, then live, forever (close the iterator to stop); see the docstring."""
    position = await start_position(engine, keys, since)
    backoff = 0.05
    while True:
        pubsub = engine.open_pubsub()
        try:
            await pubsub.subscribe(keys.events_channel)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                backoff = 0.05
                if message is None:
                    continue
                if message.get("type") == "subscribe":  # the first confirmation, or one after a reconnect
                    async for replayed in replay(engine, keys, tenant, position):
                        yield replayed
                    continue
                live = _message_event(tenant, message)
                if live is not None and position.is_new(live):
                    if live.id is not None:
                        position.passed(live.id)
                    yield live
        except _NETWORK_ERRORS as exc:
            log.warning("events.disconnected", tenant=tenant, error=str(exc), retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


def _message_event(tenant: str, message: dict[str, Any]) -> Event | None:
    if message.get("type") != "message":
        return None
    try:
        return Event.from_message(tenant, message["data"])
    except (json.JSONDecodeError, ValueError) as exc:
        log.warning("events.bad_message", tenant=tenant, error=str(exc))
        return None
