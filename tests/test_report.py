"""Cost reports: totals are the sum of the ledger, `since` picks the period, every export parses."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from slowburn_redis import Budget, InvalidInput, InvalidName
from slowburn_redis import report as report_module
from slowburn_redis.report import Report, latex_escape

CALLS: list[tuple[str | None, str | None, float, float, int, int, str]] = [
    # agent, model, estimate usd, actual usd, input tokens, output tokens, how it settles
    ("researcher", "gpt-4o-mini", 0.02, 0.0131, 1200, 340, "commit"),
    ("researcher", "gpt-4o-mini", 0.02, 0.0007, 300, 21, "commit"),
    ("researcher", "gpt-4o", 0.05, 0.0312, 2100, 900, "commit"),
    ("writer", "gpt-4o", 0.05, 0.07, 2500, 1800, "commit"),  # overrun
    ("writer", "claude_x&y", 0.01, 0.0, 0, 0, "error"),  # refunded, with an entry
    (None, None, 0.003, 0.003, 10, 5, "commit"),  # tenant-level, no model
]


async def _fill(budget: Budget, tenant: str = "acme") -> None:
    await budget.set_limits(tenant, ["usd 10/hour"])
    for agent, model, est, usd, inp, out, how in CALLS:
        r = await budget.acquire(tenant, agent, usd=est, input_tokens=inp + 50, output_tokens=out + 50)
        if how == "commit":
            await r.commit(usd=usd, input_tokens=inp, output_tokens=out, model=model)
        else:
            # a release writes no model field: the model named in its metadata attributes it
            await r.release(outcome="error", metadata={"error": "RateLimitError", "model": model})


async def _ledger(budget: Budget, tenant: str = "acme") -> list[dict[str, str]]:
    return [fields for _, fields in await budget.engine.client.xrange(budget.key(tenant) + ":ledger")]


def _sum(entries: list[dict[str, str]], field: str) -> int:
    return sum(int(e.get(field) or 0) for e in entries)


async def test_totals_equal_the_sum_of_the_ledger(budget: Budget) -> None:
    await _fill(budget)
    entries = await _ledger(budget)
    assert len(entries) == len(CALLS)
    report = await budget.report("acme")
    assert report.entries == len(entries)
    assert report.since is None
    for field in ("input_tokens", "output_tokens", "tokens", "requests"):
        assert getattr(report.totals, field) == _sum(entries, field)
    assert report.totals.usd_nano == _sum(entries, "usd")
    assert report.totals.est_usd_nano == _sum(entries, "est_usd")
    assert report.totals.calls == len(entries)
    assert report.totals.outcomes == dict(Counter(e["outcome"] for e in entries))
    assert report.totals.outcomes["overrun"] == 1 and report.totals.outcomes["error"] == 1
    # per agent and per model: each group sums its own entries, and the groups add up to the totals
    for rows, field in ((report.agents, "agent"), (report.models, "model")):
        groups: dict[str, list[dict[str, str]]] = defaultdict(list)
        for e in entries:
            groups[e[field] or json.loads(e["meta"] or "{}").get(field, "")].append(e)
        assert {r.name or "" for r in rows} == set(groups)
        for row in rows:
            mine = groups[row.name or ""]
            assert row.calls == len(mine)
            assert row.usd_nano == _sum(mine, "usd")
            assert row.input_tokens == _sum(mine, "input_tokens")
            assert row.output_tokens == _sum(mine, "output_tokens")
        assert sum(r.usd_nano for r in rows) == report.totals.usd_nano
    # the actual dollars: what was committed, nano-exact
    expected = sum(round(usd * 10**9) for _, _, _, usd, _, _, how in CALLS if how == "commit")
    assert report.totals.usd_nano == expected
    assert report.totals.usd == pytest.approx(expected / 10**9)
    # rows are ordered by cost, most expensive first
    assert [r.usd_nano for r in report.agents] == sorted((r.usd_nano for r in report.agents), reverse=True)


async def test_since_keeps_only_recent_entries(budget: Budget) -> None:
    key = budget.key("acme") + ":ledger"
    now_s, _ = await budget.engine.client.time()
    now_ms = int(now_s) * 1000
    old = {"ts": "1", "agent": "a", "model": "m", "usd": "5000", "input_tokens": "7", "output_tokens": "3"}
    new = {"ts": "2", "agent": "a", "model": "m", "usd": "2000", "input_tokens": "2", "output_tokens": "1"}
    await budget.engine.client.xadd(key, old, id=f"{now_ms - 2 * 3600_000}-0")
    await budget.engine.client.xadd(key, {**old, "usd": "9"}, id=f"{now_ms - 40 * 60_000}-0")
    await budget.engine.client.xadd(key, new, id=f"{now_ms - 60_000}-0")
    everything = await budget.report("acme")
    last_hour = await budget.report("acme", since="1h")
    last_30m = await budget.report("acme", since=1800)
    assert (everything.entries, last_hour.entries, last_30m.entries) == (3, 2, 1)
    assert everything.totals.usd_nano == 7009
    assert last_hour.totals.usd_nano == 2009
    assert last_30m.totals.usd_nano == 2000 and last_30m.totals.input_tokens == 2
    assert last_hour.since is not None
    assert (last_hour.until - last_hour.since).total_seconds() == pytest.approx(3600, abs=0.01)


async def test_report_reads_the_ledger_in_pages(budget: Budget, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "PAGE", 3)
    await budget.set_unlimited("acme")  # this test is about reading the ledger, not limits
    for i in range(10):
        r = await budget.acquire("acme", f"a{i % 3}", usd=0.01)
        await r.commit(usd=0.001 * (i + 1), input_tokens=i, output_tokens=1, model="m")
    report = await budget.report("acme")
    assert report.entries == 10
    assert report.totals.usd_nano == sum(10**6 * (i + 1) for i in range(10))
    assert report.totals.input_tokens == sum(range(10))


async def test_bad_arguments_raise_typed_errors(budget: Budget) -> None:
    for since in ("yesterday", -5, 0, float("nan"), True, [1]):
        with pytest.raises(InvalidInput):
            await budget.report("acme", since=since)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        await budget.report("bad tenant}")


async def test_empty_ledger_gives_an_empty_report(budget: Budget) -> None:
    report = await budget.report("nobody", since="1d")
    assert report.entries == 0 and report.totals.usd_nano == 0 and report.agents == []
    assert json.loads(report.to_json())["entries"] == 0
    _check_latex(report.to_latex())
    assert list(csv.reader(io.StringIO(report.to_csv())))[-1][0] == "total"


async def test_exports_parse_and_agree(budget: Budget) -> None:
    await _fill(budget)
    report = await budget.report("acme")

    data = json.loads(report.to_json())
    assert Report.model_validate(data) == report
    assert data["totals"]["usd"] == pytest.approx(report.totals.usd_nano / 10**9)

    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    by_scope: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_scope[row["scope"]].append(row)
    assert len(by_scope["agent"]) == len(report.agents) and len(by_scope["model"]) == len(report.models)
    (total,) = by_scope["total"]
    for scope in ("agent", "model"):
        # the CSV dollars are exact: the rows add up to the total to the nano-dollar
        nano = sum(round(float(r["usd"]) * 10**9) for r in by_scope[scope])
        assert nano == round(float(total["usd"]) * 10**9) == report.totals.usd_nano
        assert sum(int(r["input_tokens"]) for r in by_scope[scope]) == int(total["input_tokens"])

    markdown = report.to_markdown()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    # two tables: header, rule, one line per row, total
    assert len(table_lines) == 2 * 3 + len(report.agents) + len(report.models)
    assert all(line.count(" | ") == 4 for line in table_lines if not line.startswith("|---"))
    assert "claude_x&y" in markdown

    latex = report.to_latex()
    _check_latex(latex)
    assert r"claude\_x\&y" in latex and "claude_x&y" not in latex

    # the human tables print dollars exactly, so their rows add up to their totals
    cost = [
        Decimal(line.split(" | ")[-1].strip(" |*"))
        for line in table_lines
        if not line.startswith(("|---", "| A", "| M"))
    ]
    agents_md, models_md = cost[: len(report.agents) + 1], cost[len(report.agents) + 1 :]
    for block in (agents_md, models_md):
        assert sum(block[:-1]) == block[-1] == Decimal(report.totals.usd_nano) / 10**9
    text = report.to_table()
    rows = [line.split() for line in text.splitlines()[2:] if not line.startswith("[")]
    assert rows[-1][0] == "TOTAL"
    assert sum(Decimal(r[-1]) for r in rows[: len(report.agents)]) == Decimal(rows[-1][-1])


def _check_latex(latex: str) -> None:
    """A balanced booktabs tabular: environments paired, braces balanced, every row of 5 cells."""
    assert latex.count(r"\begin{tabular}") == latex.count(r"\end{tabular}") == 1
    assert latex.count(r"\begin{table}") == latex.count(r"\end{table}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in latex
    unescaped = re.sub(r"\\[{}&%$#_]", "", latex)
    depth = 0
    for char in unescaped:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0
    body = latex.split(r"\toprule", 1)[1].split(r"\bottomrule", 1)[0]
    for line in body.splitlines():
        line = line.strip()
        if not line or line.startswith(r"\midrule") or line.startswith(r"\multicolumn"):
            continue
        assert line.endswith(r"\\"), line
        assert len(re.findall(r"(?<!\\)&", line)) == 4, line


def test_latex_escape_covers_every_special_character() -> None:
    escaped = latex_escape(r"a_b&c%d$e#f{g}h~i^j\k")
    assert escaped == (r"a\_b\&c\%d\$e\#f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no pdflatex on this host")
def test_latex_compiles(make_budget: Any, tmp_path: Path) -> None:
    sync = make_budget().sync()
    try:
        sync.call(_fill(sync.budget))
        latex = sync.report("acme").to_latex()
    finally:
        sync.close()
    doc = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + latex + "\\end{document}\n"
    (tmp_path / "r.tex").write_text(doc)
    done = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "r.tex"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]


def test_sync_report_matches(make_budget: Any) -> None:
    budget = make_budget()
    sync = budget.sync()
    try:
        sync.set_unlimited("acme")
        r = sync.acquire("acme", "a", usd=0.5)
        r.commit(usd=0.25, model="m", input_tokens=3, output_tokens=4)
        report = sync.report("acme", since="5m")
        assert report.entries == 1 and report.totals.usd_nano == 250_000_000 and report.models[0].name == "m"
    finally:
        sync.close()
