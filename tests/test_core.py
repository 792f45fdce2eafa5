"""Core behaviour on fakeredis and on a real Redis: scopes, all-or-nothing, settlement, windows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from slowburn_redis import (
    Budget,
    BudgetExhausted,
    InvalidInput,
    InvalidLimit,
    InvalidName,
    Limit,
    RequestTooLarge,
)
from slowburn_redis.testing import advance_clock, freeze_clock


def remaining(status_limits: list, key: str) -> float:  # type: ignore[type-arg]
    return next(s.remaining for s in status_limits if s.key == key)


async def keys_of(budget: Budget, tenant: str) -> dict[str, object]:
    """Every key of a tenant with a comparable dump of its value."""
    out: dict[str, object] = {}
    async for key in budget.engine.client.scan_iter(match=budget.key(tenant) + ":*"):
        kind = await budget.engine.client.type(key)
        if kind == "hash":
            out[key] = await budget.engine.client.hgetall(key)
        elif kind == "zset":
            out[key] = await budget.engine.client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            out[key] = sorted(await budget.engine.client.smembers(key))
        elif kind == "string":
            out[key] = await budget.engine.client.get(key)
        elif kind == "stream":
            out[key] = await budget.engine.client.xlen(key)
    return out


async def test_limits_round_trip_per_scope(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 5/day", "tokens 1M/hour", "requests 60/min", "concurrency 8"])
    await budget.set_limits("acme", ["usd 0.50/hour"], agent="researcher")
    await budget.set_limits("acme", ["requests 10/min"], agent="*")
    assert await budget.get_limits("acme") == [
        Limit.parse("usd 5/day"),
        Limit.parse("tokens 1M/hour"),
        Limit.parse("requests 60/min"),
        Limit.parse("concurrency 8"),
    ]
    assert await budget.get_limits("acme", agent="researcher") == [Limit.parse("usd 0.50/hour")]
    assert await budget.get_limits("acme", agent="*") == [Limit.parse("requests 10/min")]
    assert await budget.get_limits("acme", agent="nobody") == []
    await budget.clear_limits("acme", agent="researcher")
    assert await budget.get_limits("acme", agent="researcher") == []


async def test_one_acquire_checks_tenant_agent_and_default_limits(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/min"])
    await budget.set_limits("acme", ["usd 0.3/min"], agent="researcher")
    await budget.set_limits("acme", ["usd 0.2/min"], agent="*")
    # The researcher's own limit replaces the default; other agents get the default, each its own window.
    await budget.acquire("acme", "researcher", usd=0.3)
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire("acme", "researcher", usd=0.01, mode="reject")
    assert caught.value.limit == "A:researcher:usd:60000"
    await budget.acquire("acme", "writer", usd=0.2)
    await budget.acquire("acme", "critic", usd=0.2)
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire("acme", "writer", usd=0.01, mode="reject")
    assert caught.value.limit == "A:writer:usd:60000"
    # The tenant limit binds everyone: 0.7 used, 0.3 left, a new agent's default allows 0.2.
    await budget.acquire("acme", "editor", usd=0.2)
    await budget.acquire("acme", usd=0.1)
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire("acme", "linter", usd=0.05, mode="reject")
    assert caught.value.limit == "T:usd:60000"


async def test_a_denied_acquire_charges_nothing_anywhere(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/min", "tokens 100/min", "requests 10/min"])
    await budget.acquire("acme", usd=0.5, tokens=90)
    before = await keys_of(budget, "acme")
    with pytest.raises(BudgetExhausted):
        await budget.acquire("acme", usd=0.1, tokens=20, mode="reject")
    after = await keys_of(budget, "acme")

    def charges(dump: dict[str, object]) -> dict[str, object]:
        # The "th" field only records that an exhausted event was announced.
        return {k: {f: v for f, v in v.items() if f != "th"} for k, v in dump.items() if ":w:" in k}  # type: ignore[attr-defined]

    assert charges(after) == charges(before)


async def test_commit_lower_frees_capacity_at_once(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    r = await budget.acquire("acme", usd=0.8)
    with pytest.raises(BudgetExhausted):
        await budget.acquire("acme", usd=0.5, mode="reject")
    await r.commit(usd=0.2)
    await budget.acquire("acme", usd=0.5, mode="reject")
    status = await budget.status("acme")
    assert status.limits[0].used == pytest.approx(0.2)
    assert status.limits[0].reserved == pytest.approx(0.5)
    assert status.limits[0].remaining == pytest.approx(0.3)


async def test_commit_higher_is_charged_and_recorded_as_overrun(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour", "tokens 1000/hour"])
    r = await budget.acquire("acme", usd=0.1, tokens=100)
    with capture_logs() as logs:
        result = await r.commit(usd=0.35, tokens=100)
    assert result.settled
    assert result.overrun == {"usd": pytest.approx(0.25)}
    status = await budget.status("acme")
    usd = next(s for s in status.limits if s.limit.dimension == "usd")
    assert usd.used == pytest.approx(0.35)
    assert usd.overrun == pytest.approx(0.25)
    assert any(entry["event"] == "budget.overrun" for entry in logs)


async def test_usage_in_an_unreserved_dimension_is_still_charged(budget: Budget) -> None:
    await budget.set_limits("acme", ["tokens 1000/hour"])
    r = await budget.acquire("acme", usd=0.1)
    await r.commit(usd=0.1, tokens=400)
    status = await budget.status("acme")
    assert status.limits[0].used == 400
    assert status.limits[0].overrun == 400


async def test_release_refunds_and_settling_is_idempotent(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour", "requests 5/hour", "concurrency 2"])
    r = await budget.acquire("acme", usd=0.6)
    first = await r.release()
    assert first.settled and first.state == "released"
    again = await r.release()
    assert not again.settled and again.state == "released"
    late_commit = await r.commit(usd=0.6)
    assert not late_commit.settled
    status = await budget.status("acme")
    assert all(s.used == 0 and s.reserved == 0 for s in status.limits)

    r2 = await budget.acquire("acme", usd=0.3)
    await r2.commit(usd=0.25)
    await r2.commit(usd=0.01)
    await r2.release()
    usd = next(s for s in (await budget.status("acme")).limits if s.limit.dimension == "usd")
    assert usd.used == pytest.approx(0.25)
    ledger = await budget.engine.client.xlen(budget.key("acme") + ":ledger")
    assert ledger == 1


async def test_requests_count_one_per_acquire_and_concurrency_returns_on_settle(budget: Budget) -> None:
    await budget.set_limits("acme", ["requests 3/min", "concurrency 2"])
    a = await budget.acquire("acme")
    b = await budget.acquire("acme")
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire("acme", mode="reject")
    assert caught.value.limit == "T:concurrency:0"
    await a.commit()
    c = await budget.acquire("acme")
    await b.release()  # refunds its request too
    await c.commit()
    d = await budget.acquire("acme")
    await d.commit()
    with pytest.raises(BudgetExhausted) as caught:
        await budget.acquire("acme", mode="reject")
    assert caught.value.limit == "T:requests:60000"


async def test_lifetime_caps_never_refill(clocked: Budget) -> None:
    await clocked.set_limits("run-7", ["tokens 500"])
    await freeze_clock(clocked, "run-7")
    r = await clocked.acquire("run-7", tokens=400)
    await r.commit(tokens=450)
    await advance_clock(clocked, "run-7", 365 * 86400)
    with pytest.raises(BudgetExhausted) as caught:
        await clocked.acquire("run-7", tokens=100, mode="reject")
    assert caught.value.retry_after is None
    await clocked.acquire("run-7", tokens=50)


async def test_the_window_slides_at_bucket_resolution(clocked: Budget) -> None:
    await clocked.set_limits("acme", ["usd 1/60s"])
    t0 = await freeze_clock(clocked, "acme", 1_000_000_000_000)
    r = await clocked.acquire("acme", usd=1)
    await r.commit()
    with pytest.raises(BudgetExhausted) as caught:
        await clocked.acquire("acme", usd=0.1, mode="reject")
    # Buckets are 1 s wide: the charge at t0 leaves the window when t0's bucket is 61 buckets old.
    assert caught.value.retry_after == pytest.approx(61.0)
    await advance_clock(clocked, "acme", 60.999)
    with pytest.raises(BudgetExhausted):
        await clocked.acquire("acme", usd=0.1, mode="reject")
    await advance_clock(clocked, "acme", 0.001)
    await clocked.acquire("acme", usd=1, mode="reject")
    assert t0 == 1_000_000_000_000


async def test_window_memory_stays_bounded(clocked: Budget) -> None:
    await clocked.set_limits("acme", ["requests 1000000/10s"])
    await freeze_clock(clocked, "acme")
    for _ in range(400):
        r = await clocked.acquire("acme")
        await r.commit()
        await advance_clock(clocked, "acme", 0.37)
    fields = await clocked.engine.client.hlen(clocked.key("acme") + ":w:T:requests:10000")
    # 61 buckets at most, two fields each, plus the running totals and bookkeeping.
    assert fields <= 2 * 61 + 6
    status = await clocked.status("acme")
    assert status.limits[0].used == pytest.approx(28, abs=1)


async def test_limits_set_by_one_client_apply_to_another_at_once(make_budget: Callable[..., Budget]) -> None:
    admin, worker = make_budget(), make_budget()
    try:
        await admin.set_limits("acme", ["usd 1/hour"])
        await worker.acquire("acme", usd=0.9)
        with pytest.raises(BudgetExhausted):
            await worker.acquire("acme", usd=0.5, mode="reject")
        await admin.set_limits("acme", ["usd 2/hour"])
        await worker.acquire("acme", usd=0.5, mode="reject")
    finally:
        await admin.aclose()
        await worker.aclose()


async def test_request_larger_than_a_limit_fails_at_once(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    with pytest.raises(RequestTooLarge) as caught:
        await budget.acquire("acme", usd=1.5, timeout=60)
    assert caught.value.limit == "T:usd:3600000"
    assert await budget.engine.client.exists(budget.key("acme") + ":q") == 0


async def test_scripts_recover_from_noscript(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    await budget.acquire("acme", usd=0.1)
    await budget.engine.client.script_flush()
    r = await budget.acquire("acme", usd=0.1)
    await r.commit(usd=0.05)
    assert (await budget.status("acme")).limits[0].used == pytest.approx(0.05)


async def test_reset_forgets_usage(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour", "tokens 100"])
    await budget.set_limits("acme", ["usd 0.5/hour"], agent="*")
    await (await budget.acquire("acme", "a1", usd=0.5, tokens=50)).commit()
    await (await budget.acquire("acme", "a2", usd=0.4, tokens=40)).commit()
    with capture_logs() as logs:
        assert await budget.reset("acme", agent="a1") == 1
    assert any(entry["event"] == "budget.reset" for entry in logs)
    await budget.acquire("acme", "a1", usd=0.1, mode="reject")  # a1's own window is fresh
    assert await budget.reset("acme", dimension="tokens") == 1
    assert await budget.reset("acme") >= 3
    status = await budget.status("acme")
    assert all(s.used == 0 for s in status.limits)


async def test_status_reports_every_applicable_limit(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 5/day", "requests 60/min", "concurrency 8"])
    await budget.set_limits("acme", ["usd 0.5/hour"], agent="researcher")
    r = await budget.acquire("acme", "researcher", usd=0.2)
    status = await budget.status("acme", agent="researcher")
    by_key = {s.key: s for s in status.limits}
    assert set(by_key) == {"T:usd:86400000", "T:requests:60000", "T:concurrency:0", "A:researcher:usd:3600000"}
    assert by_key["A:researcher:usd:3600000"].reserved == pytest.approx(0.2)
    assert by_key["A:researcher:usd:3600000"].remaining == pytest.approx(0.3)
    assert by_key["T:concurrency:0"].reserved == 1
    assert by_key["T:usd:86400000"].refill_in is not None
    assert status.model_dump(mode="json")["tenant"] == "acme"
    await r.commit(usd=0.1)
    everyone = await budget.status("acme")
    assert "A:researcher:usd:3600000" in {s.key for s in everyone.limits}


async def test_bad_input_raises_typed_errors_and_changes_nothing(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    await budget.acquire("acme", usd=0.1)
    before = await keys_of(budget, "acme")
    bad_calls = [
        lambda: budget.set_limits("acme", ["usd -1/hour"]),
        lambda: budget.set_limits("acme", ["usd 1/hour", "bogus-3 3"]),
        lambda: budget.set_limits("ac{me}", ["usd 1/hour"]),
        lambda: budget.set_limits("acme", ["usd 1/hour"], agent="a:b"),
        lambda: budget.acquire("acme", usd=float("nan")),
        lambda: budget.acquire("acme", usd=-1),
        lambda: budget.acquire("acme", tokens=1.5),  # type: ignore[arg-type]
        lambda: budget.acquire("acme", priority=1000),
        lambda: budget.acquire("acme", mode="maybe"),  # type: ignore[arg-type]
        lambda: budget.acquire("", usd=0.1),
        lambda: budget.acquire("x" * 65, usd=0.1),
        lambda: budget.acquire("acme", "a\nb", usd=0.1),
        lambda: budget.reset("acme", dimension="gold9"),
        lambda: budget.status("acme", agent="*?"),
    ]
    for call in bad_calls:
        with pytest.raises((InvalidInput, InvalidLimit, InvalidName)):
            await call()
    assert await keys_of(budget, "acme") == before


async def test_log_events_for_denial_overrun_reset(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    with capture_logs() as logs:
        r = await budget.acquire("acme", usd=0.9)
        await r.commit(usd=1.0)
        with pytest.raises(BudgetExhausted):
            await budget.acquire("acme", usd=0.5, mode="reject")
        await budget.reset("acme")
    events = [entry["event"] for entry in logs]
    for expected in ("budget.overrun", "acquire.denied", "budget.reset"):
        assert expected in events
    assert "commit" not in events  # the ledger records each commit; no log line per call


async def test_lease_extend_moves_the_expiry(budget: Budget) -> None:
    await budget.set_limits("acme", ["concurrency 1"])
    r = await budget.acquire("acme", lease_ttl=5)
    first = r.lease_expires_ms
    assert await r.extend(120)
    assert r.lease_expires_ms > first + 100_000
    await r.commit()
    assert not await r.extend(120)


async def test_context_manager_commits_estimate_or_releases_on_error(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    async with budget.acquire("acme", usd=0.3) as r:
        pass
    assert r.settlement is not None and r.settlement.state == "committed"
    with pytest.raises(RuntimeError):
        async with budget.acquire("acme", usd=0.3) as r2:
            raise RuntimeError("provider down")
    assert r2.settlement is not None and r2.settlement.state == "released"
    assert (await budget.status("acme")).limits[0].used == pytest.approx(0.3)


def test_sync_twin_runs_the_same_operations(make_budget: Callable[..., Budget]) -> None:
    sync = make_budget().sync()
    try:
        sync.set_limits("acme", ["usd 1/hour", "concurrency 1"])
        assert sync.get_limits("acme")[0] == Limit.parse("usd 1/hour")
        with sync.acquire("acme", usd=0.4) as r:
            r.commit(usd=0.25)
        with pytest.raises(BudgetExhausted), sync.acquire("acme", usd=0.1):
            sync.acquire("acme", usd=0.1, mode="reject")
        status = sync.status("acme")
        assert status.limits[0].used == pytest.approx(0.25)
        assert sync.reset("acme") == 1
    finally:
        sync.close()


async def test_acquire_can_run_as_a_task(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    task = asyncio.create_task(budget.acquire("acme", usd=0.4))
    reservation = await task
    await reservation.commit(usd=0.1)
    assert (await budget.status("acme")).limits[0].used == pytest.approx(0.1)


async def test_more_calls_in_flight_than_pool_connections(budget: Budget) -> None:
    """Calls beyond the connection pool wait for a connection instead of failing."""
    await budget.set_limits("acme", ["requests 10000/hour"])

    async def one() -> None:
        r = await budget.acquire("acme")
        await r.commit()

    with capture_logs() as logs:
        await asyncio.gather(*(one() for _ in range(300)))
    assert (await budget.status("acme")).limits[0].used == 300
    assert not [entry for entry in logs if entry["event"].startswith("redis.")]


async def test_usage_in_an_unlimited_dimension_is_not_an_overrun(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    r = await budget.acquire("acme", usd=0.1)
    result = await r.commit(usd=0.1, tokens=500)
    assert result.overrun == {}
    entry = (await budget.engine.client.xrange(budget.key("acme") + ":ledger"))[-1][1]
    assert (entry["outcome"], entry["tokens"]) == ("ok", "500")
