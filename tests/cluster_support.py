"""A throwaway 3-node Redis Cluster for tests, built from real redis-server processes.

`LocalCluster` starts three ``redis-server --cluster-enabled yes`` nodes on
free ports in a temp dir, joins them with ``redis-cli --cluster create ...
--cluster-replicas 0 --cluster-yes``, and waits until every node reports
``cluster_state:ok`` and agrees on the slot map. `tenants_on_each_node` picks
tenant names whose hash slots land on each node, so tests cover all three.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

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
    """Three cluster-enabled redis-server processes under `directory`, joined into one cluster."""

    def __init__(self, directory: Path, nodes: int = NODES) -> None:
        self.directory = Path(directory)
        taken: set[int] = set()
        self.servers: list[RedisServer] = []
        for i in range(nodes):
            port = free_cluster_port(taken)
            taken.update((port, port + 10_000))
            self.servers.append(
                RedisServer(self.directory / f"node{i}", *CLUSTER_ARGS, port=port),
            )

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

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
            [*command, "--cluster-replicas", "0", "--cluster-yes"],
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
        for port in self.ports:
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
            try:
                if client.cluster("INFO").get("cluster_state") != "ok":
                    return False
                if len(self.slot_owners(client)) != len(self.servers):
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def slot_owners(self, client: redis.Redis | None = None) -> dict[int, list[tuple[int, int]]]:
        """Port of each primary -> its slot ranges, as a node reports them."""
        own = client is None
        client = client or redis.Redis(host="127.0.0.1", port=self.ports[0], socket_timeout=2)
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
