"""``slowburn-redis doctor``: check that the deployment can hold the guarantee, and say what to fix.

One line per check (``ok``, ``FINDING`` with what to do, or ``unknown`` with
why it could not be checked), then a summary. Exit codes: 0 every check
passed; 4 at least one finding; 5 no finding, but some checks could not be
made (fakeredis has no INFO or CONFIG; an ACL may refuse them); 1 Redis
unreachable; 2 bad input. Nothing is written to Redis.
"""

from __future__ import annotations

import click

from slowburn_redis.cli import params, render
from slowburn_redis.cli.doctor import Check, run_checks
from slowburn_redis.cli.runtime import EXIT_FINDINGS, EXIT_UNCHECKED, state, with_budget
from slowburn_redis.connection import redact_url


def exit_code(checks: list[Check]) -> int:
    """0 all ok, `EXIT_FINDINGS` with a finding, `EXIT_UNCHECKED` when only some checks could not be made."""
    if any(c.verdict == "finding" for c in checks):
        return EXIT_FINDINGS
    if any(c.verdict == "unknown" for c in checks):
        return EXIT_UNCHECKED
    return 0


def summary(checks: list[Check]) -> str:
    """``2 finding(s), 1 check(s) not made: exit 4``."""
    findings = sum(c.verdict == "finding" for c in checks)
    unchecked = sum(c.verdict == "unknown" for c in checks)
    if not findings and not unchecked:
        return f"all {len(checks)} checks passed"
    parts = [f"{findings} finding(s)"] + ([f"{unchecked} check(s) not made"] if unchecked else [])
    return ", ".join(parts) + f": exit {exit_code(checks)}"


@click.command("doctor")
@click.option("--tenant", callback=params.tenant_name, help="Check the ACL against this tenant's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the checks, the exit code.")
@click.pass_context
def doctor_command(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """Check the deployment: eviction policy, persistence, version, cluster, clocks, ACL, tenants missing limits.

    One line per check, each finding with what to do. Exit 0 when all is
    well, 4 with a finding, 5 when some checks could not be made (and
    nothing was found), 1 when Redis is unreachable. Writes nothing.
    """
    cli_state = state(ctx)
    url = cli_state.redis_url
    cluster_url = "+cluster://" in url.split("?")[0]
    checks = with_budget(
        ctx, lambda budget: run_checks(budget, name=redact_url(url), cluster_url=cluster_url, tenant=tenant)
    )
    code = exit_code(checks)
    if as_json:
        render.print_json({"exit_code": code, "checks": [c.model_dump(mode="json") for c in checks]})
    else:
        for check in checks:
            click.echo(check.line())
        click.echo(summary(checks))
    ctx.exit(code)
