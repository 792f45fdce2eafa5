"""A primary of a Redis Cluster dies and its replica takes over: nothing replicated is lost, nobody hangs.

A cluster of three primaries, each with one replica (``--cluster-node-timeout
2000``). The tenant lives on the primary with the lowest port, which is also
the node a worker process's pub/sub connection picks first, so the kill takes
away at once the tenant's data node and the waiter's notification channel. The
URL names that node too: a pub/sub opened before the cluster client has learned
the node list goes to the URL's node (this was a flake while the URL named
another primary: 2 runs in 5 under load).
Replication is asynchronous: the test waits (``WAIT``) until the replica has
every write before it kills the primary, and then checks that the state the
replica took over is exactly what was acknowledged. What a failover can lose
without that wait is stated in the README (deployment section).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from slowburn_redis import Budget
from tests import test_waiting
from tests.cluster_support import LocalCluster, running_cluster
from tests.workers import Worker

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three primaries with one replica each, for this test alone (it kills a node)."""
    with running_cluster(tmp_path / "cluster", replicas=1) as local:
        yield local


def listening(cluster: LocalCluster, channel: str) -> int:
    """Subscribers of `channel` over every live node (PUBSUB NUMSUB counts one node's)."""
    return sum(subscribers_on(cluster, port, channel) for port in cluster.live_ports)


def script_calls(cluster: LocalCluster, port: int) -> int:
    """Script calls the node at `port` has run itself (scripts replicated from a primary run as their effects)."""
    node = cluster.node_client(port)
    try:
        stats = node.info("commandstats")
    finally:
        node.close()
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def subscribers_on(cluster: LocalCluster, port: int, channel: str) -> int:
    """Connections subscribed to `channel` on the node at `port` itself (pub/sub counts are per node)."""
    node = cluster.node_client(port)
    try:
        return int(dict(node.pubsub_numsub(channel)).get(channel, 0))
    finally:
        node.close()


async def test_a_failover_keeps_replicated_spend_and_the_waiter_in_another_process_resumes(
    cluster: LocalCluster, prefix: str
) -> None:
    primary = min(cluster.slot_owners())
    tenant = cluster.name_on(primary, "tenant", key=lambda name: f"{prefix}:{{{name}}}")
    url = f"redis+cluster://127.0.0.1:{primary}"
    budget = Budget.from_url(url, prefix=prefix)
    worker: Worker | None = None
    try:
        await budget.set_limits(tenant, ["usd 1/hour"])
        await (await budget.acquire(tenant, usd=0.3)).commit(usd=0.3)
        held = await budget.acquire(tenant, usd=0.6)  # 0.9 of 1 taken: the waiter's 0.5 must wait
        # A heartbeat of 300 s: only a notification can wake it within the test.
        worker = Worker("acquire", url, prefix, tenant, "--usd", "0.5", "--timeout", "300", "--heartbeat", "300")
        worker.expect("started")
        await test_waiting.wait_queued(budget, 1, tenant)
        # Queued first, subscribed next (under load the second lags): wait until it listens somewhere.
        channel = budget.key(tenant) + ":wake"
        per_node: dict[int, int] = {}
        for _ in range(1500):  # bounded
            per_node = {port: subscribers_on(cluster, port, channel) for port in cluster.live_ports}
            if sum(per_node.values()):
                break
            await asyncio.sleep(0.02)
        assert per_node[primary] == 1, f"the waiter listens on the primary that dies: {per_node}"

        cluster.sync_replicas(primary)
        successor = cluster.fail_over(primary)
        assert successor != primary

        # The waiter lost its pub/sub node: it must listen again on a live node,
        # and its own retry (every waiter retries after a reconnect) must have
        # been denied on the new primary before the refund below, so that only
        # the refund's notification can admit it.
        channel = budget.key(tenant) + ":wake"
        await test_waiting.eventually(lambda: listening(cluster, channel) == 1, 60, "the waiter to listen again")
        await test_waiting.eventually(lambda: script_calls(cluster, successor) > 0, 60, "the waiter's retry")
        assert await test_waiting.queued(budget, tenant) == 1

        # The reservation taken before the failover is known to the new primary:
        # its commit settles it (and refunds 0.5 of its 0.6), nothing is unknown.
        settlement = await held.commit(usd=0.1)
        assert (settlement.settled, settlement.state) == (True, "committed")
        # The refund wakes the waiter, whose pub/sub node is gone: it must have
        # reconnected to another node and be admitted, not hang or crash.
        worker.expect("admitted", timeout=60)
        assert worker.expect("settled")["state"] == "committed"
        assert worker.wait() == 0
        (usd,) = (await budget.status(tenant)).limits
        assert usd.used == pytest.approx(0.3 + 0.1 + 0.5)
        assert usd.reserved == pytest.approx(0)
        assert await test_waiting.queued(budget, tenant) == 0
    finally:
        if worker is not None:
            worker.stop()
        await budget.aclose()
