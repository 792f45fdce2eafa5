"""``slowburn-redis reset``: forget what a tenant (or agent) has used, and wake its waiters."""

from __future__ import annotations

import click

from slowburn_redis.cli import params
from slowburn_redis.cli.runtime import with_budget


def _confirmed(question: str) -> bool:
    """Ask `question`; False when declined, interrupted or stdin is closed."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        click.echo()
        return False


@click.command("reset")
@click.argument("tenant", callback=params.tenant_name)
@click.option("--agent", callback=params.agent_name, help="Only this agent's windows.")
@click.option("--dimension", callback=params.dimension, help="Only the windows of this dimension (usd, tokens...).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def reset_command(ctx: click.Context, tenant: str, agent: str | None, dimension: str | None, yes: bool) -> None:
    """Reset the used amounts of TENANT (or one --agent, or one --dimension) and wake every waiter.

    Concurrency (calls in flight) is reset only when named with --dimension.
    Without --yes it asks first; declining (or no answer on stdin) prints
    "nothing reset" and exits 0.
    """
    what = (
        tenant
        + (f" agent {agent}" if agent else " and all its agents")
        + (f", dimension {dimension}" if dimension else "")
    )
    if not yes and not _confirmed(f"Reset the budget of {what}?"):
        click.echo("nothing reset")
        return
    count = with_budget(ctx, lambda budget: budget.reset(tenant, agent=agent, dimension=dimension))
    click.echo(f"reset {count} window(s) of {what}; waiters woken")
