"""What a Budget does when Redis cannot be reached or refuses: deadlines, backoff, retries and ``on_unavailable``.

Every script call of a Budget goes through `Resilience.call`.

**Deadlines.** A call has a deadline (event-loop time): an acquire's
``timeout``, else the Budget's ``retry_timeout`` counted from the start of
the call, else none. Every network attempt is bounded by the time left, so a
call ends by its deadline whatever Redis does (a blackholed server that
accepts and never answers included): an attempt still in flight at the
deadline is cancelled and abandoned (each attempt runs as a task of its
own, so the call resumes at the deadline without waiting for the attempt to
unwind; redis-py drops that connection as it does, so no late reply can be
read by another command) and the call raises `RedisUnavailable`. Such an
attempt may have run on Redis: for an acquire the Budget then releases the
reservation id it sent (``AcquireCall._release_unseen``), so a cut acquire is
treated as possibly admitted, never as denied-and-forgotten. The first
attempt of a call always gets at least `FINAL_ATTEMPT` seconds (0.1 s), even
when the deadline is nearer or already passed: that is the "one attempt"
of a cleanup call made after its acquire's deadline (release of an
interrupted acquire, `Budget.aclose`), and what lets ``timeout=0`` ask Redis
once. A queue ``leave`` is cleanup only and always gets one attempt of at
most `FINAL_ATTEMPT` seconds. So an acquire on a blackholed Redis ends at
most about ``2 * FINAL_ATTEMPT`` after its deadline: its own attempt is cut
at the deadline, then its cleanup waits up to `FINAL_ATTEMPT` for that
attempt's batch to be answered (`slowburn_redis.batching.Batcher.quiesce`),
then sends the release and the leave together, one final attempt each (an
acquire with ``timeout=0``, or a waiter woken by a notification at its
deadline, adds its own one final attempt: about ``3 * FINAL_ATTEMPT``; a
waiter whose own timer reaches the deadline raises `BudgetTimeout` without
another attempt); ``bench/deadlines.py``
measures it. Without any deadline (no timeout, ``retry_timeout=None``) an
attempt is bounded by the socket timeouts of `slowburn_redis.connection`
and retried until Redis answers.

**Unreachable.** A call that fails because Redis is unreachable (connection
refused or reset, socket timeout, ``CLUSTERDOWN``/``TRYAGAIN`` on a cluster)
is handled by the policy:

- ``"wait"`` (default): retry with exponential backoff and jitter until the
  call succeeds or its deadline passes, then raise `RedisUnavailable`.
- ``"raise"``: raise `RedisUnavailable` at once.
- ``"allow"``: fail open. An acquire is admitted without Redis: it returns a
  reservation that is not backed by Redis (nothing was charged, nothing is
  counted) and whose commit and release only log. A commit or release of a
  real reservation that cannot reach Redis is logged and given up: its
  estimate stays charged and its lease expires by itself. Other operations
  (status, limits, reset) raise `RedisUnavailable`. Every fail-open decision
  is logged at error level.

**Refused.** Redis answered and refused (`slowburn_redis.errors.RedisRefused`):

- ``READONLY`` (a replica, just after a failover), ``LOADING`` (a restarting
  server) and ``BUSY`` (another script past ``busy-reply-threshold``) pass by
  themselves: under ``"wait"`` and ``"allow"`` they are retried like an
  outage within the deadline, then raised as `RedisReadOnly`,
  `RedisLoading` or `RedisBusy` (also RedisUnavailable); under ``"raise"``
  they are raised at once.
- ``OOM`` (`RedisOutOfMemory`) and ``MISCONF`` (`RedisMisconfigured`) need an
  operator: raised at once under every policy.
- No refusal is ever failed open: ``"allow"`` applies to an unreachable
  Redis only. A refused script wrote nothing (Redis refuses a script at its
  first write), so nothing was admitted.

Retrying is safe because every script is idempotent under a retry with the
same arguments: acquire takes a client-made reservation id and returns the
first admission for a known id, and settling a reservation twice changes
nothing the second time. So a call whose reply was lost is simply run again.

Other errors (a script error, a refused authentication, a NOPERM) are never
retried. The heartbeat and queue-leave calls (``refresh``, ``leave``) are
tried once and raise the original error (a redis-py ``TimeoutError`` when
their attempt was cut by the deadline): their callers already treat a
failure as "try again later".
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import structlog
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slowburn_redis import protocol
from slowburn_redis.errors import (
    InvalidInput,
    RedisBusy,
    RedisLoading,
    RedisMisconfigured,
    RedisOutOfMemory,
    RedisReadOnly,
    RedisRefused,
    RedisUnavailable,
)
from slowburn_redis.tasks import abandon

log = structlog.get_logger("slowburn_redis")

T = TypeVar("T")

OnUnavailable = Literal["wait", "raise", "allow"]
ON_UNAVAILABLE: tuple[OnUnavailable, ...] = ("wait", "raise", "allow")

ONCE = frozenset({"refresh", "leave"})
"""Scripts tried once whatever the policy: their callers retry on their own schedule."""

CLEANUP = frozenset({"leave"})
"""Scripts that are only ever cleanup: one attempt of at most `FINAL_ATTEMPT` seconds, whatever the deadline."""

FINAL_ATTEMPT = 0.1
"""Seconds the first attempt of a call may take at least, even past its deadline (see the module docstring).

On loopback or a LAN a script answers in well under a millisecond, and in
a few milliseconds on a loaded server; 0.1 s leaves room for a loaded
client. It is also the cost of each cleanup call after a deadline, so it
sets the slack of the ``timeout=`` guarantee (about three times this)."""

_NOT_REACHABILITY = (AuthenticationError, AuthorizationError, AuthenticationWrongNumberOfArgsError)
_REACHABILITY = (
    RedisConnectionError,  # includes BusyLoadingError (LOADING)
    RedisTimeoutError,
    OSError,
    ClusterDownError,  # includes MasterDownError
    TryAgainError,
    ReadOnlyError,  # a replica promoted away under us: transient
    SlotNotCoveredError,
    asyncio.TimeoutError,
)
_MAX_UNBACKED = 100_000

PASSING_REFUSALS: dict[str, type[RedisRefused]] = {
    "READONLY": RedisReadOnly,
    "LOADING": RedisLoading,
    "BUSY": RedisBusy,
}
"""Refusals that pass by themselves: retried within the deadline like an outage (never failed open)."""

FINAL_REFUSALS: dict[str, type[RedisRefused]] = {"OOM": RedisOutOfMemory, "MISCONF": RedisMisconfigured}
"""Refusals that need an operator: raised at once under every policy."""


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says Redis could not be reached (worth a retry), not that it refused the call."""
    if isinstance(exc, _NOT_REACHABILITY):
        return False
    if isinstance(exc, _REACHABILITY):
        return True
    # asyncio RedisCluster raises a bare RedisClusterException when no node answers.
    return isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc)


def refusal_code(exc: BaseException) -> str | None:
    """The Redis error code of a refusal in `PASSING_REFUSALS` or `FINAL_REFUSALS`, else None.

    redis-py types OOM, LOADING and READONLY; BUSY and MISCONF arrive as a
    plain ResponseError whose text starts with the code. Redis 7 keeps the
    code of an error raised inside a script (``OOM command not allowed ...
    script: ...``).
    """
    if isinstance(exc, OutOfMemoryError):
        return "OOM"
    if isinstance(exc, BusyLoadingError):
        return "LOADING"
    if isinstance(exc, ReadOnlyError):
        return "READONLY"
    if isinstance(exc, ResponseError):
        code = str(exc).lstrip("-").split(" ", 1)[0]
        if code in PASSING_REFUSALS or code in FINAL_REFUSALS:
            return code
    return None


async def bounded(awaitable: Awaitable[T], deadline: float | None, *, what: str = "waiting for Redis") -> T:
    """Await `awaitable` until `deadline` (event-loop time; None: no bound), then cancel it and raise.

    A deadline nearer than `FINAL_ATTEMPT` seconds, or already passed,
    still gives it `FINAL_ATTEMPT` seconds (one last chance, as for a
    script call). Raises RedisUnavailable naming `what` when the bound cut
    it; any other outcome is the awaitable's own.
    """
    if deadline is None:
        return await awaitable
    loop = asyncio.get_running_loop()
    start = loop.time()
    cut_at = max(deadline, start + FINAL_ATTEMPT)
    try:
        return await _until(awaitable, cut_at)
    except _Expired as exc:
        raise RedisUnavailable(f"{what}: no answer from Redis within {cut_at - start:.2f}s (deadline)") from exc


class _Expired(Exception):
    """`_until` reached its bound with the awaitable still running."""


async def _until(awaitable: Awaitable[T], cut_at: float) -> T:
    """Run `awaitable` as a task of its own until the loop time `cut_at`; at the bound, cancel it and raise `_Expired`.

    The caller never waits for the cancelled task to unwind (redis-py drops
    the connection it was reading as it unwinds; `abandon` repeats a lost
    cancellation): it resumes at the bound, however the awaitable handles
    its cancellation. A caller cancelled meanwhile abandons the task the
    same way.
    """
    task = asyncio.ensure_future(awaitable)
    if not task.done():
        try:
            await asyncio.wait((task,), timeout=max(0.0, cut_at - asyncio.get_running_loop().time()))
        except asyncio.CancelledError:
            abandon(task)
            raise
        if not task.done():
            abandon(task)
            raise _Expired
    return task.result()


_RETRY = object()
"""What `Resilience._judge` returns for a failure worth another attempt."""


class _Cut(Exception):
    """An attempt was still in flight when its bound passed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no reply within {seconds:.2f}s")
        self.seconds = seconds


async def _attempt(operation: Callable[[], Awaitable[Any]], cut_at: float | None, start: float) -> Any:
    """One attempt, run as a task of its own bounded by the loop time `cut_at` (None: unbounded); raises `_Cut`."""
    if cut_at is None:
        return await operation()
    try:
        return await _until(operation(), cut_at)
    except _Expired as exc:
        raise _Cut(cut_at - start) from exc


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: `initial`, times `multiplier` per attempt, capped at `maximum`.

    Each delay is drawn from ``[(1 - jitter) * d, d]`` so a fleet that lost
    Redis at the same moment does not come back in lockstep.
    """

    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise InvalidInput("backoff needs 0 < initial <= maximum, multiplier >= 1 and 0 <= jitter <= 1")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """An endless sequence of delays, in seconds."""
        rng = rng or random.Random()
        delay = self.initial
        while True:
            yield delay * (1 - self.jitter * rng.random())
            delay = min(delay * self.multiplier, self.maximum)


class Resilience:
    """The ``on_unavailable`` policy of one Budget; see the module docstring.

    `description` (a URL without credentials) names Redis in errors and logs.
    `retry_timeout` is the deadline of a call that has none of its own,
    counted from the call's start (None: retry until Redis answers).
    `final_attempt` is the least time a call's first attempt gets (see
    `FINAL_ATTEMPT`).
    """

    def __init__(
        self,
        on_unavailable: OnUnavailable = "wait",
        *,
        backoff: Backoff | None = None,
        retry_timeout: float | None = None,
        description: str = "redis",
        final_attempt: float = FINAL_ATTEMPT,
    ) -> None:
        if on_unavailable not in ON_UNAVAILABLE:
            raise InvalidInput(f"on_unavailable must be one of {', '.join(ON_UNAVAILABLE)}, not {on_unavailable!r}")
        if retry_timeout is not None and not (isinstance(retry_timeout, (int, float)) and retry_timeout >= 0):
            raise InvalidInput(f"retry_timeout must be a non-negative number of seconds or None, not {retry_timeout!r}")
        if not (isinstance(final_attempt, (int, float)) and final_attempt > 0):
            raise InvalidInput(f"final_attempt must be a positive number of seconds, not {final_attempt!r}")
        self.on_unavailable: OnUnavailable = on_unavailable
        self.backoff = backoff or Backoff()
        self.retry_timeout = retry_timeout
        self.description = description
        self.final_attempt = float(final_attempt)
        self._unbacked: OrderedDict[str, None] = OrderedDict()

    def is_backed(self, reservation_id: str) -> bool:
        """False for a reservation admitted by the fail-open policy without Redis."""
        return reservation_id not in self._unbacked

    async def call(
        self,
        name: str,
        operation: Callable[[], Awaitable[Any]],
        args: Sequence[Any],
        *,
        deadline: float | None = None,
    ) -> Any:
        """Run `operation` (the script `name` with `args`) under the policy, by `deadline`.

        `deadline` is an event-loop time (``loop.time()``); None means
        `retry_timeout` from now (and no bound when that is None too). The
        call returns or raises by the deadline, or by ``now + final_attempt``
        when that is later; see the module docstring for what it raises.
        """
        if name == "settle" and args and not self.is_backed(str(args[0])):
            self._unbacked.pop(str(args[0]), None)
            log.warning("budget.unbacked_settle", reservation=args[0], kind=args[1], redis=self.description)
            return [0, "unbacked"]
        loop = asyncio.get_running_loop()
        start = loop.time()
        if deadline is None and self.retry_timeout is not None:
            deadline = start + self.retry_timeout
        first_cut = start + self.final_attempt
        if name in CLEANUP:
            deadline = first_cut
        delays: Iterator[float] | None = None
        attempt, first_failure = 0, start
        while True:
            # Each attempt is bounded by the time left; the first gets at least final_attempt.
            cut_at = None if deadline is None else max(deadline, first_cut) if attempt == 0 else deadline
            try:
                reply = await _attempt(operation, cut_at, start)
            except _Cut as cut:
                return self._after_cut(name, args, cut, attempt, start)
            except Exception as exc:
                failed_open = self._judge(name, args, exc)  # raises unless a retry (or failing open) is right
                if failed_open is not _RETRY:
                    return failed_open
                attempt += 1
                if delays is None:
                    delays, first_failure = self.backoff.delays(), loop.time()
                await self._pause(name, exc, next(delays), deadline, attempt, first_failure)
                continue
            if attempt:
                log.warning(
                    "redis.recovered", redis=self.description, operation=name, attempts=attempt + 1,
                    down_for=round(loop.time() - first_failure, 3),
                )  # fmt: skip
            return reply

    def _after_cut(self, name: str, args: Sequence[Any], cut: _Cut, attempt: int, start: float) -> Any:
        """An attempt still in flight at its bound: a typed error (or, when failing open, the unchecked reply)."""
        if name in ONCE:
            raise RedisTimeoutError(f"{name}: no reply from Redis at {self.description} by the deadline") from cut
        log.error(
            "redis.unavailable", redis=self.description, operation=name, attempts=attempt + 1,
            error="no reply by the deadline", waited=round(asyncio.get_running_loop().time() - start, 3),
        )  # fmt: skip
        error = RedisUnavailable(
            f"Redis at {self.description} did not answer {name} within {cut.seconds:.2f}s "
            "(the call's deadline); it may have run"
        )
        if self.on_unavailable == "allow":
            return self._fail_open(name, args, error)
        raise error from cut

    def _judge(self, name: str, args: Sequence[Any], exc: Exception) -> Any:
        """`_RETRY` when `exc` is worth another attempt, the fail-open reply under ``"allow"``; else raises."""
        code = refusal_code(exc)
        if name in ONCE:
            raise exc
        if code in FINAL_REFUSALS:
            log.error("redis.refused", redis=self.description, operation=name, code=code, error=_describe(exc))
            raise FINAL_REFUSALS[code](self._message(name, exc), code=code) from exc
        if code is None and not is_unavailable(exc):
            raise exc
        if code is None and self.on_unavailable == "allow":
            return self._fail_open(name, args, exc)
        if self.on_unavailable == "raise":
            log.error("redis.unavailable", redis=self.description, operation=name, error=_describe(exc))
            raise self._error(name, exc) from exc
        return _RETRY

    async def _pause(
        self, name: str, exc: Exception, delay: float, deadline: float | None, attempt: int, first_failure: float
    ) -> None:
        """Sleep before the next attempt, never past the deadline (then raise RedisUnavailable)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if deadline is not None:
            if now >= deadline:
                log.error("redis.unavailable", redis=self.description, operation=name, attempts=attempt)
                raise self._error(name, exc, waited=now - first_failure) from exc
            delay = min(delay, deadline - now)
        log.warning(
            "redis.unavailable",
            redis=self.description,
            operation=name,
            error=_describe(exc),
            attempt=attempt,
            retry_in=round(delay, 3),
        )
        await asyncio.sleep(delay)
        now = loop.time()
        if deadline is not None and now >= deadline:  # no attempt doomed from its start
            log.error("redis.unavailable", redis=self.description, operation=name, attempts=attempt)
            raise self._error(name, exc, waited=now - first_failure) from exc

    def _message(self, name: str, exc: BaseException, waited: float | None = None) -> str:
        after = "" if waited is None else f" after retrying for {waited:.1f}s"
        code = refusal_code(exc)
        what = "refused" if code else "is unavailable"
        return f"Redis at {self.description} {what} ({name}{after}): {_describe(exc)}"

    def _error(self, name: str, exc: BaseException, waited: float | None = None) -> RedisUnavailable:
        """The error a call raises when it gives up on `exc`: typed by its refusal code, else RedisUnavailable."""
        code = refusal_code(exc)
        message = self._message(name, exc, waited)
        if code in PASSING_REFUSALS:
            error = PASSING_REFUSALS[code](message, code=code)
            assert isinstance(error, RedisUnavailable)
            return error
        return RedisUnavailable(message)

    def _fail_open(self, name: str, args: Sequence[Any], exc: BaseException) -> Any:
        if name == "acquire":
            request = protocol.read_acquire_args(args)
            rid, lease_ms = request.reservation_id, request.lease_ms
            self._unbacked[rid] = None
            while len(self._unbacked) > _MAX_UNBACKED:
                self._unbacked.popitem(last=False)
            log.error(
                "budget.fail_open",
                redis=self.description,
                reservation=rid,
                agent=request.agent,
                amounts=request.amounts,
                error=_describe(exc),
                note="admitted WITHOUT a budget check: Redis is unavailable and on_unavailable='allow'",
            )
            now_ms = int(time.time() * 1000)
            return [1, rid, now_ms, now_ms + lease_ms, ""]
        if name == "settle":
            log.error(
                "budget.settle_lost",
                redis=self.description,
                reservation=args[0],
                kind=args[1],
                error=_describe(exc),
                note="Redis is unavailable: the estimate stays charged and the lease expires by itself",
            )
            return [0, "unavailable"]
        log.error("redis.unavailable", redis=self.description, operation=name, error=_describe(exc))
        raise self._error(name, exc) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
