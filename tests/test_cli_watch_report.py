"""`slowburn-redis watch` and `report` on fakeredis (TCP) and a real Redis."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator

import pytest

from slowburn_redis import Budget, SyncBudget
from tests.cli_support import Cli, assert_bad_input, assert_exit


@pytest.fixture
def run(server_url: str, prefix: str) -> Cli:
    return Cli(server_url, prefix)


@pytest.fixture
def sync(server_url: str, prefix: str) -> Iterator[SyncBudget]:
    budget = Budget.from_url(server_url, prefix=prefix).sync()
    yield budget
    budget.close()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_watch_once(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    assert_exit(run("limits", "set", "globex", "requests 5/min"))
    sync.acquire("acme", usd=0.2).commit(usd=0.2)

    lines = json_lines(run("watch", "acme", "--once", "--json").stdout)
    assert len(lines) == 1 and lines[0]["type"] == "status"
    (status,) = lines[0]["statuses"]  # type: ignore[misc]
    assert status["tenant"] == "acme" and status["limits"][0]["used"] == 0.2

    every = run("watch", "--once")
    assert_exit(every)
    assert "acme" in every.stdout and "globex" in every.stdout and "usd 1/min" in every.stdout
    assert "(no events yet)" in every.stdout


def test_watch_follows_events_until_duration(run: Cli, sync: SyncBudget, prefix: str) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    channel = f"{prefix}:{{acme}}:events"
    client = run.client()

    def spend() -> None:
        for _ in range(300):  # wait until watch is subscribed, then cross 50 % and 75 %
            if dict(client.pubsub_numsub(channel)).get(channel, 0) > 0:
                break
            time.sleep(0.02)
        sync.acquire("acme", usd=0.8).commit(usd=0.8)

    thread = threading.Thread(target=spend, daemon=True)
    thread.start()
    started = time.monotonic()
    result = run("watch", "acme", "--json", "--interval", "0.3", "--duration", "3")
    thread.join(10)
    assert_exit(result)
    assert time.monotonic() - started < 30
    lines = json_lines(result.stdout)
    events = [line["event"] for line in lines if line["type"] == "event"]
    levels = [e["level"] for e in events if e["type"] == "threshold"]  # type: ignore[index]
    assert levels == [50, 75]
    statuses = [line["statuses"] for line in lines if line["type"] == "status"]
    assert len(statuses) >= 2
    assert statuses[-1][0]["limits"][0]["used"] == 0.8  # type: ignore[index]


def test_watch_live_view_draws_tables(run: Cli) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    result = run("watch", "--interval", "0.2", "--duration", "0.5")
    assert_exit(result)
    assert "acme" in result.stdout and "events" in result.stdout


def test_watch_bad_input(run: Cli) -> None:
    assert_bad_input(run("watch", "a b", "--once"), "tenant name")
    assert_bad_input(run("watch", "--interval", "0", "--once"), "--interval")
    assert_bad_input(run("watch", "--duration", "-1"), "--duration")


@pytest.fixture
def ledger(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 10/day"))
    for agent, model, usd, tin, tout in [
        ("researcher", "gpt-4o-mini", 0.25, 1000, 200),
        ("researcher", "gpt-4o", 1.5, 3000, 500),
        ("writer", "gpt-4o-mini", 0.125, 800, 100),
    ]:
        sync.acquire("acme", agent=agent, usd=2).commit(usd=usd, input_tokens=tin, output_tokens=tout, model=model)


@pytest.mark.usefixtures("ledger")
def test_report_formats(run: Cli) -> None:
    as_json = run("report", "acme", "--format", "json")
    assert_exit(as_json)
    data = json.loads(as_json.stdout)
    assert data["tenant"] == "acme"
    again = json.loads(run("report", "acme", "--json").stdout)
    assert {k: v for k, v in again.items() if k != "until"} == {k: v for k, v in data.items() if k != "until"}
    assert json.loads(run("report", "acme", "--since", "1h", "--json").stdout)["tenant"] == "acme"

    table = run("report", "acme").stdout
    for text in ("researcher", "writer", "gpt-4o-mini", "gpt-4o", "1.875"):
        assert text in table, text

    rows = list(csv.reader(io.StringIO(run("report", "acme", "--format", "csv").stdout)))
    assert any("researcher" in row for row in rows) and any("writer" in row for row in rows)

    markdown = run("report", "acme", "--format", "md").stdout
    assert "| researcher |" in markdown.replace("|  ", "| ") or "researcher" in markdown
    assert markdown.count("|---") >= 2

    latex = run("report", "acme", "--format", "latex").stdout
    assert "\\toprule" in latex and "researcher" in latex


def test_report_bad_input(run: Cli) -> None:
    assert_bad_input(run("report", "acme", "--since", "yesterday"), "--since", "yesterday")
    assert_bad_input(run("report", "acme", "--since", "-1h"), "--since")
    assert_bad_input(run("report", "ac me"), "tenant name")
    bad_format = run("report", "acme", "--format", "xml")
    assert bad_format.exit_code == 2 and "xml" in bad_format.stderr
