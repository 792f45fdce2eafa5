"""Re-seeding limits from declared desired state: only declared tenants, only missing scopes, always loudly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from structlog.testing import capture_logs

from slowburn_redis import Budget, InvalidInput, Limit, LimitsMissing
from slowburn_redis.desired import desired_limits
from slowburn_redis.events import Event

T, OTHER = "acme", "globex"
DECLARED = {T: {"limits": ["usd 1/hour", "concurrency 4"], "agents": {"bot": ["usd 0.25/hour"]}}}


def reseeds(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == "limits.reseeded"]


async def first_of_type(events: AsyncIterator[Event], kind: str) -> Event:
    async for event in events:
        if event.type == kind:
            return event
    raise AssertionError("the event stream ended")


async def test_lost_limits_of_a_declared_tenant_are_written_back_loudly(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget(desired_limits=DECLARED)
    admin = make_budget()
    await admin.set_limits(T, DECLARED[T]["limits"])
    await admin.set_limits(T, ["usd 0.25/hour"], agent="bot")
    await (await budget.acquire(T, usd=0.1)).commit(usd=0.1)  # a ledger entry: the history survives
    await admin.engine.client.delete(admin.keys(T).limits)  # Redis lost the limits hash
    listener = budget.events(T)
    reseeded = asyncio.ensure_future(first_of_type(listener, "limits_reseeded"))
    for _ in range(500):  # bounded: until the listener is subscribed
        if await admin.engine.subscribers(admin.keys(T).events_channel):
            break
        await asyncio.sleep(0.01)
    with capture_logs() as logs:
        reservation = await budget.acquire(T, agent="bot", usd=0.2)
    [line] = reseeds(logs)
    assert line["log_level"] == "error" and line["history_lost"] is False
    assert line["limits"] == {"tenant": ["usd 1/hour", "concurrency 4"], "agent bot": ["usd 0.25/hour"]}
    event = await asyncio.wait_for(reseeded, 30)
    assert event.history_lost is False  # type: ignore[attr-defined]
    assert event.limits == line["limits"]  # type: ignore[attr-defined]
    assert await admin.get_limits(T) == [Limit.parse("usd 1/hour"), Limit.parse("concurrency 4")]
    assert await admin.get_limits(T, agent="bot") == [Limit.parse("usd 0.25/hour")]
    # The re-seeded limits hold: the bot's window has 0.05 left.
    with pytest.raises(Exception, match=r"usd 0\.25/hour"):
        await budget.acquire(T, agent="bot", usd=0.1, mode="reject")
    await reservation.release()
    await listener.aclose()


async def test_a_declared_tenant_never_stored_is_seeded_and_its_history_is_said_lost(
    make_budget: Callable[..., Budget],
) -> None:
    budget = make_budget(desired_limits={T: ["usd 1/hour"]})
    with capture_logs() as logs:
        await (await budget.acquire(T, usd=0.5)).commit(usd=0.5)
    [line] = reseeds(logs)
    assert line["history_lost"] is True
    with pytest.raises(Exception, match=r"usd 1/hour"):
        await budget.acquire(T, usd=0.6, mode="reject")


async def test_an_undeclared_tenant_is_refused_and_nothing_is_written(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget(desired_limits=DECLARED)
    with capture_logs() as logs, pytest.raises(LimitsMissing):
        await budget.acquire(OTHER, usd=0.1)
    assert not reseeds(logs)
    assert await budget.engine.client.keys(budget.key(OTHER) + "*") == []


async def test_only_missing_scopes_are_written_an_operators_change_stands(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget(desired_limits=DECLARED)
    admin = make_budget()
    await admin.set_limits(T, ["usd 9/hour"], agent="bot")  # the operator's own choice, not the declared one
    with capture_logs() as logs:
        await (await budget.acquire(T, usd=0.1)).release()
    [line] = reseeds(logs)
    assert line["limits"] == {"tenant": ["usd 1/hour", "concurrency 4"]}
    assert await admin.get_limits(T, agent="bot") == [Limit.parse("usd 9/hour")]


async def test_concurrent_acquires_of_one_process_reseed_once(make_budget: Callable[..., Budget]) -> None:
    budget = make_budget(desired_limits={T: ["requests 100/hour"]})
    with capture_logs() as logs:
        held = await asyncio.gather(*(budget.acquire(T) for _ in range(20)))
    assert len(reseeds(logs)) == 1
    assert (await budget.status(T)).limits[0].reserved == 20
    await asyncio.gather(*(r.release() for r in held))


def test_the_sync_twin_reseeds_too(make_budget: Callable[..., Budget]) -> None:
    twin = make_budget(desired_limits={T: ["usd 1/hour"]}).sync()
    try:
        with capture_logs() as logs:
            twin.acquire(T, usd=0.1).release()
        assert len(reseeds(logs)) == 1
    finally:
        twin.close()


@pytest.mark.parametrize(
    "bad", [["usd 1/hour"], {T: ["usd -1/hour"]}, {"bad name!": ["usd 1/hour"]}, {T: {"limits": 5}}, "acme"]
)
def test_bad_desired_limits_are_refused_at_construction(bad: object) -> None:
    with pytest.raises(InvalidInput):
        Budget.embedded(desired_limits=bad)


def test_desired_limits_take_the_limits_file_shape() -> None:
    declared = desired_limits(DECLARED)
    assert declared.assignments() == [
        (T, None, [Limit.parse("usd 1/hour"), Limit.parse("concurrency 4")]),
        (T, "bot", [Limit.parse("usd 0.25/hour")]),
    ]
    assert desired_limits(declared) is declared
