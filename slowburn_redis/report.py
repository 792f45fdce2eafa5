"""Cost reports from a tenant's ledger: totals per agent and per model, exported for people and papers.

    report = await budget.report("acme", since="1h")
    print(report.to_markdown())

The ledger is the Redis Stream ``<base>:ledger`` (one entry per commit, or
per release given an outcome). An entry's amounts are integers as stored:
``usd`` in nano-dollars (10**9 per dollar). The report sums integers, so its
totals are exactly the sum of the entries it read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, computed_field

from slowburn_redis.errors import InvalidInput, InvalidLimit
from slowburn_redis.limits import UNITS, parse_window
from slowburn_redis.names import validate_name

if TYPE_CHECKING:
    from slowburn_redis.engine import Engine
    from slowburn_redis.keys import TenantKeys

PAGE = 1000
"""Entries read per XRANGE round trip."""

_NANO = UNITS["usd"]
_COLUMNS = ("calls", "input_tokens", "output_tokens", "tokens", "requests", "usd", "est_usd")


class Row(BaseModel):
    """Sums over a set of ledger entries (one agent, one model, or all of them)."""

    name: str | None = None
    """The agent or model; None for tenant-level calls (no agent) or calls with no model."""
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    tokens: int = 0
    requests: int = 0
    usd_nano: int = 0
    """Actual cost in nano-dollars (exact)."""
    est_usd_nano: int = 0
    """Reserved estimates in nano-dollars."""
    outcomes: dict[str, int] = Field(default_factory=dict)
    """Entries per outcome (ok, overrun, error, timeout, cancelled, abandoned...)."""
    custom: dict[str, int] = Field(default_factory=dict)
    """Committed amounts of custom dimensions (``tool_calls``, ``steps``...), whole units."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def usd(self) -> float:
        """Actual cost in dollars."""
        return self.usd_nano / _NANO

    @computed_field  # type: ignore[prop-decorator]
    @property
    def est_usd(self) -> float:
        """Reserved estimates in dollars."""
        return self.est_usd_nano / _NANO

    def add(self, entry: dict[str, str]) -> None:
        """Add one ledger entry (its fields as stored)."""
        self.calls += 1
        self.input_tokens += _int(entry, "input_tokens")
        self.output_tokens += _int(entry, "output_tokens")
        self.tokens += _int(entry, "tokens")
        self.requests += _int(entry, "requests")
        self.usd_nano += _int(entry, "usd")
        self.est_usd_nano += _int(entry, "est_usd")
        outcome = entry.get("outcome") or "ok"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        for pair in (entry.get("x") or "").split():
            dim, _, value = pair.partition("=")
            if value.lstrip("-").isdigit():
                self.custom[dim] = self.custom.get(dim, 0) + int(value)


class Report(BaseModel):
    """Cost of a tenant over a period, attributed per agent and per model."""

    tenant: str
    since: datetime | None
    """Start of the period (None: the whole ledger)."""
    until: datetime
    """Server time when the report was read."""
    entries: int
    first: datetime | None = None
    """Time of the first entry read."""
    last: datetime | None = None
    totals: Row
    agents: list[Row]
    models: list[Row]

    # exports ---------------------------------------------------------------

    def to_json(self, indent: int | None = 2) -> str:
        """The whole report as JSON (usd in dollars, usd_nano exact)."""
        return self.model_dump_json(indent=indent)

    def _rows(self) -> Iterable[tuple[str, str, Row]]:
        for row in self.agents:
            yield "agent", _agent_label(row.name), row
        for row in self.models:
            yield "model", _model_label(row.name), row
        yield "total", "", self.totals

    def to_csv(self) -> str:
        """One line per agent, per model, and the total: scope,name,calls,tokens...,usd,est_usd."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["scope", "name", *_COLUMNS])
        for scope, name, row in self._rows():
            writer.writerow(
                [
                    scope,
                    name,
                    row.calls,
                    row.input_tokens,
                    row.output_tokens,
                    row.tokens,
                    row.requests,
                    _usd(row.usd_nano),
                    _usd(row.est_usd_nano),
                ]
            )
        return out.getvalue()

    def _period(self) -> str:
        start = "the start of the ledger" if self.since is None else _stamp(self.since)
        return f"{start} to {_stamp(self.until)}"

    def _digits(self) -> int:
        """Decimals that show every dollar amount of the report exactly (2 to 9), so the rows add up."""
        return max([2, *(_decimals(r.usd_nano) for r in [self.totals, *self.agents, *self.models])])

    def _table_cells(self, rows: list[Row], label: Any) -> list[list[str]]:
        digits = self._digits()
        return [_cells(label(r.name), r, digits) for r in rows]

    def _total_cells(self, name: str) -> list[str]:
        return _cells(name, self.totals, self._digits())

    def to_markdown(self) -> str:
        """Two Markdown tables (per agent, per model) with a total line."""
        header = "| {} | Calls | Input tokens | Output tokens | Cost (USD) |\n|---|---:|---:|---:|---:|\n"
        total_line = "| " + " | ".join(f"**{cell}**" for cell in self._total_cells("Total")) + " |\n"
        parts = [f"## LLM cost: tenant `{self.tenant}`\n\n", f"{self.entries} ledger entries, {self._period()}.\n\n"]
        for title, rows, label in (("Agent", self.agents, _agent_label), ("Model", self.models, _model_label)):
            parts.append(header.format(title))
            for cells in self._table_cells(rows, label):
                parts.append("| " + " | ".join(_md_escape(c) for c in cells) + " |\n")
            parts.append(total_line + "\n")
        if self.totals.custom:
            parts.append(f"Custom dimensions, in total: {self._custom_words()}.\n")
        return "".join(parts).rstrip("\n") + "\n"

    def _custom_words(self) -> str:
        """``tool_calls 12, steps 3``: the custom dimensions committed over the whole report."""
        return ", ".join(f"{dim} {value:,}" for dim, value in sorted(self.totals.custom.items()))

    def to_latex(self) -> str:
        """A booktabs table (needs ``\\usepackage{booktabs}``): agents, then models, then the total."""
        caption = f"LLM cost of tenant \\texttt{{{latex_escape(self.tenant)}}}, {latex_escape(self._period())}"
        label = "".join(c if c.isalnum() else "-" for c in self.tenant)
        lines = [
            r"\begin{table}[ht]",
            r"\centering",
            r"\caption{" + caption + "}",
            r"\label{tab:llm-cost-" + label + "}",
            r"\begin{tabular}{lrrrr}",
            r"\toprule",
            r" & Calls & Input tokens & Output tokens & Cost (USD) \\",
        ]
        for title, rows, name in (("By agent", self.agents, _agent_label), ("By model", self.models, _model_label)):
            lines += [r"\midrule", r"\multicolumn{5}{l}{\emph{" + title + r"}} \\"]
            lines += [_latex_row(r"\quad " + latex_escape(cells[0]), cells) for cells in self._table_cells(rows, name)]
        lines += [
            r"\midrule",
            _latex_row(r"\textbf{Total}", self._total_cells("")),
            r"\bottomrule",
            r"\end{tabular}",
            r"\end{table}",
        ]
        return "\n".join(lines) + "\n"

    def to_table(self) -> str:
        """Plain aligned text (agents, models, total) for a terminal."""
        head = ["", "calls", "input tokens", "output tokens", "usd"]
        body: list[list[str]] = []
        for title, rows, label in (("agent", self.agents, _agent_label), ("model", self.models, _model_label)):
            body.append([f"[{title}]", "", "", "", ""])
            body.extend(self._table_cells(rows, label))
        body.append(self._total_cells("TOTAL"))
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

        def fmt(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )

        title = f"LLM cost of tenant {self.tenant}: {self.entries} entries, {self._period()}"
        custom = [f"custom dimensions: {self._custom_words()}"] if self.totals.custom else []
        return "\n".join([title, fmt(head), *(fmt(r) for r in body), *custom]) + "\n"


MAX_SINCE = 100 * 365 * 86400
"""The longest look back a report takes (100 years): anything longer means the whole ledger."""


def since_seconds(since: float | str | None) -> float | None:
    """`since` as seconds back from now: None, a number of seconds, or a duration like "1h"."""
    if since is None:
        return None
    if isinstance(since, bool) or not isinstance(since, (int, float, str)):
        raise InvalidInput(f"since must be seconds or a duration like '1h', not {since!r}")
    if isinstance(since, str):
        try:
            seconds = parse_window(since)
        except InvalidLimit:
            raise InvalidInput(f"bad since {since!r}: use a duration such as 30m, 1h, 1d or 7d") from None
        assert seconds is not None
        return seconds
    try:
        seconds = float(since)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_SINCE:
        shown = str(since) if len(str(since)) <= 40 else str(since)[:40] + "..."
        raise InvalidInput(f"since must be a number of seconds from 0 to {MAX_SINCE} (100 years), not {shown}")
    return seconds


async def build_report(engine: Engine, keys: TenantKeys, tenant: str, *, since: float | str | None = None) -> Report:
    """Read the tenant's ledger (entries of the last `since` seconds, or all) and sum it.

    The period ends at the server time when reading starts; entries added
    while it reads are left out. Bad arguments raise InvalidInput before
    Redis is touched.
    """
    validate_name("tenant", tenant)
    seconds = since_seconds(since)
    key = keys.ledger
    now_ms = await engine.server_time_ms()
    start_ms = None if seconds is None else now_ms - round(seconds * 1000)
    low = "-" if start_ms is None else f"{max(start_ms, 0)}-0"
    high = str(now_ms)
    totals = Row()
    agents: dict[str, Row] = {}
    models: dict[str, Row] = {}
    count = 0
    first: str | None = None
    last: str | None = None
    while True:
        page = await engine.xrange(key, low, high, PAGE)
        for entry_id, fields in page:
            count += 1
            first = first or entry_id
            last = entry_id
            totals.add(fields)
            agent, model = fields.get("agent", ""), fields.get("model") or _meta_model(fields.get("meta"))
            agents.setdefault(agent, Row(name=agent or None)).add(fields)
            models.setdefault(model, Row(name=model or None)).add(fields)
        if len(page) < PAGE:
            break
        ms, _, seq = page[-1][0].partition("-")
        low = f"{ms}-{int(seq or 0) + 1}"
    return Report(
        tenant=tenant,
        since=None if start_ms is None else _time(start_ms),
        until=_time(now_ms),
        entries=count,
        first=None if first is None else _time(int(first.partition("-")[0])),
        last=None if last is None else _time(int(last.partition("-")[0])),
        totals=totals,
        agents=_ordered(agents.values()),
        models=_ordered(models.values()),
    )


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped, for use in running text or a table cell."""
    out = []
    for char in text:
        if char in _LATEX:
            out.append(_LATEX[char])
        else:
            out.append(char)
    return "".join(out)


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}


def _cells(name: str, row: Row, digits: int) -> list[str]:
    money = _usd(row.usd_nano)[: -9 + digits] if digits < 9 else _usd(row.usd_nano)
    return [name, str(row.calls), f"{row.input_tokens:,}", f"{row.output_tokens:,}", money]


def _decimals(nano: int) -> int:
    """Decimals needed to write `nano` nano-dollars exactly in dollars."""
    frac = nano % _NANO
    if frac == 0:
        return 0
    digits = 9
    while frac % 10 == 0:
        frac //= 10
        digits -= 1
    return digits


def _latex_row(first: str, cells: list[str]) -> str:
    """A tabular row: `first` (already escaped), then the numeric cells with LaTeX-safe thousands separators."""
    return " & ".join([first, *(c.replace(",", "{,}") for c in cells[1:])]) + r" \\"


def _ordered(rows: Iterable[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (-r.usd_nano, r.name or ""))


def _meta_model(meta: str | None) -> str:
    """A release writes no model field; the LLM layer names the model in the entry's metadata."""
    if not meta or '"model"' not in meta:
        return ""
    try:
        model = json.loads(meta).get("model")
    except (ValueError, AttributeError):
        return ""
    return model if isinstance(model, str) else ""


def _int(entry: dict[str, str], name: str) -> int:
    value = entry.get(name)
    return int(value) if value else 0


def _usd(nano: int) -> str:
    whole, frac = divmod(nano, _NANO)
    return f"{whole}.{frac:09d}"


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _agent_label(name: str | None) -> str:
    return name or "(tenant)"


def _model_label(name: str | None) -> str:
    return name or "(no model)"


def _md_escape(text: str) -> str:
    return text.replace("|", r"\|")
