"""Finding tenants and the scopes of their limits, by the key layout in docs/ARCHITECTURE.md.

Tenants are found with SCAN over ``<prefix>:{*}:limits`` (never KEYS, which
blocks the server): a tenant is listed once it has had limits set.
"""

from __future__ import annotations

from slowburn_redis.budget import Budget
from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import Limit
from slowburn_redis.names import EVERY_AGENT, validate_name


async def find_tenants(budget: Budget) -> list[str]:
    """Every tenant with a limits hash under the budget's prefix, sorted, found with SCAN."""
    head, tail = f"{budget.prefix}:{{", "}:limits"
    found: set[str] = set()
    async for key in budget.engine.scan_keys(f"{head}*{tail}"):
        name = str(key)[len(head) : -len(tail)]
        try:
            found.add(validate_name("tenant", name))
        except InvalidInput:  # a key that merely looks alike (a name cannot contain '}')
            continue
    return sorted(found)


_TENANT_KEYS = ("limits", "ledger", "agents", "leases", "q", "admin")
"""Keys under a tenant's base of which at least one exists once anything was stored for it."""


async def tenant_exists(budget: Budget, tenant: str) -> bool:
    """Has anything been stored for `tenant` (limits, a ledger, agents' windows, leases, a queue, an admin action)?

    One EXISTS over the tenant's well-known keys (one slot, so it also works on
    a Redis Cluster); never a SCAN.
    """
    base = budget.key(tenant)
    return bool(await budget.engine.exists(*(f"{base}:{name}" for name in _TENANT_KEYS)))


def no_such_tenant(tenant: str, prefix: str) -> str:
    """The one-line message for a tenant with nothing stored under `prefix`."""
    return f"no such tenant {tenant!r} under prefix {prefix!r}: nothing is stored for it (see `slowburn-redis status`)"


def _agent_of(field: str) -> str | None:
    if field == "T":
        return None
    if field == "D":
        return EVERY_AGENT
    return field[2:] if field.startswith("A:") else None


async def limit_scopes(budget: Budget, tenant: str) -> list[tuple[str | None, list[Limit]]]:
    """Every scope of `tenant` with limits set: the tenant (None), every agent ("*"), then agents by name."""
    fields = await budget.engine.hkeys(budget.keys(tenant).limits)
    agents = {_agent_of(str(f)) for f in fields if str(f) in ("T", "D") or str(f).startswith("A:")}
    ordered = sorted(agents, key=lambda a: (a is not None, a != EVERY_AGENT, a or ""))
    scopes = []
    for agent in ordered:
        limits = await budget.get_limits(tenant, agent=agent)
        if limits:
            scopes.append((agent, limits))
    return scopes


async def model_scopes(budget: Budget, tenant: str) -> list[tuple[str, list[Limit]]]:
    """Every model of `tenant` with limits of its own (``set_limits(..., model=)``), by name."""
    fields = await budget.engine.hkeys(budget.keys(tenant).limits)
    models = sorted(str(f)[2:] for f in fields if str(f).startswith("M:"))
    scopes = []
    for model in models:
        limits = await budget.get_limits(tenant, model=model)
        if limits:
            scopes.append((model, limits))
    return scopes
