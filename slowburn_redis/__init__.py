"""slowburn-redis: fleet-wide LLM budgets in Redis that pause workers instead of killing them.

from slowburn_redis import Budget, Limit

budget = Budget.embedded()            # or Budget.from_url("redis://localhost:6379/0")
await budget.set_limits("acme", ["usd 5/day", "requests 60/min", "concurrency 8"])
async with budget.acquire("acme", usd=0.02, tokens=1500) as r:
    ...                               # the paid call
    await r.commit(usd=0.013, tokens=1210)
"""

from slowburn_redis._version import __version__
from slowburn_redis.budget import Budget
from slowburn_redis.errors import (
    BudgetClosed,
    BudgetDenied,
    BudgetExhausted,
    BudgetTimeout,
    InvalidInput,
    InvalidLimit,
    InvalidName,
    LimitsMissing,
    MissingExtra,
    PermissionDenied,
    RedisBusy,
    RedisLoading,
    RedisMisconfigured,
    RedisOutOfMemory,
    RedisReadOnly,
    RedisRefused,
    RedisUnavailable,
    RequestTooLarge,
    ReservationError,
    RunExhausted,
    SlowburnError,
)
from slowburn_redis.events import Event
from slowburn_redis.limits import Limit
from slowburn_redis.names import EVERY_AGENT
from slowburn_redis.quote import Quote
from slowburn_redis.reservation import Reservation, Settlement
from slowburn_redis.runs import Run, RunSummary, SyncRun, current_run
from slowburn_redis.status import LimitStatus, Status
from slowburn_redis.sync import SyncBudget, SyncReservation

__all__ = [
    "EVERY_AGENT",
    "Budget",
    "BudgetClosed",
    "BudgetDenied",
    "BudgetExhausted",
    "BudgetTimeout",
    "Event",
    "InvalidInput",
    "InvalidLimit",
    "InvalidName",
    "Limit",
    "LimitStatus",
    "LimitsMissing",
    "MissingExtra",
    "PermissionDenied",
    "Quote",
    "RedisBusy",
    "RedisLoading",
    "RedisMisconfigured",
    "RedisOutOfMemory",
    "RedisReadOnly",
    "RedisRefused",
    "RedisUnavailable",
    "RequestTooLarge",
    "Reservation",
    "ReservationError",
    "Run",
    "RunExhausted",
    "RunSummary",
    "Settlement",
    "SlowburnError",
    "Status",
    "SyncBudget",
    "SyncReservation",
    "SyncRun",
    "__version__",
    "current_run",
]
