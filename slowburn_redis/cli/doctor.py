"""``doctor``'s checks: is this Redis fit to hold a budget, and what to do when it is not.

Each check reads the deployment (INFO, CONFIG GET, TIME, ACL, SCAN; nothing
is written) and gives one `Check` per subject and node: ``ok``, ``finding``
(something to fix, with what to do) or ``unknown`` (could not be checked, and
why: fakeredis has no INFO or CONFIG, an ACL may refuse them). The judging is
pure (`judge_version`, `judge_eviction`, ...) so every verdict is unit-tested
without a server; `run_checks` gathers the facts and calls them.

What needs to hold, and why:

- ``maxmemory-policy noeviction``: any other policy lets Redis drop budget keys
  under memory pressure (the limits hash included), and the budget then fails
  closed at best (LimitsMissing) or forgets spend.
- AOF persistence: without it a restart forgets every window, reservation and
  limit; ``appendfsync everysec`` can lose about a second of writes on a crash,
  ``always`` none, ``no`` whatever the OS had not flushed.
- Redis 7 or later: the scripts rely on Redis 7 (``#!lua`` flags, ACL selectors).
- A Cluster in state ``ok``, and clocks within `CLOCK_TOLERANCE` of this host
  and of each other (the scripts run on the server's clock; a failover to a
  node with another clock steps the tenant's time).
- A connected user that may run what workers need (the scripts, their
  commands, pub/sub); admin rights are reported, not required.
- No tenant with usage windows but no limits (its acquires are refused).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel
from redis.exceptions import ResponseError

from slowburn_redis.budget import Budget
from slowburn_redis.errors import InvalidInput
from slowburn_redis.names import validate_name

Verdict = Literal["ok", "finding", "unknown"]

CLOCK_TOLERANCE = 1.0
"""Seconds of clock difference (Redis vs this host, or between nodes) before it is a finding."""
MIN_MAJOR_VERSION = 7
TENANTS_NAMED = 10
"""Tenants named in one line; the rest are counted."""


class Check(BaseModel):
    """One verdict: what was checked (and on which node), what was found, what to do."""

    check: str
    verdict: Verdict
    message: str
    node: str | None = None

    def line(self) -> str:
        """``FINDING  maxmemory-policy (127.0.0.1:6379): ...``: one line for people."""
        label = {"ok": "ok", "finding": "FINDING", "unknown": "unknown"}[self.verdict]
        where = f" ({self.node})" if self.node else ""
        return f"{label:<8} {self.check}{where}: {self.message}"


def ok(check: str, message: str) -> Check:
    return Check(check=check, verdict="ok", message=message)


def finding(check: str, message: str) -> Check:
    return Check(check=check, verdict="finding", message=message)


def unknown(check: str, message: str) -> Check:
    return Check(check=check, verdict="unknown", message=message)


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:160] or type(exc).__name__


def cannot(command: str, exc: Exception) -> str:
    """Why `command` could not be run, for people: unknown to this server, refused by the ACL, or Redis's words."""
    text = str(exc)
    if "unknown command" in text or "unknown subcommand" in text:
        return f"cannot check: this server has no {command} (the embedded store, fakeredis, has none)"
    if text.startswith("NOPERM") or "no permissions" in text or "permission" in text.lower():
        return f"cannot check: the connected user may not run {command} (run doctor as an admin user)"
    return f"cannot check: {command} failed ({_reason(exc)})"


# -- the verdicts (pure) -------------------------------------------------------------------------------------


def judge_version(version: str) -> Check:
    """Redis `version` (``7.0.15``): older than 7 is a finding."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return unknown("version", f"cannot read the Redis version {version[:40]!r}")
    if major < MIN_MAJOR_VERSION:
        return finding(
            "version",
            f"Redis {version} is older than {MIN_MAJOR_VERSION}: upgrade to Redis 7 or later "
            "(the scripts and the ACL rules need it)",
        )
    return ok("version", f"Redis {version}")


def judge_eviction(policy: str) -> Check:
    """Anything but ``noeviction`` is a finding."""
    if policy == "noeviction":
        return ok("maxmemory-policy", "noeviction: Redis refuses writes when full rather than drop budget keys")
    return finding(
        "maxmemory-policy",
        f"{policy} lets Redis evict budget keys under memory pressure (limits and windows included), so spend "
        "is forgotten or tenants lose their limits: run `CONFIG SET maxmemory-policy noeviction` and set it in "
        "redis.conf",
    )


def judge_persistence(appendonly: str, appendfsync: str, save: str) -> Check:
    """AOF on with fsync ``always`` or ``everysec`` is ok; AOF with ``no``, RDB alone, or nothing are findings."""
    if appendonly == "yes":
        if appendfsync == "always":
            return ok("persistence", "appendonly yes, appendfsync always: an acknowledged commit survives a crash")
        if appendfsync == "everysec":
            return ok(
                "persistence",
                "appendonly yes, appendfsync everysec: a crash can lose about 1 s of writes "
                "(`CONFIG SET appendfsync always` loses none)",
            )
        return finding(
            "persistence",
            f"appendonly yes but appendfsync {appendfsync}: a crash loses whatever the OS had not flushed; "
            "run `CONFIG SET appendfsync everysec` (or always)",
        )
    if save.strip():
        what = f"RDB snapshots only (save {save!r}): a crash forgets all spend since the last snapshot"
    else:
        what = "no persistence at all (no AOF, no RDB): a restart forgets every window, reservation and limit"
    return finding("persistence", f"{what}; run `CONFIG SET appendonly yes` (and set it in redis.conf)")


def judge_cluster(enabled: bool, state: str | None, *, cluster_url: bool) -> Check:
    """A cluster must be in state ok; a cluster node reached as a single server is a finding."""
    if not enabled:
        return ok("cluster", "one server, not a cluster")
    if not cluster_url:
        return finding(
            "cluster",
            "this server is a Redis Cluster node but was reached as a single server: use a redis+cluster:// URL",
        )
    if state != "ok":
        return finding("cluster", f"cluster_state is {state}: some slots are not served; fix the cluster first")
    return ok("cluster", "cluster_state ok")


def judge_clock(offset: float, uncertainty: float) -> Check:
    """Redis's clock `offset` seconds ahead of this host (negative: behind), measured to `uncertainty`."""
    ahead = "ahead of" if offset >= 0 else "behind"
    said = f"Redis is {abs(offset):.3f} s {ahead} this host (±{uncertainty:.3f} s)"
    if abs(offset) - uncertainty > CLOCK_TOLERANCE:
        return finding(
            "clock",
            f"{said}, more than {CLOCK_TOLERANCE:g} s: windows run on Redis's clock, so sync both with NTP "
            "(a failover to a node with another clock steps every tenant's time)",
        )
    return ok("clock", f"{said}")


def judge_clock_spread(offsets: dict[str, float]) -> Check | None:
    """Between nodes: a spread over CLOCK_TOLERANCE is a finding; None for fewer than two nodes."""
    if len(offsets) < 2:
        return None
    spread = max(offsets.values()) - min(offsets.values())
    if spread > CLOCK_TOLERANCE:
        return finding(
            "clock",
            f"the nodes' clocks differ by {spread:.3f} s: a failover steps the tenants' time; sync them with NTP",
        )
    return ok("clock", f"the nodes' clocks agree within {spread:.3f} s")


def judge_acl(user: str, worker_denied: list[str], admin_denied: list[str]) -> Check:
    """The connected `user`: what a worker needs must be allowed; admin rights are reported."""
    if worker_denied:
        return finding(
            "acl",
            f"user {user} may not run what workers need ({', '.join(worker_denied[:6])}): give it the rules "
            "`slowburn-redis acl TENANT` prints",
        )
    if admin_denied:
        return ok(
            "acl",
            f"user {user} may run what workers need; it is not an admin ({', '.join(admin_denied[:3])} refused): "
            "limits set and reset need an admin user",
        )
    return ok("acl", f"user {user} may run what workers and admins need")


def judge_tenants(missing: list[str], seen: int) -> Check:
    """Tenants with usage windows but no limits stored: a finding (their acquires are refused)."""
    if not missing:
        return ok("tenants", f"{seen} tenant(s) with usage windows, every one with limits")
    named = ", ".join(missing[:TENANTS_NAMED]) + (
        f" and {len(missing) - TENANTS_NAMED} more" if len(missing) > TENANTS_NAMED else ""
    )
    first = missing[0]
    return finding(
        "tenants",
        f"{len(missing)} tenant(s) have usage windows but no limits ({named}): their acquires are refused "
        f"(LimitsMissing) and their spend history may be lost; set them with `slowburn-redis limits set {first} "
        "LIMIT...` or `slowburn-redis limits apply FILE`",
    )


# -- gathering the facts ---------------------------------------------------------------------------------------

Call = Callable[..., Awaitable[Any]]


async def _nodes(budget: Budget, single_name: str) -> list[tuple[str, Call]]:
    """(name, call) per node: each primary of a Cluster (after discovering them), or the one server."""
    return await budget.engine.primaries(single_name)


def _config(reply: Any) -> dict[str, str]:
    """A CONFIG GET reply (a dict, or a flat list) as a dict."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = [str(x) for x in reply]
    return dict(zip(items[::2], items[1::2], strict=False))


async def _version(call: Call) -> Check:
    try:
        return judge_version(_fields(await call("INFO", "server")).get("redis_version", "?"))
    except ResponseError as exc:
        return unknown("version", cannot("INFO", exc))


async def _eviction(call: Call) -> Check:
    try:
        return judge_eviction(_config(await call("CONFIG", "GET", "maxmemory-policy")).get("maxmemory-policy", "?"))
    except ResponseError as exc:
        try:  # CONFIG is often refused to applications; INFO memory says it too
            return judge_eviction(_fields(await call("INFO", "memory"))["maxmemory_policy"])
        except (ResponseError, KeyError):
            return unknown("maxmemory-policy", cannot("CONFIG GET or INFO", exc))


async def _persistence(call: Call) -> Check:
    try:
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync", "save"):
            config |= _config(await call("CONFIG", "GET", name))
        return judge_persistence(config.get("appendonly", "no"), config.get("appendfsync", "?"), config.get("save", ""))
    except ResponseError as exc:
        try:
            aof = "yes" if _fields(await call("INFO", "persistence")).get("aof_enabled") == "1" else "no"
        except ResponseError:
            return unknown("persistence", cannot("CONFIG GET or INFO", exc))
        return judge_persistence(aof, "everysec (assumed: CONFIG refused)", "")


def _fields(reply: Any) -> dict[str, str]:
    """An INFO-style reply (parsed to a dict, or the raw ``key:value`` lines) as a dict of strings."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


async def _cluster(call: Call, cluster_url: bool) -> Check:
    try:
        enabled = _fields(await call("INFO", "cluster")).get("cluster_enabled", "0") == "1"
        state = _fields(await call("CLUSTER", "INFO")).get("cluster_state") if enabled and cluster_url else None
    except ResponseError as exc:
        return unknown("cluster", cannot("INFO", exc))
    return judge_cluster(enabled, state, cluster_url=cluster_url)


async def _clock(call: Call) -> tuple[Check, float | None]:
    try:
        before = time.time()
        seconds, micros = await call("TIME")
        after = time.time()
    except ResponseError as exc:
        return unknown("clock", cannot("TIME", exc)), None
    offset = int(seconds) + int(micros) / 1e6 - (before + after) / 2
    return judge_clock(offset, (after - before) / 2), offset


async def _node_checks(name: str, call: Call, *, cluster_url: bool, many: bool) -> tuple[list[Check], float | None]:
    """Version, eviction policy, persistence, cluster state and clock of one node; and its clock offset."""
    clock, offset = await _clock(call)
    checks = [await _version(call), await _eviction(call), await _persistence(call), await _cluster(call, cluster_url)]
    checks.append(clock)
    if many:
        checks = [check.model_copy(update={"node": name}) for check in checks]
    return checks, offset


def _acl_probes(base: str) -> tuple[list[list[str]], list[list[str]]]:
    """Commands (with keys of a tenant whose base is `base`) a worker, and an admin, must be allowed."""
    sha = "0" * 40
    worker = [
        ["EVALSHA", sha, "1", base],
        ["SCRIPT", "LOAD", "return 1"],
        ["SUBSCRIBE", f"{base}:wake"],
        ["TIME"],
        ["HGET", f"{base}:limits", "T"],
        ["HSET", f"{base}:w:T:usd:0", "t", "0"],
        ["ZADD", f"{base}:leases", "0", "x"],
        ["XADD", f"{base}:ledger", "*", "a", "b"],
        ["XRANGE", f"{base}:ledger", "-", "+"],
        ["PUBLISH", f"{base}:events", "x"],
    ]
    admin = [["HSET", f"{base}:limits", "T", "[]"], ["SET", f"{base}:admin", "x"]]
    return worker, admin


async def acl_check(call: Call, base: str) -> Check:
    """What the connected user may do, by ``ACL DRYRUN`` on a tenant's keys (`base`)."""
    try:
        user = str(await call("ACL", "WHOAMI"))
    except ResponseError as exc:
        return unknown("acl", cannot("ACL WHOAMI", exc))
    worker, admin = _acl_probes(base)

    async def denied(probes: list[list[str]]) -> list[str]:
        out = []
        for probe in probes:
            reply = await call("ACL", "DRYRUN", user, *probe)
            if str(reply) != "OK":
                out.append(" ".join(probe[:2]) if probe[0] in ("SCRIPT",) else probe[0])
        return out

    try:
        return judge_acl(user, await denied(worker), await denied(admin))
    except ResponseError as exc:
        return unknown("acl", f"user {user}: " + cannot("ACL DRYRUN", exc))


async def tenants_with_windows(budget: Budget) -> list[str]:
    """Every tenant with a usage window (``<prefix>:{*}:w:*``), found with SCAN (never KEYS), sorted."""
    head = f"{budget.prefix}:{{"
    tenants: set[str] = set()
    async for key in budget.engine.scan_keys(f"{head}*}}:w:*", count=1000):
        name = str(key)[len(head) :].partition("}")[0]
        try:
            tenants.add(validate_name("tenant", name))
        except InvalidInput:  # a key that merely looks alike
            continue
    return sorted(tenants)


async def tenants_check(budget: Budget) -> tuple[Check, list[str]]:
    """Tenants with windows but no ``:limits`` hash; and every tenant with windows."""
    try:
        tenants = await tenants_with_windows(budget)
        missing = [t for t in tenants if not await budget.engine.exists(budget.keys(t).limits)]
    except ResponseError as exc:
        return unknown("tenants", cannot("SCAN", exc)), []
    return judge_tenants(missing, len(tenants)), tenants


async def run_checks(budget: Budget, *, name: str, cluster_url: bool, tenant: str | None = None) -> list[Check]:
    """Every check on `budget`'s Redis (`name`: how to call the single server in a line); nothing is written.

    The ACL check probes the keys of `tenant` (default: the first tenant with
    windows, else a made-up one). Connection errors propagate (the caller
    says Redis is unreachable); a refused or unknown command makes its check
    ``unknown``.
    """
    nodes = await _nodes(budget, name)
    checks: list[Check] = []
    offsets: dict[str, float] = {}
    for node_name, call in nodes:
        found, offset = await _node_checks(node_name, call, cluster_url=cluster_url, many=len(nodes) > 1)
        checks.extend(found)
        if offset is not None:
            offsets[node_name] = offset
    spread = judge_clock_spread(offsets)
    if spread is not None:
        checks.append(spread)
    tenants, seen = await tenants_check(budget)
    checks.append(tenants)
    probe_tenant = tenant or (seen[0] if seen else "doctor-probe")
    checks.append(await acl_check(nodes[0][1], budget.key(probe_tenant)))
    return checks
