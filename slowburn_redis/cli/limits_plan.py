"""What ``limits apply`` would change: a plan of scope writes compared with what Redis holds.

`plan_apply` reads the current limits of every scope the file names (and,
with ``prune``, of every other scope of the file's tenants) and returns one
`Change` per scope: set (new or different limits), unchanged, or pruned
(``--prune``: a scope of a tenant in the file that the file does not name is
cleared). `apply_plan` writes the changes, nothing else. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from slowburn_redis.budget import Budget
from slowburn_redis.cli.tenants import limit_scopes
from slowburn_redis.config import LimitsFile
from slowburn_redis.limits import Limit
from slowburn_redis.reseeding import Reseeded, Reseeder, scope_words

Action = Literal["set", "unchanged", "pruned"]


@dataclass(frozen=True)
class Change:
    """One scope of the plan: `before` as stored, `after` as the file says (empty: cleared)."""

    tenant: str
    agent: str | None
    before: list[Limit]
    after: list[Limit]
    action: Action


scope_name = scope_words
"""``tenant``, ``every agent`` or ``agent <name>``."""


def _shown(limits: list[Limit]) -> str:
    return ", ".join(str(lim) for lim in limits) or "(none)"


def change_line(change: Change) -> str:
    """``acme: agent bot: usd 1/hour -> usd 2/hour``, ``... (unchanged)`` or ``... -> (pruned)``."""
    where = f"{change.tenant}: {scope_name(change.agent)}"
    if change.action == "unchanged":
        return f"{where}: {_shown(change.after)} (unchanged)"
    after = "(pruned)" if change.action == "pruned" else _shown(change.after) if change.after else "(cleared)"
    return f"{where}: {_shown(change.before)} -> {after}"


async def plan_apply(budget: Budget, config: LimitsFile, *, prune: bool) -> list[Change]:
    """Every scope the file names, compared with Redis; with `prune` also the scopes it would clear."""
    plan: list[Change] = []
    named: set[tuple[str, str | None]] = set()
    for tenant, agent, limits in config.assignments():
        before = await budget.get_limits(tenant, agent=agent)
        action: Action = "unchanged" if before == limits else "set"
        plan.append(Change(tenant, agent, before, limits, action))
        named.add((tenant, agent))
    if prune:
        for tenant in config.tenants:
            for agent, limits in await limit_scopes(budget, tenant):
                if (tenant, agent) not in named:
                    plan.append(Change(tenant, agent, limits, [], "pruned"))
    return plan


async def apply_plan(budget: Budget, plan: list[Change]) -> None:
    """Write every change of `plan` that changes something (an unchanged scope is not written)."""
    for change in plan:
        if change.action == "set":
            await budget.set_limits(change.tenant, change.after, agent=change.agent)
        elif change.action == "pruned":
            await budget.clear_limits(change.tenant, agent=change.agent)


async def reseed_missing(budget: Budget, config: LimitsFile, *, dry_run: bool) -> list[Reseeded]:
    """``--only-missing``: per tenant of the file, the declared scopes Redis holds nothing for, written back.

    Written through `Reseeder.restore` (so each re-seed is logged at error level
    and published as ``limits_reseeded``); with `dry_run` only read.
    """
    reseeder = Reseeder(
        config,
        engine=budget.engine,
        keys=budget.keys,
        write=lambda tenant, agent, limits: budget.set_limits(tenant, limits, agent=agent),
    )
    out: list[Reseeded] = []
    for tenant in config.tenants:
        if not dry_run:
            out.append(await reseeder.restore(tenant))
            continue
        missing = await reseeder.missing(tenant)
        lost = bool(missing) and not await budget.engine.exists(budget.keys(tenant).ledger)
        out.append(Reseeded(tenant, missing, history_lost=lost))
    return out


def reseed_lines(results: list[Reseeded], *, source: object, dry_run: bool) -> list[str]:
    """One line per scope re-seeded, one per tenant whose spend history is gone, and a summary."""
    lines: list[str] = []
    for result in results:
        for agent, limits in result.written:
            verb = "would be re-seeded" if dry_run else "re-seeded"
            lines.append(f"{result.tenant}: {scope_words(agent)}: (missing) -> {_shown(limits)} ({verb})")
        if result.history_lost:
            lines.append(
                f"{result.tenant}: no spend history in Redis (lost, or never spent): spend before now is not counted"
            )
    scopes = sum(len(r.written) for r in results)
    tenants = sum(bool(r.written) for r in results)
    lost = sum(r.history_lost for r in results)
    summary = f"{scopes} scope(s) of {tenants} tenant(s) missing in Redis, {lost} with their spend history lost"
    lines.append(f"dry run: {summary}; nothing written" if dry_run else f"re-seeded from {source}: {summary}")
    return lines
