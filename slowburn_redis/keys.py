"""The key schema: every key, channel and scope field of a tenant, in one place.

Every key of a tenant starts with its base ``<prefix>:{<tenant>}``, so all of
one tenant's keys share one hash tag and one Redis Cluster slot. The Lua
scripts derive the same names from KEYS[1] with the helpers at the top of
``lua/lib.lua`` (`tests/test_keys.py` checks that both agree).

A *limit key* (LK) names one limit of one scope: ``<scope>:<dimension>:<window_ms>``
with scope ``T`` (the tenant), ``D`` (the default of every agent) or
``A:<agent>``, or ``M:<model>`` (one model, tenant-wide), or ``R:<run>`` (the
lifetime caps of one run, see `slowburn_redis.runs`); a lifetime cap has
window 0; a calendar period ends in ``<period>@<zone>`` instead
(``T:usd:month@Europe/Berlin``). Text for people never shows a limit key:
`describe_limit_key` turns it into ``usd 0.5/hour (agent researcher)`` or
``usd 50/month (Europe/Berlin, tenant)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from slowburn_redis.errors import InvalidInput
from slowburn_redis.names import EVERY_AGENT, validate_model, validate_name

TENANT_SCOPE = "T"
DEFAULT_AGENT_SCOPE = "D"
AGENT_SCOPE_PREFIX = "A:"
MODEL_SCOPE_PREFIX = "M:"
RUN_SCOPE_PREFIX = "R:"

# The suffixes after the base key; lua/lib.lua names the same ones.
LIMITS = "limits"
AGENTS = "agents"
WINDOW = "w"
BLOCKED = "b"
QUEUE = "q"
QUEUE_EXPIRY = "qexp"
SEQUENCE = "seq"
RESERVATION = "r"
SETTLED = "s"
RUN = "run"
LEASES = "leases"
LEDGER = "ledger"
ADMIN = "admin"
CLOCK = "clock"
TEST_CLOCK = "testclock"
WAKE_CHANNEL = "wake"
EVENTS_CHANNEL = "events"
TRAIL = "trail"


def base_key(prefix: str, tenant: str) -> str:
    """The key every other key of `tenant` derives from: ``<prefix>:{<tenant>}``."""
    return f"{prefix}:{{{validate_name('tenant', tenant)}}}"


def scope_field(agent: str | None, model: str | None = None) -> str:
    """The field of the limits hash that holds a scope: ``T``, ``D`` (every agent), ``A:<agent>`` or ``M:<model>``.

    A model's limits are tenant-wide: `agent` and `model` together raise InvalidInput.
    """
    if model is not None:
        if agent is not None:
            raise InvalidInput("per-model limits apply to the whole tenant: give agent or model, not both")
        return MODEL_SCOPE_PREFIX + validate_model(model)
    if agent is None:
        return TENANT_SCOPE
    if agent == EVERY_AGENT:
        return DEFAULT_AGENT_SCOPE
    return AGENT_SCOPE_PREFIX + validate_name("agent", agent)


@dataclass(frozen=True)
class TenantKeys:
    """The keys and channels of one tenant under `base` (``<prefix>:{<tenant>}``)."""

    base: str

    @classmethod
    def of(cls, prefix: str, tenant: str) -> TenantKeys:
        return cls(base_key(prefix, tenant))

    def _(self, suffix: str) -> str:
        return f"{self.base}:{suffix}"

    @property
    def limits(self) -> str:
        """Hash: scope field -> JSON list of the scope's limits."""
        return self._(LIMITS)

    @property
    def agents(self) -> str:
        """Set: agents that ever had a window of their own."""
        return self._(AGENTS)

    def window(self, limit_key: str) -> str:
        """Hash: one limit's window (running total, buckets)."""
        return self._(f"{WINDOW}:{limit_key}")

    def blocked(self, limit_key: str) -> str:
        """Sorted set: waiters blocked on one limit, by queue rank."""
        return self._(f"{BLOCKED}:{limit_key}")

    @property
    def queue(self) -> str:
        """Hash: ticket -> queue record (see lua/lib.lua, `queue_record`)."""
        return self._(QUEUE)

    @property
    def queue_expiry(self) -> str:
        return self._(QUEUE_EXPIRY)

    @property
    def sequence(self) -> str:
        return self._(SEQUENCE)

    def reservation(self, reservation_id: str) -> str:
        """Hash: a reservation not settled yet (open, or expired; see lua/lib.lua, "reservation records")."""
        return self._(f"{RESERVATION}:{reservation_id}")

    def settled(self, reservation_id: str) -> str:
        """String: a settled reservation's tombstone, ``1`` committed or ``2`` released, kept 10 minutes."""
        return self._(f"{SETTLED}:{reservation_id}")

    def run(self, run_id: str) -> str:
        """Hash: one run (caps, start, deadline, steps, committed amounts; see lua/lib.lua, "runs")."""
        return self._(f"{RUN}:{run_id}")

    @property
    def leases(self) -> str:
        return self._(LEASES)

    @property
    def ledger(self) -> str:
        """Stream: one entry per commit."""
        return self._(LEDGER)

    @property
    def trail(self) -> str:
        """Stream: the durable event trail, one entry per event (see `slowburn_redis.trail`)."""
        return self._(TRAIL)

    @property
    def admin(self) -> str:
        return self._(ADMIN)

    @property
    def clock(self) -> str:
        """Hash: the tenant's clock, which never runs backward (offset, mark, lease shift; see lua/lib.lua)."""
        return self._(CLOCK)

    @property
    def test_clock(self) -> str:
        return self._(TEST_CLOCK)

    @property
    def wake_channel(self) -> str:
        return self._(WAKE_CHANNEL)

    @property
    def events_channel(self) -> str:
        return self._(EVENTS_CHANNEL)


@dataclass(frozen=True)
class LimitKey:
    """A limit key taken apart: its scope (``T``, ``D``, ``A:<agent>``, ``M:<model>``), dimension and window in ms.

    A calendar limit has window 0 and `period`, its ``<period>@<zone>`` token.
    """

    scope: str
    dimension: str
    window_ms: int
    period: str | None = None

    @classmethod
    def parse(cls, text: str) -> LimitKey:
        """``"A:researcher:usd:3600000"`` -> ``LimitKey("A:researcher", "usd", 3600000)``; ValueError if malformed.

        ``"T:usd:month@Europe/Berlin"`` -> ``LimitKey("T", "usd", 0, "month@Europe/Berlin")``.
        """
        from slowburn_redis.limits import split_period_token

        head, _, window = text.rpartition(":")
        scope, _, dimension = head.rpartition(":")
        if not scope or not dimension:
            raise ValueError(f"not a limit key: {text!r}")
        if window.isdigit():
            return cls(scope, dimension, int(window))
        split_period_token(window)  # ValueError when it is not one
        return cls(scope, dimension, 0, window)

    @property
    def model(self) -> str | None:
        """The model of an ``M:`` scope, else None."""
        return self.scope[len(MODEL_SCOPE_PREFIX) :] if self.scope.startswith(MODEL_SCOPE_PREFIX) else None

    @property
    def run(self) -> str | None:
        """The run id of an ``R:`` scope (a run's cap), else None."""
        return self.scope[len(RUN_SCOPE_PREFIX) :] if self.scope.startswith(RUN_SCOPE_PREFIX) else None

    @property
    def agent(self) -> str | None:
        """The agent of an ``A:`` scope, ``*`` for the default of every agent, None for the tenant or a model."""
        if self.scope.startswith((MODEL_SCOPE_PREFIX, RUN_SCOPE_PREFIX)):
            return None
        if self.scope.startswith(AGENT_SCOPE_PREFIX):
            return self.scope[len(AGENT_SCOPE_PREFIX) :]
        return EVERY_AGENT if self.scope == DEFAULT_AGENT_SCOPE else None

    def scope_words(self) -> str:
        """``tenant``, ``every agent``, ``agent researcher``, ``model gpt-4o`` or ``run r-123``."""
        if self.model is not None:
            return f"model {self.model}"
        if self.run is not None:
            return f"run {self.run}"
        agent = self.agent
        if agent is None:
            return "tenant"
        return "every agent" if agent == EVERY_AGENT else f"agent {agent}"


def describe_limit_key(text: str, amount_units: int | None = None) -> str:
    """A limit key in words: ``usd 0.5/hour (agent researcher)``; with no amount, ``usd per hour (tenant)``.

    `amount_units` is the limit's amount in stored units (usd in nano-dollars).
    A string that is not a limit key is returned as it is.
    """
    from slowburn_redis.limits import stored_limit

    try:
        key = LimitKey.parse(text)
    except (ValueError, KeyError):
        return text
    per = key.period or key.window_ms
    try:
        if amount_units is not None:
            limit = stored_limit(key.dimension, amount_units, per)
        else:
            limit = stored_limit(key.dimension, 1, per)
        scope = key.scope_words() if limit.tz is None else f"{limit.tz}, {key.scope_words()}"
        if amount_units is not None:
            return f"{str(limit).partition('@')[0]} ({scope})"
        period = str(limit).partition("/")[2].partition("@")[0]
        return f"{key.dimension}{' per ' + period if period else ' (lifetime)'} ({scope})"
    except (ValueError, KeyError):
        return text
