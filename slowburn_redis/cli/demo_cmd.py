"""``slowburn-redis demo``: a fleet of workers sharing one small dollar window, on the embedded store by default."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import click

from slowburn_redis.budget import Budget
from slowburn_redis.cli import params, render
from slowburn_redis.cli.demo_view import LineView, LiveView, workers_table
from slowburn_redis.cli.runtime import BadInput, check_redis_url, run_async, state
from slowburn_redis.demo import (
    MAX_CALLS,
    MAX_PROCESSES,
    MAX_SECONDS,
    MAX_WORKERS,
    DemoConfig,
    run_demo,
    tcp_fake_server,
)
from slowburn_redis.limits import MAX_WINDOW

DEFAULT_SECONDS = 15.0


@contextlib.contextmanager
def _store(url: str | None, processes: int) -> Iterator[str | None]:
    """The URL workers use: `url`, a local fakeredis TCP server for embedded processes, or None (in-process)."""
    if url is not None:
        yield url
    elif processes:
        with tcp_fake_server() as local_url:
            yield local_url
    else:
        yield None


async def _demo(url: str | None, prefix: str, config: DemoConfig, plain: bool) -> None:
    budget = Budget.from_url(url, prefix=prefix) if url else Budget.embedded(prefix=prefix)
    console = render.console()
    view = LineView(console) if plain or not console.is_terminal else LiveView(console)
    try:
        with view:
            final = await run_demo(budget, config, view, url=url)
        if not view.shows_table:  # a live view's last frame already holds the table: print it once
            console.print(workers_table(final))
        paused = sum(w.pauses for w in final.workers.values())
        console.print(
            f"{final.calls} calls, ${final.usd:.4f} spent under {config.limit}; "
            f"workers paused {paused} time(s) and resumed when the window refilled."
        )
        report = await budget.report(config.tenant, since=min(math.ceil(final.elapsed) + 2, MAX_WINDOW))
        console.print()
        console.print(report.to_table())
    finally:
        await budget.aclose()


@click.command("demo")
@click.option(
    "--seconds",
    type=float,
    callback=params.positive,
    help=f"How long the fleet runs (default 15, or no limit with --calls; at most {MAX_SECONDS:g}).",
)
@click.option(
    "--calls",
    type=int,
    callback=params.positive,
    help=f"Each worker stops after this many calls, however long they take (at most {MAX_CALLS}).",
)
@click.option(
    "--workers",
    type=int,
    default=4,
    show_default=True,
    callback=params.positive,
    help=f"How many workers share the budget (at most {MAX_WORKERS}).",
)
@click.option(
    "--processes",
    type=int,
    default=0,
    show_default=True,
    help=f"Spread the workers over this many OS processes (0: all in this process; at most {MAX_PROCESSES}).",
)
@click.option(
    "--usd",
    type=float,
    default=0.01,
    show_default=True,
    callback=params.positive,
    help="Dollars the fleet may spend per window.",
)
@click.option("--window", type=float, default=5.0, show_default=True, help="The window, in seconds.")
@click.option("--tenant", default="demo", show_default=True, callback=params.tenant_name, help="Tenant to use.")
@click.option("--redis-url", "demo_url", help="Run on this Redis instead of the embedded store.")
@click.option("--plain", is_flag=True, help="Print lines instead of the live table.")
@click.pass_context
def demo_command(
    ctx: click.Context,
    seconds: float | None,
    calls: int | None,
    workers: int,
    processes: int,
    usd: float,
    window: float,
    tenant: str,
    demo_url: str | None,
    plain: bool,
) -> None:
    """Workers share one small dollar window: they pause when it is spent and resume when it refills.

    Runs on an embedded store (no Redis needed) unless a Redis is named: with
    --redis-url (here or before the command) or SLOWBURN_REDIS_URL.
    --processes spreads the workers over OS processes. Ends with the cost
    report.
    """
    if processes < 0:
        raise BadInput(f"--processes must not be negative, not {processes}")
    if processes > workers:
        raise BadInput(f"--processes ({processes}) must not exceed --workers ({workers})")
    if seconds is None and calls is None:
        seconds = DEFAULT_SECONDS
    try:
        config = DemoConfig(
            tenant=tenant, workers=workers, seconds=seconds, usd=usd, window=window, processes=processes, calls=calls
        )
        config.check()
        from slowburn_redis.limits import coerce_limits

        coerce_limits([config.limit])
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    cli_state = state(ctx)
    url = demo_url or (cli_state.redis_url if cli_state.url_given else None)
    if url is not None:
        check_redis_url(url)
    with _store(url, processes) as store_url:
        run_async(store_url or "embedded://", _demo(store_url, cli_state.prefix, config, plain))
