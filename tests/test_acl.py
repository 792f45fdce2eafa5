"""Redis ACL: a worker user runs its own tenant's budget and nothing else; an admin sets limits and resets.

Runs against a redis-server this module starts (the default user stays open
for setup and for inspecting keys); the users come from `acl_rules`.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError
from structlog.testing import capture_logs

from slowburn_redis import Budget, LimitsMissing
from slowburn_redis.acl import ADMIN_KEY, SCRIPT_COMMANDS, acl_rules, permission_error
from slowburn_redis.errors import BudgetExhausted, InvalidInput, PermissionDenied
from slowburn_redis.scripts import lua_dir
from tests.servers import RedisServer, redis_server_available
from tests.statecheck import glob_escape, snapshot

pytestmark = pytest.mark.realredis

ACME, GLOBEX = "acme", "globex"


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of this module's own (its ACL users never leak into other tests)."""
    if not redis_server_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("redis-server is required (SLOWBURN_REQUIRE_REAL_REDIS) but not on PATH")
        pytest.skip("redis-server not on PATH")
    server = RedisServer(tmp_path_factory.mktemp("acl"))
    server.start()
    yield server
    server.stop()


@dataclass
class Env:
    """Users for two tenants under one fresh prefix, and a default-user client to inspect keys."""

    port: int
    prefix: str
    admin: aioredis.Redis
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"

    def budget(self, user: str, **options: Any) -> Budget:
        return Budget.from_url(self.url(user), prefix=self.prefix, **options)

    def worker(self, tenant: str) -> str:
        return f"{self.prefix}-worker-{tenant}"

    def admin_user(self, tenant: str) -> str:
        return f"{self.prefix}-admin-{tenant}"

    async def keys(self, tenant: str) -> Any:
        return await snapshot(self.admin, glob_escape(f"{self.prefix}:{{{tenant}}}") + "*")


@pytest.fixture
async def env(acl_server: RedisServer) -> AsyncIterator[Env]:
    """Worker and admin users of ACME and GLOBEX for this test's prefix, with limits set by the admins."""
    prefix = "acl" + secrets.token_hex(3)
    root = aioredis.Redis(port=acl_server.port, decode_responses=True)
    passwords: dict[str, str] = {}
    for tenant in (ACME, GLOBEX):
        for line in acl_rules(tenant, prefix=prefix):
            await root.execute_command(*line.split())
            user = line.split()[2]
            passwords[user] = secrets.token_hex(8)
            await root.execute_command("ACL", "SETUSER", user, ">" + passwords[user])
    env = Env(acl_server.port, prefix, root, passwords)
    for tenant in (ACME, GLOBEX):
        async with env.budget(env.admin_user(tenant)) as admin:
            await admin.set_limits(tenant, ["usd 1/day", "concurrency 2"])
            await admin.set_limits(tenant, ["usd 0.5/hour"], agent="bot")
    yield env
    for user in passwords:
        await root.execute_command("ACL", "DELUSER", user)
    await root.aclose()


async def assert_refused(awaitable: Any) -> BaseException:
    """The awaitable fails with an ACL refusal (PermissionDenied, or a Redis error it maps to)."""
    with pytest.raises(Exception) as info:
        await awaitable
    exc = info.value
    assert isinstance(exc, PermissionDenied) or permission_error(exc) is not None, repr(exc)
    return exc


# the rules ---------------------------------------------------------------------


def test_rules_are_one_line_per_user_with_the_tenant_keys_only() -> None:
    worker, admin = acl_rules("acme", prefix="sb")
    assert worker.startswith("ACL SETUSER sb-worker-acme on resetkeys resetchannels clearselectors -@all ")
    assert admin.startswith("ACL SETUSER sb-admin-acme on ")
    for line in (worker, admin):
        keys = [word for word in line.split() if "~" in word]
        assert keys and all(re.fullmatch(r"(%R)?~sb:\{acme\}(:.*)?", word) for word in keys), keys
        assert [word for word in line.split() if word.startswith("&")] == ["&sb:{acme}:*"]
        assert "nopass" not in line and ">" not in line and "+@all" not in line
        for dangerous in ("+eval", "+flushall", "+flushdb", "+keys", "+config", "+acl", "+script|flush", "+debug"):
            assert dangerous not in line.split()
    assert "%R~sb:{acme}:limits" in worker.split()
    assert "~sb:{acme}:*" not in worker.split() and f"~sb:{{acme}}:{ADMIN_KEY}" not in worker
    assert "~sb:{acme}:*" in admin.split()
    assert acl_rules("acme", prefix="p", worker_user="w1", admin_user="a1")[0].startswith("ACL SETUSER w1 ")


@pytest.mark.parametrize(
    ("tenant", "options"),
    [
        ("ac me", {}),
        ("a*", {}),
        ("a}b", {}),
        ("", {}),
        ("acme", {"prefix": "sb:x"}),
        ("acme", {"worker_user": "w x"}),
        ("acme", {"admin_user": ">pass"}),
        ("acme", {"worker_user": "same", "admin_user": "same"}),
    ],
)
def test_bad_names_are_refused(tenant: str, options: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        acl_rules(tenant, **options)  # type: ignore[arg-type]


def test_script_commands_cover_every_redis_call_in_the_lua_sources() -> None:
    """A command added to a script without adding it here would break every ACL user."""
    folder = Path(str(lua_dir()))
    sources = [path.read_text() for path in [*folder.glob("*.lua"), *folder.glob("clock/*.lua")]]
    assert sources
    calls = [call for source in sources for call in re.findall(r"redis\.p?call\(\s*([^,)]*)", source)]
    assert calls
    literal = [re.fullmatch(r"'([A-Za-z]+)'", call) for call in calls]
    assert all(literal), [call for call, match in zip(calls, literal, strict=True) if not match]
    used = {match[1].lower() for match in literal if match}
    assert used <= set(SCRIPT_COMMANDS), used - set(SCRIPT_COMMANDS)


def test_permission_error_maps_only_acl_refusals() -> None:
    top = permission_error(NoPermissionError("this user has no permissions to access one of the keys"))
    assert isinstance(top, PermissionDenied) and "no permissions" in str(top)
    inner = ResponseError("The user executing the script can't access at least one of the keys script: ab12, on x")
    mapped = permission_error(inner)
    assert isinstance(mapped, PermissionDenied) and "script: ab12" not in str(mapped)
    assert permission_error(ResponseError("WRONGTYPE Operation against a key")) is None
    assert permission_error(ValueError("x")) is None


# the worker ----------------------------------------------------------------------


async def test_worker_acquires_commits_releases_and_reads_its_tenant(env: Env) -> None:
    async with env.budget(env.worker(ACME)) as worker:
        async with worker.acquire(ACME, usd=0.2) as r:
            await r.commit(usd=0.1, model="m")
        r2 = await worker.acquire(ACME, agent="bot", usd=0.3)
        await r2.extend(30)
        await r2.release()
        status = await worker.status(ACME)
        usd = next(row for row in status.limits if row.key == "T:usd:86400000")
        assert usd.used == pytest.approx(0.1)
        assert [str(limit) for limit in await worker.get_limits(ACME)] == ["usd 1/day", "concurrency 2"]
        with pytest.raises(BudgetExhausted):
            await worker.acquire(ACME, usd=0.95, mode="reject")
    assert (await env.admin.xlen(f"{env.prefix}:{{{ACME}}}:ledger")) == 1


async def test_worker_waits_and_is_woken_by_another_workers_release(env: Env) -> None:
    async with env.budget(env.worker(ACME)) as a, env.budget(env.worker(ACME)) as b:
        first = await a.acquire(ACME, usd=0.9)
        waiting = asyncio.ensure_future(b.acquire(ACME, usd=0.5, timeout=10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await first.release()
        second = await asyncio.wait_for(waiting, 5)
        await second.commit(usd=0.5)


async def test_worker_reloads_scripts_after_a_script_flush(env: Env) -> None:
    async with env.budget(env.worker(ACME)) as worker:
        await (await worker.acquire(ACME, usd=0.01)).release()
        await env.admin.script_flush()
        await (await worker.acquire(ACME, usd=0.01)).release()


async def test_worker_hears_its_tenants_events(env: Env) -> None:
    async with env.budget(env.worker(ACME)) as worker, env.budget(env.admin_user(ACME)) as admin:
        events = worker.events(ACME)
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.2)
        await admin.reset(ACME)
        event = await asyncio.wait_for(first, 5)
        assert event.type == "reset"
        first.cancel()
        await events.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "operation",
    [
        lambda b: b.set_limits(ACME, ["usd 100/day"]),
        lambda b: b.set_limits(ACME, ["usd 100/day"], agent="bot"),
        lambda b: b.set_limits(ACME, ["usd 100/day"], agent="*"),
        lambda b: b.clear_limits(ACME),
        lambda b: b.reset(ACME),
        lambda b: b.reset(ACME, agent="bot"),
        lambda b: b.reset(ACME, dimension="concurrency"),
    ],
    ids=["limits", "agent-limits", "default-limits", "clear", "reset", "reset-agent", "reset-concurrency"],
)
async def test_worker_cannot_set_limits_or_reset(env: Env, operation: Any) -> None:
    async with env.budget(env.worker(ACME)) as worker:
        held = await worker.acquire(ACME, agent="bot", usd=0.3)
        await (await worker.acquire(ACME, usd=0.2)).commit(usd=0.2)
        before = await env.keys(ACME)
        await assert_refused(operation(worker))
        assert await env.keys(ACME) == before
        assert f"{env.prefix}:{{{ACME}}}:{ADMIN_KEY}" in before  # written by the admin's set_limits
        await held.release()


async def test_worker_cannot_touch_another_tenant(env: Env) -> None:
    async with env.budget(env.admin_user(GLOBEX)) as globex_admin:
        await (await globex_admin.acquire(GLOBEX, usd=0.3)).commit(usd=0.3)
    before = await env.keys(GLOBEX)
    assert before
    async with env.budget(env.worker(ACME)) as worker:
        await assert_refused(worker.acquire(GLOBEX, usd=0.01))
        await assert_refused(worker.acquire(GLOBEX, agent="bot", usd=0.01, mode="reject"))
        await assert_refused(worker.status(GLOBEX))
        await assert_refused(worker.get_limits(GLOBEX))
        await assert_refused(worker.set_limits(GLOBEX, ["usd 100/day"]))
        await assert_refused(worker.reset(GLOBEX))
    async with env.budget(env.admin_user(ACME)) as acme_admin:
        await assert_refused(acme_admin.set_limits(GLOBEX, ["usd 100/day"]))
        await assert_refused(acme_admin.reset(GLOBEX))
        await assert_refused(acme_admin.acquire(GLOBEX, usd=0.01))
    # Another prefix is another set of keys: refused too.
    other = Budget.from_url(env.url(env.worker(ACME)), prefix="sb")
    await assert_refused(other.acquire(ACME, usd=0.01))
    await other.aclose()
    assert await env.keys(GLOBEX) == before


async def test_worker_raw_commands_are_confined(env: Env) -> None:
    """What a leaked worker password allows: nothing outside its tenant, no writes to limits."""
    client = aioredis.Redis.from_url(env.url(env.worker(ACME)), decode_responses=True)
    mine, theirs = f"{env.prefix}:{{{ACME}}}", f"{env.prefix}:{{{GLOBEX}}}"
    before = await env.keys(GLOBEX)
    refused = [
        client.hset(f"{mine}:limits", "T", "[]"),
        client.delete(f"{mine}:limits"),
        client.set(f"{mine}:{ADMIN_KEY}", "x"),
        client.get(f"{mine}:{ADMIN_KEY}"),
        client.hgetall(f"{theirs}:limits"),
        client.delete(f"{theirs}:limits"),
        client.publish(f"{theirs}:wake", "*"),
        client.eval("return 1", 0),
        client.keys("*"),
        client.flushall(),
        client.config_get("*"),
        client.execute_command("ACL", "WHOAMI"),
        client.script_flush(),
    ]
    for call in refused:
        with pytest.raises(NoPermissionError):
            await call
    pubsub = client.pubsub()
    with pytest.raises(NoPermissionError):  # the refusal comes back as the reply to SUBSCRIBE
        await pubsub.subscribe(f"{theirs}:events")
        await pubsub.get_message(timeout=2)
    await pubsub.aclose()
    assert await client.hget(f"{mine}:limits", "T")  # reading its own limits is allowed
    assert await env.keys(GLOBEX) == before
    await client.aclose()


async def test_budget_raises_permission_denied(env: Env) -> None:
    async with env.budget(env.worker(ACME)) as worker:
        with pytest.raises(PermissionDenied, match="ACL"):
            await worker.reset(ACME)
        with pytest.raises(PermissionDenied, match="ACL"):
            await worker.acquire(GLOBEX, usd=0.01)


# the admin -----------------------------------------------------------------------


async def test_admin_sets_limits_and_resets_and_a_reset_wakes_a_worker(env: Env) -> None:
    async with env.budget(env.worker(ACME)) as worker, env.budget(env.admin_user(ACME)) as admin:
        await (await worker.acquire(ACME, usd=0.9)).commit(usd=0.9)
        waiting = asyncio.ensure_future(worker.acquire(ACME, usd=0.5, timeout=10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        assert await admin.reset(ACME) >= 1
        await (await asyncio.wait_for(waiting, 5)).commit(usd=0.5)
        await admin.set_limits(ACME, ["usd 3/day"])
        assert [str(limit) for limit in await worker.get_limits(ACME)] == ["usd 3/day"]
        await (await worker.acquire(ACME, usd=2)).release()
        admin_record = await env.admin.get(f"{env.prefix}:{{{ACME}}}:{ADMIN_KEY}")
        assert admin_record is not None and "set_limits" in admin_record


async def test_a_worker_cannot_reseed_and_says_so_an_admin_can(env: Env) -> None:
    declared = {ACME: ["usd 1/day", "concurrency 2"]}
    async with env.budget(env.admin_user(ACME)) as admin:
        await admin.clear_limits(ACME)
        await admin.clear_limits(ACME, agent="bot")
    async with env.budget(env.worker(ACME), desired_limits=declared) as worker:
        with capture_logs() as logs, pytest.raises(LimitsMissing):
            await worker.acquire(ACME, usd=0.1)
    refused = [e for e in logs if e["event"] == "limits.reseed_refused"]
    assert len(refused) == 1 and refused[0]["log_level"] == "error" and "--only-missing" in str(refused[0]["fix"])
    assert await env.admin.hlen(f"{env.prefix}:{{{ACME}}}:limits") == 0, "nothing was written"
    async with env.budget(env.admin_user(ACME), desired_limits=declared) as admin:
        await (await admin.acquire(ACME, usd=0.1)).release()
        assert [str(limit) for limit in await admin.get_limits(ACME)] == ["usd 1/day", "concurrency 2"]
