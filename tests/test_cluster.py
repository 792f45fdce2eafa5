"""slowburn-redis on a real 3-node Redis Cluster (``redis-server --cluster-enabled yes``).

Two layers:

- The batching, core, waiting, fleet, calendar, scopes, quote and event-trail suites
  (tests/test_batching.py, test_core.py, test_waiting.py, test_fleet.py, test_calendar.py,
  test_scopes.py, test_quote.py, test_event_trail.py, test_runs.py) run again here,
  unchanged, with the fixtures ``make_budget``,
  ``real_url`` and ``server_url`` pointed at the cluster (a
  ``redis+cluster://`` URL). Their tenant lives on one node.
- The tests below spread tenants over all three nodes (names chosen by hash
  slot), and wake waiters across nodes, clients and OS processes.

Every Budget built here runs its scripts with a ``#!lua`` shebang: Redis then
refuses any script that touches a key outside the slot of its declared key
(without it, Redis only refuses keys of another node). So every script call
of these suites also checks that a script never touches two slots; a scan of
every key afterwards checks it once more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from slowburn_redis import Budget, BudgetTimeout, PermissionDenied
from slowburn_redis.connection import connect_url
from tests import (
    test_batching,
    test_calendar,
    test_core,
    test_event_trail,
    test_fleet,
    test_quote,
    test_runs,
    test_scopes,
    test_waiting,
)
from tests.cluster_support import LocalCluster, running_cluster, tenants_on_each_node
from tests.test_waiting_processes import eventually
from tests.workers import Worker

pytestmark = pytest.mark.cluster

# The suites that run here too (see the module docstring). pytest collects
# every test function found in this module's namespace, with the fixtures of
# this module, so they run against the cluster.
for _suite in (
    test_batching,
    test_core,
    test_waiting,
    test_fleet,
    test_calendar,
    test_scopes,
    test_quote,
    test_event_trail,
    test_runs,
):
    for _name, _test in vars(_suite).items():
        if _name.startswith("test_") and callable(_test):
            globals()[_name] = _test
waiting_budget = test_waiting.waiting_budget
_litellm_worker_stopped = test_scopes._litellm_worker_stopped
run = test_event_trail.run


# fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A fresh 3-node cluster for this module."""
    with running_cluster(tmp_path_factory.mktemp("cluster")) as local:
        yield local


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    return f"redis+cluster://127.0.0.1:{cluster.ports[0]}"


def strict_slots(budget: Budget) -> Budget:
    """Give every script of `budget` a ``#!lua`` shebang, so Redis refuses a key outside the declared slot."""
    for script in vars(budget.engine.scripts).values():
        if not script.source.startswith("#!lua"):
            script.source = "#!lua\n" + script.source
            script.sha = hashlib.sha1(script.source.encode()).hexdigest()
    return budget


@pytest.fixture(autouse=True)
def numsub_over_every_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PUBSUB NUMSUB`` counts one node's subscribers; redis-py asks a random node. Ask them all.

    The waiting suite checks a subscription with ``client.pubsub_numsub``; on
    a cluster the subscriber sits on whichever node its pub/sub connection
    chose, so the count must be summed over the nodes (redis-py does the sum).
    """

    def numsub(self: RedisCluster, *channels: str, **kwargs: Any) -> Any:
        kwargs.setdefault("target_nodes", RedisCluster.ALL_NODES)
        return self.execute_command("PUBSUB NUMSUB", *channels, **kwargs)

    monkeypatch.setattr(RedisCluster, "pubsub_numsub", numsub)


@pytest.fixture
def backend() -> str:
    return "cluster"


@pytest.fixture
def real_url(cluster_url: str) -> str:
    return cluster_url


@pytest.fixture
def server_url(cluster_url: str) -> str:
    return cluster_url


@pytest.fixture
async def make_budget(cluster_url: str, prefix: str) -> AsyncIterator[Callable[..., Budget]]:
    """Budgets on the cluster (strict slots), closed after the test."""
    built: list[Budget] = []

    def make(**options: Any) -> Budget:
        options.setdefault("prefix", prefix)
        budget = strict_slots(Budget.from_url(cluster_url, **options))
        built.append(budget)
        return budget

    yield make
    for budget in built:
        await budget.aclose()


@pytest.fixture
def spread(cluster: LocalCluster, prefix: str) -> dict[int, str]:
    """One tenant per node: node port -> tenant name."""
    tenants = tenants_on_each_node(cluster, prefix)
    assert len(tenants) == 3
    return tenants


# helpers -------------------------------------------------------------------------------


def keys_by_node(cluster: LocalCluster, prefix: str) -> dict[int, list[str]]:
    """Every key under `prefix`, per node port, read from each node directly."""
    found: dict[int, list[str]] = {}
    for port in cluster.ports:
        client = cluster.node_client(port)
        try:
            found[port] = sorted(client.scan_iter(match=prefix + ":*", count=1000))
        finally:
            client.close()
    return found


def tenant_of(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


# the cluster itself --------------------------------------------------------------------


def test_cluster_url_forms_are_equivalent(cluster: LocalCluster) -> None:
    plain = f"redis://127.0.0.1:{cluster.ports[0]}/0"
    _, pubsub_a, description_a = connect_url(plain, cluster=True)
    _, pubsub_b, description_b = connect_url(f"redis+cluster://user:secret@127.0.0.1:{cluster.ports[0]}")
    assert pubsub_a is not None and pubsub_b is not None
    assert description_a.startswith("redis+cluster://127.0.0.1:")
    assert "secret" not in description_b and "user" not in description_b
    _, pubsub_c, _ = connect_url(plain)
    assert pubsub_c is None  # one server: the client's own pub/sub


async def test_a_call_serves_one_tenant_on_a_cluster(
    spread: dict[int, str], make_budget: Callable[..., Budget]
) -> None:
    """The keys of one call must share a slot: off a cluster the tenants ready together share calls, here not."""
    budget = make_budget()
    assert budget.engine.tenants_per_call == 1
    for tenant in spread.values():
        await budget.set_limits(tenant, ["usd 1/hour"])
    reservations = await asyncio.gather(*(budget.acquire(t, usd=0.1) for t in spread.values()))
    assert [r.tenant for r in reservations] == list(spread.values())
    await asyncio.gather(*(r.commit() for r in reservations))


async def test_core_cycle_on_a_tenant_of_each_node(
    cluster: LocalCluster, spread: dict[int, str], make_budget: Callable[..., Budget], prefix: str
) -> None:
    budget = make_budget()
    for tenant in spread.values():
        await budget.set_limits(tenant, ["usd 1/hour", "requests 10/min", "concurrency 2"])
        await budget.set_limits(tenant, ["usd 0.5/hour"], agent="bot")
        assert [str(x) for x in await budget.get_limits(tenant, agent="bot")] == ["usd 0.5/hour"]
        r = await budget.acquire(tenant, "bot", usd=0.3)
        await r.commit(usd=0.1, model="m")
        r2 = await budget.acquire(tenant, "bot", usd=0.2)
        assert (await r2.release()).state == "released"
        status = await budget.status(tenant, agent="bot")
        used = {lim.key: lim.used for lim in status.limits}
        assert used["T:usd:3600000"] == pytest.approx(0.1)
        assert used["A:bot:usd:3600000"] == pytest.approx(0.1)
        assert used["T:requests:60000"] == 1  # the released one is refunded
        assert await budget.engine.client.xlen(budget.key(tenant) + ":ledger") == 1
        assert await budget.reset(tenant) >= 1
        status = await budget.status(tenant, agent="bot")
        assert all(lim.used == 0 for lim in status.limits)

    by_node = keys_by_node(cluster, prefix)
    for port, tenant in spread.items():
        assert {tenant_of(key) for key in by_node[port]} == {tenant}, "each tenant's keys live on its own node"


async def test_every_key_a_script_writes_is_in_the_tenants_slot(
    cluster: LocalCluster, spread: dict[int, str], make_budget: Callable[..., Budget], prefix: str
) -> None:
    budget = make_budget(heartbeat=60.0)
    waiters: list[asyncio.Task[Any]] = []
    for tenant in spread.values():
        await budget.set_limits(tenant, ["usd 1/hour", "tokens 1000/min", "tokens 5000", "concurrency 3"])
        await budget.set_limits(tenant, ["usd 1/hour"], agent="*")
        held = await budget.acquire(tenant, "a1", usd=0.9, tokens=100)
        done = await budget.acquire(tenant, "a2", usd=0.05)
        await done.commit(usd=0.01, input_tokens=3, output_tokens=4, model="m")
        waiters.append(asyncio.ensure_future(budget.acquire(tenant, "a3", usd=0.5, timeout=30)))
        await test_waiting.wait_queued(budget, 1, tenant)
        await budget.status(tenant)
        _ = held  # left open: its lease and reservation keys stay

    # While waiters hold queue places, every kind of key exists: check them all.
    by_node = keys_by_node(cluster, prefix)
    kinds = set()
    for port, keys in by_node.items():
        client = cluster.node_client(port)
        try:
            for key in keys:
                tenant = tenant_of(key)
                expected = key_slot(f"{prefix}:{{{tenant}}}".encode())
                assert int(client.execute_command("CLUSTER", "KEYSLOT", key)) == expected, key
                assert spread[port] == tenant, f"{key} is on node {port}"
                kinds.add(key.split("}:", 1)[1].split(":", 1)[0])
        finally:
            client.close()
    assert {"limits", "agents", "w", "r", "leases", "ledger", "q", "qexp", "b", "seq"} <= kinds, kinds

    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_strict_slot_check_is_armed(cluster: LocalCluster, spread: dict[int, str], prefix: str) -> None:
    """The shebang makes Redis refuse a script that reaches another slot, even on the same node."""
    port, tenant = next(iter(spread.items()))
    base = f"{prefix}:{{{tenant}}}"
    lo, hi = cluster.slot_owners()[port][0]
    other = next(f"k{i}" for i in range(100_000) if lo <= key_slot(f"k{i}".encode()) <= hi and f"k{i}" != base)
    client = cluster.node_client(port)
    try:
        client.eval("#!lua\nreturn redis.call('GET', KEYS[1] .. ':x')", 1, base)
        with pytest.raises(redis.ResponseError, match="same slot"):
            client.eval(f"#!lua\nreturn redis.call('GET', '{other}')", 1, base)
    finally:
        client.close()


# waiting across nodes, clients and processes ------------------------------------------


async def test_waiter_is_woken_by_a_commit_from_another_client_on_every_node(
    spread: dict[int, str], make_budget: Callable[..., Budget]
) -> None:
    waiting, holding = make_budget(heartbeat=60.0), make_budget()
    for tenant in spread.values():
        await holding.set_limits(tenant, ["usd 1/hour"])
        held = await holding.acquire(tenant, usd=0.8)
        # Only a notification can wake it: the window refills in an hour, the heartbeat is 60 s.
        waiter = asyncio.ensure_future(waiting.acquire(tenant, usd=0.5, timeout=15))
        await test_waiting.wait_queued(holding, 1, tenant)
        assert not waiter.done()
        await held.commit(usd=0.2)
        admitted = await waiter
        await admitted.commit(usd=0.5)
        assert (await holding.status(tenant)).limits[0].used == pytest.approx(0.7)


async def test_sync_twin_of_a_cluster_budget_waits_on_the_node_rotating_pubsub(
    spread: dict[int, str], make_budget: Callable[..., Budget]
) -> None:
    """The twin is built by the same factory: it keeps the cluster's pub/sub (asyncio RedisCluster has none)."""
    budget = make_budget(heartbeat=60.0)

    def blocking_side() -> None:
        twin = budget.sync()
        try:
            assert twin.budget.engine.open_pubsub_factory is budget.engine.open_pubsub_factory
            for tenant in spread.values():
                twin.set_limits(tenant, ["usd 1/hour"])
                held = twin.acquire(tenant, usd=0.8)
                admitted: list[Any] = []

                def wait(tenant: str = tenant, admitted: list[Any] = admitted) -> None:
                    admitted.append(twin.acquire(tenant, usd=0.5, timeout=15))

                waiter = threading.Thread(target=wait)
                waiter.start()
                eventually(lambda tenant=tenant: twin.status(tenant).queue_length == 1, what="a queued waiter")
                # Only a notification can wake it: the window refills in an hour, the heartbeat is 60 s.
                held.commit(usd=0.2)
                waiter.join(timeout=30)
                assert len(admitted) == 1, "the twin's waiter was not woken by the refund"
                admitted[0].commit(usd=0.5)
                assert twin.status(tenant).limits[0].used == pytest.approx(0.7)
        finally:
            twin.close()

    await asyncio.to_thread(blocking_side)


async def test_waiter_in_another_process_is_woken_on_every_node(
    cluster_url: str, spread: dict[int, str], make_budget: Callable[..., Budget], prefix: str
) -> None:
    budget = make_budget()
    held = {}
    for tenant in spread.values():
        await budget.set_limits(tenant, ["usd 1/hour"])
        held[tenant] = await budget.acquire(tenant, usd=0.8)
    workers = {
        tenant: Worker("acquire", cluster_url, prefix, tenant, "--usd", "0.5", "--timeout", "30", "--heartbeat", "60")
        for tenant in spread.values()
    }
    try:
        for tenant, worker in workers.items():
            worker.expect("started")
            await test_waiting.wait_queued(budget, 1, tenant)
        for tenant, worker in workers.items():
            await held[tenant].commit(usd=0.1)
            worker.expect("admitted")
            assert worker.expect("settled")["state"] == "committed"
            assert worker.wait() == 0
            assert (await budget.status(tenant)).limits[0].used == pytest.approx(0.6)
    finally:
        for worker in workers.values():
            worker.stop()


async def test_timeout_on_the_cluster_is_a_budget_timeout(
    spread: dict[int, str], make_budget: Callable[..., Budget]
) -> None:
    budget = make_budget(heartbeat=60.0)
    tenant = next(iter(spread.values()))
    await budget.set_limits(tenant, ["usd 1/hour"])
    await budget.acquire(tenant, usd=1)
    with pytest.raises(BudgetTimeout) as caught:
        await budget.acquire(tenant, usd=0.5, timeout=0.3)
    assert caught.value.status is not None
    assert await test_waiting.queued(budget, tenant) == 0


# the CLI -------------------------------------------------------------------------------


def test_cli_commands_on_a_tenant_of_each_node(
    cluster: LocalCluster, cluster_url: str, spread: dict[int, str], prefix: str
) -> None:
    from slowburn_redis.cli.app import cli

    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(cli, ["--redis-url", cluster_url, "--prefix", prefix, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    for tenant in spread.values():
        run("limits", "set", tenant, "usd 2/hour", "requests 50/min")
        shown = json.loads(run("limits", "show", tenant, "--json"))
        pairs = {(x["dimension"], x["amount"]) for x in shown["scopes"][0]["limits"]}
        assert pairs == {("usd", "2"), ("requests", "50")}

        async def spend(t: str = tenant) -> None:
            async with Budget.from_url(cluster_url, prefix=prefix) as budget:
                r = await budget.acquire(t, "bot", usd=0.5)
                await r.commit(usd=0.25, model="gpt-x")

        asyncio.run(spend())
        status = json.loads(run("status", tenant, "--json"))
        assert {x["key"]: x["used"] for x in status["limits"]}["T:usd:3600000"] == pytest.approx(0.25)
        report = json.loads(run("report", tenant, "--format", "json"))
        assert report["totals"]["usd"] == pytest.approx(0.25) and "gpt-x" in json.dumps(report)

    # Without a tenant, status finds the tenants of every node.
    every = json.loads(run("status", "--json"))
    assert {x["tenant"] for x in every} == set(spread.values())

    for tenant in spread.values():
        run("reset", tenant, "--yes")
        after = json.loads(run("status", tenant, "--json"))
        assert all(x["used"] == 0 for x in after["limits"])

    by_node = keys_by_node(cluster, prefix)
    for port, tenant in spread.items():
        assert {tenant_of(key) for key in by_node[port]} == {tenant}


# access control ------------------------------------------------------------------------


def pipe_to_every_node(cluster: LocalCluster, lines: list[str], reply: str = "OK") -> None:
    """Run `lines` on every node through ``redis-cli`` (ACL users are per node), as the README says."""
    for port in cluster.ports:
        done = subprocess.run(
            ["redis-cli", "-p", str(port)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True
        )
        assert done.stdout.split() == [reply] * len(lines), done.stdout + done.stderr


async def test_acl_users_set_on_every_node_confine_a_worker_on_the_cluster(
    cluster: LocalCluster, spread: dict[int, str], prefix: str, make_budget: Callable[..., Budget]
) -> None:
    from slowburn_redis.acl import acl_rules

    mine, other = list(spread.values())[:2]  # on two different nodes
    lines, passwords = [], {}
    for tenant in (mine, other):
        for line in acl_rules(tenant, prefix=prefix):
            user = line.split()[2]
            passwords[user] = secrets.token_hex(8)
            lines += [line, f"ACL SETUSER {user} >{passwords[user]}"]
    pipe_to_every_node(cluster, lines)
    budgets: list[Budget] = []

    def as_user(user: str) -> Budget:
        url = f"redis+cluster://{user}:{passwords[user]}@127.0.0.1:{cluster.ports[0]}"
        budgets.append(strict_slots(Budget.from_url(url, prefix=prefix, heartbeat=60.0)))
        return budgets[-1]

    try:
        admin, worker, waiting = (
            as_user(f"{prefix}-admin-{mine}"),
            as_user(f"{prefix}-worker-{mine}"),
            as_user(f"{prefix}-worker-{mine}"),
        )
        await admin.set_limits(mine, ["usd 1/hour"])
        with pytest.raises(PermissionDenied):
            await admin.set_limits(other, ["usd 1/hour"])
        held = await worker.acquire(mine, usd=0.9)
        # The waiter subscribes on whichever node its pub/sub connection picked.
        waiter = asyncio.ensure_future(waiting.acquire(mine, usd=0.5, timeout=15))
        await test_waiting.wait_queued(make_budget(), 1, mine)  # as the default user: workers may not HLEN
        await held.commit(usd=0.2)
        await (await waiter).commit(usd=0.5)
        assert (await worker.status(mine)).limits[0].used == pytest.approx(0.7)
        for refused in (worker.set_limits(mine, ["usd 5/hour"]), worker.reset(mine), worker.acquire(other, usd=0.1)):
            with pytest.raises(PermissionDenied):
                await refused
        assert [str(limit) for limit in await worker.get_limits(mine)] == ["usd 1/hour"]
    finally:
        for budget in budgets:
            await budget.aclose()
        pipe_to_every_node(cluster, [f"ACL DELUSER {user}" for user in passwords], reply="1")
