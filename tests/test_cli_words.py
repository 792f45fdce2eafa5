"""slowburn_redis.cli.words: limit keys, stored units and events in the operator's words."""

from __future__ import annotations

import json

import pytest

from slowburn_redis import Event, Limit
from slowburn_redis.cli.words import LimitKey, amount_words, event_words, limit_words, parse_limit_key, scope_words


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("T:usd:86400000", LimitKey("tenant", None, "usd", 86400000)),
        ("A:researcher:usd:3600000", LimitKey("agent", "researcher", "usd", 3600000)),
        ("D:requests:60000", LimitKey("every agent", None, "requests", 60000)),
        ("T:tokens:0", LimitKey("tenant", None, "tokens", 0)),
        ("X:usd:1", None),
        ("T:usd", None),
        ("A::usd:1", None),
        ("T:usd:soon", None),
        ("", None),
    ],
)
def test_parse_limit_key(key: str, parsed: LimitKey | None) -> None:
    assert parse_limit_key(key) == parsed


def test_limit_words_from_units_from_known_limits_and_without_an_amount() -> None:
    assert limit_words("A:researcher:usd:3600000", 500_000_000) == "usd 0.5/hour (agent researcher)"
    assert limit_words("T:usd:10000", 5_000_000) == "usd 0.005/10s (tenant)"
    assert limit_words("D:requests:60000", 60) == "requests 60/min (every agent)"
    assert limit_words("T:tokens:0", 50_000) == "tokens 50000 (tenant)"
    assert limit_words("T:usd:86400000", known={"T:usd:86400000": Limit.parse("usd 5/day")}) == "usd 5/day (tenant)"
    assert limit_words("A:bot:usd:3600000") == "usd per hour (agent bot)"
    assert limit_words("T:tokens:0") == "tokens (lifetime) (tenant)"
    assert limit_words("not-a-key") == "not-a-key"


def test_amounts_are_dollars_and_counts() -> None:
    assert amount_words("usd", 450_000_000) == "$0.4500"
    assert amount_words("usd", "1234500000000") == "$1,234.50"
    assert amount_words("usd", 999_999_900_000) == "$999.9999"
    assert amount_words("tokens", 1500) == "1,500"
    assert scope_words("T") == "tenant" and scope_words("D") == "every agent" and scope_words("A:x") == "agent x"


def event(kind: str, **fields: object) -> Event:
    return Event.from_message("acme", json.dumps({"type": kind, "ts": 0, **fields}))


@pytest.mark.parametrize(
    ("ev", "text"),
    [
        (
            event("exhausted", agent="researcher", limit="A:researcher:usd:3600000", dimension="usd",
                  used=490_000_000, amount=500_000_000, requested=20_000_000),
            "exhausted usd 0.5/hour (agent researcher): $0.4900 used, $0.0200 requested",
        ),
        (
            event("exhausted", limit="T:usd:10000", dimension="usd", used=5_000_000, amount=5_000_000,
                  requested=1_000_000),
            "exhausted usd 0.005/10s (tenant): $0.0050 used, $0.0010 requested",
        ),
        (
            event("threshold", agent="w", limit="T:usd:86400000", dimension="usd", level=90, used=4_500_000_000,
                  amount=5_000_000_000),
            "usd 5/day (tenant): 90 % used",
        ),
        (event("waiting", agent="w", ticket="ab12", limit="T:requests:60000", reason="capacity"),
         "waiting on requests per min (tenant)"),
        (event("waiting", agent="w", ticket="ab12", limit="T:requests:60000", reason="queue"),
         "waiting on requests per min (tenant) (behind earlier waiters)"),
        (event("resumed", agent="w", ticket="ab12", waited_ms=3210), "resumed after 3.2s"),
        (event("overrun", agent="w", reservation="ff00", overrun="usd=1500000 tokens=12"),
         "overrun: charged $0.0015, 12 tokens beyond the estimate"),
        (event("lease_expired", agent="w", reservation="ff00"),
         "a lease expired (its worker stopped before settling; its estimate stays charged)"),
        (event("reset", agent="", dimension="usd", windows=2), "reset 2 window(s) of usd"),
        (event("limits_changed", scope="A:bot", limits=json.dumps([{"d": "usd", "a": 500_000_000, "w": 3600000}])),
         "limits of agent bot set: usd 0.5/hour"),
        (event("limits_changed", scope="T", limits=""), "limits of tenant cleared"),
        (event("clock_jump", jump_ms=-120000, from_ms=1, leases=0),
         "the Redis clock stepped back 120.0s: the budget kept its own time (nothing refills twice or is lost)"),
        (event("clock_jump", jump_ms=120000, from_ms=1, leases=2),
         "the Redis clock jumped 120.0s ahead (or the tenant was silent that long): "
         "2 lease(s) in flight aged 30s at most"),
        (event("limits_reseeded", limits={"tenant": ["usd 1/hour"], "agent bot": ["usd 0.25/hour"]}, history_lost=True),
         "limits re-seeded from declared state after Redis lost them (tenant usd 1/hour; agent bot usd 0.25/hour): "
         "its spend history was lost, spend before now is not counted"),
    ],
)  # fmt: skip
def test_event_words_hide_keys_units_and_ids(ev: Event, text: str) -> None:
    words = event_words(ev)
    assert words == text
    for internal in ("T:", "A:", "ab12", "ff00", "amount=", "000000"):
        assert internal not in words


def test_known_limits_give_waiting_events_their_amount() -> None:
    known = {"T:requests:60000": Limit.parse("requests 60/min")}
    assert event_words(event("waiting", limit="T:requests:60000"), known) == "waiting on requests 60/min (tenant)"


def test_watch_lines_name_the_agent_once() -> None:
    from slowburn_redis.cli.watch_cmd import event_text

    own = event("exhausted", agent="researcher", limit="A:researcher:usd:3600000", amount=500_000_000)
    assert event_text(own).endswith(" acme exhausted usd 0.5/hour (agent researcher)")
    shared = event("threshold", agent="writer", limit="T:usd:86400000", amount=5_000_000_000, level=50)
    assert event_text(shared).endswith(" acme usd 5/day (tenant): 50 % used (by agent writer)")
    assert event_text(event("reset", windows=1)).endswith(" acme reset 1 window(s)")
