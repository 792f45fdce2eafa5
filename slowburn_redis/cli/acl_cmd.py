"""``slowburn-redis acl``: the Redis ACL rules that confine a tenant's workers and admin."""

from __future__ import annotations

import click

from slowburn_redis.cli import params, render
from slowburn_redis.cli.runtime import BadInput, state
from slowburn_redis.errors import InvalidInput


@click.command("acl")
@click.argument("tenant", callback=params.tenant_name)
@click.option("--worker-user", help="Name of the worker user (default <prefix>-worker-<tenant>).")
@click.option("--admin-user", help="Name of the admin user (default <prefix>-admin-<tenant>).")
@click.option("--json", "as_json", is_flag=True, help="Print the rules as a JSON list.")
@click.pass_context
def acl_command(
    ctx: click.Context, tenant: str, worker_user: str | None, admin_user: str | None, as_json: bool
) -> None:
    """Print the ACL SETUSER lines for TENANT's worker and admin users (pipe them to redis-cli).

    No password is set: add one with ``ACL SETUSER <user> >password``. Nothing
    is sent to Redis.
    """
    from slowburn_redis.acl import acl_rules

    try:
        rules = acl_rules(tenant, prefix=state(ctx).prefix, worker_user=worker_user, admin_user=admin_user)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None
    if as_json:
        render.print_json(rules)
    else:
        for rule in rules:
            click.echo(rule)
