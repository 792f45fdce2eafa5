"""Redis answered and refused: each refusal provoked on a real throwaway redis-server, and its typed error.

The contract (slowburn_redis.resilience, "Refused"): READONLY, LOADING and
BUSY pass by themselves, so they are retried within the call's deadline
(then raised as RedisReadOnly, RedisLoading, RedisBusy); OOM and MISCONF
need an operator, so they are raised at once under every policy
(RedisOutOfMemory, RedisMisconfigured). No refusal is ever failed open, and
a refused acquire charges nothing.

Every test waits for the server's condition (INFO fields, a refused PING),
never for wall time. The "retried" and "at once" claims are checked on the
logs (how many attempts were made), not on a clock.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

import slowburn_redis
from slowburn_redis import (
    Budget,
    RedisBusy,
    RedisLoading,
    RedisMisconfigured,
    RedisOutOfMemory,
    RedisReadOnly,
    RedisRefused,
    RedisUnavailable,
)
from slowburn_redis.redis_server import free_port
from slowburn_redis.resilience import refusal_code
from tests.servers import RedisServer, redis_server_available

TENANT = "acme"
LIMITS = ["usd 1/hour", "requests 100/hour"]


# the public names -------------------------------------------------------------------------


def test_the_refusal_errors_are_exported() -> None:
    names = ["RedisRefused", "RedisOutOfMemory", "RedisMisconfigured", "RedisReadOnly", "RedisLoading", "RedisBusy"]
    for name in names:
        assert name in slowburn_redis.__all__, name
        assert issubclass(getattr(slowburn_redis, name), RedisRefused)
    for passing in (RedisReadOnly, RedisLoading, RedisBusy):
        assert issubclass(passing, RedisUnavailable), "a passing refusal is caught wherever an outage is"
    for final in (RedisOutOfMemory, RedisMisconfigured):
        assert not issubclass(final, RedisUnavailable), "a refusal needing an operator is not an outage"


# refusal_code on every form redis-py produces ----------------------------------------------

RAW = {
    "OOM": "OOM command not allowed when used memory > 'maxmemory'.",
    "MISCONF": "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "READONLY": "READONLY You can't write against a read only replica.",
    "LOADING": "LOADING Redis is loading the dataset in memory",
    "BUSY": "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
}
IN_SCRIPT = " script: 4f1d8c6e2b, on @user_script:12."


@pytest.mark.parametrize("code", sorted(RAW))
@pytest.mark.parametrize("suffix", ["", IN_SCRIPT], ids=["command", "in-script"])
def test_refusal_code_reads_what_the_redis_py_parser_makes(code: str, suffix: str) -> None:
    """The parser's own exception (typed for OOM, LOADING, READONLY; plain ResponseError for BUSY, MISCONF)."""
    parsed = BaseParser.parse_error(RAW[code] + suffix)
    assert refusal_code(parsed) == code, (type(parsed).__name__, str(parsed))


@pytest.mark.parametrize("code", sorted(RAW))
@pytest.mark.parametrize("leading", ["", "-"], ids=["text", "wire"])
def test_refusal_code_reads_a_plain_response_error_text(code: str, leading: str) -> None:
    assert refusal_code(ResponseError(leading + RAW[code])) == code
    assert refusal_code(ResponseError(leading + RAW[code] + IN_SCRIPT)) == code


@pytest.mark.parametrize(
    "exc",
    [
        ResponseError("ERR Error running script: OOM in a message that does not start with it"),
        ResponseError("NOSCRIPT No matching script."),
        ResponseError("BUSYKEY Target key name already exists."),
        ResponseError("OOMKILLED made up"),
        ResponseError(""),
        RedisConnectionError("Connection refused"),
        ValueError("OOM"),
    ],
    ids=repr,
)
def test_refusal_code_is_none_for_anything_else(exc: BaseException) -> None:
    assert refusal_code(exc) is None


# real servers ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _needs_redis_server(request: pytest.FixtureRequest) -> None:
    if "server" not in request.fixturenames and "loading_server" not in request.fixturenames:
        return
    if not redis_server_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("SLOWBURN_REQUIRE_REAL_REDIS is set but redis-server is missing")
        pytest.skip("needs redis-server")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A fresh server per test: each test leaves it refusing something."""
    with RedisServer(
        None, "--busy-reply-threshold", "50", "--enable-debug-command", "yes", "--enable-protected-configs", "yes"
    ) as srv:
        yield srv


@pytest.fixture
async def control(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=server.port, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def budgets(server: RedisServer, prefix: str) -> AsyncIterator[Callable[..., Budget]]:
    built: list[Budget] = []

    def make(url: str = server.url, **options: Any) -> Budget:
        budget = Budget.from_url(url, prefix=prefix, **options)
        built.append(budget)
        return budget

    yield make
    for budget in built:
        await asyncio.wait_for(budget.aclose(), 30)


async def until(check: Callable[[], Any], what: str, within: float = 60.0) -> None:
    """Poll `check` (sync or async) until truthy; fails after `within` seconds (a hang, not a timing)."""
    give_up = time.monotonic() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > give_up:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


PY_NAMES = {"READONLY": "ReadOnlyError", "LOADING": "BusyLoadingError", "OOM": "OutOfMemoryError"}
"""The redis-py exception a typed refusal arrives as (its text then lacks the code); the others carry the code."""


def attempts(logs: list[dict[str, Any]], code: str) -> int:
    """How many attempts of an acquire the logs show refused with `code` and retried (each logs ``retry_in``)."""
    marks = (code, PY_NAMES.get(code, code))
    return sum(
        1
        for e in logs
        if e["event"] == "redis.unavailable"
        and e.get("operation") == "acquire"
        and "retry_in" in e
        and any(mark in str(e.get("error", "")) for mark in marks)
    )


async def charged(budget: Budget) -> tuple[float, float, float]:
    """(usd used, usd reserved, requests used + reserved) of the tenant."""
    by = {lim.key.split(":")[1]: lim for lim in (await budget.status(TENANT)).limits}
    return by["usd"].used, by["usd"].reserved, by["requests"].used + by["requests"].reserved


async def info(client: aioredis.Redis, section: str) -> dict[str, Any]:
    return dict(await client.info(section))


# final refusals: raised at once, never retried, never failed open --------------------------


@pytest.mark.parametrize("policy", ["wait", "allow"])
async def test_out_of_memory_is_raised_at_once_and_charges_nothing(
    control: aioredis.Redis, budgets: Callable[..., Budget], policy: str
) -> None:
    budget = budgets(on_unavailable=policy)
    await budget.set_limits(TENANT, LIMITS)
    await (await budget.acquire(TENANT, usd=0.01)).release()  # connected, scripts loaded
    await control.execute_command("DEBUG", "POPULATE", 2000, "filler", 100)
    await control.config_set("maxmemory-policy", "noeviction")
    await control.config_set("maxmemory", 1024 * 1024)  # far below what the server already holds
    used = (await info(control, "memory"))["used_memory"]
    assert used > 1024 * 1024, used
    with capture_logs() as logs, pytest.raises(RedisOutOfMemory) as caught:
        await budget.acquire(TENANT, usd=0.1, timeout=30)
    assert caught.value.code == "OOM" and not isinstance(caught.value, RedisUnavailable)
    assert attempts(logs, "OOM") == 0, "no retry"
    # The acquire is refused once, not retried; its cleanup (the release of its id) may be refused too.
    refused = [e["event"] for e in logs if e.get("code") == "OOM" and e.get("operation") == "acquire"]
    assert refused == ["redis.refused"], [(e["event"], e.get("operation"), e.get("code")) for e in logs]
    assert not any(e["event"] == "budget.fail_open" for e in logs), "a refusal is never failed open"
    await control.config_set("maxmemory", 0)
    assert await charged(budget) == (0, 0, 0), "nothing was charged"


@pytest.mark.parametrize("policy", ["wait", "allow"])
async def test_misconf_is_raised_at_once_and_charges_nothing(
    server: RedisServer, control: aioredis.Redis, budgets: Callable[..., Budget], policy: str
) -> None:
    """A BGSAVE that fails (its dir removed under the server: works as root too) stops writes."""
    budget = budgets(on_unavailable=policy)
    await budget.set_limits(TENANT, LIMITS)
    await (await budget.acquire(TENANT, usd=0.01)).release()
    doomed = server.directory / "doomed"
    doomed.mkdir()
    await control.config_set("save", "3600 1")  # stop-writes-on-bgsave-error applies only with save points
    await control.config_set("stop-writes-on-bgsave-error", "yes")
    await control.config_set("dir", str(doomed))
    doomed.rmdir()  # the server's working directory is gone: it cannot create its temp RDB file
    await control.bgsave()

    async def failed() -> bool:
        persistence = await info(control, "persistence")
        return not persistence["rdb_bgsave_in_progress"] and persistence["rdb_last_bgsave_status"] == "err"

    await until(failed, "the BGSAVE to fail")
    with capture_logs() as logs, pytest.raises(RedisMisconfigured) as caught:
        await budget.acquire(TENANT, usd=0.1, timeout=30)
    assert caught.value.code == "MISCONF" and not isinstance(caught.value, RedisUnavailable)
    assert attempts(logs, "MISCONF") == 0, "no retry"
    assert not any(e["event"] == "budget.fail_open" for e in logs), "a refusal is never failed open"
    await control.config_set("dir", str(server.directory))
    await control.config_set("save", "")
    assert await charged(budget) == (0, 0, 0), "nothing was charged"


# passing refusals: retried within the deadline, raised after it, admitted once they pass ----


async def test_readonly_is_retried_until_the_deadline_then_passes_when_promoted(
    server: RedisServer, budgets: Callable[..., Budget], prefix: str
) -> None:
    primary = budgets()
    await primary.set_limits(TENANT, LIMITS)
    with RedisServer() as replica_server:
        replica = aioredis.Redis(port=replica_server.port, decode_responses=True)
        try:
            await replica.replicaof("127.0.0.1", server.port)

            async def synced() -> bool:
                return (await info(replica, "replication")).get("master_link_status") == "up"

            await until(synced, "the replica to sync")
            budget = budgets(replica_server.url)
            # The script already loaded there: the deadline is for refused attempts, not a first NOSCRIPT and
            # SCRIPT LOAD (on a loaded machine they alone outlasted a 0.5 s deadline before any READONLY came).
            await replica.script_load(budget.engine.scripts.acquire.source)
            with capture_logs() as logs, pytest.raises(RedisReadOnly) as caught:
                await budget.acquire(TENANT, usd=0.1, timeout=2.0)
            assert caught.value.code == "READONLY" and isinstance(caught.value, RedisUnavailable)
            assert attempts(logs, "READONLY") >= 1, "retried before giving up"

            with capture_logs() as logs:
                admitted = asyncio.ensure_future(budget.acquire(TENANT, usd=0.1, timeout=60))
                await until(lambda: attempts(logs, "READONLY") >= 1, "a refused attempt")
                await replica.replicaof("NO", "ONE")  # a failover promoted it
                reservation = await admitted
            assert (await reservation.release()).state == "released"
        finally:
            await replica.aclose()
    assert await charged(primary) == (0, 0, 0), "the refused attempts charged nothing on the primary"


def _busy_script(port: int, errors: list[BaseException]) -> None:
    """Another client's script that never ends by itself (until SCRIPT KILL)."""
    client = redis.Redis(port=port)
    try:
        client.eval("while true do end", 0)
    except BaseException as exc:  # "Script killed by user with SCRIPT KILL"
        errors.append(exc)
    finally:
        client.close()


async def test_busy_is_retried_until_the_deadline_then_passes_after_script_kill(
    server: RedisServer, control: aioredis.Redis, budgets: Callable[..., Budget]
) -> None:
    budget = budgets()
    await budget.set_limits(TENANT, LIMITS)
    await (await budget.acquire(TENANT, usd=0.01)).release()
    ended: list[BaseException] = []
    busy = threading.Thread(target=_busy_script, args=(server.port, ended), daemon=True)
    busy.start()

    async def refusing() -> bool:
        try:
            await control.ping()
        except ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    try:
        await until(refusing, "the script to run past busy-reply-threshold")
        with capture_logs() as logs, pytest.raises(RedisBusy) as caught:
            await budget.acquire(TENANT, usd=0.1, timeout=0.5)
        assert caught.value.code == "BUSY" and isinstance(caught.value, RedisUnavailable)
        assert attempts(logs, "BUSY") >= 1, "retried before giving up"

        with capture_logs() as logs:
            admitted = asyncio.ensure_future(budget.acquire(TENANT, usd=0.1, timeout=60))
            await until(lambda: attempts(logs, "BUSY") >= 1, "a refused attempt")
            await control.script_kill()
            reservation = await admitted
        assert (await reservation.release()).state == "released"
    finally:
        if busy.is_alive():
            with pytest.raises(ResponseError):
                await control.script_kill()
        await asyncio.to_thread(busy.join, 30)
    assert ended, "the busy script was killed"
    assert await charged(budget) == (0, 0, 0)


# LOADING needs a server that is still loading: started by hand (RedisServer waits for PING).


def _populate(directory: Path, prefix: str, keys: int) -> None:
    """An RDB in `directory` holding the tenant's limits and `keys` filler keys."""

    async def limits(url: str) -> None:
        async with Budget.from_url(url, prefix=prefix) as budget:
            await budget.set_limits(TENANT, LIMITS)

    with RedisServer(directory, "--enable-debug-command", "yes") as seed:
        asyncio.run(limits(seed.url))
        client = redis.Redis(port=seed.port)
        client.execute_command("DEBUG", "POPULATE", keys, "filler", 20)
        client.save()
        client.close()


@pytest.fixture
def loading_server(tmp_path: Path, prefix: str) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A redis-server loading a 40,000-key RDB at about 0.1 ms a key, answering LOADING meanwhile."""
    _populate(tmp_path, prefix, 40_000)
    port = free_port()
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
        "--save", "", "--appendonly", "no", "--logfile", str(tmp_path / "loading.log"),
        "--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port, process
    finally:
        process.terminate()
        process.wait(10)


async def test_loading_is_retried_until_the_deadline_then_passes_once_loaded(
    loading_server: tuple[int, subprocess.Popen[bytes]], budgets: Callable[..., Budget]
) -> None:
    port, process = loading_server
    control = aioredis.Redis(port=port, decode_responses=True)

    async def loading() -> bool:
        assert process.poll() is None, "the loading server died"
        try:
            return bool((await info(control, "persistence"))["loading"])
        except RedisConnectionError:  # not listening yet
            return False

    try:
        await until(loading, "the server to start loading")
        budget = budgets(f"redis://127.0.0.1:{port}/0")
        with capture_logs() as logs, pytest.raises(RedisLoading) as caught:
            await budget.acquire(TENANT, usd=0.1, timeout=0.3)
        assert caught.value.code == "LOADING" and isinstance(caught.value, RedisUnavailable)
        assert attempts(logs, "LOADING") >= 1, "retried before giving up"
        assert await loading(), "still loading: the next acquire is refused first"

        with capture_logs() as logs:
            reservation = await budget.acquire(TENANT, usd=0.1, timeout=120)
        assert attempts(logs, "LOADING") >= 1, "refused while loading, retried, then admitted"
        assert not await loading()
        assert (await reservation.release()).state == "released"
        assert await charged(budget) == (0, 0, 0)
    finally:
        await control.aclose()
