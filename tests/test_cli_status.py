"""`slowburn-redis status` and `reset` on fakeredis (TCP) and a real Redis."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from slowburn_redis import Budget, Limit, LimitStatus, Status, SyncBudget
from slowburn_redis.cli import render
from tests.cli_support import Cli, assert_bad_input, assert_exit


@pytest.fixture
def run(server_url: str, prefix: str) -> Cli:
    return Cli(server_url, prefix)


@pytest.fixture
def sync(server_url: str, prefix: str) -> Iterator[SyncBudget]:
    budget = Budget.from_url(server_url, prefix=prefix).sync()
    yield budget
    budget.close()


def status_json(run: Cli, *args: str) -> Any:
    result = run("status", *args, "--json")
    assert_exit(result)
    return json.loads(result.stdout)


def rows_by_key(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in status["limits"]}


def wait_for_waiters(run: Cli, tenant: str, count: int) -> None:
    """Wait for the condition; the 60 s bound only turns a hang into a failure."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if status_json(run, tenant)["queue_length"] == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"never saw {count} waiter(s)")


class Waiter(threading.Thread):
    """An acquire waiting in a thread; `admitted` once it got in."""

    def __init__(self, sync: SyncBudget, tenant: str, **amounts: Any) -> None:
        super().__init__(daemon=True)
        self.sync, self.tenant, self.amounts = sync, tenant, amounts
        self.admitted = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            reservation = self.sync.acquire(self.tenant, timeout=30, **self.amounts)
            self.admitted.set()
            reservation.release()
        except BaseException as exc:
            self.error = exc


def test_status_shows_used_reserved_remaining_refill_and_waiters(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min", "requests 100/hour"))
    with sync.acquire("acme", agent="bot", usd=0.30) as r:
        r.commit(usd=0.25)
    open_reservation = sync.acquire("acme", usd=0.5)

    status = status_json(run, "acme")
    assert status["tenant"] == "acme"
    rows = rows_by_key(status)
    usd = rows["T:usd:60000"]
    assert (usd["used"], usd["reserved"], usd["remaining"]) == (0.25, 0.5, 0.25)
    assert usd["limit"] == {"dimension": "usd", "amount": "1", "window": 60.0}
    assert 0 < usd["refill_in"] <= 61  # a window returns capacity up to one bucket (W/60) late
    assert usd["waiters"] == 0
    assert (rows["T:requests:3600000"]["used"], rows["T:requests:3600000"]["reserved"]) == (1, 1)

    waiter = Waiter(sync, "acme", usd=0.5)
    waiter.start()
    wait_for_waiters(run, "acme", 1)
    assert rows_by_key(status_json(run, "acme"))["T:usd:60000"]["waiters"] == 1

    table = run("status", "acme")
    assert_exit(table)
    for text in ("acme", "usd 1/min", "$0.2500", "$0.5000", "requests 100/hour", "refill in", "█", "75%"):
        assert text in table.stdout, text
    assert "queue: 1 waiting" in table.stdout

    open_reservation.release()  # frees 0.5: the waiter gets in
    assert waiter.admitted.wait(60)
    waiter.join(60)
    assert waiter.error is None


def test_status_of_one_agent(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 5/day"))
    assert_exit(run("limits", "set", "acme", "--agent", "bot", "requests 10/min"))
    sync.acquire("acme", agent="bot", usd=1).commit(usd=1)
    status = status_json(run, "acme", "--agent", "bot")
    assert status["agent"] == "bot"
    assert sorted(rows_by_key(status)) == ["A:bot:requests:60000", "T:usd:86400000"]
    assert rows_by_key(status)["A:bot:requests:60000"]["used"] == 1


def test_status_without_tenant_lists_every_tenant(run: Cli, sync: SyncBudget) -> None:
    assert status_json(run) == []
    assert "no tenants with limits found" in run("status").stdout
    assert_exit(run("limits", "set", "acme", "usd 5/day"))
    assert_exit(run("limits", "set", "globex", "requests 9/min"))
    sync.acquire("globex").commit()
    statuses = status_json(run)
    assert [s["tenant"] for s in statuses] == ["acme", "globex"]
    assert rows_by_key(statuses[1])["T:requests:60000"]["used"] == 1
    table = run("status").stdout
    assert "acme" in table and "globex" in table and "requests 9/min" in table


def test_status_of_tenant_without_limits(run: Cli) -> None:
    assert_exit(run("limits", "set", "nobody", "usd 1/min"))
    assert_exit(run("limits", "clear", "nobody"))  # known (its admin trail stays), with no limits left
    assert status_json(run, "nobody")["limits"] == []
    assert "nobody: no limits set" in run("status", "nobody").stdout


def test_status_bad_input(run: Cli) -> None:
    assert_bad_input(run("status", "--agent", "bot"), "--agent needs a TENANT")
    assert_bad_input(run("status", "a*b"), "tenant name")
    assert_bad_input(run("status", "acme", "--agent", "*"), "agent name")


def test_reset_wakes_waiters_and_forgets_usage(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1", "requests 100"))  # lifetime caps: only a reset refills
    sync.acquire("acme", usd=1).commit(usd=1)
    waiter = Waiter(sync, "acme", usd=0.5)
    waiter.start()
    wait_for_waiters(run, "acme", 1)
    assert not waiter.admitted.is_set()

    result = run("reset", "acme", "--yes")
    assert_exit(result)
    assert "waiters woken" in result.stdout
    assert waiter.admitted.wait(60)
    waiter.join(60)
    assert waiter.error is None
    rows = rows_by_key(status_json(run, "acme"))
    assert rows["T:usd:0"]["used"] == 0


def test_reset_asks_first(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1"))
    sync.acquire("acme", usd=0.4).commit(usd=0.4)
    before = run.snapshot()
    declined = run("reset", "acme", input="n\n")
    assert declined.exit_code == 0  # declining is not an error (1 means Redis unreachable)
    assert "Reset the budget of acme and all its agents?" in declined.output
    assert declined.output.strip().endswith("nothing reset")
    assert run.snapshot() == before
    no_answer = run("reset", "acme", input="")  # stdin closed: the same as declining
    assert no_answer.exit_code == 0 and "nothing reset" in no_answer.output
    assert run.snapshot() == before
    accepted = run("reset", "acme", input="y\n")
    assert_exit(accepted)
    assert rows_by_key(status_json(run, "acme"))["T:usd:0"]["used"] == 0


def test_reset_one_dimension_or_agent(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1", "requests 10"))
    assert_exit(run("limits", "set", "acme", "--agent", "bot", "requests 5"))
    sync.acquire("acme", agent="bot", usd=0.5).commit(usd=0.5)
    assert_exit(run("reset", "acme", "--dimension", "usd", "--yes"))
    rows = rows_by_key(status_json(run, "acme", "--agent", "bot"))
    assert rows["T:usd:0"]["used"] == 0
    assert rows["T:requests:0"]["used"] == 1
    assert rows["A:bot:requests:0"]["used"] == 1
    assert_exit(run("reset", "acme", "--agent", "bot", "--yes"))
    rows = rows_by_key(status_json(run, "acme", "--agent", "bot"))
    assert rows["A:bot:requests:0"]["used"] == 0
    assert rows["T:requests:0"]["used"] == 1


def test_reset_bad_input_changes_nothing(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1"))
    sync.acquire("acme", usd=0.4).commit(usd=0.4)
    before = run.snapshot()
    assert_bad_input(run("reset", "acme", "--dimension", "gold9", "--yes"), "unknown dimension", "gold9")
    assert_bad_input(run("reset", "acme", "--agent", "*", "--yes"), "agent name")
    assert_bad_input(run("reset", "ac:me", "--yes"), "tenant name", "ac:me")
    assert run.snapshot() == before


def test_status_of_a_tenant_with_nothing_stored_is_exit_3(run: Cli) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    for args in (["status", "nosuchtenant"], ["status", "nosuchtenant", "--json"], ["report", "nosuch"]):
        result = run(*args)
        assert result.exit_code == 3, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no such tenant" in lines[0], result.stderr
        assert result.stdout == ""
    assert_exit(run("status", "acme"))
    assert_exit(run("report", "acme"))  # it exists, with an empty ledger: an empty report


def test_a_tenant_known_by_its_ledger_alone_is_found(run: Cli, sync: SyncBudget) -> None:
    assert_exit(run("limits", "set", "acme", "usd 1/min"))
    sync.acquire("acme", usd=0.1).commit(usd=0.1, model="m")
    assert_exit(run("limits", "clear", "acme"))
    shown = run("status", "acme")
    assert_exit(shown)
    assert "acme: no limits set" in shown.stdout
    assert_exit(run("report", "acme"))


def cells_ok(text: str, *wanted: str) -> None:
    """No line wider than 80 columns, no number cut short, each of `wanted` shown whole."""
    for line in text.splitlines():
        assert len(line) <= 80, line
    assert "…" not in text, text
    for word in wanted:
        assert word in text, (word, text)


def test_status_is_readable_at_80_columns(server_url: str, prefix: str, sync: SyncBudget) -> None:
    run = Cli(server_url, prefix, env={"COLUMNS": "80"})
    assert_exit(run("limits", "set", "acme", "usd 5/day", "tokens 1M/hour", "requests 60/min", "concurrency 8"))
    assert_exit(run("limits", "set", "acme", "--agent", "researcher", "usd 0.50/hour"))
    with sync.acquire("acme", agent="researcher", usd=0.05, tokens=2000) as r:
        r.commit(usd=0.039, tokens=3630)
    open_reservation = sync.acquire("acme", agent="researcher", usd=0.05, tokens=2000)
    result = run("status", "acme")
    assert_exit(result)
    cells_ok(
        result.stdout,
        "usd 5/day", "tokens 1000000/hour", "usd 0.5/hour", "agent researcher", "$0.0390", "$0.0500",
        "$4.9110", "3,630", "2,000", "994,370", "$0.4110",
    )  # fmt: skip
    wide = Cli(server_url, prefix, env={"COLUMNS": "140"})("status", "acme")
    assert "remaining" in wide.stdout and "$4.9110" in wide.stdout  # the full table where there is room
    open_reservation.release()


def test_extreme_amounts_stay_whole_at_80_columns() -> None:
    def row(agent: str | None, limit: str, used: float, reserved: float, remaining: float) -> LimitStatus:
        return LimitStatus(
            scope="tenant" if agent is None else "agent", agent=agent, limit=Limit.parse(limit), key="k",
            used=used, reserved=reserved, remaining=remaining, overrun=0, refill_in=86520, waiters=1234,
        )  # fmt: skip

    status = Status(
        tenant="acme", agent=None, at=datetime.now(UTC), queue_length=0,
        limits=[
            row(None, "usd 50000/week", 12345.6789, 1234.5, 36419.8211),
            row(None, "tokens 2B/hour", 1234567890, 2000000, 765432110),
            row("a" * 64, "usd 0.5/hour", 0.039, 0.05, 0.411),
        ],
    )  # fmt: skip
    out = io.StringIO()
    console = Console(file=out, width=80, soft_wrap=False, highlight=False)
    console.print(render.statuses_view([status], console.width))
    cells_ok(out.getvalue(), "$12,345.68", "$1,234.50", "$36,419.82", "1,234,567,890", "765,432,110", "$0.4110", "1234")
