"""``slowburn-redis events``: a tenant's durable event trail, then its events live.

Prints the trail (from ``--since``: a duration such as 1h, or a stream id to
resume after; default: the whole trail, its last 10,000 events), then follows
the event channel with no gap and no duplicate at the seam (``--no-follow``
stops after the history). Lines read as ``2026-11-23 11:35:02 acme threshold
usd 0.5/hour (agent researcher): 90 % used``: dollars and seconds in the
operator's words, times on the Redis server's clock in UTC. ``--json`` prints
one event a line (``{"type": "event", "event": {...}}``, with its stream id and
stored units). A tenant with nothing stored and no trail is an error under
``--no-follow`` (exit 3); when following, the command waits for its first event.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncGenerator
from typing import Any

import click

from slowburn_redis import trail
from slowburn_redis.budget import Budget
from slowburn_redis.cli import params, words
from slowburn_redis.cli.runtime import BadInput, NotFound, state, with_budget
from slowburn_redis.cli.tenants import no_such_tenant, tenant_exists
from slowburn_redis.events import Event

WHOLE_TRAIL = "0-0"


def event_line(event: Event) -> str:
    """One event for people: ``2026-11-23 11:35:02 acme exhausted usd 0.5/hour (agent researcher): ...``."""
    text = words.event_words(event)
    if event.type == "threshold":
        text = "threshold " + text
    if event.agent and f"(agent {event.agent})" not in text:
        text += f" (by agent {event.agent})"
    return f"{event.at:%Y-%m-%d %H:%M:%S} {event.tenant} {text}"


def _json_line(event: Event) -> None:
    data: dict[str, Any] = {"type": "event", "event": event.model_dump(mode="json")}
    sys.stdout.write(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | float:
    """A duration (seconds back) or a stream id ``<ms>-<seq>``; none: the whole trail."""
    if value is None:
        return WHOLE_TRAIL
    text = value.strip()
    if trail.is_stream_id(text):
        return text
    try:
        return float(params.duration(ctx, param, text) or 0)
    except BadInput:
        raise BadInput(
            f"bad --since {value!r}: a duration such as 90s, 30m, 1h or 2d, or a stream id such as 1700000000000-0"
        ) from None


async def _events(budget: Budget, tenant: str, since: str | float, follow: bool) -> AsyncGenerator[Event, None]:
    if follow:
        async for event in budget.events(tenant, since=since):
            yield event
        return
    async for event in trail.history(budget.engine, budget.keys(tenant), tenant, since):
        yield event


async def show_events(budget: Budget, tenant: str, *, since: str | float, follow: bool, as_json: bool) -> int:
    """Print the trail from `since` (then live events when `follow`); the number of events printed."""
    printed = 0
    stream = _events(budget, tenant, since, follow)
    try:
        async for event in stream:
            if as_json:
                _json_line(event)
            else:
                click.echo(event_line(event))
            printed += 1
    finally:
        await stream.aclose()
    if not follow and printed == 0 and not await tenant_exists(budget, tenant):
        return -1
    return printed


@click.command("events")
@click.argument("tenant", callback=params.tenant_name)
@click.option(
    "--since",
    callback=since_option,
    help="History this far back (90s, 30m, 1h, 7d) or after a stream id. Default: the whole trail.",
)
@click.option("--follow/--no-follow", default=True, show_default=True, help="Go on with live events after the history.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line, with stream ids and stored units.")
@click.pass_context
def events_command(ctx: click.Context, tenant: str, since: str | float, follow: bool, as_json: bool) -> None:
    """TENANT's durable event trail, then its events live (thresholds, exhausted, waiting, resets...).

    A TENANT with nothing stored and no trail is an error with --no-follow: exit 3.
    """
    printed = 0
    with contextlib.suppress(KeyboardInterrupt):
        printed = with_budget(ctx, lambda b: show_events(b, tenant, since=since, follow=follow, as_json=as_json))
    if printed < 0:
        raise NotFound(no_such_tenant(tenant, state(ctx).prefix))
    if printed == 0 and not follow and not as_json:
        click.echo("(no events)")
