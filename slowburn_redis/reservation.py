"""A reservation: an admitted estimate, held under a lease until it is settled.

A Reservation talks to the `Engine` that admitted it (settle and extend
scripts), never to the Budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog

from slowburn_redis import protocol
from slowburn_redis.amounts import amounts_to_units
from slowburn_redis.engine import Engine
from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import from_units

log = structlog.get_logger("slowburn_redis")

SETTLED_TTL = 600.0
"""Seconds a settled reservation's tombstone is kept (``SETTLED_TTL_MS`` in lua/lib.lua, "reservation records").

Settling replaces the reservation's record (~650 bytes) by a tombstone of
about 150 bytes that holds only the final state. For that long a retried
commit or release of the id answers ``settled=False`` with the state it
settled to (nothing charged again), and a copy of its acquire admits nothing;
later both Redis forgets the id: a settle answers state ``"unknown"`` and
still changes nothing. 10 minutes outlives every copy of an acquire the
network can still deliver (see lua/lib.lua) and a settle retried within a
``retry_timeout`` of up to 10 minutes."""

MAX_LEASE_TTL = 10**7
"""Seconds: the longest lease (about 116 days); longer is refused as a likely unit mistake."""


def check_lease_ttl(seconds: object, name: str = "lease_ttl") -> float:
    """`seconds` as a float if it is a lease TTL a Budget accepts (0 < ttl < `MAX_LEASE_TTL`), else InvalidInput."""
    if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and 0 < seconds < MAX_LEASE_TTL):
        raise InvalidInput(f"{name} must be a positive number of seconds below {MAX_LEASE_TTL}, not {seconds!r}")
    return float(seconds)


@dataclass(frozen=True)
class Settler:
    """What a Reservation needs of its Budget: the engine, the tenant's base key, the ledger bound, the default TTL."""

    engine: Engine
    key: str
    ledger_maxlen: int
    lease_ttl: float


@dataclass(frozen=True)
class Settlement:
    """What a commit or release did.

    `settled` is False when the call changed nothing; `state` then says why:
    ``"committed"`` or ``"released"`` (settled before: a second call, or a
    retry whose first reply was lost), ``"expired"`` (a release after the
    lease expired refunds nothing) or ``"unknown"`` (Redis no longer knows
    the id: settled more than `SETTLED_TTL` ago, or its keys were lost).
    `overrun` maps each dimension to what was charged beyond its estimate.
    """

    settled: bool
    state: str
    overrun: dict[str, float] = field(default_factory=dict)
    ledger_id: str | None = None


class Reservation:
    """An estimate admitted against every limit of a tenant (and agent).

    Settle it once: `commit` with the actual cost (a lower actual frees
    capacity at once, a higher one is charged and recorded as an overrun) or
    `release` to refund it. Both are idempotent. Used as an async context
    manager, it is released if the block raises and committed at the
    estimate if the block ends without settling it.
    """

    def __init__(
        self,
        settler: Settler,
        *,
        tenant: str,
        agent: str | None,
        id: str,
        estimate: dict[str, int],
        model: str | None = None,
        admitted_at_ms: int,
        lease_expires_ms: int,
        over_limits: list[str],
    ) -> None:
        self._settler = settler
        self._tenant = tenant
        self._agent = agent
        self._id = id
        self._model = model
        self.estimate_units = dict(estimate)
        self.admitted_at_ms = admitted_at_ms
        self.lease_expires_ms = lease_expires_ms
        self.over_limits = over_limits
        """Limits this admission went past (advisory mode only)."""
        self.state = "open"
        self.settlement: Settlement | None = None

    @property
    def id(self) -> str:
        """The reservation id (immutable: it names the reservation in Redis and in the ledger)."""
        return self._id

    @property
    def tenant(self) -> str:
        return self._tenant

    @property
    def agent(self) -> str | None:
        return self._agent

    @property
    def model(self) -> str | None:
        """The model the reservation was acquired for (its per-model limits were checked), if given."""
        return self._model

    @property
    def estimate(self) -> dict[str, float]:
        """The reserved amounts in human units (usd in dollars)."""
        return {dim: from_units(dim, units) for dim, units in self.estimate_units.items()}

    @property
    def settled(self) -> bool:
        return self.settlement is not None

    @property
    def backed(self) -> bool:
        """False when admitted without Redis (``on_unavailable="allow"``): nothing was charged; settling only logs."""
        return self._settler.engine.is_backed(self.id)

    async def commit(
        self,
        usd: float | str | None = None,
        tokens: int | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        requests: int | None = None,
        model: str | None = None,
        outcome: str | None = None,
        metadata: dict[str, Any] | None = None,
        **custom: int,
    ) -> Settlement:
        """Replace the estimate by the actual cost. Dimensions left out keep their estimate.

        When `tokens` is left out but input and output tokens are given, their
        sum is the token count. `custom` holds custom dimensions
        (``tool_calls=3``). `model` names the model in the ledger (default: the
        one acquired for). The commit is appended to the tenant's ledger.
        """
        actual = amounts_to_units(
            usd=usd,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            requests=requests,
            custom=custom,
        )
        return await self._settle("commit", actual, model=model, outcome=outcome, metadata=metadata)

    async def release(self, *, outcome: str | None = None, metadata: dict[str, Any] | None = None) -> Settlement:
        """Refund the reservation (the call failed and cost nothing).

        With an `outcome` (such as ``"error"``) a zero-cost entry is written to
        the ledger. A release after the lease expired refunds nothing.
        """
        return await self._settle("release", {}, model=None, outcome=outcome, metadata=metadata)

    async def extend(self, ttl: float | None = None) -> bool:
        """Push the lease expiry `ttl` seconds from now (default: the budget's lease TTL).

        Returns False when the reservation is no longer open.
        """
        seconds = check_lease_ttl(self._settler.lease_ttl if ttl is None else ttl, "ttl")
        if not self.backed:
            return True  # admitted while failing open: nothing to extend
        engine = self._settler.engine
        reply = await engine.run(engine.scripts.extend, self._settler.key, [self.id, round(seconds * 1000)])
        expiry = protocol.decode_extend(reply)
        if expiry is None:
            return False
        self.lease_expires_ms = expiry
        return True

    async def _settle(
        self,
        kind: str,
        actual: dict[str, int],
        *,
        model: str | None,
        outcome: str | None,
        metadata: dict[str, Any] | None,
    ) -> Settlement:
        settler = self._settler
        args = protocol.settle_args(
            reservation_id=self.id,
            kind=kind,
            ledger_maxlen=settler.ledger_maxlen,
            actual=actual,
            model=model or "",
            outcome=outcome or "",
            metadata=metadata,
        )
        reply = protocol.decode_settle(await settler.engine.run(settler.engine.scripts.settle, settler.key, args))
        overrun = {dim: from_units(dim, units) for dim, units in reply.overrun.items()}
        if overrun:
            log.warning("budget.overrun", tenant=self.tenant, agent=self.agent, reservation=self.id, overrun=overrun)
        result = Settlement(reply.settled, reply.state, overrun, reply.ledger_id)
        if result.settled or self.settlement is None:
            self.settlement = result
        self.state = reply.state
        return result

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.settled:
            return
        if exc_type is None:
            await self.commit()
        else:
            await self.release()

    def __repr__(self) -> str:
        who = self.tenant + (f"/{self.agent}" if self.agent else "")
        return f"<Reservation {self.id} {who} {self.state} {self.estimate}>"
