"""``slowburn-redis metrics``: a Prometheus endpoint for every tenant's limits, waits and spend.

Serves ``http://HOST:PORT/metrics`` (see `slowburn_redis.metrics` for what
is measured) until interrupted, or for ``--duration`` seconds.
"""

from __future__ import annotations

import asyncio

import click

from slowburn_redis.budget import Budget
from slowburn_redis.cli import params
from slowburn_redis.cli.runtime import BadInput, with_budget
from slowburn_redis.errors import MissingExtra


def _tenant_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(name for v in value if (name := params.tenant_name(ctx, param, v)) is not None)


@click.command("metrics")
@click.option("--port", type=click.IntRange(0, 65535), default=9108, show_default=True, help="Port to serve on.")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--tenant", "tenants", multiple=True, callback=_tenant_names, help="Only these tenants (repeat).")
@click.option("--interval", type=float, default=5.0, show_default=True, help="Seconds between limit reads.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: run until Ctrl-C).")
@click.pass_context
def metrics_command(
    ctx: click.Context, port: int, host: str, tenants: tuple[str, ...], interval: float, duration: float | None
) -> None:
    """Serve Prometheus metrics of every tenant with limits (or of --tenant ones) on --port."""
    if not interval > 0:
        raise BadInput("--interval must be positive")
    try:
        from prometheus_client import start_http_server

        from slowburn_redis.metrics import BudgetMetrics
    except ImportError:
        raise BadInput(str(MissingExtra("the metrics command", "metrics"))) from None

    async def serve(budget: Budget) -> None:
        metrics = BudgetMetrics(budget, list(tenants) or None, interval=interval)
        start_http_server(port, addr=host, registry=metrics.prometheus_registry())
        click.echo(f"serving metrics on http://{host}:{port}/metrics", err=True)
        task = asyncio.create_task(metrics.run())
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=duration)
        except TimeoutError:
            pass
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with_budget(ctx, serve)
