"""A throwaway Redis Cluster for tests, built from real redis-server processes.

`LocalCluster` starts three ``redis-server --cluster-enabled yes`` primaries
(and, with ``replicas=1``, one replica of each) on free ports in a temp dir,
joins them with ``redis-cli --cluster create ... --cluster-replicas N
--cluster-yes``, and waits until every node reports ``cluster_state:ok``,
agrees on the slot map and, for replicas, has its replication link up.
`tenants_on_each_node` picks tenant names whose hash slots land on each
primary, so tests cover all three. `fail_over` kills a primary and waits
until its replica serves its slots.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from tests.servers import RedisServer

NODES = 3
CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int] | None = None) -> int:
    """A free port P below 55536 whose cluster bus port P + 10000 is free too."""
    taken = taken or set()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20_000, 45_000)
        if port not in taken and port + 10_000 not in taken and _bindable(port) and _bindable(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def cluster_tools_available() -> bool:
    """redis-server and redis-cli (for ``--cluster create``) are both on PATH."""
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


class LocalCluster:
    """`nodes` cluster-enabled primaries (each with `replicas` replicas) under `directory`, joined into one cluster.

    The primaries get the lowest ports: ``redis-cli --cluster create`` makes
    the first nodes it is given primaries when they all share one host.
    """

    def __init__(self, directory: Path, nodes: int = NODES, *, replicas: int = 0) -> None:
        self.directory = Path(directory)
        self.primaries = nodes
        self.replicas = replicas
        taken: set[int] = set()
        ports: list[int] = []
        for _ in range(nodes * (1 + replicas)):
            ports.append(free_cluster_port(taken))
            taken.update((ports[-1], ports[-1] + 10_000))
        ports.sort()
        self.servers: list[RedisServer] = [
            RedisServer(self.directory / f"node{i}", *CLUSTER_ARGS, port=port) for i, port in enumerate(ports)
        ]

    @property
    def ports(self) -> list[int]:
        """Every node's port, the killed ones included."""
        return [server.port for server in self.servers]

    @property
    def live_ports(self) -> list[int]:
        return [server.port for server in self.servers if server.process is not None and server.process.poll() is None]

    @property
    def url(self) -> str:
        """A URL naming the first node (any node works as the entry point)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start the nodes, create the cluster and wait until it serves every slot."""
        for server in self.servers:
            server.start()
        command = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        subprocess.run(
            [*command, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def _ready(self) -> bool:
        for port in self.live_ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            try:
                if client.cluster("INFO").get("cluster_state") != "ok":
                    return False
                if len(self.slot_owners(client)) != self.primaries:
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def name_on(self, primary: int, stem: str, key: Callable[[str], str] = str) -> str:
        """The first of ``stem0``, ``stem1``, ... whose `key` hashes to a slot the primary at port `primary` serves."""
        ranges = self.slot_owners()[primary]
        for i in range(100_000):
            if any(lo <= key_slot(key(f"{stem}{i}").encode()) <= hi for lo, hi in ranges):
                return f"{stem}{i}"
        raise LookupError(f"no {stem}<n> hashes to node {primary}")

    def replica_of(self, primary: int) -> int:
        """The port of a replica of the primary at port `primary`."""
        client = self.node_client(primary)
        try:
            replication = client.info("replication")
        finally:
            client.close()
        replicas = [
            int(value["port"]) for key, value in replication.items() if key.startswith("slave") and key[5:].isdigit()
        ]
        if not replicas:
            raise LookupError(f"node {primary} has no replica")
        return replicas[0]

    def sync_replicas(self, primary: int, timeout: float = 10.0) -> None:
        """Return once every write the primary at port `primary` has taken is on one of its replicas (WAIT)."""
        client = self.node_client(primary)
        try:
            # WAIT counts the replicas that acknowledged this connection's own
            # last write, and the replication stream is in order: one write
            # here and its WAIT cover every earlier write of every client.
            client.set(self.name_on(primary, "cluster-support-sync"), "1")
            acknowledged = client.execute_command("WAIT", 1, int(timeout * 1000))
        finally:
            client.close()
        if int(acknowledged) < 1:
            raise RuntimeError(f"no replica of node {primary} acknowledged its writes in {timeout}s")

    def fail_over(self, primary: int, timeout: float = 60.0) -> int:
        """SIGKILL the primary at port `primary`; return the port of the replica that took over its slots."""
        replica = self.replica_of(primary)
        slots = self.slot_owners()[primary]
        next(server for server in self.servers if server.port == primary).kill()
        deadline = time.monotonic() + timeout
        while True:
            if self._ready():
                client = self.node_client(replica)
                try:
                    if self.slot_owners(client).get(replica) == slots:
                        return replica
                except redis.RedisError:
                    pass
                finally:
                    client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over the slots of node {primary} in {timeout}s")
            time.sleep(0.1)

    def slot_owners(self, client: redis.Redis | None = None) -> dict[int, list[tuple[int, int]]]:
        """Port of each primary -> its slot ranges, as a node reports them."""
        own = client is None
        client = client or redis.Redis(host="127.0.0.1", port=self.live_ports[0], socket_timeout=2)
        try:
            owners: dict[int, list[tuple[int, int]]] = {}
            for entry in client.execute_command("CLUSTER", "SLOTS"):
                start, end, primary = int(entry[0]), int(entry[1]), entry[2]
                owners.setdefault(int(primary[1]), []).append((start, end))
            return owners
        finally:
            if own:
                client.close()

    def port_of_slot(self, slot: int) -> int:
        """The port of the primary that serves `slot`."""
        for port, ranges in self.slot_owners().items():
            if any(start <= slot <= end for start, end in ranges):
                return port
        raise LookupError(f"no node serves slot {slot}")

    def node_client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def tenants_on_each_node(cluster: LocalCluster, prefix: str, stem: str = "tenant") -> dict[int, str]:
    """One tenant name per node (port -> name) whose base key ``prefix:{name}`` hashes to that node."""
    owners = cluster.slot_owners()
    found: dict[int, str] = {}
    for i in range(10_000):
        name = f"{stem}{i}"
        slot = key_slot(f"{prefix}:{{{name}}}".encode())
        port = next(p for p, ranges in owners.items() if any(a <= slot <= b for a, b in ranges))
        found.setdefault(port, name)
        if len(found) == len(owners):
            return found
    raise LookupError("could not find a tenant for every node")


@contextlib.contextmanager
def running_cluster(directory: Path, *, replicas: int = 0) -> Iterator[LocalCluster]:
    """A started `LocalCluster`, stopped afterwards; skips the test without the tools.

    The skip is a failure under ``SLOWBURN_REQUIRE_REAL_REDIS`` (as in CI).
    """
    if not cluster_tools_available():
        if os.environ.get("SLOWBURN_REQUIRE_REAL_REDIS", "") not in ("", "0", "false"):
            pytest.fail("SLOWBURN_REQUIRE_REAL_REDIS is set but redis-server/redis-cli are missing")
        pytest.skip("redis-server and redis-cli are needed to start a Redis Cluster")
    local = LocalCluster(directory, replicas=replicas)
    try:
        local.start()
        yield local
    finally:
        local.stop()
