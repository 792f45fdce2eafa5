"""What a Budget does when Redis cannot be reached: backoff, retries and the ``on_unavailable`` policy.

Every script call of a Budget goes through `Resilience.call`. A call that
fails because Redis is unreachable (connection refused or reset, timeout,
``LOADING`` after a restart, ``CLUSTERDOWN``/``TRYAGAIN`` on a cluster) is
handled by the policy:

- ``"wait"`` (default): retry with exponential backoff and jitter until the
  call succeeds or its deadline passes (an acquire's ``timeout``; for other
  operations the Budget's ``retry_timeout``, None for no bound), then raise
  `RedisUnavailable`.
- ``"raise"``: raise `RedisUnavailable` at once.
- ``"allow"``: fail open. An acquire is admitted without Redis: it returns a
  reservation that is not backed by Redis (nothing was charged, nothing is
  counted) and whose commit and release only log. A commit or release of a
  real reservation that cannot reach Redis is logged and given up: its
  estimate stays charged and its lease expires by itself. Other operations
  (status, limits, reset) raise `RedisUnavailable`. Every fail-open decision
  is logged at error level.

Retrying is safe because every script is idempotent under a retry with the
same arguments: acquire takes a client-made reservation id and returns the
first admission for a known id, and settling a reservation twice changes
nothing the second time. So a call whose reply was lost is simply run again.

Errors that are not about reachability (a script error, a refused
authentication, a NOPERM) are never retried. The heartbeat and queue-leave
calls (``refresh``, ``leave``) are tried once and raise the original error:
their callers already treat a failure as "try again later".
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from slowburn_redis.errors import InvalidInput, RedisUnavailable

log = structlog.get_logger("slowburn_redis")

OnUnavailable = Literal["wait", "raise", "allow"]
ON_UNAVAILABLE: tuple[OnUnavailable, ...] = ("wait", "raise", "allow")

ONCE = frozenset({"refresh", "leave"})
"""Scripts tried once whatever the policy: their callers retry on their own schedule."""

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


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says Redis could not be reached (worth a retry), not that it refused the call."""
    if isinstance(exc, _NOT_REACHABILITY):
        return False
    if isinstance(exc, _REACHABILITY):
        return True
    # asyncio RedisCluster raises a bare RedisClusterException when no node answers.
    return isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc)


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
    `retry_timeout` bounds the retries of a call that has no deadline of its
    own, in ``"wait"`` mode (None: retry until Redis answers).
    """

    def __init__(
        self,
        on_unavailable: OnUnavailable = "wait",
        *,
        backoff: Backoff | None = None,
        retry_timeout: float | None = None,
        description: str = "redis",
    ) -> None:
        if on_unavailable not in ON_UNAVAILABLE:
            raise InvalidInput(f"on_unavailable must be one of {', '.join(ON_UNAVAILABLE)}, not {on_unavailable!r}")
        if retry_timeout is not None and not (isinstance(retry_timeout, (int, float)) and retry_timeout >= 0):
            raise InvalidInput(f"retry_timeout must be a non-negative number of seconds or None, not {retry_timeout!r}")
        self.on_unavailable: OnUnavailable = on_unavailable
        self.backoff = backoff or Backoff()
        self.retry_timeout = retry_timeout
        self.description = description
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
        """Run `operation` (the script `name` with `args`) under the policy.

        `deadline` is an event-loop time (``loop.time()``) after which a
        ``"wait"`` retry gives up; None means the `retry_timeout` from the first
        failure.
        """
        if name == "settle" and args and not self.is_backed(str(args[0])):
            self._unbacked.pop(str(args[0]), None)
            log.warning("budget.unbacked_settle", reservation=args[0], kind=args[1], redis=self.description)
            return [0, "unbacked"]
        loop = asyncio.get_running_loop()
        delays: Iterator[float] | None = None
        attempt, first_failure = 0, 0.0
        while True:
            try:
                reply = await operation()
            except Exception as exc:
                if name in ONCE or not is_unavailable(exc):
                    raise
                attempt += 1
                if self.on_unavailable == "allow":
                    return self._fail_open(name, args, exc)
                if self.on_unavailable == "raise":
                    log.error("redis.unavailable", redis=self.description, operation=name, error=_describe(exc))
                    raise self._error(name, exc) from exc
                now = loop.time()
                if delays is None:
                    delays, first_failure = self.backoff.delays(), now
                    if deadline is None and self.retry_timeout is not None:
                        deadline = now + self.retry_timeout
                delay = next(delays)
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
                continue
            if attempt:
                log.warning(
                    "redis.recovered", redis=self.description, operation=name, attempts=attempt + 1,
                    down_for=round(loop.time() - first_failure, 3),
                )  # fmt: skip
            return reply

    def _error(self, name: str, exc: BaseException, waited: float | None = None) -> RedisUnavailable:
        after = "" if waited is None else f" after retrying for {waited:.1f}s"
        return RedisUnavailable(f"Redis at {self.description} is unavailable ({name}{after}): {_describe(exc)}")

    def _fail_open(self, name: str, args: Sequence[Any], exc: BaseException) -> Any:
        if name == "acquire":
            rid, lease_ms = str(args[0]), int(args[5])
            self._unbacked[rid] = None
            while len(self._unbacked) > _MAX_UNBACKED:
                self._unbacked.popitem(last=False)
            log.error(
                "budget.fail_open",
                redis=self.description,
                reservation=rid,
                agent=args[1] or None,
                amounts=args[7],
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
