"""The wire contract, network-free: argument builders and reply decoders of slowburn_redis.protocol."""

from __future__ import annotations

import pytest

from slowburn_redis import protocol
from slowburn_redis.keys import LimitKey, TenantKeys, describe_limit_key
from slowburn_redis.limits import Limit
from slowburn_redis.scripts import Script


def test_acquire_args_follow_the_script_header_order() -> None:
    args = protocol.acquire_args(
        reservation_id="r1",
        agent=None,
        mode="wait",
        priority=3,
        ticket="",
        lease_ms=60000,
        queue_ms=15000,
        estimate={"usd": 5, "concurrency": 1},
    )
    assert args == ["r1", "", "", "", "wait", 3, "", 60000, 15000, "usd=5 concurrency=1"]
    with_model = protocol.acquire_args(
        reservation_id="r1",
        agent="bot",
        mode="wait",
        priority=0,
        ticket="",
        lease_ms=1,
        queue_ms=1,
        estimate={"tool_calls": 2},
        model="openai/gpt-4o",
    )
    assert with_model[:4] == ["r1", "bot", "openai/gpt-4o", ""] and with_model[-1] == "tool_calls=2"
    in_run = protocol.acquire_args(
        reservation_id="r1",
        agent="bot",
        mode="wait",
        priority=0,
        ticket="",
        lease_ms=1,
        queue_ms=1,
        estimate={"tokens": 2},
        run_id="r-1",
    )
    assert in_run[:4] == ["r1", "bot", "", "r-1"]


def test_the_acquire_script_reads_as_many_joined_fields_as_acquire_args_builds() -> None:
    from slowburn_redis.scripts import Script

    args = protocol.acquire_args(
        reservation_id="r1", agent="a", mode="wait", priority=0, ticket="", lease_ms=1, queue_ms=1, estimate={"usd": 1}
    )
    assert Script("acquire").request(args) == [" ".join(map(str, args))]


def test_settle_args_carry_metadata_as_compact_json() -> None:
    args = protocol.settle_args(
        reservation_id="r1", kind="commit", ledger_maxlen=10, actual={"usd": 7}, model="m", metadata={"a": 1}
    )
    assert args == ["r1", "commit", 10, "usd=7", "m", "", '{"a":1}']
    assert protocol.settle_args(reservation_id="r", kind="release", ledger_maxlen=0, actual={})[-1] == ""


@pytest.mark.parametrize(
    ("reply", "decoded"),
    [
        ([1, "r1", "100", "160", "T:usd:0 A:a:usd:0"], protocol.Admitted("r1", 100, 160, ["T:usd:0", "A:a:usd:0"])),
        ([0, "t", "100", "-1", "T:usd:0", "capacity", "5"], protocol.Denied("t", 100, -1, "T:usd:0", "capacity", 5)),
        ([-1, "T:usd:0", "5", "9"], protocol.TooLarge("T:usd:0", 5, 9)),
        ([-2, "researcher"], protocol.Missing("researcher")),
        ([-3, "cap", "R:r-1:tokens:0", "50", "40", "20"], protocol.RunSpent("cap", "R:r-1:tokens:0", 50, 40, 20)),
    ],
)
def test_acquire_replies_decode_to_their_types(reply: list[object], decoded: protocol.AcquireReply) -> None:
    assert protocol.decode_acquire(reply) == decoded


def test_denied_retry_in_is_seconds_from_the_script_clock() -> None:
    assert protocol.Denied("t", 1000, 3500, "T:usd:1", "capacity", 1).retry_in == 2.5
    assert protocol.Denied("t", 1000, -1, "T:usd:1", "queue", 1).retry_in is None
    assert protocol.Denied("t", 1000, 900, "T:usd:1", "capacity", 1).retry_in == 0.0


def test_an_unknown_acquire_reply_is_refused() -> None:
    with pytest.raises(ValueError, match="unexpected acquire reply"):
        protocol.decode_acquire([7])


def test_settle_extend_refresh_and_status_replies() -> None:
    committed = protocol.Settled(True, "committed", {"usd": 3}, "1-0")
    assert protocol.decode_settle([1, "committed", "usd=3", "1-0"]) == committed
    assert protocol.decode_settle([0, "expired"]) == protocol.Settled(False, "expired")
    assert protocol.decode_extend([1, "123"]) == 123 and protocol.decode_extend([0, "committed"]) is None
    assert protocol.decode_refresh([["a"], ["b", "c"]]) == (["a"], ["b", "c"])
    status = protocol.decode_status(["10", "2", [["T", "T:usd:0", "usd", "9", "0", "4", "1", "0", "-1", "2"]]])
    assert status.now_ms == 10 and status.queue_length == 2
    assert status.rows == [protocol.LimitRow("T", "T:usd:0", "usd", 9, 0, 4, 1, 0, -1, 2)]


def test_limits_json_round_trip_and_the_unlimited_marker() -> None:
    limits = [Limit.parse("usd 5/day"), Limit.parse("concurrency 8")]
    text = protocol.limits_json(limits)
    assert protocol.decode_limits_json(text) == [("usd", 5 * 10**9, 86_400_000), ("concurrency", 8, 0)]
    assert protocol.limits_json([]) == ""  # clears the scope
    assert protocol.decode_limits_json(protocol.UNLIMITED_JSON) == []  # stored, deliberately empty
    assert protocol.decode_limits_json(None) == []


def test_limit_keys_in_words() -> None:
    assert describe_limit_key("A:researcher:usd:3600000", 500_000_000) == "usd 0.5/hour (agent researcher)"
    assert describe_limit_key("T:tokens:0", 50_000) == "tokens 50000 (tenant)"
    assert describe_limit_key("D:requests:60000") == "requests per min (every agent)"
    assert describe_limit_key("not a key") == "not a key"
    assert LimitKey.parse("A:a.b@c:usd:1000") == LimitKey("A:a.b@c", "usd", 1000)


def test_tenant_keys_share_the_hash_tag() -> None:
    keys = TenantKeys.of("sb", "acme")
    assert keys.base == "sb:{acme}"
    named = [keys.limits, keys.queue, keys.ledger, keys.window("T:usd:0"), keys.reservation("r1"), keys.wake_channel]
    assert all(name.startswith("sb:{acme}:") for name in named)


def test_acquire_fields_read_back_what_acquire_args_wrote() -> None:
    args = protocol.acquire_args(
        reservation_id="r9",
        agent="bot",
        mode="reject",
        priority=-3,
        ticket="t",
        lease_ms=4500,
        queue_ms=15000,
        estimate={"usd": 7, "tool_calls": 1},
        model="gpt-4o",
        run_id="run1",
    )
    joined = Script("acquire").request(args)
    assert len(args) == len(protocol.ACQUIRE_FIELDS) and len(joined) == 1  # every field travels in the one string
    fields = protocol.read_acquire_args(args)
    assert (fields.reservation_id, fields.agent, fields.lease_ms, fields.amounts) == (
        "r9",
        "bot",
        4500,
        "usd=7 tool_calls=1",
    )
    assert (
        protocol.read_acquire_args(
            protocol.acquire_args(
                reservation_id="r", agent=None, mode="wait", priority=0, ticket="", lease_ms=1, queue_ms=1, estimate={}
            )
        ).agent
        is None
    )
