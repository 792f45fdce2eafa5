"""A reservation: an admitted estimate, held under a lease until it is settled."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from slowburn_redis.amounts import amounts_to_units, format_amounts, parse_amounts
from slowburn_redis.limits import from_units

if TYPE_CHECKING:
    from slowburn_redis.budget import Budget


@dataclass(frozen=True)
class Settlement:
    """What a commit or release did.

    `settled` is False when the call changed nothing (the reservation was
    already settled, or a release came after its lease expired); `state` then
    says why. `overrun` maps each dimension to what was charged beyond its
    estimate.
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
        budget: Budget,
        *,
        tenant: str,
        agent: str | None,
        id: str,
        estimate: dict[str, int],
        admitted_at_ms: int,
        lease_expires_ms: int,
        over_limits: list[str],
    ) -> None:
        self._budget = budget
        self.tenant = tenant
        self.agent = agent
        self.id = id
        self.estimate_units = estimate
        self.admitted_at_ms = admitted_at_ms
        self.lease_expires_ms = lease_expires_ms
        self.over_limits = over_limits
        """Limits this admission went past (advisory mode only)."""
        self.state = "open"
        self.settlement: Settlement | None = None

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
        return self._budget._resilience.is_backed(self.id)

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
    ) -> Settlement:
        """Replace the estimate by the actual cost. Dimensions left out keep their estimate.

        When `tokens` is left out but input and output tokens are given, their
        sum is the token count. The commit is appended to the tenant's ledger.
        """
        actual = amounts_to_units(
            usd=usd, tokens=tokens, input_tokens=input_tokens, output_tokens=output_tokens, requests=requests
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
        expiry = await self._budget._extend(self, ttl)
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
        meta = json.dumps(metadata, default=str, separators=(",", ":")) if metadata else ""
        reply = await self._budget._settle(
            self, kind, format_amounts(actual), model=model or "", outcome=outcome or "", meta=meta
        )
        if reply[0] == 1:
            overrun = {dim: from_units(dim, units) for dim, units in parse_amounts(reply[2]).items()}
            result = Settlement(True, reply[1], overrun, reply[3] or None)
        else:
            result = Settlement(False, reply[1])
        if result.settled or self.settlement is None:
            self.settlement = result
        self.state = reply[1]
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
