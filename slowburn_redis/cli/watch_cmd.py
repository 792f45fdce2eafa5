"""``slowburn-redis watch``: a live view of usage and events, redrawn in place.

The view refreshes every --interval seconds: the status of each tenant and
the latest events from the tenants' event channels. ``--json`` prints one
JSON object a line instead (``{"type": "status", ...}`` per refresh,
``{"type": "event", ...}`` per event); ``--once`` draws one frame and exits;
``--duration`` stops after that many seconds, ``--max-events`` after that
many live events. The view starts with the tenants' recent history (their
last 20 events from the durable trail, ``"replayed": true`` under ``--json``;
they do not count toward ``--max-events``), then follows them live with no gap
and no duplicate at the seam. Events read as ``exhausted usd 0.5/hour (agent researcher):
$0.4900 used, $0.0200 requested``: dollars and seconds, no internal keys or
ids (those are in ``--json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import deque
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from slowburn_redis import trail
from slowburn_redis.budget import Budget
from slowburn_redis.cli import params, render, words
from slowburn_redis.cli.runtime import with_budget
from slowburn_redis.cli.tenants import find_tenants
from slowburn_redis.events import Event
from slowburn_redis.limits import Limit
from slowburn_redis.status import Status
from slowburn_redis.tasks import cancel_and_wait

EVENTS_SHOWN = 12
RECENT_EVENTS = 20
"""Events of the trail a watch starts with, per tenant."""


def _json_line(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def event_text(event: Event, known: dict[str, Limit] | None = None) -> str:
    """One event as a line for people: time, tenant (and agent) and what happened, in dollars and seconds.

    ``12:00:01 acme exhausted usd 0.5/hour (agent researcher): $0.4900 used, $0.0200 requested``;
    the agent whose call it was is added (``(by agent writer)``) unless the
    limit already names it. `known` maps limit keys to their Limit (from the
    latest status) for events that carry no amount. Internal keys and ids are
    left to ``--json``.
    """
    text = words.event_words(event, known)
    if event.agent and f"(agent {event.agent})" not in text:
        text += f" (by agent {event.agent})"
    return f"{event.at:%H:%M:%S} {event.tenant} {text}"


def known_limits(statuses: list[Status]) -> dict[str, Limit]:
    """Limit key -> Limit of every row of `statuses`."""
    return {row.key: row.limit for status in statuses for row in status.limits}


def events_table(events: deque[Event], known: dict[str, Limit] | None = None) -> Table:
    """The latest events, newest last; long lines wrap rather than being cut."""
    table = Table(title="events", title_justify="left", show_header=False, box=None)
    table.add_column("event", overflow="fold")
    for event in events:
        style = "red" if event.type in ("exhausted", "waiting") else "green" if event.type == "resumed" else ""
        table.add_row(Text(event_text(event, known), style=style))
    if not events:
        table.add_row(Text("(no events yet)", style="dim"))
    return table


class Watcher:
    """Follows the event channels of the watched tenants and draws the view.

    `done` is set once `max_events` events have arrived (never when it is None).
    """

    def __init__(self, budget: Budget, tenant: str | None, *, as_json: bool, max_events: int | None = None) -> None:
        self.budget = budget
        self.tenant = tenant
        self.as_json = as_json
        self.events: deque[Event] = deque(maxlen=EVENTS_SHOWN)
        self.seen = 0
        self.max_events = max_events
        self.done = asyncio.Event()
        self._followers: dict[str, asyncio.Task[None]] = {}

    def _show(self, event: Event, *, replayed: bool) -> None:
        self.events.append(event)
        if self.as_json:
            _json_line({"type": "event", "event": event.model_dump(mode="json"), "replayed": replayed})

    async def _recent(self, tenant: str) -> str:
        """Show the tenant's last `RECENT_EVENTS` events of the trail; the id to follow live after."""
        engine, keys = self.budget.engine, self.budget.keys(tenant)
        since, _ = await trail.recent(engine, keys, RECENT_EVENTS)
        async for event in trail.history(engine, keys, tenant, since):
            self._show(event, replayed=True)
            since = event.id or since
        return since

    async def _follow(self, tenant: str, since: str) -> None:
        async for event in self.budget.events(tenant, since=since):
            if self.done.is_set():
                continue
            self._show(event, replayed=False)
            self.seen += 1
            if self.max_events is not None and self.seen >= self.max_events:
                self.done.set()

    async def refresh(self) -> list[Status]:
        """Read every watched tenant's status, following the events of tenants seen for the first time."""
        tenants = [self.tenant] if self.tenant is not None else await find_tenants(self.budget)
        for name in tenants:
            if name not in self._followers:
                since = await self._recent(name)
                self._followers[name] = asyncio.create_task(self._follow(name, since))
        return [await self.budget.status(name) for name in tenants]

    def view(self, statuses: list[Status], width: int | None = None) -> Group:
        """The status of each tenant and the latest events, laid out for `width` columns."""
        return Group(render.statuses_view(statuses, width), events_table(self.events, known_limits(statuses)))

    async def stop(self) -> None:
        await cancel_and_wait(list(self._followers.values()))


def _status_line(statuses: list[Status]) -> None:
    _json_line({"type": "status", "statuses": [s.model_dump(mode="json") for s in statuses]})


async def watch(
    budget: Budget,
    tenant: str | None,
    *,
    interval: float,
    duration: float | None,
    once: bool,
    as_json: bool,
    max_events: int | None = None,
) -> None:
    """Redraw the view every `interval` seconds until `duration` passes (forever if None), after one frame
    (`once`), or once `max_events` events have arrived (then one last frame that shows them)."""
    watcher = Watcher(budget, tenant, as_json=as_json, max_events=max_events)
    loop = asyncio.get_running_loop()
    end = None if duration is None else loop.time() + duration
    console = render.console()
    try:
        statuses = await watcher.refresh()
        if once:
            if as_json:
                _status_line(statuses)
            else:
                console.print(watcher.view(statuses, console.width))
            return
        live = None if as_json else Live(watcher.view(statuses, console.width), console=console, auto_refresh=False)
        if live is not None:
            live.start(refresh=True)
        try:
            while True:
                if as_json:
                    _status_line(statuses)
                elif live is not None:
                    live.update(watcher.view(statuses, console.width), refresh=True)
                pause = interval if end is None else min(interval, end - loop.time())
                if pause <= 0 or watcher.done.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.done.wait(), pause)
                statuses = await watcher.refresh()
        finally:
            if live is not None:
                live.stop()
    finally:
        await watcher.stop()


@click.command("watch")
@click.argument("tenant", required=False, callback=params.tenant_name)
@click.option(
    "--interval", type=float, default=1.0, show_default=True, callback=params.positive, help="Seconds between redraws."
)
@click.option("--duration", type=float, callback=params.positive, help="Stop after this many seconds.")
@click.option("--once", is_flag=True, help="Draw one frame and exit.")
@click.option(
    "--max-events",
    type=int,
    callback=params.positive,
    help="Stop after this many live events (and one last frame).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines: status snapshots and events.")
@click.pass_context
def watch_command(
    ctx: click.Context,
    tenant: str | None,
    interval: float,
    duration: float | None,
    once: bool,
    max_events: int | None,
    as_json: bool,
) -> None:
    """A live view of TENANT's usage and events (every tenant's without TENANT), redrawn in place."""
    with contextlib.suppress(KeyboardInterrupt):
        with_budget(
            ctx,
            lambda b: watch(
                b, tenant, interval=interval, duration=duration, once=once, as_json=as_json, max_events=max_events
            ),
        )
