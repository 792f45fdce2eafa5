"""`slowburn-redis watch` and `report` on fakeredis (TCP) and a real Redis."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from slowburn_redis import Budget, BudgetExhausted, SyncBudget
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
    assert [line["type"] for line in lines] == ["event", "status"]  # the recent history, then one frame
    assert lines[0]["replayed"] is True and lines[0]["event"]["type"] == "limits_changed"  # type: ignore[index]
    (status,) = lines[-1]["statuses"]  # type: ignore[misc]
    assert status["tenant"] == "acme" and status["limits"][0]["used"] == 0.2

    every = run("watch", "--once")
    assert_exit(every)
    assert "acme" in every.stdout and "globex" in every.stdout and "usd 1/min" in every.stdout
    assert "acme limits of tenant set: usd 1/min" in every.stdout  # the recent history, in people's words
    assert "globex limits of tenant set: requests 5/min" in every.stdout


def spend_once_watched(run: Cli, channel: str, action: Callable[[], None]) -> threading.Thread:
    """A thread that waits until `watch` is subscribed to `channel` (a condition, not a time), then runs `action`."""
    client = run.client()

    def go() -> None:
        for _ in range(3000):
            if dict(client.pubsub_numsub(channel)).get(channel, 0) > 0:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("watch never subscribed")
        action()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_watch_follows_events_until_max_events(run: Cli, sync: SyncBudget, prefix: str) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    thread = spend_once_watched(run, f"{prefix}:{{acme}}:events", lambda: sync.acquire("acme", usd=0.8).commit(usd=0.8))
    # --duration is only a safety net: the run ends when the two threshold events (50 %, 75 %) have arrived.
    result = run("watch", "acme", "--json", "--interval", "0.3", "--max-events", "2", "--duration", "120")
    thread.join(10)
    assert_exit(result)
    lines = json_lines(result.stdout)
    events = [line["event"] for line in lines if line["type"] == "event"]
    levels = [e["level"] for e in events if e["type"] == "threshold"]  # type: ignore[index]
    assert levels == [50, 75]
    assert events[0]["type"] == "limits_changed"  # the recent history comes first (not counted by --max-events)
    assert events[1]["limit"] == "T:usd:60000"  # type: ignore[index]  # internal keys: only under --json
    statuses = [line["statuses"] for line in lines if line["type"] == "status"]
    assert len(statuses) >= 2
    last = statuses[-1][0]["limits"][0]  # type: ignore[index]
    assert last["used"] + last["reserved"] == 0.8  # the events came with the acquire; the commit may follow


def test_watch_speaks_dollars_and_limits_at_80_columns(server_url: str, prefix: str, sync: SyncBudget) -> None:
    run = Cli(server_url, prefix, env={"COLUMNS": "80"})
    assert_exit(run("limits", "set", "acme", "usd 5/day"))
    assert_exit(run("limits", "set", "acme", "--agent", "researcher", "usd 0.50/hour"))

    def spend() -> None:
        sync.acquire("acme", agent="researcher", usd=0.45).commit(usd=0.45)  # 50, 75 and 90 % of usd 0.5/hour
        with pytest.raises(BudgetExhausted):
            sync.acquire("acme", agent="researcher", usd=0.1, mode="reject")

    thread = spend_once_watched(run, f"{prefix}:{{acme}}:events", spend)
    result = run("watch", "acme", "--interval", "0.3", "--max-events", "4", "--duration", "120")
    thread.join(10)
    assert_exit(result)
    out = result.stdout
    for line in out.splitlines():
        assert len(line) <= 80, line
    assert "…" not in out
    text = " ".join(out.split())  # long event lines wrap at word boundaries
    assert "acme usd 0.5/hour (agent researcher): 90 % used" in text
    assert "exhausted usd 0.5/hour (agent researcher): $0.4500 used, $0.1000 requested" in text
    assert "$4.5500" in out and "$0.0500" in out  # what is left of each, whole
    for internal in ("A:researcher", "T:usd", "amount=", "450000000", "500000000", "ticket"):
        assert internal not in out, internal


def test_watch_live_view_draws_tables(run: Cli) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    result = run("watch", "--interval", "0.2", "--duration", "0.5")
    assert_exit(result)
    assert "acme" in result.stdout and "events" in result.stdout


def test_watch_bad_input(run: Cli) -> None:
    assert_bad_input(run("watch", "a b", "--once"), "tenant name")
    assert_bad_input(run("watch", "--interval", "0", "--once"), "--interval")
    assert_bad_input(run("watch", "--duration", "-1"), "--duration")
    assert_bad_input(run("watch", "--max-events", "0"), "--max-events")


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
