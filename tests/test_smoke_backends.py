"""The fixtures give both backends, and a budget works on each."""

from slowburn_redis import Budget


async def test_acquire_commit_on_each_backend(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/min"])
    r = await budget.acquire("acme", usd=0.4)
    await r.commit(usd=0.1)
    status = await budget.status("acme")
    assert status.limits[0].used == 0.1
    assert status.limits[0].remaining == 0.9
