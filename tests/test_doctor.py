"""`slowburn-redis doctor` against real redis-server processes it starts (free ports, temp dirs), and fakeredis.

Each server is configured one way (well, evicting, without persistence...) and
doctor must name exactly what is wrong with it, with what to do, and exit
0 (all well), 4 (a finding) or 5 (something could not be checked).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
from click.testing import CliRunner, Result

from slowburn_redis import Budget
from slowburn_redis.acl import acl_rules
from slowburn_redis.cli import cli
from slowburn_redis.cli.doctor import (
    Check,
    judge_clock,
    judge_clock_spread,
    judge_cluster,
    judge_persistence,
    judge_tenants,
    judge_version,
    run_checks,
)
from tests.cluster_support import running_cluster
from tests.servers import RedisServer, free_port, redis_server_available

pytestmark = pytest.mark.realredis

WELL = ("--maxmemory-policy", "noeviction", "--appendonly", "yes")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """start(*args) -> a running redis-server with those options, stopped after the test."""
    if not redis_server_available():
        pytest.skip("redis-server is not on PATH")
    servers: list[RedisServer] = []

    def go(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}", *args)
        server.start()
        servers.append(server)
        return server

    yield go
    for server in servers:
        server.stop()


def doctor(url: str, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--redis-url", url, "--prefix", "sb", "doctor", *args])


def lines_of(result: Result) -> dict[str, str]:
    """check name -> its line (one per check on one server)."""
    out: dict[str, str] = {}
    for line in result.stdout.splitlines()[:-1]:
        rest = line.partition(" ")[2]
        out[rest.strip().split(":")[0]] = line
    return out


def test_a_well_configured_server_passes(start: Callable[..., RedisServer]) -> None:
    server = start(*WELL)
    result = doctor(server.url)
    assert result.exit_code == 0, result.output
    lines = lines_of(result)
    assert set(lines) == {"version", "maxmemory-policy", "persistence", "cluster", "clock", "tenants", "acl"}
    assert all(line.startswith("ok ") for line in lines.values()), result.stdout
    assert "Redis 7" in lines["version"] and "appendonly yes" in lines["persistence"]
    assert "ahead of this host" in lines["clock"] or "behind this host" in lines["clock"]
    assert result.stdout.splitlines()[-1] == "all 7 checks passed"
    data = json.loads(doctor(server.url, "--json").stdout)
    assert data["exit_code"] == 0 and {c["verdict"] for c in data["checks"]} == {"ok"}


def test_eviction_and_no_persistence_are_findings(start: Callable[..., RedisServer]) -> None:
    server = start("--maxmemory-policy", "allkeys-lru")  # and, as RedisServer starts it, no AOF and no RDB
    result = doctor(server.url)
    assert result.exit_code == 4, result.output
    lines = lines_of(result)
    assert lines["maxmemory-policy"].startswith("FINDING")
    assert (
        "allkeys-lru" in lines["maxmemory-policy"]
        and "CONFIG SET maxmemory-policy noeviction" in lines["maxmemory-policy"]
    )
    assert lines["persistence"].startswith("FINDING") and "no persistence at all" in lines["persistence"]
    assert "CONFIG SET appendonly yes" in lines["persistence"]
    assert lines["version"].startswith("ok") and lines["tenants"].startswith("ok")
    assert result.stdout.splitlines()[-1] == "2 finding(s): exit 4"
    data = json.loads(doctor(server.url, "--json").stdout)
    assert data["exit_code"] == 4
    assert sorted(c["check"] for c in data["checks"] if c["verdict"] == "finding") == [
        "maxmemory-policy",
        "persistence",
    ]


def test_rdb_alone_and_a_lax_fsync_are_findings(start: Callable[..., RedisServer]) -> None:
    rdb = doctor(start("--maxmemory-policy", "noeviction", "--save", "900 1").url)
    assert rdb.exit_code == 4 and "RDB snapshots only" in lines_of(rdb)["persistence"]
    lax = doctor(start(*WELL, "--appendfsync", "no").url)
    assert lax.exit_code == 4 and "appendfsync no" in lines_of(lax)["persistence"]


def test_a_tenant_with_windows_but_no_limits_is_a_finding(start: Callable[..., RedisServer]) -> None:
    server = start(*WELL)
    budget = Budget.from_url(server.url, prefix="sb").sync()
    for tenant in ("ghost", "healthy"):
        budget.set_limits(tenant, ["usd 1/min"])
        budget.acquire(tenant, usd=0.1).commit(usd=0.1)
    budget.close()
    client = redis.Redis.from_url(server.url)
    client.delete("sb:{ghost}:limits")  # as an eviction or a restart without persistence would
    before = sorted(client.scan_iter("*"))
    result = doctor(server.url)
    assert result.exit_code == 4, result.output
    line = lines_of(result)["tenants"]
    assert line.startswith("FINDING") and "(ghost)" in line and "healthy" not in line
    assert "slowburn-redis limits set ghost" in line
    assert sorted(client.scan_iter("*")) == before  # doctor writes nothing
    client.close()


def test_the_connected_users_acl(start: Callable[..., RedisServer]) -> None:
    server = start(*WELL)
    admin = redis.Redis.from_url(server.url)
    worker, _ = acl_rules("acme", prefix="sb")
    admin.execute_command(*worker.split(), ">pw", "+acl|whoami", "+acl|dryrun", "+info", "+config|get", "+scan")
    admin.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "&*", "+@all", "-evalsha")
    worker_url = server.url.replace("redis://", "redis://sb-worker-acme:pw@")
    as_worker = doctor(worker_url, "--tenant", "acme")
    line = lines_of(as_worker)["acl"]
    assert line.startswith("ok") and "user sb-worker-acme may run what workers need" in line
    assert "not an admin" in line
    as_worker_elsewhere = doctor(worker_url, "--tenant", "globex")  # another tenant's keys: not its own
    assert lines_of(as_worker_elsewhere)["acl"].startswith("FINDING")
    no_scripts = doctor(server.url.replace("redis://", "redis://noscripts:pw@"))
    assert no_scripts.exit_code == 4
    assert lines_of(no_scripts)["acl"].startswith("FINDING") and "EVALSHA" in lines_of(no_scripts)["acl"]
    admin.close()


def test_a_user_who_may_not_look_gets_unknowns_not_a_crash(start: Callable[..., RedisServer]) -> None:
    server = start(*WELL)
    admin = redis.Redis.from_url(server.url)
    worker, _ = acl_rules("acme", prefix="sb")
    admin.execute_command(*worker.split(), ">pw")  # the worker rules: no INFO, CONFIG, SCAN or ACL
    result = doctor(server.url.replace("redis://", "redis://sb-worker-acme:pw@"))
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output and "pw" not in result.output
    lines = lines_of(result)
    for check in ("version", "maxmemory-policy", "persistence", "acl"):
        assert lines[check].startswith("unknown") and "may not run" in lines[check], lines[check]
    assert result.stdout.splitlines()[-1].endswith("exit 5")
    admin.close()


def test_doctor_on_the_embedded_store_says_what_it_cannot_check() -> None:
    server = fakeredis.TcpFakeServer(("127.0.0.1", free_port()), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        result = doctor(f"redis://{host}:{port}/0")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output
    lines = lines_of(result)
    assert "fakeredis" in lines["version"] and lines["version"].startswith("unknown")
    assert lines["clock"].startswith("ok") and lines["tenants"].startswith("ok")


def test_unreachable_redis_is_exit_1() -> None:
    result = doctor(f"redis://u:secret@127.0.0.1:{free_port()}/0")
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "secret" not in result.output


def test_a_cluster_is_checked_node_by_node(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "cluster") as cluster:
        result = doctor(f"redis+cluster://127.0.0.1:{cluster.ports[0]}")
        single = doctor(f"redis://127.0.0.1:{cluster.ports[0]}/0")
    lines = result.stdout.splitlines()
    cluster_lines = [line for line in lines if " cluster (127.0.0.1:" in line]
    assert len(cluster_lines) == 3 and all(
        line.startswith("ok") and "cluster_state ok" in line for line in cluster_lines
    )
    assert any(line.startswith("ok") and "the nodes' clocks agree" in line for line in lines), result.stdout
    assert len([line for line in lines if " version (127.0.0.1:" in line]) == 3
    single_line = lines_of(single)["cluster"]
    assert single_line.startswith("FINDING") and "redis+cluster://" in single_line


@pytest.mark.parametrize(
    ("check", "verdict", "words"),
    [
        (judge_version("6.2.6"), "finding", ["6.2.6", "older than 7"]),
        (judge_version("7.2.4"), "ok", ["7.2.4"]),
        (judge_version("x"), "unknown", []),
        (judge_clock(2.5, 0.001), "finding", ["2.500 s ahead", "NTP"]),
        (judge_clock(-3.0, 0.01), "finding", ["3.000 s behind"]),
        (judge_clock(0.4, 0.001), "ok", ["0.400 s ahead"]),
        (judge_clock(1.2, 0.5), "ok", []),  # within the tolerance once the measurement's uncertainty is counted
        (judge_cluster(True, "fail", cluster_url=True), "finding", ["cluster_state is fail"]),
        (judge_persistence("yes", "always", ""), "ok", ["survives a crash"]),
        (judge_tenants([f"t{i}" for i in range(12)], 12), "finding", ["12 tenant(s)", "and 2 more"]),
    ],
)
def test_verdicts(check: Check, verdict: str, words: list[str]) -> None:
    assert check.verdict == verdict
    for word in words:
        assert word in check.message


def test_clock_spread_between_nodes() -> None:
    assert judge_clock_spread({"a": 0.1}) is None
    spread = judge_clock_spread({"a": 0.1, "b": 1.5})
    assert spread is not None and spread.verdict == "finding" and "1.400 s" in spread.message
    agree = judge_clock_spread({"a": 0.1, "b": 0.2})
    assert agree is not None and agree.verdict == "ok"


async def test_run_checks_on_an_embedded_budget() -> None:
    async with Budget.embedded(prefix="sb") as budget:
        await budget.set_limits("acme", ["usd 1/min"])
        await (await budget.acquire("acme", usd=0.1)).commit(usd=0.1)
        checks = {c.check: c for c in await run_checks(budget, name="embedded", cluster_url=False)}
    assert checks["version"].verdict == "unknown" and "fakeredis" in checks["version"].message
    assert checks["clock"].verdict == "ok"
    assert checks["tenants"].verdict == "ok" and "1 tenant(s)" in checks["tenants"].message
