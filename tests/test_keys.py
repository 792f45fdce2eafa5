"""slowburn_redis.keys and lua/lib.lua name the same keys."""

from __future__ import annotations

import re
from pathlib import Path

from slowburn_redis import keys

LIB = (Path(__file__).resolve().parent.parent / "lua" / "lib.lua").read_text()


def test_the_lua_key_table_matches_keys_py() -> None:
    table = LIB.split("local function tenant_keys(base)", 1)[1].split("}", 1)[0]
    lua = dict(re.findall(r"(\w+) = base \.\. ':(\w+)'", table))
    assert lua == {
        "limits": keys.LIMITS,
        "agents": keys.AGENTS,
        "queue": keys.QUEUE,
        "queue_expiry": keys.QUEUE_EXPIRY,
        "sequence": keys.SEQUENCE,
        "leases": keys.LEASES,
        "ledger": keys.LEDGER,
        "admin": keys.ADMIN,
        "clock": keys.CLOCK,
        "wake": keys.WAKE_CHANNEL,
        "events": keys.EVENTS_CHANNEL,
        "trail": keys.TRAIL,
    }


def test_the_lua_per_item_keys_match_keys_py() -> None:
    per_item = (
        ("window_key", keys.WINDOW),
        ("blocked_key", keys.BLOCKED),
        ("reservation_key", keys.RESERVATION),
        ("run_key", keys.RUN),
    )
    for function, suffix in per_item:
        assert re.search(rf"local function {function}\(\w+\) return B \.\. ':{suffix}:' \.\. \w+ end", LIB), function


def test_only_lib_lua_builds_keys_from_the_base() -> None:
    lua = Path(__file__).resolve().parent.parent / "lua"
    for path in lua.glob("*.lua"):
        if path.name == "lib.lua":
            continue
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("--"))
        assert "B .. ':" not in code, path.name
