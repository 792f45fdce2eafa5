"""How the demo shows itself: a rich live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from slowburn_redis.cli import render
from slowburn_redis.demo import DemoState

_STATE_STYLE = {"working": "green", "paused": "bold red", "done": "dim", "starting": "dim"}


def window_line(state: DemoState) -> Text:
    """The shared window: a bar of what is used and reserved, and how many workers wait."""
    text = Text(f"{state.elapsed:5.1f}s  {state.config.limit} ")
    rows = state.status.limits if state.status else []
    if rows:
        row = rows[0]
        text.append_text(render.bar(row.fraction))
        text.append(f"  refill in {render.seconds(row.refill_in)}")
    return text


def workers_table(state: DemoState) -> Table:
    """One row per worker: its process, calls, spend, state, pauses and time spent waiting."""
    table = Table(title_justify="left")
    for column in ("worker", "pid", "calls", "spent", "state", "pauses", "waited"):
        table.add_column(column, justify="left" if column in ("worker", "state") else "right")
    for w in state.workers.values():
        table.add_row(
            w.name,
            str(w.pid or "-"),
            str(w.calls),
            f"${w.usd:.4f}",
            Text(w.state, style=_STATE_STYLE.get(w.state, "")),
            str(w.pauses),
            f"{w.waited:.1f}s",
        )
    table.add_row("total", "", str(state.calls), f"${state.usd:.4f}", "", "", "", style="bold")
    return table


class LiveView:
    """A table of workers redrawn in place, with the latest state changes below it.

    Its last frame stays on the screen, table included (`shows_table`).
    """

    shows_table = True

    def __init__(self, console: Console, lines_shown: int = 8) -> None:
        self.console = console
        self.lines: list[Text] = []
        self.lines_shown = lines_shown
        self.live = Live(console=console, auto_refresh=False, transient=False)

    def _view(self, state: DemoState) -> Group:
        return Group(window_line(state), workers_table(state), *self.lines[-self.lines_shown :])

    def line(self, state: DemoState, text: str) -> None:
        self.lines.append(Text(f"{state.elapsed:5.1f}s  {text}", style="dim"))

    def tick(self, state: DemoState) -> None:
        self.live.update(self._view(state), refresh=True)

    def __enter__(self) -> LiveView:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.stop()


class LineView:
    """Plain output: each state change as a line, and the shared window once a second.

    It never draws the table of workers (`shows_table`): the caller prints it at the end.
    """

    shows_table = False

    def __init__(self, console: Console) -> None:
        self.console = console
        self._next_tick = 0.0

    def line(self, state: DemoState, text: str) -> None:
        self.console.print(f"{state.elapsed:5.1f}s  {text}")

    def tick(self, state: DemoState) -> None:
        if state.elapsed >= self._next_tick:
            self._next_tick = int(state.elapsed) + 1.0
            working = sum(w.state == "working" for w in state.workers.values())
            paused = sum(w.state == "paused" for w in state.workers.values())
            line = window_line(state)
            line.append(f"  working {working}, paused {paused}  calls {state.calls}  ${state.usd:.4f}")
            self.console.print(line)

    def __enter__(self) -> LineView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
