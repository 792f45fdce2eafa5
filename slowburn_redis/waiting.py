"""Sleeping until the budget refills: one pub/sub connection per process.

A `WakeHub` holds one subscription per tenant that has waiters in this
process, and routes each wake notification (a list of queue tickets, or
``*`` for all) to the local waiters it names. It also runs the heartbeat that
keeps the waiters' queue places alive and wakes any waiter that stands first
in its queues (the safety net for a notification lost while disconnected).
While nothing changes, the hub sends Redis one command per tenant per
heartbeat, whatever the number of waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slowburn_redis.tasks import cancel_and_wait

log = structlog.get_logger("slowburn_redis")

Refresh = Callable[[str, list[str]], Awaitable[tuple[list[str], list[str]]]]
_NETWORK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class Waiter:
    """One waiting acquire: sleeps until woken or until its own deadline."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.ticket = ""
        self._event = asyncio.Event()

    def wake(self) -> None:
        self._event.set()

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

    async def join(self, tenant: str) -> Waiter:
        """A new waiter for `tenant`, returned once this process is subscribed to its wakes."""
        waiter = Waiter(tenant)
        self._tenants.setdefault(tenant, set()).add(waiter)
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

    def leave(self, waiter: Waiter) -> None:
        """Forget a waiter (admitted, timed out or cancelled)."""
        waiters = self._tenants.get(waiter.tenant)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._tenants[waiter.tenant]
        self._left.set()

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
        for waiter in list(self._tenants.get(tenant, ())):
            if tickets is None or waiter.ticket in tickets or not waiter.ticket:
                waiter.wake()

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
                self._wake_tenant(tenant, None)
            return
        if message.get("type") != "message":
            return
        data = message.get("data")
        if isinstance(data, bytes):
            data = data.decode()
        self._wake_tenant(tenant, None if data == "*" else str(data).split())

    async def _beat(self) -> None:
        """Every `heartbeat` seconds, refresh each tenant's queue places; runs until cancelled.

        No error ends it: a failed refresh (Redis away, or anything
        unexpected) is logged and that tenant is refreshed again on the
        next beat. Only cancellation (`aclose`) stops it.
        """
        while True:
            await asyncio.sleep(self._heartbeat)
            for tenant, waiters in list(self._tenants.items()):
                await self._beat_tenant(tenant, waiters)

    async def _beat_tenant(self, tenant: str, waiters: set[Waiter]) -> None:
        """One tenant's heartbeat: refresh its waiters' tickets, wake those first in line or lost; never raises."""
        by_ticket = {w.ticket: w for w in waiters if w.ticket}
        if not by_ticket:
            return
        try:
            first, missing = await self._refresh(tenant, list(by_ticket))
            for ticket in missing:
                if ticket in by_ticket:
                    by_ticket[ticket].ticket = ""
            for ticket in [*first, *missing]:
                if ticket in by_ticket:
                    by_ticket[ticket].wake()
        except _NETWORK_ERRORS as exc:
            log.warning("heartbeat.failed", tenant=tenant, error=str(exc))
        except Exception as exc:  # a heartbeat that dies would let every queue place expire
            log.exception("heartbeat.error", tenant=tenant, error=f"{type(exc).__name__}: {exc}")
