"""Rendering for the terminal: amounts, bars, and the tables of limits and status."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.table import Table
from rich.text import Text

from slowburn_redis.limits import Limit
from slowburn_redis.status import LimitStatus, Status

BAR_WIDTH = 12


def console() -> Console:
    """A console on the current stdout; 120 columns wide when stdout is not a terminal."""
    out = sys.stdout
    width = None if out.isatty() else int(os.environ.get("COLUMNS", "120"))
    return Console(file=out, width=width, soft_wrap=False, highlight=False)


def print_json(data: Any) -> None:
    """Stable JSON on stdout: sorted keys, two-space indent, one trailing newline."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def amount(dimension: str, value: float) -> str:
    """An amount in its unit: ``$0.0123`` for usd (cents only from $1,000: ``$12,345.68``), ``1,500`` for counts."""
    if dimension == "usd":
        return f"${value:,.4f}" if abs(value) < 1000 else f"${value:,.2f}"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def seconds(value: float | None) -> str:
    """``-`` for None, else ``1.2s``, ``3m04s`` or ``2h05m``."""
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def bar(fraction: float, width: int = BAR_WIDTH) -> Text:
    """A bar of `width` cells filled to `fraction` (green, yellow past 75 %, red when spent), and the percent."""
    shown = max(0.0, min(1.0, fraction))
    filled = round(shown * width)
    style = "red" if fraction >= 1 else "yellow" if fraction >= 0.75 else "green"
    text = Text("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    text.append(f" {fraction * 100:4.0f}%")
    return text


def scope_label(row: LimitStatus) -> str:
    """``tenant``, ``agent <name>`` or ``model <name>``."""
    if row.scope == "model":
        return f"model {row.model}"
    return "tenant" if row.scope == "tenant" else f"agent {row.agent}"


NARROW = 110
"""Below this many columns `status_table` switches to its compact layout."""


def status_table(status: Status, width: int | None = None) -> Table:
    """Every limit of a Status: used, reserved, remaining, a bar, refill time, waiters.

    At `width` below `NARROW` columns (80 included) the table is compact: the
    scope goes under the limit, headers and the bar are shorter and the table
    has no vertical rules, so that no number is ever cut.
    """
    who = status.tenant + (f" / agent {status.agent}" if status.agent else "")
    title = f"{who}  (queue: {status.queue_length} waiting)"
    narrow = width is not None and width < NARROW
    columns: tuple[str, ...]
    if narrow:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        columns = ("limit", "used", "reserved", "left", "usage", "refill", "wait")
    else:
        table = Table(title=title, title_justify="left")
        columns = ("scope", "limit", "used", "reserved", "remaining", "usage", "refill in", "waiters")
    for column in columns:
        justify: JustifyMethod = "left" if column in ("scope", "limit", "usage", "refill", "refill in") else "right"
        if column in ("scope", "limit"):
            table.add_column(column, justify=justify, overflow="fold")
        else:
            table.add_column(column, justify=justify, no_wrap=True)
    for row in status.limits:
        dim = row.limit.dimension
        numbers = (
            amount(dim, row.used),
            amount(dim, row.reserved),
            amount(dim, row.remaining),
            bar(row.fraction, 6 if narrow else BAR_WIDTH),
            f"resets {row.resets}" if row.resets else seconds(row.refill_in),
            str(row.waiters),
        )
        if narrow:
            table.add_row(Text(f"{row.limit}\n") + Text(scope_label(row), style="dim"), *numbers)
        else:
            table.add_row(scope_label(row), str(row.limit), *numbers)
    return table


def status_view(status: Status, width: int | None = None) -> Table | Text:
    """The status table (compact below `NARROW` columns), or a line saying the scope has no limits."""
    if not status.limits:
        who = status.tenant + (f" / agent {status.agent}" if status.agent else "")
        return Text(f"{who}: no limits set")
    return status_table(status, width)


def statuses_view(statuses: list[Status], width: int | None = None) -> Group:
    """Several tenants' status, one after the other, laid out for `width` columns."""
    if not statuses:
        return Group(Text("no tenants with limits found"))
    return Group(*(status_view(s, width) for s in statuses))


def limits_table(tenant: str, scopes: list[tuple[str | None, list[Limit]]]) -> Table | Text:
    """The limits set on each scope of a tenant."""
    if not scopes:
        return Text(f"{tenant}: no limits set")
    table = Table(title=tenant, title_justify="left")
    table.add_column("scope")
    table.add_column("limit")
    for agent, limits in scopes:
        if agent is not None and agent.startswith("model "):
            label = agent  # a per-model scope, already in words
        else:
            label = "tenant" if agent is None else "every agent (*)" if agent == "*" else f"agent {agent}"
        for limit in limits:
            table.add_row(label, str(limit))
    return table
