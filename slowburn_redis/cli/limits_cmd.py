"""``slowburn-redis limits``: set, show, clear and apply limits."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import BaseModel

from slowburn_redis.budget import Budget
from slowburn_redis.cli import params, render
from slowburn_redis.cli.limits_plan import (
    Change,
    apply_plan,
    change_line,
    plan_apply,
    reseed_lines,
    reseed_missing,
    scope_name,
)
from slowburn_redis.cli.runtime import BadInput, with_budget
from slowburn_redis.cli.tenants import limit_scopes, model_scopes
from slowburn_redis.config import load_limits_file
from slowburn_redis.errors import InvalidInput
from slowburn_redis.limits import Limit


class ScopeLimits(BaseModel):
    """The limits set on one scope: agent None is the tenant, "*" every agent; `model` names a per-model scope."""

    agent: str | None
    limits: list[Limit]
    model: str | None = None


class TenantLimitsView(BaseModel):
    """What ``limits show --json`` prints."""

    tenant: str
    scopes: list[ScopeLimits]


class _EveryAgentCommand(click.Command):
    """A command whose --agent accepts "*" (the default of every agent)."""

    allow_every_agent = True


_agent_option = click.option(
    "--agent",
    callback=params.agent_name,
    help='An agent of the tenant; "*" is the default of every agent. Without it: the tenant itself.',
)
_model_option = click.option(
    "--model",
    callback=params.model_name,
    help="A model: its limits apply to every call of the tenant naming it (tenant-wide; not with --agent).",
)


def _where(agent: str | None, model: str | None) -> str:
    if model is not None:
        if agent is not None:
            raise BadInput("per-model limits apply to the whole tenant: give --agent or --model, not both")
        return f"model {model}"
    return scope_name(agent)


@click.group("limits")
def limits_group() -> None:
    """Set, show, clear and apply the limits of tenants and agents.

    A tenant with no limits stored is refused (LimitsMissing), never treated as
    unlimited; `limits unlimited TENANT` stores that choice explicitly.
    """


@limits_group.command("set", cls=_EveryAgentCommand)
@click.argument("tenant", callback=params.tenant_name)
@click.argument("limits", nargs=-1, required=True, callback=params.limits, metavar="LIMIT...")
@_agent_option
@_model_option
@click.pass_context
def set_command(ctx: click.Context, tenant: str, limits: list[Limit], agent: str | None, model: str | None) -> None:
    """Replace the limits of TENANT (or of one agent or model) with LIMIT... such as "usd 5/day" "requests 60/min".

    Every worker sees the change at once and waiters are woken to try again.
    """
    where = _where(agent, model)
    with_budget(ctx, lambda budget: budget.set_limits(tenant, limits, agent=agent, model=model))
    click.echo(f"{tenant}: {where} limits set: {', '.join(str(lim) for lim in limits)}")


@limits_group.command("unlimited", cls=_EveryAgentCommand)
@click.argument("tenant", callback=params.tenant_name)
@_agent_option
@click.pass_context
def unlimited_command(ctx: click.Context, tenant: str, agent: str | None) -> None:
    """Store that TENANT (or one agent) deliberately has no limit: its acquires are admitted unchecked.

    Without this, a scope with no limits stored is refused, never unlimited.
    """
    with_budget(ctx, lambda budget: budget.set_unlimited(tenant, agent=agent))
    click.echo(f"{tenant}: {scope_name(agent)} is unlimited (stored deliberately; `limits clear` undoes it)")


@limits_group.command("show", cls=_EveryAgentCommand)
@click.argument("tenant", callback=params.tenant_name)
@_agent_option
@_model_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def show_command(ctx: click.Context, tenant: str, agent: str | None, model: str | None, as_json: bool) -> None:
    """Show the limits set on TENANT: its own, every agent's default, each agent's and each model's.

    With --agent or --model: that scope only.
    """
    _where(agent, model)

    async def read(budget: Budget) -> list[ScopeLimits]:
        if model is not None:
            limits = await budget.get_limits(tenant, model=model)
            return [ScopeLimits(agent=None, model=model, limits=limits)] if limits else []
        if agent is not None:
            limits = await budget.get_limits(tenant, agent=agent)
            return [ScopeLimits(agent=agent, limits=limits)] if limits else []
        scopes = [ScopeLimits(agent=a, limits=lims) for a, lims in await limit_scopes(budget, tenant)]
        return scopes + [
            ScopeLimits(agent=None, model=m, limits=lims) for m, lims in await model_scopes(budget, tenant)
        ]

    scopes = with_budget(ctx, read)
    if as_json:
        render.print_json(TenantLimitsView(tenant=tenant, scopes=scopes).model_dump(mode="json"))
    else:
        rows = [(("model " + s.model) if s.model else s.agent, s.limits) for s in scopes]
        render.console().print(render.limits_table(tenant, rows))


@limits_group.command("clear", cls=_EveryAgentCommand)
@click.argument("tenant", callback=params.tenant_name)
@_agent_option
@_model_option
@click.pass_context
def clear_command(ctx: click.Context, tenant: str, agent: str | None, model: str | None) -> None:
    """Remove every limit of TENANT's own scope (or of one --agent, "*", or one --model)."""
    where = _where(agent, model)
    with_budget(ctx, lambda budget: budget.clear_limits(tenant, agent=agent, model=model))
    click.echo(f"{tenant}: {where} limits cleared")


@limits_group.command("apply")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option("--prune", is_flag=True, help="The file is the whole truth: clear the scopes of its tenants it omits.")
@click.option(
    "--only-missing",
    is_flag=True,
    help="Re-seed after Redis lost its state: write only the scopes Redis holds nothing for, and say so loudly.",
)
@click.pass_context
def apply_command(ctx: click.Context, file: Path, dry_run: bool, prune: bool, only_missing: bool) -> None:
    """Set the limits of every tenant and agent in FILE (YAML, or TOML if it ends in .toml).

    The whole file is validated before the first write; a file that is not a
    regular file, is over 1 MiB, nests too deeply, uses YAML aliases or names
    a key twice is refused (exit 2). Scopes the file does not name are left as
    they are (an empty list clears a scope), unless --prune: then every other
    scope of the file's tenants is cleared (tenants not in the file are never
    touched). Prints one line per scope: ``old -> new``, ``(unchanged)`` or
    ``-> (pruned)``. --dry-run prints the same lines and writes nothing.

    --only-missing re-seeds: it writes only the scopes of the file that Redis
    holds nothing for (never one that is stored, so a change made since
    stands), prints ``(missing) -> ...`` for each and names every tenant whose
    spend history (its ledger) is gone too; each re-seed is logged at error
    level and published as a ``limits_reseeded`` event.
    """
    if only_missing and prune:
        raise BadInput("--only-missing and --prune do not go together: re-seed first, then prune")
    try:
        config = load_limits_file(file)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None
    if only_missing:
        results = with_budget(ctx, lambda budget: reseed_missing(budget, config, dry_run=dry_run))
        for line in reseed_lines(results, source=file, dry_run=dry_run):
            click.echo(line)
        return

    async def run(budget: Budget) -> list[Change]:
        plan = await plan_apply(budget, config, prune=prune)
        if not dry_run:
            await apply_plan(budget, plan)
        return plan

    plan = with_budget(ctx, run)
    for change in plan:
        click.echo(change_line(change))
    changed = sum(c.action == "set" for c in plan)
    pruned = sum(c.action == "pruned" for c in plan)
    unchanged = len(plan) - changed - pruned
    counts = f"{changed} scope(s) set, {pruned} pruned, {unchanged} unchanged"
    if dry_run:
        click.echo(f"dry run: {counts} from {file}; nothing written")
    else:
        click.echo(f"applied {len(plan) - pruned} scope(s) from {file}: {counts}")
