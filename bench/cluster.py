"""Section "cluster": the per-node cost a capacity model past one node is built on, checked on a 3-node cluster.

Starts a private 3-primary Redis Cluster (tests/cluster_support.py: real
``redis-server --cluster-enabled yes`` processes on free ports, no
persistence) and runs acquire+commit on a random tenant per call from the
fleet (4 processes x 16 tasks) over two sets of tenants with the same limits:

- ``spread``: tenants whose hash slots fall where they fall (about a third
  per node), as a real fleet's would;
- ``one node``: as many tenants, all hashing to the first primary.

Per node it reads the server's own CPU time (``INFO cpu``, user + sys: command
execution, protocol parsing and socket I/O) and its script calls
(``INFO commandstats``) before and after each run. On this machine the load
generator shares the 2 cores with the three servers, so throughput is bound
by the clients, not by Redis; what carries over to a real deployment is the
server CPU per admission and how evenly the load spreads. The model in
`model` (README, "Past one node") scales from those: a node admits
``UTILISATION / cpu_s_per_admission`` per second, a cluster of N nodes
carries N times that, derated by the busiest node's excess over the mean
share; tenants per node follow from the bytes each tenant keeps.

The shape check: with tenants spread each node takes about a third of the
admissions, and the server CPU per admission stays of the same order whether
a node carries all the tenants or a third of them (the cost is per call, not
per tenant). It is higher spread: a client's pipeline of ready calls splits
by node, so each node reads shorter pipelines and pays more socket work per
call. The model uses the spread figure, what a real cluster pays.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from bench.helpers import Settings, closed_loop, load_dict, median, merge_loads, ratio

LIMITS = ["usd 50/day", "tokens 2000000/hour", "requests 600/min"]
PREFIX = "bench"

UTILISATION = 0.7
"""Share of one core a Redis node's main thread is planned to run at (headroom for bursts, failover, replication)."""
MEMORY_PER_NODE = 16 * 2**30
"""Planned ``maxmemory`` of one node in the model (bytes): a common cloud node size; the README scales it."""
MEMORY_HEADROOM = 0.5
"""Share of ``maxmemory`` the model fills with tenants (the rest: fragmentation, replication buffers, growth)."""
NODE_COUNTS = (3, 6, 12)
TARGET_TENANTS = 1_000_000
TARGET_ADMISSIONS_PER_S = 100_000


async def setup_job(*, index: int, url: str, tenants: list[str]) -> None:
    """Set the limits of `tenants` and admit+commit one call on each (so every key kind exists)."""
    import asyncio

    from slowburn_redis import Budget

    async with Budget.from_url(url, prefix=PREFIX) as budget:

        async def one(name: str) -> None:
            await budget.set_limits(name, LIMITS)
            r = await budget.acquire(name, usd=0.01, tokens=500, mode="reject")
            await r.commit(usd=0.008, tokens=400)

        for start in range(0, len(tenants), 64):
            await asyncio.gather(*(one(name) for name in tenants[start : start + 64]))


async def load_job(
    *, index: int, url: str, tenants: list[str], tasks: int, start_at: float, duration: float
) -> dict[str, Any]:
    """acquire+commit on a random one of `tenants` per call, `tasks` at a time."""
    from slowburn_redis import Budget

    rng = random.Random(index)
    async with Budget.from_url(url, prefix=PREFIX) as budget:

        async def op(_: int) -> None:
            r = await budget.acquire(rng.choice(tenants), usd=0.0001, tokens=10, mode="reject")
            await r.commit(usd=0.0001, tokens=8)

        return load_dict(await closed_loop(op, tasks=tasks, start_at=start_at, duration=duration))


def _node_stats(ports: list[int]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for port in ports:
        client = redis.Redis(host="127.0.0.1", port=port)
        try:
            cpu: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
            stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
            memory: dict[str, Any] = client.info("memory")  # type: ignore[assignment]
        finally:
            client.close()
        evalsha = stats.get("cmdstat_evalsha", {"calls": 0})
        out[port] = {
            "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            "scripts": float(evalsha["calls"]),
            "used_memory": float(memory["used_memory"]),
        }
    return out


def _delta(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]], field: str) -> dict[int, float]:
    return {port: after[port][field] - before[port][field] for port in before}


def _names(owners: dict[int, list[tuple[int, int]]], count: int, *, only: int | None, stem: str) -> list[str]:
    """`count` tenant names (stem0, stem1, ...) whose base key hashes anywhere (`only` None) or to node `only`."""
    names: list[str] = []
    i = 0
    ranges = owners[only] if only is not None else None
    while len(names) < count:
        name = f"{stem}{i}"
        i += 1
        if ranges is not None:
            slot = key_slot(f"{PREFIX}:{{{name}}}".encode())
            if not any(lo <= slot <= hi for lo, hi in ranges):
                continue
        names.append(name)
    return names


def run(settings: Settings) -> dict[str, Any]:
    from tests.cluster_support import LocalCluster, cluster_tools_available

    if not cluster_tools_available():
        return {"error": "redis-server and redis-cli are needed to start a Redis Cluster"}
    count = 300 if settings.quick else 1_500
    with tempfile.TemporaryDirectory(prefix="slowburn-bench-cluster-") as tmp:
        cluster = LocalCluster(Path(tmp))
        try:
            cluster.start()
            return _measure(settings, cluster, count)
        finally:
            cluster.stop()


def _measure(settings: Settings, cluster: Any, count: int) -> dict[str, Any]:
    url = f"redis+cluster://127.0.0.1:{cluster.ports[0]}"
    owners = cluster.slot_owners()
    ports = sorted(owners)
    first = ports[0]
    sets = {
        "spread": _names(owners, count, only=None, stem="cs"),
        "one_node": _names(owners, count, only=first, stem="c1"),
    }
    bytes_per_tenant: dict[str, float] = {}
    for label, names in sets.items():
        before = _node_stats(ports)
        share = math.ceil(len(names) / settings.processes)
        settings.fleet.run("bench.cluster:setup_job_share", url=url, tenants=names, share=share, timeout=300)
        after = _node_stats(ports)
        bytes_per_tenant[label] = sum(_delta(before, after, "used_memory").values()) / len(names)
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in sets}
    for _ in range(settings.reps):
        for label, names in sets.items():
            before = _node_stats(ports)
            results = settings.fleet.run(
                "bench.cluster:load_job",
                url=url,
                tenants=names,
                tasks=settings.tasks,
                start_at=settings.start_at(1.0),
                duration=settings.duration,
            )
            after = _node_stats(ports)
            merged = merge_loads(results)
            cpu = _delta(before, after, "cpu_s")
            scripts = _delta(before, after, "scripts")
            admissions = merged["ops"]
            total_scripts = sum(scripts.values()) or 1.0
            merged["cpu_us_per_admission"] = ratio(sum(cpu.values()) * 1e6, admissions)
            merged["share_by_node"] = {str(p): scripts[p] / total_scripts for p in ports}
            merged["cpu_us_per_admission_by_node"] = {
                str(p): ratio(cpu[p] * 1e6, admissions * scripts[p] / total_scripts) for p in ports if scripts[p]
            }
            runs[label].append(merged)
    summary: dict[str, Any] = {}
    for label, reps in runs.items():
        shares = [max(r["share_by_node"].values()) for r in reps]
        summary[label] = {
            "per_s": median(r["per_s"] for r in reps),
            "p99_ms": median(r["p99_ms"] for r in reps),
            "errors": sum(r["errors"] for r in reps),
            "cpu_us_per_admission": median(r["cpu_us_per_admission"] for r in reps),
            "busiest_node_share": median(shares),
        }
    spread, one = summary["spread"], summary["one_node"]
    out: dict[str, Any] = {
        "nodes": len(ports),
        "tenants_per_set": count,
        "limits": LIMITS,
        "bytes_per_tenant": bytes_per_tenant,
        "runs": runs,
        "summary": summary,
        "spread_over_one_node_throughput": ratio(spread["per_s"], one["per_s"]),
        "spread_over_one_node_cpu_per_admission": ratio(spread["cpu_us_per_admission"], one["cpu_us_per_admission"]),
    }
    out["model"] = model(  # the spread figure: what a cluster with tenants over its nodes pays
        cpu_us_per_admission=spread["cpu_us_per_admission"],
        busiest_share=spread["busiest_node_share"],
        nodes_measured=len(ports),
        bytes_per_tenant=bytes_per_tenant["one_node"],
    )
    return out


def model(
    *, cpu_us_per_admission: float, busiest_share: float, nodes_measured: int, bytes_per_tenant: float
) -> dict[str, Any]:
    """Capacity past one node from the measured per-node cost; see the module docstring."""
    per_node = UTILISATION * 1e6 / cpu_us_per_admission if cpu_us_per_admission > 0 else float("nan")
    balance = (1 / nodes_measured) / busiest_share if busiest_share > 0 else 1.0  # mean share / busiest share
    tenants_per_node = MEMORY_PER_NODE * MEMORY_HEADROOM / bytes_per_tenant if bytes_per_tenant > 0 else float("nan")
    clusters = {
        str(n): {"admissions_per_s": n * per_node * balance, "tenants": n * tenants_per_node} for n in NODE_COUNTS
    }
    for_rate = math.ceil(TARGET_ADMISSIONS_PER_S / (per_node * balance)) if per_node > 0 else 0
    for_tenants = math.ceil(TARGET_TENANTS / tenants_per_node) if tenants_per_node > 0 else 0
    return {
        "utilisation": UTILISATION,
        "memory_per_node_bytes": MEMORY_PER_NODE,
        "memory_headroom": MEMORY_HEADROOM,
        "admissions_per_s_per_node": per_node,
        "balance": balance,
        "tenants_per_node": tenants_per_node,
        "clusters": clusters,
        "target": {"tenants": TARGET_TENANTS, "admissions_per_s": TARGET_ADMISSIONS_PER_S},
        "nodes_for_rate": for_rate,
        "nodes_for_tenants": for_tenants,
        "nodes_for_target": max(for_rate, for_tenants, 3),
    }


async def setup_job_share(*, index: int, url: str, tenants: list[str], share: int) -> None:
    await setup_job(index=index, url=url, tenants=tenants[index * share : (index + 1) * share])
