"""The asyncio client: limits, acquire/commit/release, status, reset, events.

Every operation is one Lua script call on the tenant's keys; the acquires
(and the commits and releases) of one tenant that are ready together share
one call (`slowburn_redis.batching`). The blocking twin (`Budget.sync`) runs
this same code on a private event loop.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from typing import TYPE_CHECKING, Any, Literal

import structlog
from redis.exceptions import RedisError

from slowburn_redis.acl import permission_error
from slowburn_redis.amounts import amounts_to_units, format_amounts
from slowburn_redis.batching import BATCH_LIMIT, MAX_BATCH, Batcher
from slowburn_redis.connection import MAX_CONNECTIONS
from slowburn_redis.errors import (
    BudgetClosed,
    BudgetExhausted,
    BudgetTimeout,
    InvalidInput,
    RequestTooLarge,
)
from slowburn_redis.events import Event
from slowburn_redis.limits import UNITS, Limit, coerce_limits, from_units
from slowburn_redis.names import EVERY_AGENT, base_key, scope_field, validate_agent, validate_name
from slowburn_redis.reservation import Reservation
from slowburn_redis.resilience import Backoff, OnUnavailable, Resilience
from slowburn_redis.scripts import Clock, Script, Scripts
from slowburn_redis.status import Status
from slowburn_redis.tasks import finish_despite_cancel
from slowburn_redis.waiting import WakeHub

if TYPE_CHECKING:
    from slowburn_redis.report import Report
    from slowburn_redis.sync import SyncBudget

log = structlog.get_logger("slowburn_redis")

Mode = Literal["wait", "reject", "advisory"]

CLEANUP_GRACE = 5.0
"""Seconds an interrupted acquire waits for its in-flight script's answer before cleaning up regardless
(then a queue place it left may outlive it until its heartbeats lapse, three heartbeats at most)."""
MODES = ("wait", "reject", "advisory")


class Budget:
    """A fleet-wide budget on one Redis: build it with `from_url` or `embedded`.

    `prefix` starts every key. `lease_ttl` (seconds) is how long a reservation
    holds its concurrency slot without a commit, release or `extend`.
    `heartbeat` is how often a waiting process refreshes its queue places,
    which expire after three heartbeats. `ledger_maxlen` bounds each tenant's
    ledger stream (approximately). `test_clock` loads scripts whose clock can
    be moved forward (see `slowburn_redis.testing`); never use it in production.

    `on_unavailable` says what happens when Redis cannot be reached (see
    `slowburn_redis.resilience`): ``"wait"`` retries with `backoff` until the
    acquire's timeout (other operations: `retry_timeout`, None for no bound)
    and then raises RedisUnavailable; ``"raise"`` raises RedisUnavailable at
    once; ``"allow"`` fails open (the acquire is admitted unchecked, its
    Reservation has ``backed == False``, logged at error level).

    `batch_size` is the most requests of one tenant sent as one script call
    (`slowburn_redis.batching`); 1 sends each request on its own.
    """

    def __init__(
        self,
        client: Any,
        *,
        connect: Callable[[], Any] | None = None,
        open_pubsub: Callable[[], Any] | None = None,
        prefix: str = "sb",
        lease_ttl: float = 60.0,
        heartbeat: float = 5.0,
        ledger_maxlen: int = 100_000,
        test_clock: bool = False,
        description: str = "redis",
        on_unavailable: OnUnavailable = "wait",
        retry_timeout: float | None = None,
        backoff: Backoff | None = None,
        batch_size: int = MAX_BATCH,
    ) -> None:
        validate_name("prefix", prefix)
        if not lease_ttl > 0 or not heartbeat > 0:
            raise InvalidInput("lease_ttl and heartbeat must be positive")
        if ledger_maxlen < 0:
            raise InvalidInput("ledger_maxlen must not be negative")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= BATCH_LIMIT:
            raise InvalidInput(f"batch_size must be an integer from 1 to {BATCH_LIMIT}, not {batch_size!r}")
        self.client = client
        self.prefix = prefix
        self.lease_ttl = float(lease_ttl)
        self.heartbeat = float(heartbeat)
        self.ledger_maxlen = int(ledger_maxlen)
        self.description = description
        self._connect = connect
        self._options: dict[str, Any] = {
            "prefix": prefix,
            "lease_ttl": lease_ttl,
            "heartbeat": heartbeat,
            "ledger_maxlen": ledger_maxlen,
            "test_clock": test_clock,
            "description": description,
            "on_unavailable": on_unavailable,
            "retry_timeout": retry_timeout,
            "backoff": backoff,
            "batch_size": batch_size,
        }
        self._resilience = Resilience(
            on_unavailable, backoff=backoff, retry_timeout=retry_timeout, description=description
        )
        self._clock: Clock = "test" if test_clock else "server"
        self._scripts = Scripts(self._clock)
        # More calls in flight than connections would fail (redis-py pools
        # raise when full, per node on a cluster): extra calls queue here.
        self._in_flight = asyncio.Semaphore(MAX_CONNECTIONS)
        self._closing = False
        self._batcher = Batcher(self._send, max_batch=batch_size)
        self._open_pubsub = open_pubsub or (lambda: client.pubsub())
        self._hub = WakeHub(
            self._open_pubsub,
            self._refresh,
            channel=lambda tenant: self.key(tenant) + ":wake",
            heartbeat=self.heartbeat,
        )

    # construction ------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **options: Any) -> Budget:
        """A Budget on the Redis at `url` (``redis://``, ``rediss://``, ``unix://``).

        With ``cluster=True``, or a ``redis+cluster://`` / ``rediss+cluster://``
        URL, the URL names any node of a Redis Cluster. `options` are those of
        `Budget` (prefix, lease_ttl, on_unavailable...). Nothing is sent to
        Redis here: an unreachable server shows at the first call.
        """
        from slowburn_redis.connection import connect_url

        connect, open_pubsub, description = connect_url(url, cluster=cluster)
        return cls(connect(), connect=connect, open_pubsub=open_pubsub, description=description, **options)

    @classmethod
    def embedded(cls, server: Any = None, **options: Any) -> Budget:
        """A Budget on an in-process fakeredis server (no Redis needed); `server` shares one."""
        from slowburn_redis.connection import connect_embedded

        connect = connect_embedded(server)
        return cls(connect(), connect=connect, description="embedded", **options)

    def sync(self) -> SyncBudget:
        """A blocking twin with the same methods, on its own connection and event loop."""
        from slowburn_redis.sync import SyncBudget

        if self._connect is None:
            raise InvalidInput("sync() needs a Budget built by from_url() or embedded(), or with connect=")
        connect, options = self._connect, self._options
        return SyncBudget(lambda: Budget(connect(), connect=connect, **options))

    async def aclose(self) -> None:
        """End every wait of this Budget, stop its waiting machinery and close its connection pool.

        Acquires still waiting raise BudgetClosed once they have given up their
        queue place (one attempt each); any later call, and any retry of a call
        in progress, raises BudgetClosed without sending anything.
        """
        self._closing = True
        await self._hub.aclose()
        await self._batcher.aclose()
        close = getattr(self.client, "aclose", None)
        if close is not None:
            await close()

    async def __aenter__(self) -> Budget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def key(self, tenant: str) -> str:
        """The base key of `tenant`; every key of the tenant starts with it."""
        return base_key(self.prefix, tenant)

    async def _call(self, script: Script, key: str, args: list[Any], *, deadline: float | None = None) -> Any:
        """Run one request of a script: the single path every operation takes to Redis.

        A failure to reach Redis is handled by the ``on_unavailable`` policy
        (`slowburn_redis.resilience`); a ``"wait"`` retry gives up at
        `deadline` (event-loop time), else after ``retry_timeout``. Retries
        resend the same arguments, which every script treats idempotently.
        """
        run = self._batcher.call if script.batched else self._send
        try:
            return await self._resilience.call(script.name, lambda: run(script, key, args), args, deadline=deadline)
        except RedisError as exc:
            denied = permission_error(exc)
            if denied is None:
                raise
            raise denied from exc

    async def _send(self, script: Script, key: str, args: list[Any]) -> Any:
        """One EVALSHA of `script` (a single request, or a batch of them) on a connection of the pool.

        Once the Budget is closing, only a waiter giving up its queue place is sent.
        """
        if self._closing and script is not self._scripts.leave:
            raise BudgetClosed(f"budget {self.description} is closed")
        async with self._in_flight:
            return await script(self.client, key, args)

    # limits ------------------------------------------------------------------

    async def set_limits(self, tenant: str, limits: Iterable[Limit | str] | str, *, agent: str | None = None) -> None:
        """Replace the limits of a scope: the tenant (agent=None), one agent, or every agent (``agent="*"``).

        An empty list clears the scope. Every worker sees the change at once;
        waiters are woken to try again.
        """
        key = self.key(tenant)
        field = scope_field(agent)
        parsed = coerce_limits(limits)
        json_text = json.dumps([{"d": lim.dimension, "a": lim.units, "w": lim.window_ms} for lim in parsed])
        await self._call(self._scripts.set_limits, key, [field, json_text if parsed else ""])
        log.info("limits.set", tenant=tenant, agent=agent, limits=[str(lim) for lim in parsed])

    async def clear_limits(self, tenant: str, *, agent: str | None = None) -> None:
        """Remove every limit of a scope."""
        await self.set_limits(tenant, [], agent=agent)

    async def get_limits(self, tenant: str, *, agent: str | None = None) -> list[Limit]:
        """The limits set on exactly this scope (not the ones inherited from the tenant or the default)."""
        key, field = self.key(tenant) + ":limits", scope_field(agent)
        raw = await self._resilience.call("get_limits", lambda: self.client.hget(key, field), [])
        if raw is None:
            return []
        return [
            Limit(dimension=item["d"], amount=_decimal_amount(item["d"], item["a"]), window=item["w"] / 1000 or None)
            for item in json.loads(raw)
        ]

    # acquire -----------------------------------------------------------------

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
    ) -> _Acquire:
        """Reserve an estimate against every limit that applies, all or nothing.

        Await it for a `Reservation`, or use it as ``async with``. In ``wait``
        mode a denied request sleeps (FIFO within `priority`, higher first)
        until capacity returns or `timeout` seconds pass (BudgetTimeout). In
        ``reject`` mode it raises BudgetExhausted at once; ``advisory`` admits
        whatever the limits say. A request larger than a limit itself raises
        RequestTooLarge at once. All arguments are checked before Redis is
        touched (InvalidInput).
        """
        validate_name("tenant", tenant)
        agent = validate_agent(agent)
        if agent == EVERY_AGENT:
            raise InvalidInput("acquire needs a real agent name, not '*'")
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
            raise InvalidInput(f"priority must be an integer from -100 to 100, not {priority!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
            raise InvalidInput(f"timeout must be a non-negative number of seconds, not {timeout!r}")
        ttl = self.lease_ttl if lease_ttl is None else lease_ttl
        if not (isinstance(ttl, (int, float)) and 0 < ttl < 10**7):
            raise InvalidInput(f"lease_ttl must be a positive number of seconds, not {lease_ttl!r}")
        units = amounts_to_units(
            usd=usd,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            requests=requests,
            round_up=True,
        )
        units["concurrency"] = 1
        estimate = {dim: value for dim, value in units.items() if value > 0}
        return _Acquire(
            self._acquire(tenant, agent, estimate, mode=mode, timeout=timeout, priority=priority, lease_ttl=ttl)
        )

    async def _acquire(
        self,
        tenant: str,
        agent: str | None,
        estimate: dict[str, int],
        *,
        mode: str,
        timeout: float | None,
        priority: int,
        lease_ttl: float,
    ) -> Reservation:
        loop = asyncio.get_running_loop()
        key = self.key(tenant)
        rid = secrets.token_hex(12)
        deadline = None if timeout is None else loop.time() + timeout
        amounts = format_amounts(estimate)
        lease_ms, queue_ms = round(lease_ttl * 1000), round(self.heartbeat * 3000)
        waiter = None
        ticket = ""
        paused_at: float | None = None
        in_flight = False
        try:
            while True:
                if self._closing:
                    raise BudgetClosed(f"budget {self.description} was closed while tenant {tenant!r} waited")
                args = [rid, agent or "", mode, priority, ticket, lease_ms, queue_ms, amounts]
                in_flight = True
                reply = await self._call(self._scripts.acquire, key, args, deadline=deadline)
                in_flight = False
                if reply[0] == 1:
                    ticket = ""
                    if paused_at is not None:
                        log.info("budget.resumed", tenant=tenant, agent=agent, waited=loop.time() - paused_at)
                    return Reservation(
                        self,
                        tenant=tenant,
                        agent=agent,
                        id=rid,
                        estimate=estimate,
                        admitted_at_ms=int(reply[2]),
                        lease_expires_ms=int(reply[3]),
                        over_limits=str(reply[4]).split(),
                    )
                if reply[0] == -1:
                    ticket = ""
                    _, limit_key, amount, requested = reply
                    dim = limit_key.split(":")[-2]
                    raise RequestTooLarge(
                        f"request for {from_units(dim, int(requested)):g} {dim} exceeds the limit "
                        f"{limit_key} of {from_units(dim, int(amount)):g} itself and can never be admitted",
                        tenant=tenant,
                        agent=agent,
                        limit=limit_key,
                        amount=int(amount),
                        requested=int(requested),
                    )
                _, ticket, now_ms, retry_at, limit_key, reason = reply
                retry_in = None if int(retry_at) < 0 else max(0.0, (int(retry_at) - int(now_ms)) / 1000)
                if mode == "reject":
                    log.info("acquire.denied", tenant=tenant, agent=agent, limit=limit_key, reason=reason)
                    raise BudgetExhausted(
                        f"budget {limit_key} of tenant {tenant!r} is spent; retry in "
                        + ("an unknown time" if retry_in is None else f"{retry_in:.3f}s"),
                        tenant=tenant,
                        agent=agent,
                        limit=limit_key,
                        retry_after=retry_in,
                    )
                if waiter is None:
                    # Subscribe first, then try once more: a refill between the
                    # denial and the subscription is not missed.
                    waiter = await self._hub.join(tenant)
                    waiter.ticket = ticket
                    paused_at = loop.time()
                    log.info(
                        "budget.paused", tenant=tenant, agent=agent, limit=limit_key, reason=reason, retry_in=retry_in
                    )
                    continue
                waiter.ticket = ticket
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise await self._timeout_error(tenant, agent, limit_key, timeout)
                    retry_in = left if retry_in is None else min(retry_in, left)
                await waiter.sleep(retry_in)
                ticket = waiter.ticket
        except BaseException:
            if in_flight:
                # Interrupted while the script ran: Redis may have admitted the
                # request, and nobody will ever settle that reservation. Release
                # it (a no-op when there was no admission). A denial may have
                # queued it instead, under its id: give that place up too. Both
                # wait until the interrupted call has been answered, so they
                # reach Redis after it (a late acquire would queue it again).
                await finish_despite_cancel(self._release_unseen(key, rid))
                ticket = ticket or rid
            if ticket:
                await finish_despite_cancel(self._leave(key, ticket))
            raise
        finally:
            if waiter is not None:
                self._hub.leave(waiter)

    async def _release_unseen(self, key: str, rid: str) -> None:
        """Release reservation `rid` that its acquire never returned; see `_acquire`."""
        if not await self._batcher.quiesce(self._scripts.acquire, key, timeout=CLEANUP_GRACE):
            log.warning("acquire.cleanup_unordered", reservation=rid, waited=CLEANUP_GRACE)
        deadline = asyncio.get_running_loop().time()  # one attempt: no retries while Redis is away
        try:
            await self._call(self._scripts.settle, key, [rid, "release", 0, "", "", "", ""], deadline=deadline)
        except Exception as exc:  # the lease expires by itself
            log.warning("acquire.release_failed", reservation=rid, error=str(exc))

    async def _timeout_error(
        self, tenant: str, agent: str | None, limit_key: str, timeout: float | None
    ) -> BudgetTimeout:
        try:
            snapshot: Status | None = await self.status(tenant, agent=agent)
        except Exception:  # the error to raise is the timeout, not a failed snapshot
            snapshot = None
        log.info("budget.timeout", tenant=tenant, agent=agent, limit=limit_key, timeout=timeout)
        return BudgetTimeout(
            f"waited {timeout}s for budget {limit_key} of tenant {tenant!r}",
            tenant=tenant,
            agent=agent,
            limit=limit_key,
            status=snapshot,
        )

    async def _leave(self, key: str, ticket: str) -> None:
        # While closing, one attempt: close() must not wait for Redis to come back.
        deadline = asyncio.get_running_loop().time() if self._closing else None
        try:
            await self._call(self._scripts.leave, key, [ticket], deadline=deadline)
        except Exception as exc:  # the place expires by itself after three heartbeats
            log.warning("queue.leave_failed", ticket=ticket, error=str(exc))

    async def _refresh(self, tenant: str, tickets: list[str]) -> tuple[list[str], list[str]]:
        reply = await self._call(self._scripts.refresh, self.key(tenant), [round(self.heartbeat * 3000), *tickets])
        return list(reply[0]), list(reply[1])

    # settling ----------------------------------------------------------------

    async def _settle(
        self, reservation: Reservation, kind: str, actual: str, *, model: str, outcome: str, meta: str
    ) -> list[Any]:
        args = [reservation.id, kind, self.ledger_maxlen, actual, model, outcome, meta]
        reply: list[Any] = await self._call(self._scripts.settle, self.key(reservation.tenant), args)
        if reply[0] == 1 and reply[2]:
            log.warning(
                "budget.overrun",
                tenant=reservation.tenant,
                agent=reservation.agent,
                reservation=reservation.id,
                overrun=reply[2],
            )
        return reply

    async def _extend(self, reservation: Reservation, ttl: float | None) -> int | None:
        seconds = self.lease_ttl if ttl is None else ttl
        if not (isinstance(seconds, (int, float)) and 0 < seconds < 10**7):
            raise InvalidInput(f"ttl must be a positive number of seconds, not {ttl!r}")
        if not reservation.backed:
            return reservation.lease_expires_ms  # admitted while failing open: nothing to extend
        reply = await self._call(
            self._scripts.extend, self.key(reservation.tenant), [reservation.id, round(seconds * 1000)]
        )
        return int(reply[1]) if reply[0] == 1 else None

    # inspecting and resetting -------------------------------------------------

    async def status(self, tenant: str, *, agent: str | None = None) -> Status:
        """Every limit that applies, with used, reserved, remaining, refill time and waiters.

        Without an agent: the tenant's own limits and those of every agent that used a window.
        """
        agent = validate_agent(agent)
        reply = await self._call(self._scripts.status, self.key(tenant), [agent or ""])
        return Status.from_reply(tenant, agent, reply)

    async def reset(self, tenant: str, *, agent: str | None = None, dimension: str | None = None) -> int:
        """Forget used amounts and wake every waiter; returns how many windows were reset.

        Without an agent, the tenant's windows and every agent's; `dimension`
        narrows it to one (concurrency is reset only when named).
        """
        agent = validate_agent(agent)
        if agent == EVERY_AGENT:
            raise InvalidInput("reset takes one agent or none, not '*'")
        if dimension is not None and (not isinstance(dimension, str) or dimension not in UNITS):
            raise InvalidInput(f"unknown dimension {dimension!r}: one of {', '.join(UNITS)}")
        count = int(await self._call(self._scripts.reset, self.key(tenant), [agent or "", dimension or ""]))
        log.info("budget.reset", tenant=tenant, agent=agent, dimension=dimension, windows=count)
        return count

    async def report(self, tenant: str, *, since: float | str | None = None) -> Report:
        """Cost attributed per agent and per model from the tenant's ledger.

        `since` is a duration back from now ("1h", "30m", seconds) or None for
        the whole ledger.
        """
        from slowburn_redis.report import build_report

        return await build_report(self, tenant, since=since)

    async def events(self, tenant: str) -> AsyncIterator[Event]:
        """Events of `tenant` as they are published (thresholds, waiting, resumed, reset...)."""
        channel = self.key(tenant) + ":events"
        pubsub = self._open_pubsub()
        await pubsub.subscribe(channel)
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is not None and message.get("type") == "message":
                    yield Event.from_message(tenant, message["data"])
        finally:
            await pubsub.aclose()


def _decimal_amount(dimension: str, units: int) -> Any:
    from decimal import Decimal

    return Decimal(int(units)) / UNITS[dimension]


class _Acquire(Coroutine[Any, Any, Reservation]):
    """What `Budget.acquire` returns: a coroutine (await it, or hand it to
    `asyncio.create_task`) for a Reservation, and an async context manager that
    settles the reservation on exit."""

    def __init__(self, coro: Coroutine[Any, Any, Reservation]) -> None:
        self._coro = coro
        self._started = False
        self._reservation: Reservation | None = None

    def __await__(self) -> Generator[Any, None, Reservation]:
        self._started = True
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        self._started = True
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        self._started = True
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    async def __aenter__(self) -> Reservation:
        self._started = True
        self._reservation = await self._coro
        return self._reservation

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._reservation is not None
        await self._reservation.__aexit__(*exc_info)

    def __del__(self) -> None:
        # Never awaited (e.g. bad usage): close the coroutine quietly.
        if not self._started:
            self._coro.close()
