"""``slowburn-redis status``: every limit of a tenant (or of all tenants) as it stands."""

from __future__ import annotations

import click

from slowburn_redis.budget import Budget
from slowburn_redis.cli import params, render
from slowburn_redis.cli.runtime import BadInput, NotFound, state, with_budget
from slowburn_redis.cli.tenants import find_tenants, no_such_tenant, tenant_exists
from slowburn_redis.status import Status


async def read_statuses(budget: Budget, tenant: str | None, agent: str | None = None) -> list[Status] | None:
    """The status of `tenant` (and `agent`), or of every tenant found with SCAN when `tenant` is None.

    None when `tenant` is named but nothing at all is stored for it.
    """
    if tenant is not None:
        status = await budget.status(tenant, agent=agent)
        if not status.limits and not await tenant_exists(budget, tenant):
            return None
        return [status]
    return [await budget.status(name, agent=agent) for name in await find_tenants(budget)]


@click.command("status")
@click.argument("tenant", required=False, callback=params.tenant_name)
@click.option("--agent", callback=params.agent_name, help="Only the limits that apply to this agent.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one Status, or a list of them without TENANT.")
@click.pass_context
def status_command(ctx: click.Context, tenant: str | None, agent: str | None, as_json: bool) -> None:
    """Used, reserved and remaining amount, refill time and waiters of every limit of TENANT.

    Without TENANT: every tenant that has limits (found with SCAN). A TENANT
    with nothing stored is an error: exit 3.
    """
    if agent is not None and tenant is None:
        raise BadInput("--agent needs a TENANT")
    statuses = with_budget(ctx, lambda budget: read_statuses(budget, tenant, agent))
    if statuses is None:
        assert tenant is not None
        raise NotFound(no_such_tenant(tenant, state(ctx).prefix))
    if as_json:
        dumped = [s.model_dump(mode="json") for s in statuses]
        render.print_json(dumped[0] if tenant is not None else dumped)
    else:
        console = render.console()
        console.print(render.statuses_view(statuses, console.width))
