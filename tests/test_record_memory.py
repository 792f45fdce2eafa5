"""What a settled reservation leaves in Redis: a small tombstone that keeps retries idempotent.

Settling replaces the reservation's record (``B:r:<id>``, ~650 bytes) by its
tombstone (``B:s:<id>``, the final state only) kept `SETTLED_TTL`; see
lua/lib.lua, "reservation records". These tests replay the exact script calls a
retry would resend (recorded from the first send) and check that nothing is
charged twice, then measure the tombstone on a real Redis.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from slowburn_redis import Budget, keys, protocol
from slowburn_redis.acl import WORKER_WRITE_KEYS
from slowburn_redis.reservation import SETTLED_TTL
from slowburn_redis.testing import advance_clock

T = "acme-research-01"
LIB = (Path(__file__).resolve().parent.parent / "lua" / "lib.lua").read_text()

GOAL_BYTES_PER_ADMISSION = 200
"""Redis bytes an admission may leave once settled, beyond its ledger entry."""

EXPIRY_OVERHEAD_BYTES = 64
"""What MEMORY USAGE leaves out of a key with a TTL: its entry in the expires dict (32) and the slots of the
keyspace and expires hash tables (8 to 16 bytes each, by how full the tables are)."""


class Sent:
    """Records the arguments of every call of one script, to resend them as a retry would."""

    def __init__(self, budget: Budget, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, list[list[Any]]] = {}
        engine = budget.engine
        real = engine.run

        async def run(script: Any, key: str, args: list[Any], **options: Any) -> Any:
            name = next((n for n in ("acquire", "settle", "extend") if getattr(engine.scripts, n) is script), "")
            self.calls.setdefault(name, []).append(list(args))
            return await real(script, key, args, **options)

        monkeypatch.setattr(engine, "run", run)
        self._real = real
        self._budget = budget

    async def resend(self, name: str, index: int = -1) -> Any:
        """Run the `index`-th recorded call of script `name` again, with the same arguments."""
        script = getattr(self._budget.engine.scripts, name)
        return await self._real(script, self._budget.key(T), self.calls[name][index])


async def used(budget: Budget, key: str) -> float:
    """What limit `key` has charged: used plus reserved."""
    return next(s.used + s.reserved for s in (await budget.status(T)).limits if s.key == key)


async def tenant_keys(budget: Budget) -> list[str]:
    base = budget.key(T)
    return sorted([key[len(base) + 1 :] async for key in budget.engine.client.scan_iter(match=base + ":*")])


def test_the_tombstone_key_and_ttl_agree_with_lib_lua() -> None:
    assert re.search(r"local function settled_key\(\w+\) return B \.\. ':" + keys.SETTLED + r":' \.\. \w+ end", LIB)
    match = re.search(r"local SETTLED_TTL_MS = (\d+)\n", LIB)
    assert match is not None and int(match.group(1)) == SETTLED_TTL * 1000
    assert f"{keys.SETTLED}:*" in WORKER_WRITE_KEYS  # a worker ACL user may write tombstones


async def test_settling_replaces_the_record_by_a_tombstone_with_a_bounded_ttl(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour", "concurrency 2"])
    committed = await budget.acquire(T, usd=0.3)
    released = await budget.acquire(T, usd=0.2)
    tenant = budget.keys(T)
    assert await budget.engine.client.type(tenant.reservation(committed.id)) == "hash"
    await committed.commit(usd=0.1)
    await released.release()
    client = budget.engine.client
    for r, code in ((committed, "1"), (released, "2")):
        assert not await client.exists(tenant.reservation(r.id))
        assert await client.get(tenant.settled(r.id)) == code
        assert 0 < await client.pttl(tenant.settled(r.id)) <= SETTLED_TTL * 1000
    assert [k for k in await tenant_keys(budget) if k.startswith(("r:", "s:"))] == sorted(
        [f"s:{committed.id}", f"s:{released.id}"]
    )


async def test_a_retried_commit_after_settlement_answers_the_same_and_charges_nothing(
    budget: Budget, monkeypatch: pytest.MonkeyPatch
) -> None:
    await budget.set_limits(T, ["usd 1/hour", "tokens 1000/hour"])
    sent = Sent(budget, monkeypatch)
    r = await budget.acquire(T, usd=0.3, tokens=100)
    first = await r.commit(usd=0.5, tokens=150)  # an overrun: charged beyond the estimate once
    assert first.settled and first.state == "committed" and first.overrun == {"usd": 0.2, "tokens": 50}
    spent = (await used(budget, "T:usd:3600000"), await used(budget, "T:tokens:3600000"))
    ledger = await budget.engine.client.xlen(budget.keys(T).ledger)
    for _ in range(2):  # the first reply was lost: resilience sends the same arguments again
        assert await sent.resend("settle") == [0, "committed"]
    again = await r.commit(usd=0.5, tokens=150)
    assert (again.settled, again.state) == (False, "committed")
    assert (await r.release()).state == "committed"
    assert (await used(budget, "T:usd:3600000"), await used(budget, "T:tokens:3600000")) == spent
    assert spent == (pytest.approx(0.5), 150)
    assert await budget.engine.client.xlen(budget.keys(T).ledger) == ledger


async def test_a_retried_release_after_settlement_refunds_nothing_twice(
    budget: Budget, monkeypatch: pytest.MonkeyPatch
) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    sent = Sent(budget, monkeypatch)
    kept = await budget.acquire(T, usd=0.4)
    r = await budget.acquire(T, usd=0.3)
    await r.release()
    assert await sent.resend("settle") == [0, "released"]
    assert (await r.commit(usd=0.3)).state == "released"  # a commit after the release charges nothing either
    assert await used(budget, "T:usd:3600000") == pytest.approx(0.4)
    await kept.release()


async def test_a_retried_acquire_of_a_settled_id_is_not_admitted_again(
    budget: Budget, monkeypatch: pytest.MonkeyPatch
) -> None:
    await budget.set_limits(T, ["usd 1/hour", "concurrency 1"])
    sent = Sent(budget, monkeypatch)
    r = await budget.acquire(T, usd=0.3)
    await r.commit(usd=0.3)
    holder = await budget.acquire(T, usd=0.1, timeout=5)  # the only slot: a fresh admission would be refused
    before = await tenant_keys(budget)
    for index in (0, 0):  # a late copy of the first acquire, twice
        admitted = protocol.decode_acquire(await sent.resend("acquire", index))
        assert isinstance(admitted, protocol.Admitted)
        assert admitted.lease_expires_ms == admitted.now_ms  # admitted long ago: its lease is over
    assert await tenant_keys(budget) == before  # no record, lease, queue place or window written
    assert await budget.engine.client.zrange(budget.keys(T).leases, 0, -1) == [holder.id]
    assert await used(budget, "T:usd:3600000") == pytest.approx(0.4)
    assert await used(budget, "T:concurrency:0") == 1
    assert await sent.resend("settle", 0) == [0, "committed"]
    await holder.release()


async def test_extend_after_settlement_reports_the_settled_state(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    r = await budget.acquire(T, usd=0.3)
    await r.release()
    reply = await budget.engine.run(budget.engine.scripts.extend, budget.key(T), [r.id, 1000])
    assert reply == [0, "released"]
    assert await r.extend(10) is False


async def test_a_late_commit_after_lease_expiry_still_lands_then_leaves_a_tombstone(clocked: Budget) -> None:
    budget = clocked
    await budget.set_limits(T, ["usd 1/hour", "concurrency 1"])
    await advance_clock(budget, T, 0)
    r = await budget.acquire(T, usd=0.3, lease_ttl=1)
    await advance_clock(budget, T, 5)
    await budget.status(T)
    blocker = await budget.acquire(T, usd=0.1, mode="reject")  # purges the expired lease (the slot returned)
    record = budget.keys(T).reservation(r.id)
    assert await budget.engine.client.hget(record, "s") == "expired"
    assert 0 < await budget.engine.client.pttl(record) <= 3600 * 1000  # kept an hour for a late commit
    late = await r.commit(usd=0.2)
    assert (late.settled, late.state) == (True, "committed")
    assert await used(budget, "T:usd:3600000") == pytest.approx(0.3)  # 0.2 replaced the 0.3 that stayed charged
    assert not await budget.engine.client.exists(record)
    assert await budget.engine.client.get(budget.keys(T).settled(r.id)) == "1"
    assert (await r.commit(usd=0.2)).state == "committed"
    await blocker.release()


async def test_once_the_tombstone_expired_a_retried_settle_changes_nothing(budget: Budget) -> None:
    await budget.set_limits(T, ["usd 1/hour"])
    r = await budget.acquire(T, usd=0.3)
    await r.commit(usd=0.25)
    await budget.engine.client.delete(budget.keys(T).settled(r.id))  # as Redis does after SETTLED_TTL
    again = await r.commit(usd=0.25)
    assert (again.settled, again.state) == (False, "unknown")
    assert (await r.release()).state == "unknown"
    assert await used(budget, "T:usd:3600000") == pytest.approx(0.25)


@pytest.mark.realredis
async def test_a_settled_admission_leaves_at_most_the_goal_in_bytes(real_url: str, prefix: str) -> None:
    """MEMORY USAGE on a real Redis (deterministic): after N settled admissions only tombstones remain.

    Each one's MEMORY USAGE, plus what it leaves out (the key's entry in the
    expires dict), is within the goal; the record it replaced was over three
    times the goal.
    """
    budget = Budget.from_url(real_url, prefix=prefix)
    try:
        await budget.set_limits(T, ["usd 1000/hour", "requests 100000/hour", "concurrency 100"])
        tenant, client = budget.keys(T), budget.engine.client
        open_ = await budget.acquire(T, usd=0.01, requests=1)
        record_bytes = await client.memory_usage(tenant.reservation(open_.id), samples=0)
        await open_.commit(usd=0.01)
        n = 20
        for _ in range(n):
            r = await budget.acquire(T, usd=0.01, requests=1)
            await r.commit(usd=0.005)
        settled = [k for k in await tenant_keys(budget) if k.startswith("s:")]
        assert len(settled) == n + 1
        assert [k for k in await tenant_keys(budget) if k.startswith("r:")] == []
        sizes = [await client.memory_usage(f"{budget.key(T)}:{k}", samples=0) for k in settled]
        assert max(sizes) + EXPIRY_OVERHEAD_BYTES <= GOAL_BYTES_PER_ADMISSION, (sizes, len(tenant.settled("x")))
        assert record_bytes > 3 * GOAL_BYTES_PER_ADMISSION
    finally:
        await budget.aclose()
