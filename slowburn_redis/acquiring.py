"""The acquire protocol: try, and while denied, wait for a notification or the refill, then try again.

One `AcquireCall` is one ``budget.acquire(...)``. Each attempt is one
acquire.lua request (`slowburn_redis.protocol`); a denial in ``wait`` mode
holds a queue place (its ticket) while the call sleeps on the tenant's wake
channel (`slowburn_redis.waiting`). Whatever ends the call, admission
excepted, it leaves no reservation and no queue place behind: an attempt
interrupted in flight is released (a no-op when it was not admitted) and its
place given up, after the interrupted script has been answered.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from slowburn_redis import protocol
from slowburn_redis.engine import Engine
from slowburn_redis.errors import (
    BudgetClosed,
    BudgetExhausted,
    BudgetTimeout,
    LimitsMissing,
    RequestTooLarge,
    RunExhausted,
)
from slowburn_redis.keys import LimitKey, describe_limit_key
from slowburn_redis.limits import from_units
from slowburn_redis.reservation import Reservation, Settler
from slowburn_redis.resilience import FINAL_ATTEMPT, bounded
from slowburn_redis.runs import read_summary, run_exhausted
from slowburn_redis.status import Status
from slowburn_redis.tasks import finish_despite_cancel
from slowburn_redis.waiting import Waiter, WakeHub

log = structlog.get_logger("slowburn_redis")

CLEANUP_GRACE = 5.0
"""Seconds an interrupted acquire waits for its in-flight script's answer before cleaning up regardless
(then a queue place it left may outlive it until its heartbeats lapse, three heartbeats at most)."""


SUMMARY_WAIT = 2.0
"""Seconds a RunExhausted waits for the run's summary (then it is raised without one)."""

RETRY_SPREAD = 0.05
"""A timed retry sleeps its retry time plus a random part of up to this fraction of it (at most
`RETRY_SPREAD_MAX` seconds): the queue heads of many tenants whose windows refill at the same
moment do not retry in the same instant. Never earlier than the retry time."""

RETRY_SPREAD_MAX = 0.005
"""Seconds a timed retry is spread by at most (see `RETRY_SPREAD`)."""


def spread(retry_in: float) -> float:
    """`retry_in` plus a random part of up to `RETRY_SPREAD` of it, at most `RETRY_SPREAD_MAX` seconds."""
    return retry_in + random.random() * min(RETRY_SPREAD * retry_in, RETRY_SPREAD_MAX)


@dataclass(frozen=True)
class AcquireRequest:
    """A validated acquire: every field checked by `Budget.acquire` before anything is sent."""

    tenant: str
    agent: str | None
    estimate: dict[str, int]
    mode: str
    timeout: float | None
    priority: int
    lease_ttl: float
    model: str | None = None
    """The model called, when known: the limits of its scope (``M:<model>``) apply too."""
    run_id: str | None = None
    """The run the call is made in (`slowburn_redis.runs`): its caps are charged too."""


class AcquireCall:
    """One acquire, from its first attempt to admission or to a typed error; see the module docstring.

    `snapshot` reads the budget's status for a BudgetTimeout (it may fail:
    the timeout is raised all the same).
    """

    def __init__(
        self,
        request: AcquireRequest,
        *,
        settler: Settler,
        hub: WakeHub,
        queue_ttl_ms: int,
        snapshot: Callable[[str, str | None], Awaitable[Status]],
        seen: set[str],
    ) -> None:
        self.request = request
        self._settler = settler
        self._engine: Engine = settler.engine
        self._hub = hub
        self._queue_ttl_ms = queue_ttl_ms
        self._snapshot = snapshot
        self._seen = seen  # tenants whose limits this Budget has found stored
        self._rid = secrets.token_hex(12)
        self._ticket = ""
        self._waiter: Waiter | None = None
        self._paused_at: float | None = None
        self._in_flight = False
        self._deadline: float | None = None
        self._listening: int | None = None  # WakeHub.listening before the first attempt

    async def run(self) -> Reservation:
        """Attempt until admitted; raise LimitsMissing, RequestTooLarge, BudgetExhausted (reject), BudgetTimeout..."""
        loop = asyncio.get_running_loop()
        timeout = self.request.timeout
        deadline = None if timeout is None else loop.time() + timeout
        self._deadline = deadline
        self._listening = self._hub.listening(self.request.tenant)
        if self._listening is not None:
            # Already subscribed: listen for this request's ticket from its first attempt on.
            self._waiter = self._hub.register(self.request.tenant, self._rid)
        try:
            while True:
                reply = await self._attempt(deadline)
                if not isinstance(reply, protocol.Missing):
                    self._seen.add(self.request.tenant)
                if isinstance(reply, protocol.Admitted):
                    return self._admitted(reply, loop.time())
                if isinstance(reply, protocol.TooLarge):
                    raise self._too_large(reply)
                if isinstance(reply, protocol.Missing):
                    raise self._missing()
                if isinstance(reply, protocol.RunSpent):
                    raise await self._run_spent(reply)
                await self._denied(reply, deadline)
        except BaseException:
            await self._clean_up()
            raise
        finally:
            if self._waiter is not None:
                self._hub.leave(self._waiter)

    async def _attempt(self, deadline: float | None) -> protocol.AcquireReply:
        request = self.request
        if self._engine.closing:
            raise BudgetClosed(f"budget {self._engine.description} was closed while tenant {request.tenant!r} waited")
        args = protocol.acquire_args(
            reservation_id=self._rid,
            agent=request.agent,
            mode=request.mode,
            priority=request.priority,
            ticket=self._ticket,
            lease_ms=round(request.lease_ttl * 1000),
            queue_ms=self._queue_ttl_ms,
            estimate=request.estimate,
            model=request.model,
            run_id=request.run_id,
        )
        self._in_flight = True
        reply = await self._engine.run(self._engine.scripts.acquire, self._settler.key, args, deadline=deadline)
        self._in_flight = False
        return protocol.decode_acquire(reply)

    def _admitted(self, reply: protocol.Admitted, now: float) -> Reservation:
        self._ticket = ""
        request = self.request
        if self._paused_at is not None:
            log.info("budget.resumed", tenant=request.tenant, agent=request.agent, waited=now - self._paused_at)
        return Reservation(
            self._settler,
            tenant=request.tenant,
            agent=request.agent,
            id=self._rid,
            estimate=request.estimate,
            model=request.model,
            admitted_at_ms=reply.now_ms,
            lease_expires_ms=reply.lease_expires_ms,
            over_limits=reply.over_limits,
        )

    def _missing(self) -> LimitsMissing:
        self._ticket = ""
        tenant, agent = self.request.tenant, self.request.agent
        scope = f"tenant {tenant!r}" + (f" (agent {agent})" if agent else "")
        if tenant in self._seen:
            log.error(
                "limits.vanished",
                tenant=tenant,
                agent=agent,
                note="this process saw limits for the tenant and now finds none: Redis lost or evicted them",
            )
        return LimitsMissing(
            f"no limits are stored for {scope}: refused (set them, or store 'unlimited' deliberately)",
            tenant=tenant,
            agent=agent,
        )

    async def _run_spent(self, reply: protocol.RunSpent) -> RunExhausted:
        """The RunExhausted for a run that cannot take the request, with the run's summary (None if unreadable)."""
        self._ticket = ""
        request = self.request
        run_id = request.run_id or ""
        try:
            deadline = asyncio.get_running_loop().time() + SUMMARY_WAIT  # the error to raise is RunExhausted
            summary = await bounded(
                read_summary(self._engine, self._settler.key, run_id=run_id, tenant=request.tenant), deadline
            )
        except Exception:
            summary = None
        log.info("run.exhausted", tenant=request.tenant, agent=request.agent, run=run_id, reason=reply.reason)
        return run_exhausted(reply, summary, tenant=request.tenant, agent=request.agent, run_id=run_id)

    def _too_large(self, reply: protocol.TooLarge) -> RequestTooLarge:
        self._ticket = ""
        request = self.request
        dimension = LimitKey.parse(reply.limit_key).dimension
        limit = describe_limit_key(reply.limit_key, reply.amount)
        return RequestTooLarge(
            f"a request for {from_units(dimension, reply.requested):g} {dimension} is larger than the limit "
            f"{limit} of tenant {request.tenant!r} itself and can never be admitted",
            tenant=request.tenant,
            agent=request.agent,
            limit=reply.limit_key,
            amount=reply.amount,
            requested=reply.requested,
        )

    async def _denied(self, reply: protocol.Denied, deadline: float | None) -> None:
        """Raise in reject mode; else join the wake channel (first denial) or sleep until woken, refilled or late."""
        request = self.request
        self._ticket = reply.ticket
        if request.mode == "reject":
            log.info("acquire.denied", tenant=request.tenant, agent=request.agent, limit=reply.limit_key)
            raise self._exhausted(reply)
        if self._paused_at is None:
            # Subscribe first, then try once more: a refill between the
            # denial and the subscription is not missed. Unless this process
            # was subscribed before the first attempt was sent (its waiter
            # registered then, under the ticket a newcomer gets: its id) and
            # still is: then no wake can have been missed, and it sleeps at once.
            joined = self._waiter is None
            if joined:
                # Bounded by the deadline: a subscription that never confirms must not outlive the wait.
                join = asyncio.ensure_future(self._hub.join(request.tenant))
                try:
                    self._waiter = await bounded(join, deadline, what="subscribing to wakes")
                except BaseException:
                    join.add_done_callback(self._forget_joined)
                    raise
            assert self._waiter is not None
            self._waiter.ticket = self._ticket
            self._paused_at = asyncio.get_running_loop().time()
            self._log_paused(reply)
            if joined or self._listening != self._hub.listening(request.tenant):
                return
        await self._sleep(reply, deadline)

    def _log_paused(self, reply: protocol.Denied) -> None:
        request = self.request
        log.info(
            "budget.paused",
            tenant=request.tenant,
            agent=request.agent,
            limit=reply.limit_key,
            limit_text=describe_limit_key(reply.limit_key, reply.limit_amount),
            reason=reply.reason,
            retry_in=reply.retry_in,
        )

    async def _sleep(self, reply: protocol.Denied, deadline: float | None) -> None:
        """Sleep until woken, the retry time (spread) or the deadline; raise BudgetTimeout at the deadline."""
        waiter = self._waiter
        assert waiter is not None
        retry_in = reply.retry_in
        loop = asyncio.get_running_loop()
        waiter.ticket = self._ticket
        waiter.refreshed_at = loop.time()  # the attempt refreshed the place
        waiter.timed = retry_in is not None
        if retry_in is not None:
            retry_in = spread(retry_in)
        until_deadline = False
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise await self._timed_out(reply)
            until_deadline = retry_in is None or left <= retry_in
            retry_in = left if until_deadline else retry_in
        woken = await waiter.sleep(retry_in)
        self._ticket = waiter.ticket
        if until_deadline and not woken:
            # The deadline came before the retry time and nothing woke the
            # waiter: another attempt could only be denied again.
            raise await self._timed_out(reply)

    def _exhausted(self, reply: protocol.Denied) -> BudgetExhausted:
        request = self.request
        retry_in = reply.retry_in
        when = "only when capacity is returned" if retry_in is None else f"in {retry_in:.3f}s"
        return BudgetExhausted(
            f"budget {describe_limit_key(reply.limit_key, reply.limit_amount)} of tenant {request.tenant!r} is spent; "
            f"retry {when}",
            tenant=request.tenant,
            agent=request.agent,
            limit=reply.limit_key,
            retry_after=retry_in,
        )

    async def _timed_out(self, reply: protocol.Denied) -> BudgetTimeout:
        request, limit_key = self.request, reply.limit_key
        try:
            # The deadline has passed: one short attempt (resilience.FINAL_ATTEMPT), never a wait.
            # The waiters of a tenant timing out together share one read (WakeHub.reads).
            now = asyncio.get_running_loop().time()
            snapshot: Status | None = await self._hub.reads.read(
                (request.tenant, request.agent), lambda: bounded(self._snapshot(request.tenant, request.agent), now)
            )
        except Exception:  # the error to raise is the timeout, not a failed snapshot
            snapshot = None
        log.info("budget.timeout", tenant=request.tenant, agent=request.agent, limit=limit_key, timeout=request.timeout)
        return BudgetTimeout(
            f"waited {request.timeout}s for budget {describe_limit_key(limit_key, reply.limit_amount)} "
            f"of tenant {request.tenant!r}",
            tenant=request.tenant,
            agent=request.agent,
            limit=limit_key,
            status=snapshot,
        )

    # cleanup ------------------------------------------------------------------------

    def _forget_joined(self, join: asyncio.Task[Waiter]) -> None:
        """Leave the hub with the waiter of a join whose caller stopped waiting for it (cancelled, or cut).

        A join can finish in the very turn its caller is cancelled: its waiter
        is then in the hub with nobody to leave it, and `WakeHub.aclose`
        would wait for it for ever.
        """
        if not join.cancelled() and join.exception() is None:
            self._hub.leave(join.result())

    async def _clean_up(self) -> None:
        """Leave nothing behind: release an admission the caller never saw, give up the queue place."""
        if self._in_flight:
            # Interrupted while the script ran: Redis may have admitted the
            # request, and nobody will ever settle that reservation. Release
            # it (a no-op when there was no admission). A denial may have
            # queued it instead, under its id: give that place up too. Both
            # wait until the interrupted call has been answered, so they
            # reach Redis after it (a late acquire would queue it again),
            # and go out together: on a Redis that does not answer, each is
            # one final attempt, so the cleanup costs one attempt, not two.
            self._ticket = self._ticket or self._rid
            await finish_despite_cancel(self._release_unseen(self._ticket))
        elif self._ticket:
            await finish_despite_cancel(self._leave(self._ticket))

    async def _release_unseen(self, ticket: str) -> None:
        """After the interrupted script's answer (or a grace), release its id and leave `ticket`'s place at once."""
        await self._await_in_flight()
        await asyncio.gather(self._release(), self._leave(ticket))

    async def _await_in_flight(self) -> None:
        engine, key = self._engine, self._settler.key
        # Wait for the interrupted call's answer, but never past the acquire's deadline: a late
        # admission after this release stays charged at its estimate until its lease expires.
        now = asyncio.get_running_loop().time()
        grace = (
            CLEANUP_GRACE if self._deadline is None else min(CLEANUP_GRACE, max(FINAL_ATTEMPT, self._deadline - now))
        )
        if not await engine.quiesce(engine.scripts.acquire, key, timeout=grace):
            log.warning("acquire.cleanup_unordered", reservation=self._rid, waited=grace)

    async def _release(self) -> None:
        """Release the reservation id this acquire sent (a no-op when Redis never admitted it); one attempt."""
        engine, key = self._engine, self._settler.key
        deadline = asyncio.get_running_loop().time()  # one attempt: no retries while Redis is away
        args = protocol.settle_args(reservation_id=self._rid, kind="release", ledger_maxlen=0, actual={})
        try:
            await engine.run(engine.scripts.settle, key, args, deadline=deadline)
        except Exception as exc:  # the lease expires by itself
            log.warning("acquire.release_failed", reservation=self._rid, error=str(exc))

    async def _leave(self, ticket: str) -> None:
        """Give up the queue place `ticket`; a failure is logged (the place expires by itself)."""
        # One attempt: a wait that ended (cancelled, timed out, closed) must not wait for Redis to come back.
        deadline = asyncio.get_running_loop().time()
        try:
            await self._engine.run(self._engine.scripts.leave, self._settler.key, [ticket], deadline=deadline)
        except Exception as exc:  # the place expires by itself after three heartbeats
            log.warning("queue.leave_failed", ticket=ticket, error=str(exc))
