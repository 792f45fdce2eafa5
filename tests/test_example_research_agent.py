"""examples/research_agent.py runs end to end, pauses on the dollar window, and its numbers add up."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import sync_client

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "research_agent.py"
CALL = re.compile(r"call +(\d+) (\S+) +in= *(\d+) out= *(\d+) usd=(\d+)\.(\d{9})$")


def _run(*args: str, url: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SLOWBURN_REDIS_URL"}
    if url:
        env["SLOWBURN_REDIS_URL"] = url
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--questions", "4", "--format", "json", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _check(output: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The output's own numbers: call lines, pauses, the JSON report and the RESULT line agree."""
    lines = output.splitlines()
    calls = [m for m in (CALL.search(line) for line in lines) if m]
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT ") :])
    start = lines.index("{")
    end = start + lines[start:].index("}")
    report = json.loads("\n".join(lines[start : end + 1]))

    # every call printed once, and the report counts exactly those
    assert [int(m[1]) for m in calls] == list(range(1, len(calls) + 1))
    assert len(calls) == result["calls"] == report["entries"] == report["totals"]["calls"] == 10
    call_nano = [int(m[5]) * 10**9 + int(m[6]) for m in calls]
    assert sum(call_nano) == result["usd_nano"] == report["totals"]["usd_nano"] > 0
    assert sum(int(m[3]) for m in calls) == report["totals"]["input_tokens"]
    assert sum(int(m[4]) for m in calls) == report["totals"]["output_tokens"]
    # per agent: the printed calls of each agent add up to its report row, and the rows to the total
    per_agent: dict[str, int] = {}
    for match, nano in zip(calls, call_nano, strict=True):
        per_agent[match[2]] = per_agent.get(match[2], 0) + nano
    assert {row["name"]: row["usd_nano"] for row in report["agents"]} == per_agent
    assert sum(per_agent.values()) == report["totals"]["usd_nano"]
    assert sum(row["usd_nano"] for row in report["models"]) == report["totals"]["usd_nano"]
    # the dollar window forced pauses, printed as they happened, and every pause resumed
    pauses = [line for line in lines if " PAUSE " in line]
    assert len(pauses) == result["pauses"] >= 1
    assert any("T:usd:2000" in line for line in pauses)
    assert sum(1 for line in lines if " RESUME " in line) == result["resumes"] == result["pauses"]
    assert result["checks_ok"] and "FAIL" not in output
    return result, report


def test_research_agent_on_the_embedded_store() -> None:
    output = _run()
    assert output.startswith("budget embedded ")
    _check(output)


def test_research_agent_on_a_redis_url(server_url: str) -> None:
    prefix = "ex" + secrets.token_hex(4)
    output = _run("--prefix", prefix, "--tenant", "lab", url=server_url)
    assert not output.startswith("budget embedded ")
    _, report = _check(output)
    # it ran against the URL: the ledger is in that Redis, and holds what the report says
    client = sync_client(server_url)
    try:
        entries = client.xrange(f"{prefix}:{{lab}}:ledger")
    finally:
        client.close()
    assert len(entries) == report["entries"]
    assert sum(int(fields["usd"]) for _, fields in entries) == report["totals"]["usd_nano"]
