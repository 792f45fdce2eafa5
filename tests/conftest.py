"""Test fixtures: every behaviour test runs on fakeredis and on a real Redis.

The real Redis is, in order: ``SLOWBURN_TEST_REDIS_URL``; a ``redis-server``
this session starts on a free port in a temp dir; a testcontainers Redis when
a Docker engine answers. Otherwise the real-Redis tests skip, unless
``SLOWBURN_REQUIRE_REAL_REDIS=1`` (set by ``.ci/run``) turns the skip into a
failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
# CrewAI asks on the terminal whether to show its traces (and waits 20 s) on a first run, unless it knows it is tested.
os.environ.setdefault("CREWAI_TESTING", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

import gc
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis

from slowburn_redis import Budget
from tests.servers import RedisServer, free_port, redis_server_available
from tests.watchdog import Watchdog

BACKENDS = ("fake", "real")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Every test body runs under a `tests.watchdog.Watchdog`: a hang is shown and stopped, not waited on."""
    with Watchdog(item.nodeid):
        return (yield)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Collect litellm's logging task of a closed event loop now, not at a random later moment.

    litellm keeps one logging-worker task per event loop and drops it only when
    the next loop makes a call. Collected later at some random moment, the
    pending task's finalizer reports through the unraisable hook, whose
    traceback formatting runs ``ast.parse``; landing inside another
    ``ast.parse`` (pytest's assertion rewriting, tests/test_structure.py) it
    breaks CPython 3.11's shared AST state ("AST constructor recursion depth
    mismatch"). Detached and collected here, after the test, it cannot land there.
    """
    worker_module = sys.modules.get("litellm.litellm_core_utils.logging_worker")
    worker = getattr(worker_module, "GLOBAL_LOGGING_WORKER", None)
    loop = getattr(worker, "_bound_loop", None)
    if worker is None or loop is None or not loop.is_closed():
        return
    for name in ("_queue", "_worker_task", "_sem", "_bound_loop", "_timeout_summary_task"):
        if hasattr(worker, name):
            setattr(worker, name, None)
    getattr(worker, "_running_tasks", set()).clear()
    gc.collect()


def _require_real() -> bool:
    return os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false")


def _missing_real(reason: str) -> None:
    if _require_real():
        pytest.fail(f"a real Redis is required (SLOWBURN_REQUIRE_REAL_REDIS) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """The URL of a real Redis for this session, or None (with the reason in the skip)."""
    url = os.environ.get("SLOWBURN_TEST_REDIS_URL")
    if url:
        yield url
        return
    if redis_server_available():
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    try:  # pragma: no cover - only where Docker answers
        from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]

        with RedisContainer("redis:7") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
            return
    except Exception:
        yield None


@pytest.fixture
def real_url(real_redis_url: str | None) -> str:
    """A real Redis URL, or skip (fail under SLOWBURN_REQUIRE_REAL_REDIS)."""
    if real_redis_url is None:
        _missing_real("no SLOWBURN_TEST_REDIS_URL, no redis-server on PATH and no Docker engine")
    assert real_redis_url is not None
    return real_redis_url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over fakeredis and a real Redis."""
    if request.param == "real":
        request.applymarker(pytest.mark.realredis)
    return str(request.param)


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own for each test, so tests never see each other's keys."""
    return "t" + secrets.token_hex(4)


@pytest.fixture
def make_budget(backend: str, request: pytest.FixtureRequest, prefix: str) -> Iterator[Callable[..., Budget]]:
    """Builds Budgets sharing one store of the test's backend (as separate clients would)."""
    built: list[Budget] = []
    fake_server = fakeredis.FakeServer(version=7)
    url = request.getfixturevalue("real_url") if backend == "real" else None

    def make(**options: Any) -> Budget:
        options.setdefault("prefix", prefix)
        budget = Budget.from_url(url, **options) if url else Budget.embedded(fake_server, **options)
        built.append(budget)
        return budget

    yield make


@pytest.fixture
async def budget(make_budget: Callable[..., Budget]) -> AsyncIterator[Budget]:
    """A Budget on the test's backend."""
    b = make_budget()
    yield b
    await b.aclose()


@pytest.fixture
async def clocked(make_budget: Callable[..., Budget]) -> AsyncIterator[Budget]:
    """A Budget whose clock tests move with slowburn_redis.testing.advance_clock."""
    b = make_budget(test_clock=True)
    yield b
    await b.aclose()


@pytest.fixture
def server_url(backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL other OS processes can reach: the real Redis, or a fakeredis TCP server."""
    if backend == "real":
        yield request.getfixturevalue("real_url")
        return
    server = fakeredis.TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"redis://{host}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()


def sync_client(url: str) -> redis.Redis:
    """A plain blocking client, for inspecting keys in tests."""
    return redis.Redis.from_url(url, decode_responses=True)
