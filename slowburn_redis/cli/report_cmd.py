"""``slowburn-redis report``: cost per agent and per model from a tenant's ledger."""

from __future__ import annotations

import click

from slowburn_redis.cli import params
from slowburn_redis.cli.runtime import with_budget

FORMATS = ("table", "json", "csv", "md", "latex")


@click.command("report")
@click.argument("tenant", callback=params.tenant_name)
@click.option("--since", callback=params.duration, help="Only commits this far back: 90s, 30m, 1h, 7d. Default: all.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True, help="Output format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.pass_context
def report_command(ctx: click.Context, tenant: str, since: float | None, fmt: str, as_json: bool) -> None:
    """Cost of TENANT attributed per agent and per model, from its ledger of commits."""
    report = with_budget(ctx, lambda budget: budget.report(tenant, since=since))
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
