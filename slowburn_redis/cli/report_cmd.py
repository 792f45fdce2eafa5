"""``slowburn-redis report``: cost per agent and per model from a tenant's ledger."""

from __future__ import annotations

import click

from slowburn_redis.budget import Budget
from slowburn_redis.cli import params
from slowburn_redis.cli.runtime import NotFound, state, with_budget
from slowburn_redis.cli.tenants import no_such_tenant, tenant_exists
from slowburn_redis.report import Report

FORMATS = ("table", "json", "csv", "md", "latex")


@click.command("report")
@click.argument("tenant", callback=params.tenant_name)
@click.option("--since", callback=params.duration, help="Only commits this far back: 90s, 30m, 1h, 7d. Default: all.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.pass_context
def report_command(ctx: click.Context, tenant: str, since: float | None, fmt: str, as_json: bool) -> None:
    """Cost of TENANT attributed per agent and per model, from its ledger of commits.

    A TENANT with nothing stored is an error: exit 3.
    """

    async def read(budget: Budget) -> Report | None:
        report = await budget.report(tenant, since=since)
        if report.totals.calls == 0 and not await tenant_exists(budget, tenant):
            return None
        return report

    report = with_budget(ctx, read)
    if report is None:
        raise NotFound(no_such_tenant(tenant, state(ctx).prefix))
    if as_json:
        fmt = "json"
    exports = {
        "table": report.to_table,
        "json": report.to_json,
        "csv": report.to_csv,
        "md": report.to_markdown,
        "latex": report.to_latex,
    }
    text = exports[fmt]()
    click.echo(text.rstrip("\n"))
