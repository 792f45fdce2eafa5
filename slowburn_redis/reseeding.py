"""Re-seeding a tenant's limits from declared desired state when Redis has lost them, loudly.

A Budget given ``desired_limits`` (a `slowburn_redis.desired.LimitsFile` or a
mapping) does not give up on a tenant whose limits are gone (a Redis restarted
empty, an evicted key, a cleared scope): when an acquire of a declared tenant
is refused with `LimitsMissing`, the `Reseeder` writes the declared scopes that
are missing (never one that is stored, so an operator's later change stands),
then the acquire is tried again within its own deadline. Each re-seed:

- logs ``limits.reseeded`` at error level, naming the limits written and
  whether the spend history was lost (``history_lost``: Redis holds no
  ledger for the tenant either, so spend before this moment, if there was
  any, is not counted in any window);
- appends a ``limits_reseeded`` event to the tenant's trail and publishes it on
  its event channel (``announce.lua``, as the scripts do their own events),
  with the same facts.

Writing limits needs an admin credential for the tenant: a worker user's
write is refused by Redis (``PermissionDenied``), which is logged as
``limits.reseed_refused`` and leaves the acquire's `LimitsMissing` standing.
Tenants the desired state does not name are never written. Within a process,
concurrent acquires of one tenant re-seed it once (a lock per tenant, and the
stored scopes are read again under it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from slowburn_redis.desired import LimitsFile
from slowburn_redis.engine import Engine
from slowburn_redis.errors import PermissionDenied
from slowburn_redis.keys import TenantKeys, scope_field
from slowburn_redis.limits import Limit

log = structlog.get_logger("slowburn_redis")

WriteLimits = Callable[[str, str | None, list[Limit]], Awaitable[None]]
"""``write(tenant, agent, limits)``: store the limits of one scope (`Budget.set_limits`)."""


class Reseeder:
    """Writes a declared tenant's missing scopes back; see the module docstring."""

    def __init__(
        self, desired: LimitsFile, *, engine: Engine, keys: Callable[[str], TenantKeys], write: WriteLimits
    ) -> None:
        self.desired = desired
        self._engine = engine
        self._keys = keys
        self._write = write
        self._locks: dict[str, asyncio.Lock] = {}

    async def reseed(self, tenant: str) -> bool:
        """For an acquire: True when every scope declared for `tenant` is stored now (written here or found).

        False when the desired state does not declare the tenant, or Redis
        refused a read or the write (logged as ``limits.reseed_refused``).
        Other errors reaching Redis propagate.
        """
        if not self.declares(tenant):
            return False
        try:
            await self.restore(tenant)
        except PermissionDenied as exc:
            log.error(
                "limits.reseed_refused", tenant=tenant, error=str(exc),
                fix="give this Budget an admin user for the tenant, or run "
                "`slowburn-redis limits apply FILE --only-missing` as an admin",
            )  # fmt: skip
            return False
        return True

    def declares(self, tenant: str) -> bool:
        spec = self.desired.tenants.get(tenant)
        return spec is not None and bool(spec.scopes())

    async def missing(self, tenant: str) -> list[tuple[str | None, list[Limit]]]:
        """The scopes declared for `tenant` that Redis holds nothing for (read only)."""
        spec = self.desired.tenants.get(tenant)
        declared = [] if spec is None else spec.scopes()
        if not declared:
            return []
        stored = await self._engine.hmget(self._keys(tenant).limits, [scope_field(agent) for agent, _ in declared])
        return [scope for scope, value in zip(declared, stored, strict=True) if value is None]

    async def restore(self, tenant: str) -> Reseeded:
        """Write the declared scopes of `tenant` that are missing, and announce it (nothing: nothing missing).

        Raises PermissionDenied when the user may not read or write them.
        """
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            keys = self._keys(tenant)
            missing = await self.missing(tenant)
            if not missing:
                return Reseeded(tenant, [], history_lost=False)
            history_lost = not await self._engine.exists(keys.ledger)
            for agent, limits in missing:
                await self._write(tenant, agent, limits)
            await self._announce(tenant, keys, missing, history_lost)
            return Reseeded(tenant, missing, history_lost=history_lost)

    async def _announce(
        self, tenant: str, keys: TenantKeys, written: list[tuple[str | None, list[Limit]]], history_lost: bool
    ) -> None:
        scopes = {scope_words(agent): [str(limit) for limit in limits] for agent, limits in written}
        log.error(
            "limits.reseeded", tenant=tenant, limits=scopes, history_lost=history_lost,
            note="Redis had no limits for this tenant; the declared ones were written again"
            + (" and its spend history was gone too: spend before now is not counted" if history_lost else ""),
        )  # fmt: skip
        fields = json.dumps({"limits": scopes, "history_lost": history_lost})
        await self._engine.run(self._engine.scripts.announce, keys.base, ["limits_reseeded", fields])


@dataclass(frozen=True)
class Reseeded:
    """What `Reseeder.restore` wrote for one tenant (`written` empty: nothing was missing)."""

    tenant: str
    written: list[tuple[str | None, list[Limit]]]
    history_lost: bool
    """Redis held no ledger for the tenant either: its spend before the re-seed (if any) is counted nowhere."""


def scope_words(agent: str | None) -> str:
    """``tenant``, ``every agent`` or ``agent <name>``."""
    if agent is None:
        return "tenant"
    return "every agent" if agent == "*" else f"agent {agent}"
