"""The ``slowburn-redis`` click group: global options and the list of commands.

Global options: ``--redis-url`` (env SLOWBURN_REDIS_URL, default
redis://localhost:6379/0), ``--prefix`` (env SLOWBURN_PREFIX, default "sb"),
``--version``. Each command lives in its own module.
"""

from __future__ import annotations

import click
from click.core import ParameterSource

from slowburn_redis import __version__
from slowburn_redis.cli.acl_cmd import acl_command
from slowburn_redis.cli.demo_cmd import demo_command
from slowburn_redis.cli.doctor_cmd import doctor_command
from slowburn_redis.cli.events_cmd import events_command
from slowburn_redis.cli.limits_cmd import limits_group
from slowburn_redis.cli.metrics_cmd import metrics_command
from slowburn_redis.cli.report_cmd import report_command
from slowburn_redis.cli.reset_cmd import reset_command
from slowburn_redis.cli.runtime import DEFAULT_URL, BadInput, CliState, quiet_logging
from slowburn_redis.cli.status_cmd import status_command
from slowburn_redis.cli.watch_cmd import watch_command
from slowburn_redis.errors import InvalidInput
from slowburn_redis.names import validate_name


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url",
    envvar="SLOWBURN_REDIS_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Redis to use (env SLOWBURN_REDIS_URL).",
)
@click.option(
    "--prefix", envvar="SLOWBURN_PREFIX", default="sb", show_default=True, help="Key prefix (env SLOWBURN_PREFIX)."
)
@click.version_option(__version__, prog_name="slowburn-redis")
@click.pass_context
def cli(ctx: click.Context, redis_url: str, prefix: str) -> None:
    """Fleet-wide LLM budgets in Redis: inspect, set and reset them, watch them live, run the demo.

    Exit codes: 0 ok; 1 Redis unreachable or refusing; 2 bad usage or input
    (nothing written); 3 not found (no such tenant); 4 doctor found something
    to fix; 5 doctor could not make every check.
    """
    try:
        validate_name("prefix", prefix)
    except InvalidInput as exc:
        raise BadInput(str(exc)) from None
    quiet_logging(ctx)
    given = ctx.get_parameter_source("redis_url") in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    ctx.obj = CliState(redis_url=redis_url, prefix=prefix, url_given=given)


for command in (limits_group, status_command, reset_command, watch_command, report_command, demo_command, acl_command):
    cli.add_command(command)
cli.add_command(events_command)
cli.add_command(doctor_command)
cli.add_command(metrics_command)
