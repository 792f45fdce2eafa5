"""Sleeping until the budget refills: one pub/sub connection per process.

A `WakeHub` holds one subscription per tenant that has waiters in this
process, and routes each wake notification (a list of queue tickets, each
possibly with the time its waiter may retry, or ``*`` for all) to the local
waiters it names. It also runs the heartbeat that
keeps the waiters' queue places alive and wakes any waiter that stands first
in its queues with no timed retry of its own (the safety net for a
notification lost while disconnected).

A queue place expires after three heartbeats unless refreshed; every attempt
of a waiter refreshes its own place, and the heartbeat refreshes only the
places that no attempt refreshed for `REFRESH_AGE` heartbeats, in one script
call per tenant (whatever the number of waiters). While nothing changes, the
hub therefore sends Redis one call per tenant every two heartbeats, and a
place is never older than 2.5 heartbeats when refreshed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slowburn_redis.tasks import cancel_and_wait

log = structlog.get_logger("slowburn_redis")

Refresh = Callable[[str, list[str]], Awaitable[tuple[list[str], list[str]]]]
_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
T = TypeVar("T")

REFRESH_AGE = 1.5
"""Heartbeats since a queue place was last refreshed after which the heartbeat refreshes it.

Places expire after three heartbeats: a place is refreshed at most
``REFRESH_AGE + 1`` heartbeats after its last refresh, which leaves half a
heartbeat for a late beat or a slow Redis."""


class Waiter:
    """One waiting acquire: sleeps until woken or until its own deadline.

    Its owner sets `ticket` (its queue place), `timed` (it will retry at a
    time of its own, so the heartbeat need not wake it when it stands first)
    and `refreshed_at` (event-loop time at which its place was last
    refreshed: each attempt refreshes it, and so does the heartbeat).
    """

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.ticket = ""
        self.timed = False
        self.refreshed_at = asyncio.get_running_loop().time()
        self._event = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        self._event.set()

    def wake_in(self, seconds: float) -> None:
        """Wake at the latest `seconds` from now (a notification naming the time the waiter may retry)."""
        self.timed = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, seconds), self._event.set)

    def forget(self) -> None:
        """Cancel a pending `wake_in` (the waiter left)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def sleep(self, seconds: float | None) -> bool:
        """Sleep up to `seconds` (None: until woken). True if woken by a notification."""
        try:
            if seconds is None:
                await self._event.wait()
            else:
                await asyncio.wait_for(self._event.wait(), max(0.0, seconds))
            return True
        except TimeoutError:
            return False
        finally:
            self._event.clear()
            self.forget()  # it retries now: a later wake_in would only be a second retry


class SharedReads:
    """Reads in flight shared by the waiters of one hub (one Budget): see `read`.

    Many waiters of a tenant that time out together (a crowd with one
    timeout) read one status snapshot between them instead of one each.
    """

    def __init__(self) -> None:
        self._reads: dict[Hashable, asyncio.Future[Any]] = {}

    async def read(self, key: Hashable, start: Callable[[], Awaitable[T]]) -> T:
        """The result of the read of `key` in flight, else of a new one `start()` makes.

        A caller that gives up (cancelled, cut at its deadline) leaves the
        read running for the others; a failed read fails each of its callers.
        """
        future = self._reads.get(key)
        if future is None:
            future = asyncio.ensure_future(start())
            self._reads[key] = future
            future.add_done_callback(lambda done: self._forget(key, done))
        result: T = await asyncio.shield(future)
        return result

    def _forget(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._reads.get(key) is done:
            del self._reads[key]
        if not done.cancelled():
            done.exception()  # marked retrieved: each caller got the error itself


class WakeHub:
    """Routes a process's wake notifications to its waiters; see the module docstring."""

    def __init__(
        self,
        open_pubsub: Callable[[], Any],
        refresh: Refresh,
        *,
        channel: Callable[[str], str],
        heartbeat: float,
    ) -> None:
        self._open_pubsub = open_pubsub
        self._refresh = refresh
        self._channel = channel
        self._heartbeat = heartbeat
        self._pubsub: Any = None
        self._tenants: dict[str, set[Waiter]] = {}
        self._by_channel: dict[str, str] = {}
        self._confirmed: dict[str, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self._left = asyncio.Event()  # set whenever a waiter leaves
        self._epoch = 0  # grows whenever notifications may have been lost (see `listening`)
        self.reads = SharedReads()
        """Status reads shared by timed-out waiters (`slowburn_redis.acquiring`)."""

    async def join(self, tenant: str) -> Waiter:
        """A new waiter for `tenant`, returned once this process is subscribed to its wakes."""
        waiter = self._add(tenant)
        channel = self._channel(tenant)
        try:
            async with self._lock:
                if channel not in self._by_channel:
                    self._by_channel[channel] = tenant
                    self._confirmed[channel] = asyncio.get_running_loop().create_future()
                    if self._closing:
                        self._confirmed[channel].set_result(None)
                    elif self._pubsub is not None:
                        await self._pubsub.subscribe(channel)
                if not self._closing:
                    self._start()
            await asyncio.shield(self._confirmed[channel])
        except BaseException:
            self.leave(waiter)
            raise
        return waiter

    def register(self, tenant: str, ticket: str) -> Waiter:
        """A new waiter for `tenant` holding `ticket`, at once; only while `listening(tenant)` is not None.

        For a request about to be sent: a wake naming `ticket` (a newcomer's
        ticket is its reservation id) that arrives before its reply is kept
        (the waiter's next sleep returns at once).
        """
        waiter = self._add(tenant)
        waiter.ticket = ticket
        return waiter

    def _add(self, tenant: str) -> Waiter:
        waiter = Waiter(tenant)
        self._tenants.setdefault(tenant, set()).add(waiter)
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """Forget a waiter (admitted, timed out or cancelled)."""
        waiter.forget()
        waiters = self._tenants.get(waiter.tenant)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._tenants[waiter.tenant]
        self._left.set()

    def listening(self, tenant: str) -> int | None:
        """A mark while this process is subscribed to `tenant`'s wakes (confirmed), else None.

        The mark changes whenever notifications may have been lost since
        (a dropped or renewed subscription): a caller that read the same
        mark before sending a request and after joining missed no wake
        published in between.
        """
        future = self._confirmed.get(self._channel(tenant))
        if self._pubsub is None or future is None or not future.done() or self._closing:
            return None
        return self._epoch

    @property
    def waiting(self) -> int:
        """How many waiters this process has."""
        return sum(len(w) for w in self._tenants.values())

    async def aclose(self) -> None:
        """Wake every waiter and wait until they have all left, then stop the reader and heartbeat and close.

        The owner makes woken waiters leave (Budget raises BudgetClosed in them);
        a waiter still joining is let through at once.
        """
        self._closing = True
        if self._beater is not None:
            await cancel_and_wait([self._beater])
        for future in self._confirmed.values():
            if not future.done():
                future.set_result(None)
        while self.waiting:
            self._left.clear()
            for tenant in list(self._tenants):
                self._wake_tenant(tenant, None)
            await self._left.wait()
        await cancel_and_wait([task for task in (self._reader, self._beater) if task is not None])
        self._reader = self._beater = None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    def _start(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        if self._beater is None or self._beater.done():
            self._beater = asyncio.get_running_loop().create_task(self._beat())

    def _wake_tenant(self, tenant: str, tickets: list[str] | None) -> None:
        """Wake the tenant's waiters that `tickets` names (None: all; a waiter without a ticket: always).

        A ticket may carry a time, ``<ticket>@<ms>``: that waiter may retry
        only then (its queue is out of capacity until then), so it is woken
        then, unless something else wakes it first.
        """
        later: dict[str, float] = {}
        now: set[str] = set()
        for item in tickets or ():
            ticket, _, ms = item.partition("@")
            if ms.isdigit():
                later[ticket] = int(ms) / 1000
            else:
                now.add(ticket)
        for waiter in list(self._tenants.get(tenant, ())):
            if tickets is None or waiter.ticket in now or not waiter.ticket:
                waiter.wake()
            elif waiter.ticket in later:
                waiter.wake_in(later[waiter.ticket])

    async def _connect(self) -> None:
        self._pubsub = self._open_pubsub()
        async with self._lock:
            for channel, future in list(self._confirmed.items()):
                if future.done():
                    self._confirmed[channel] = asyncio.get_running_loop().create_future()
            if self._by_channel:
                await self._pubsub.subscribe(*self._by_channel)

    async def _read(self) -> None:
        backoff = 0.05
        while True:
            try:
                if self._pubsub is None:
                    await self._connect()
                message = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=None)
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except _NETWORK_ERRORS as exc:
                log.warning("pubsub.disconnected", error=str(exc), retry_in=backoff)
                await self._drop_connection()
                # Notifications may have been lost: every waiter retries.
                for tenant in list(self._tenants):
                    self._wake_tenant(tenant, None)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if message is None:
                continue
            self._dispatch(message)

    async def _drop_connection(self) -> None:
        self._epoch += 1
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        tenant = self._by_channel.get(channel or "")
        if tenant is None:
            return
        if message.get("type") == "subscribe":
            future = self._confirmed.get(channel or "")
            if future is not None and not future.done():
                future.set_result(None)
            elif future is not None:
                # A second confirmation: the client reconnected by itself and
                # subscribed again. Wakes sent meanwhile were lost: every
                # waiter of the tenant retries.
                self._epoch += 1
                self._wake_tenant(tenant, None)
            return
        if message.get("type") != "message":
            return
        data = message.get("data")
        if isinstance(data, bytes):
            data = data.decode()
        self._wake_tenant(tenant, None if data == "*" else str(data).split())

    async def _beat(self) -> None:
        """Every `heartbeat` seconds, refresh each tenant's aging queue places; runs until cancelled.

        No error ends it: a failed refresh (Redis away, or anything
        unexpected) is logged and that tenant is refreshed again on the
        next beat. Only cancellation (`aclose`) stops it.
        """
        while True:
            await asyncio.sleep(self._heartbeat)
            for tenant, waiters in list(self._tenants.items()):
                await self._beat_tenant(tenant, waiters)

    async def _beat_tenant(self, tenant: str, waiters: set[Waiter]) -> None:
        """One tenant's heartbeat: refresh the places no attempt refreshed for `REFRESH_AGE` heartbeats,
        wake the lost waiters and those first in line without a timed retry; never raises."""
        now = asyncio.get_running_loop().time()
        aged = now - REFRESH_AGE * self._heartbeat
        by_ticket = {w.ticket: w for w in waiters if w.ticket and w.refreshed_at <= aged}
        if not by_ticket:
            return
        try:
            first, missing = await self._refresh(tenant, list(by_ticket))
            for waiter in by_ticket.values():
                waiter.refreshed_at = max(waiter.refreshed_at, now)
            for ticket in missing:
                if ticket in by_ticket:
                    by_ticket[ticket].ticket = ""
                    by_ticket[ticket].wake()
            for ticket in first:
                if ticket in by_ticket and not by_ticket[ticket].timed:
                    by_ticket[ticket].wake()
        except _NETWORK_ERRORS as exc:
            log.warning("heartbeat.failed", tenant=tenant, error=str(exc))
        except Exception as exc:  # a heartbeat that dies would let every queue place expire
            log.exception("heartbeat.error", tenant=tenant, error=f"{type(exc).__name__}: {exc}")
