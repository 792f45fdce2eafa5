"""The exceptions slowburn-redis raises. Every one derives from SlowburnError."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slowburn_redis.runs import RunSummary
    from slowburn_redis.status import Status


class SlowburnError(Exception):
    """Base class of every error this package raises."""


class MissingExtra(SlowburnError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f'{feature} needs the [{extra}] extra: pip install "slowburn-redis[{extra}]"')
        self.extra = extra


class InvalidInput(SlowburnError, ValueError):
    """An argument was rejected before anything was sent to Redis."""


class InvalidLimit(InvalidInput):
    """A limit string or value is malformed; `part` names the offending piece."""

    def __init__(self, message: str, *, part: str = "") -> None:
        super().__init__(message)
        self.part = part


class InvalidName(InvalidInput):
    """A tenant, agent or prefix name breaks the naming rules."""


class BudgetDenied(SlowburnError):
    """An acquire was not admitted. `limit` is the key of the limit that denied it."""

    def __init__(self, message: str, *, tenant: str, agent: str | None, limit: str) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.agent = agent
        self.limit = limit


class RequestTooLarge(BudgetDenied):
    """The request is larger than a limit itself, so it can never be admitted."""

    def __init__(
        self, message: str, *, tenant: str, agent: str | None, limit: str, amount: int, requested: int
    ) -> None:
        super().__init__(message, tenant=tenant, agent=agent, limit=limit)
        self.amount = amount
        self.requested = requested


class RunExhausted(BudgetDenied):
    """A run's cap (or its max_seconds) is spent: raised at once, in every mode that checks limits, never waited on.

    A run cap never refills, so waiting cannot help. `summary` (a
    `slowburn_redis.runs.RunSummary`) is what the run spent, per dimension
    and per model, its steps and its time; `cap` says in words what was hit
    (``tokens 50000 (run r-123)``, ``max_seconds 600 (run r-123)``); `reason`
    is ``cap``, ``time`` or ``gone`` (the run's keys expired); `limit` is the
    cap's limit key.
    """

    def __init__(
        self,
        message: str,
        *,
        tenant: str,
        agent: str | None,
        limit: str,
        run_id: str,
        reason: str,
        cap: str,
        summary: RunSummary | None,
    ) -> None:
        super().__init__(message, tenant=tenant, agent=agent, limit=limit)
        self.run_id = run_id
        self.reason = reason
        self.cap = cap
        self.summary = summary


class LimitsMissing(SlowburnError):
    """No limits are stored for the tenant (nor for its agents' default or this agent): refused, never unlimited.

    Raised before anything is charged, in every mode. "Unlimited" is an explicit
    stored choice (`Budget.set_unlimited`, ``slowburn-redis limits set TENANT unlimited``).
    """

    def __init__(self, message: str, *, tenant: str, agent: str | None) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.agent = agent


class BudgetExhausted(BudgetDenied):
    """Raised at once in ``mode="reject"``; `retry_after` is in seconds (None: unknown)."""

    def __init__(self, message: str, *, tenant: str, agent: str | None, limit: str, retry_after: float | None) -> None:
        super().__init__(message, tenant=tenant, agent=agent, limit=limit)
        self.retry_after = retry_after


class BudgetTimeout(BudgetDenied):
    """A wait ran past its `timeout`; `status` is the budget as it stood then."""

    def __init__(self, message: str, *, tenant: str, agent: str | None, limit: str, status: Status | None) -> None:
        super().__init__(message, tenant=tenant, agent=agent, limit=limit)
        self.status = status


class ReservationError(SlowburnError):
    """A reservation cannot be used as asked (for instance, used before it was admitted)."""


class RedisUnavailable(SlowburnError):
    """Redis could not be reached; the message names the URL without credentials."""


class BudgetClosed(SlowburnError):
    """The Budget was closed (`aclose`, or `close` on the sync twin): its waits end and it sends nothing more."""


class WrongThread(SlowburnError, RuntimeError):
    """A blocking call of the sync twin was made from its own event-loop thread, where it would deadlock."""


class PermissionDenied(SlowburnError):
    """Redis refused an operation under its ACL (NOPERM): the connected user may not do this.

    A worker user (see ``slowburn-redis acl``) gets it for set_limits, reset
    and any other tenant's budget.
    """


class RedisRefused(SlowburnError):
    """Redis answered, and refused the command: nothing it would have written was written.

    `code` is Redis's error code (``OOM``, ``MISCONF``, ``READONLY``,
    ``LOADING``, ``BUSY``). A refusal is never treated as permission: no
    policy, ``on_unavailable="allow"`` included, admits a request Redis
    refused. The subclasses say which refusals pass by themselves (retried
    within the call's deadline, like an outage) and which need an operator.
    """

    code = ""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class RedisOutOfMemory(RedisRefused):
    """``OOM``: Redis reached ``maxmemory`` under ``noeviction``. Raised at once, never retried, never admitted.

    Free memory or raise ``maxmemory``; evicting budget keys instead would
    lose spend history (see ``slowburn-redis doctor``).
    """

    code = "OOM"


class RedisMisconfigured(RedisRefused):
    """``MISCONF``: Redis refuses writes because it cannot persist (a failed RDB save or AOF write).

    Raised at once, never retried, never admitted: the disk needs an operator.
    """

    code = "MISCONF"


class RedisReadOnly(RedisRefused, RedisUnavailable):
    """``READONLY``: the server is a read-only replica (typically just after a failover).

    Retried within the call's deadline like an outage, then raised; being
    also a RedisUnavailable, it is caught wherever an outage is.
    """

    code = "READONLY"


class RedisLoading(RedisRefused, RedisUnavailable):
    """``LOADING``: Redis is loading its dataset after a restart. Retried within the deadline, then raised."""

    code = "LOADING"


class RedisBusy(RedisRefused, RedisUnavailable):
    """``BUSY``: another client's script ran past ``busy-reply-threshold``. Retried within the deadline, then raised."""

    code = "BUSY"
