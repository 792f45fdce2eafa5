"""A Budget checks Redis's eviction policy once, after its first answered call, and says loudly when keys may go.

Under any ``maxmemory-policy`` but ``noeviction`` Redis may drop a tenant's
limits or windows under memory pressure; the Budget cannot stop that, so it
logs ``redis.evicts_budget_keys`` at error level (once per Budget), and says
nothing when the setting is safe or when its user may not read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from slowburn_redis import Budget
from tests.servers import RedisServer, redis_server_available

T = "acme"


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    if not redis_server_available():
        pytest.fail("redis-server is required on PATH for this test")
    with RedisServer(tmp_path / "redis", "--maxmemory-policy", request.param) as running:
        yield running


async def calls_with_logs(budget: Budget) -> list[dict[str, object]]:
    """Two acquire/commit rounds, then the finished eviction check; the log lines of it all."""
    with capture_logs() as logs:
        await budget.set_limits(T, ["usd 1/hour"])
        for _ in range(2):
            await (await budget.acquire(T, usd=0.1)).commit(usd=0.1)
        assert budget.engine.eviction_check is not None
        await budget.engine.eviction_check
    return logs


@pytest.mark.parametrize("server", ["allkeys-lru", "volatile-lru", "allkeys-random"], indirect=True)
async def test_an_evicting_policy_is_logged_once_at_error_level(server: RedisServer) -> None:
    budget = Budget.from_url(server.url)
    try:
        logs = await calls_with_logs(budget)
    finally:
        await budget.aclose()
    found = [e for e in logs if e["event"] == "redis.evicts_budget_keys"]
    assert len(found) == 1, logs
    assert found[0]["log_level"] == "error" and found[0]["policy"] == server.args[1]
    assert "noeviction" in str(found[0]["fix"])
    assert "password" not in str(found[0]) and str(server.port) in str(found[0]["redis"])


@pytest.mark.parametrize("server", ["noeviction"], indirect=True)
async def test_noeviction_says_nothing(server: RedisServer) -> None:
    budget = Budget.from_url(server.url)
    try:
        logs = await calls_with_logs(budget)
        assert await budget.engine.eviction_policies() == {server.url: "noeviction"}
    finally:
        await budget.aclose()
    assert not [e for e in logs if e["event"] == "redis.evicts_budget_keys"]


@pytest.mark.parametrize("server", ["allkeys-lru"], indirect=True)
async def test_a_user_who_may_not_read_the_policy_is_not_checked_and_not_hindered(server: RedisServer) -> None:
    admin = redis.Redis(port=server.port)
    admin.execute_command("ACL", "SETUSER", "blind", "on", ">pw", "~*", "&*", "+@all", "-config", "-info")
    admin.close()
    budget = Budget.from_url(f"redis://blind:pw@127.0.0.1:{server.port}/0")
    try:
        logs = await calls_with_logs(budget)
        assert await budget.engine.eviction_policies() == {budget.description: None}
    finally:
        await budget.aclose()
    assert not [e for e in logs if e["event"] == "redis.evicts_budget_keys"]
    assert not [e for e in logs if e["log_level"] == "error"]


async def test_the_embedded_store_is_not_an_evicting_redis() -> None:
    budget = Budget.embedded()
    try:
        logs = await calls_with_logs(budget)
    finally:
        await budget.aclose()
    assert not [e for e in logs if e["event"] == "redis.evicts_budget_keys"]
