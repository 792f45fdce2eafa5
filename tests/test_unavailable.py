"""When Redis cannot be reached: ``on_unavailable`` = "wait", "raise" or "allow".

Tested against a closed port, and against a redis-server stopped (SIGKILL)
mid-run and started again on the same port. Also: a call whose reply was lost
is retried with the same arguments and charges or settles only once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import AuthenticationError, BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from slowburn_redis import Budget
from slowburn_redis.errors import InvalidInput, PermissionDenied, RedisUnavailable
from slowburn_redis.resilience import Backoff, is_unavailable
from tests.servers import RedisServer, free_port, redis_server_available

FAST = Backoff(initial=0.01, maximum=0.05)


@pytest.fixture
def closed_url() -> str:
    """A URL with credentials, on a port nothing listens on."""
    return f"redis://worker:s3cret-pw@127.0.0.1:{free_port()}/0"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test (append-only, fsync always) that the test may kill and start again."""
    if not redis_server_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("SLOWBURN_REQUIRE_REAL_REDIS is set but redis-server is missing")
        pytest.skip("needs redis-server")
    srv = RedisServer(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always")
    srv.start()
    yield srv
    srv.stop()


def no_secret(logs: list[dict[str, Any]], *texts: str) -> None:
    for text in texts:
        assert "s3cret-pw" not in text
    assert "s3cret-pw" not in repr(logs)


# the policy on its own -----------------------------------------------------------------


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    delays = Backoff(initial=0.1, maximum=0.8, multiplier=2, jitter=0.5).delays()
    first = [next(delays) for _ in range(8)]
    caps = [0.1, 0.2, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8]
    assert all(cap / 2 <= d <= cap for d, cap in zip(first, caps, strict=True)), first
    exact = Backoff(initial=0.05, maximum=0.2, jitter=0).delays()
    assert [next(exact) for _ in range(4)] == [0.05, 0.1, 0.2, 0.2]
    with pytest.raises(InvalidInput):
        Backoff(initial=0)
    with pytest.raises(InvalidInput):
        Backoff(initial=1, maximum=0.5)


def test_only_reachability_errors_count_as_unavailable() -> None:
    assert is_unavailable(RedisConnectionError("Connection refused"))
    assert is_unavailable(BusyLoadingError("LOADING Redis is loading the dataset in memory"))
    assert is_unavailable(OSError("reset"))
    assert not is_unavailable(AuthenticationError("invalid username-password pair"))
    assert not is_unavailable(ResponseError("ERR Error running script"))
    assert not is_unavailable(ValueError("x"))


def test_bad_policy_options_are_rejected() -> None:
    with pytest.raises(InvalidInput):
        Budget.embedded(on_unavailable="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Budget.embedded(retry_timeout=-1)


# a closed port -------------------------------------------------------------------------


async def test_raise_fails_at_once_with_a_typed_error_naming_the_url_without_credentials(closed_url: str) -> None:
    budget = Budget.from_url(closed_url, on_unavailable="raise", backoff=FAST)
    port = closed_url.rsplit(":", 1)[1].split("/")[0]
    assert budget.description == f"redis://127.0.0.1:{port}/0"
    with capture_logs() as logs:
        with pytest.raises(RedisUnavailable) as caught:
            await budget.acquire("acme", usd=0.1, timeout=30)
        for call in (budget.status("acme"), budget.set_limits("acme", ["usd 1/day"]), budget.reset("acme")):
            with pytest.raises(RedisUnavailable):
                await call
    message = str(caught.value)
    assert f"redis://127.0.0.1:{port}/0" in message
    assert "worker" not in message
    no_secret(logs, message)
    failures = [e for e in logs if e["event"] == "redis.unavailable"]
    assert len(failures) >= 4 and all(e["log_level"] == "error" for e in failures), "no retries, only errors"
    await budget.aclose()


async def test_wait_retries_with_backoff_until_the_acquire_timeout(closed_url: str) -> None:
    budget = Budget.from_url(closed_url, backoff=Backoff(initial=0.01, maximum=0.08))
    with capture_logs() as logs, pytest.raises(RedisUnavailable, match="after retrying"):
        await budget.acquire("acme", usd=0.1, timeout=0.6)
    retries = [e for e in logs if e["event"] == "redis.unavailable" and e["log_level"] == "warning"]
    assert len(retries) >= 3, retries
    assert retries[0]["retry_in"] <= 0.01 and max(e["retry_in"] for e in retries) > 0.01, "the delay grows"
    assert any(e["event"] == "redis.unavailable" and e["log_level"] == "error" and e["attempts"] >= 3 for e in logs)
    no_secret(logs, str(logs))
    await budget.aclose()


async def test_wait_bounds_other_operations_by_retry_timeout(closed_url: str) -> None:
    budget = Budget.from_url(closed_url, retry_timeout=0.2, backoff=FAST)
    with pytest.raises(RedisUnavailable, match="after retrying"):
        await budget.status("acme")
    await budget.aclose()


async def test_allow_fails_open_and_logs_it_loudly(closed_url: str) -> None:
    budget = Budget.from_url(closed_url, on_unavailable="allow")
    with capture_logs() as logs:
        r = await budget.acquire("acme", "bot", usd=0.5, tokens=100, timeout=5)
        assert r.backed is False
        settlement = await r.commit(usd=0.3)
        assert (settlement.settled, settlement.state) == (False, "unbacked")
        async with budget.acquire("acme", usd=0.1) as r2:
            assert not r2.backed
        with pytest.raises(RedisUnavailable):  # there is nothing to show: status does not fail open
            await budget.status("acme")
    opened = [e for e in logs if e["event"] == "budget.fail_open"]
    assert len(opened) == 2 and all(e["log_level"] == "error" for e in opened)
    assert opened[0]["reservation"] == r.id and "WITHOUT a budget check" in opened[0]["note"]
    assert any(e["event"] == "budget.unbacked_settle" and e["log_level"] == "warning" for e in logs)
    no_secret(logs)
    await budget.aclose()


def test_the_sync_twin_keeps_the_policy(closed_url: str) -> None:
    with Budget.from_url(closed_url, on_unavailable="raise").sync() as budget, pytest.raises(RedisUnavailable):
        budget.acquire("acme", usd=0.1)


# a server that goes away and comes back -------------------------------------------------


async def test_wait_goes_on_when_redis_comes_up(tmp_path: Path, server: RedisServer) -> None:
    setup = Budget.from_url(server.url)
    await setup.set_limits("acme", ["usd 1/hour"])  # persisted (AOF, fsync always): there after the restart
    await setup.aclose()
    server.stop()
    budget = Budget.from_url(server.url, backoff=FAST)
    with capture_logs() as logs:
        task = asyncio.ensure_future(budget.acquire("acme", usd=0.2, timeout=30))
        for _ in range(200):  # bounded: until the first failed attempt was logged
            if any(e["event"] == "redis.unavailable" for e in logs):
                break
            await asyncio.sleep(0.02)
        assert not task.done()
        server.start()
        r = await task
    assert r.backed
    assert (await r.commit(usd=0.1)).settled
    assert any(e["event"] == "redis.recovered" for e in logs)
    assert await budget.engine.client.xlen(budget.key("acme") + ":ledger") == 1
    await budget.aclose()


async def test_each_policy_when_the_server_is_killed_mid_run(server: RedisServer) -> None:
    budgets = {
        mode: Budget.from_url(server.url, on_unavailable=mode, backoff=FAST) for mode in ("wait", "raise", "allow")
    }
    await budgets["wait"].set_limits("acme", ["usd 10/hour"])
    held = {}
    for mode, budget in budgets.items():
        await (await budget.acquire("acme", usd=0.1)).commit(usd=0.1)
        held[mode] = await budget.acquire("acme", usd=0.5)

    server.kill()
    with capture_logs() as logs:
        with pytest.raises(RedisUnavailable):
            await budgets["raise"].acquire("acme", usd=0.1)
        with pytest.raises(RedisUnavailable):
            await held["raise"].commit(usd=0.2)  # the reservation stays open: commit again later
        with pytest.raises(RedisUnavailable):
            await budgets["wait"].acquire("acme", usd=0.1, timeout=0.3)
        unbacked = await budgets["allow"].acquire("acme", usd=0.1)
        assert not unbacked.backed
        lost = await held["allow"].commit(usd=0.2)
        assert (lost.settled, lost.state) == (False, "unavailable")
        # A commit in "wait" mode waits for Redis to come back.
        waiting_commit = asyncio.ensure_future(held["wait"].commit(usd=0.2))
        await asyncio.sleep(0.2)
        assert not waiting_commit.done()
    assert any(e["event"] == "budget.settle_lost" and e["log_level"] == "error" for e in logs)

    server.start()
    done = await asyncio.wait_for(waiting_commit, 30)
    assert done.settled and done.state == "committed"
    retried = await held["raise"].commit(usd=0.2)
    assert retried.settled and retried.state == "committed"
    for budget in budgets.values():  # every client reconnects by itself
        r = await budget.acquire("acme", usd=0.1)
        assert r.backed
        await r.commit(usd=0.1)
    status = await budgets["wait"].status("acme")
    # 3 x 0.1 before, 0.2 + 0.2 committed across the outage, the allow one held at its 0.5 estimate, 3 x 0.1 after.
    assert status.limits[0].used + status.limits[0].reserved == pytest.approx(0.3 + 0.4 + 0.5 + 0.3)
    ledger = await budgets["wait"].engine.client.xlen(budgets["wait"].key("acme") + ":ledger")
    assert ledger == 3 + 2 + 3
    for budget in budgets.values():
        await budget.aclose()


# lost replies ----------------------------------------------------------------------------


class LossyClient:
    """Delegates to a client; `lose` replies of EVALSHA are dropped after the command ran."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.lose = 0
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        reply = await self._client.evalsha(sha, numkeys, *keys_and_args)
        self.calls.append(keys_and_args)  # ran on Redis
        if self.lose:
            self.lose -= 1
            raise RedisConnectionError("Connection reset by peer (reply lost)")
        return reply


async def test_a_lost_acquire_reply_is_retried_with_the_same_id_and_charges_once(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour", "requests 10/hour"])
    lossy = LossyClient(budget.engine.client)
    budget.engine.client = lossy
    lossy.lose = 1
    r = await budget.acquire("acme", usd=0.4)
    assert len(lossy.calls) == 2 and lossy.calls[0] == lossy.calls[1], "the retry sends the same reservation id"
    assert lossy.calls[0][1].split(" ")[0] == r.id  # one request: "<id> <agent> <mode> ..."
    status = {s.key: s for s in (await budget.status("acme")).limits}
    assert status["T:usd:3600000"].reserved == pytest.approx(0.4)
    assert status["T:requests:3600000"].used + status["T:requests:3600000"].reserved == 1

    lossy.lose = 1
    settled = await r.commit(usd=0.1)
    assert settled.state == "committed"  # the retry finds it committed already
    status = {s.key: s for s in (await budget.status("acme")).limits}
    assert status["T:usd:3600000"].used == pytest.approx(0.1)
    assert status["T:usd:3600000"].reserved == 0
    assert await budget.engine.client.xlen(budget.key("acme") + ":ledger") == 1


async def test_a_lost_release_reply_is_retried_and_refunds_once(budget: Budget) -> None:
    await budget.set_limits("acme", ["usd 1/hour"])
    keep = await budget.acquire("acme", usd=0.3)
    await keep.commit()
    lossy = LossyClient(budget.engine.client)
    budget.engine.client = lossy
    r = await budget.acquire("acme", usd=0.5)
    lossy.lose = 1
    assert (await r.release()).state == "released"
    limit = (await budget.status("acme")).limits[0]
    assert (limit.used, limit.reserved) == (pytest.approx(0.3), 0)


async def test_script_errors_are_not_retried(budget: Budget) -> None:
    lossy = LossyClient(budget.engine.client)
    budget.engine.client = lossy

    async def refuse(*args: Any) -> Any:
        lossy.calls.append(args)
        raise ResponseError("NOPERM this user has no permissions to run the 'evalsha' command")

    lossy.evalsha = refuse  # type: ignore[method-assign]
    with pytest.raises(PermissionDenied) as caught:  # an ACL refusal, typed, and never retried
        await budget.acquire("acme", usd=0.1)
    assert isinstance(caught.value.__cause__, ResponseError)
    scripts = [call[0] for call in lossy.calls]
    assert len(scripts) == len(set(scripts)), "each script was tried once"
