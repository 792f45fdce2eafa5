"""The one path to Redis: every script call and every direct read of the package goes through an `Engine`.

An Engine owns the Redis client and what stands between a caller and it:
the cap on calls in flight (`MAX_CONNECTIONS`), the batching of one tenant's
ready requests into one script call and of the calls ready together into
one pipeline (`slowburn_redis.batching`), the
``on_unavailable`` policy (`slowburn_redis.resilience`), the mapping of ACL
refusals to `PermissionDenied`, and closing. No other module touches the
client: they call `run` with a script and its arguments (built by
`slowburn_redis.protocol`) or one of the few named reads.

Once, after its first script call is answered, an Engine reads Redis's
``maxmemory-policy`` (on every primary of a cluster) in the background and
logs ``redis.evicts_budget_keys`` at error level for any policy but
``noeviction``: under any other policy Redis may drop a tenant's limits
(then refused as `LimitsMissing`) or its windows (spend forgotten). A user
that may not read the setting (``CONFIG``/``INFO`` denied) is not checked.

After `aclose` (or once `begin_close` was called) every call raises
`BudgetClosed` without sending anything, except a waiter giving up its
queue place, which is allowed one attempt so a closing Budget leaves nothing
behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import structlog
from redis.exceptions import RedisError

from slowburn_redis.acl import permission_error
from slowburn_redis.batching import MAX_BATCH, MAX_TENANTS, Batcher
from slowburn_redis.connection import MAX_CONNECTIONS
from slowburn_redis.errors import BudgetClosed
from slowburn_redis.resilience import Backoff, OnUnavailable, Resilience
from slowburn_redis.scripts import Call, Clock, Script, Scripts, run_many
from slowburn_redis.tasks import cancel_and_wait

log = structlog.get_logger("slowburn_redis")

SAFE_EVICTION_POLICY = "noeviction"
"""The one ``maxmemory-policy`` under which Redis never drops a budget key (it refuses writes with OOM instead)."""

EVICTION_CHECK_TIMEOUT = 5.0
"""Seconds the one-time eviction-policy check may take before it is given up (it never delays a call)."""


class Engine:
    """Runs scripts and reads on one Redis client, under one policy; see the module docstring.

    `connect` makes a new client for the same Redis (used to build a twin,
    such as the sync Budget's); `open_pubsub` opens a pub/sub connection
    (None: the client's own ``pubsub()``).
    """

    def __init__(
        self,
        client: Any,
        *,
        connect: Callable[[], Any] | None,
        open_pubsub: Callable[[], Any] | None,
        description: str,
        clock: Clock,
        on_unavailable: OnUnavailable,
        retry_timeout: float | None,
        backoff: Backoff | None,
        batch_size: int = MAX_BATCH,
    ) -> None:
        self.client = client
        """The raw client. Only this module sends through it; tests may wrap it (a fault-injecting client)."""
        self.connect = connect
        self.open_pubsub_factory = open_pubsub
        self.description = description
        self.clock = clock
        self.scripts = Scripts(clock)
        self._resilience = Resilience(
            on_unavailable, backoff=backoff, retry_timeout=retry_timeout, description=description
        )
        # More calls in flight than connections would fail (redis-py pools
        # raise when full, per node on a cluster): extra calls queue here.
        self._in_flight = asyncio.Semaphore(MAX_CONNECTIONS)
        # Only an interrupted acquire cleans up after its send (Batcher.quiesce): other orphaned sends are dropped.
        self._batcher = Batcher(
            self._post,
            send_many=self._post_many,
            max_batch=batch_size,
            gate=self._in_flight,
            quiesced=[self.scripts.acquire.name],
            # The keys of one call must share a slot on a cluster: there a call serves one tenant.
            max_tenants=1 if _is_cluster(client) else MAX_TENANTS,
        )
        self._closing = False
        self.eviction_check: asyncio.Task[dict[str, str | None]] | None = None
        """The one-time ``maxmemory-policy`` check, started after the first answered script call."""

    @property
    def pipeline_size(self) -> int:
        """Script calls per pipeline at most (`slowburn_redis.batching.MAX_PIPELINE`); 1 sends each call apart.

        Settable, for benchmarks that compare with and without cross-tenant pipelining.
        """
        return self._batcher.max_pipeline

    @pipeline_size.setter
    def pipeline_size(self, size: int) -> None:
        self._batcher.max_pipeline = size

    @property
    def tenants_per_call(self) -> int:
        """Tenants one batched script call serves at most (`slowburn_redis.batching.MAX_TENANTS`; 1 on a cluster).

        Settable, for benchmarks that compare calls serving several tenants with one call per tenant.
        """
        return self._batcher.max_tenants

    @tenants_per_call.setter
    def tenants_per_call(self, count: int) -> None:
        self._batcher.max_tenants = count

    @property
    def closing(self) -> bool:
        return self._closing

    def is_backed(self, reservation_id: str) -> bool:
        """False for a reservation admitted by the fail-open policy without Redis."""
        return self._resilience.is_backed(reservation_id)

    def open_pubsub(self) -> Any:
        """A new pub/sub connection (on a cluster: to the next known node)."""
        self._check_open()
        if self.open_pubsub_factory is not None:
            return self.open_pubsub_factory()
        return self.client.pubsub()

    # scripts -------------------------------------------------------------------

    async def run(self, script: Script, key: str, args: list[Any], *, deadline: float | None = None) -> Any:
        """One request of `script` on the tenant base `key`: batched when the script takes batches.

        A failure to reach Redis is handled by the ``on_unavailable`` policy;
        a ``"wait"`` retry gives up at `deadline` (event-loop time), else
        after ``retry_timeout``. Retries resend the same arguments, which
        every script treats idempotently.
        """
        send = self._batcher.call if script.batched else self._send
        reply = await self._guarded(script.name, lambda: send(script, key, args), args, deadline=deadline)
        if self.eviction_check is None and not self._closing:
            self.eviction_check = asyncio.get_running_loop().create_task(self._check_eviction_policy())
        return reply

    async def quiesce(self, script: Script, key: str, *, timeout: float) -> bool:
        """Wait until the batches of `script` on `key` already gathered are answered; see `Batcher.quiesce`."""
        return await self._batcher.quiesce(script, key, timeout=timeout)

    async def _send(self, script: Script, key: str, args: list[Any]) -> Any:
        """One unbatched call of `script`, in its slot of the cap on calls in flight."""
        async with self._in_flight:
            return await self._post(script, (key,), args)

    def _refused(self, script: Script) -> BudgetClosed | None:
        """The error a call of `script` gets now: once closing, every script but a waiter's last leave."""
        if self._closing and script is not self.scripts.leave:
            return BudgetClosed(f"budget {self.description} is closed")
        return None

    async def _post(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run `script` now; the caller holds a slot of `_in_flight` (the batcher takes it for a batch)."""
        refused = self._refused(script)
        if refused is not None:
            raise refused
        return await script(self.client, keys, args)

    async def _post_many(self, calls: list[Call]) -> list[Any]:
        """Run several batched calls as one pipeline (`scripts.run_many`); the caller holds one `_in_flight` slot.

        The calls `_refused` fail on their own; the others go out.
        """
        refusals = [self._refused(script) for script, _, _ in calls]
        sent = [call for call, refused in zip(calls, refusals, strict=True) if refused is None]
        replies = iter(await run_many(self.client, sent) if sent else [])
        return [next(replies) if refused is None else refused for refused in refusals]

    async def _guarded(
        self,
        name: str,
        operation: Callable[[], Awaitable[Any]],
        args: list[Any],
        *,
        deadline: float | None = None,
    ) -> Any:
        try:
            return await self._resilience.call(name, operation, args, deadline=deadline)
        except RedisError as exc:
            denied = permission_error(exc)
            if denied is None:
                raise
            raise denied from exc

    # named reads and test-clock writes -------------------------------------------

    async def _command(self, name: str, command: Callable[[Any], Awaitable[Any]]) -> Any:
        self._check_open()
        return await self._guarded(name, lambda: command(self.client), [])

    async def hget(self, key: str, field: str) -> str | None:
        result: str | None = await self._command("hget", lambda c: c.hget(key, field))
        return result

    async def hmget(self, key: str, fields: list[str]) -> list[str | None]:
        return list(await self._command("hmget", lambda c: c.hmget(key, fields)))

    async def hkeys(self, key: str) -> list[str]:
        return list(await self._command("hkeys", lambda c: c.hkeys(key)))

    async def server_time_ms(self) -> int:
        """The Redis server's clock in milliseconds."""
        seconds, micros = await self._command("time", lambda c: c.time())
        return int(seconds) * 1000 + int(micros) // 1000

    async def xrange(self, key: str, low: str, high: str, count: int) -> list[tuple[str, dict[str, str]]]:
        return list(await self._command("xrange", lambda c: c.xrange(key, min=low, max=high, count=count)))

    async def xrevrange(self, key: str, high: str, low: str, count: int) -> list[tuple[str, dict[str, str]]]:
        return list(await self._command("xrevrange", lambda c: c.xrevrange(key, max=high, min=low, count=count)))

    async def xread(self, key: str, after: str, *, block_ms: int, count: int) -> list[tuple[str, dict[str, str]]]:
        """Stream entries of `key` after id `after` (``$``: only new ones), waiting up to `block_ms` for one."""
        self._check_open()
        reply = await self.client.xread({key: after}, block=block_ms, count=count)
        return [entry for _, entries in reply or [] for entry in entries]

    async def scan_keys(self, match: str, count: int = 500) -> AsyncIterator[str]:
        """Every key matching the glob `match` (on a cluster: on every primary)."""
        self._check_open()
        async for key in self.client.scan_iter(match=match, count=count):
            yield key

    async def subscribers(self, channel: str) -> int:
        """How many connections subscribe to `channel`."""
        counts = dict(await self._command("pubsub_numsub", lambda c: c.pubsub_numsub(channel)))
        return int(counts.get(channel, 0))

    async def exists(self, *keys: str) -> int:
        """How many of `keys` exist (keys of one tenant share a slot, so this works on a cluster)."""
        return int(await self._command("exists", lambda c: c.exists(*keys)))

    async def primaries(self, single_name: str) -> list[tuple[str, Callable[..., Awaitable[Any]]]]:
        """For diagnostics (``doctor``): ``(name, run)`` per primary, `run(*command)` sending a raw command there.

        One server is one entry named `single_name`; a cluster is discovered first.
        """
        self._check_open()
        client = self.client
        get_nodes = getattr(client, "get_nodes", None)
        if get_nodes is None:
            return [(single_name, client.execute_command)]
        await client.initialize()
        out: list[tuple[str, Callable[..., Awaitable[Any]]]] = []
        for node in get_nodes():
            if getattr(node, "server_type", "primary") != "primary":
                continue

            async def run(*args: Any, _node: Any = node) -> Any:
                return await client.execute_command(*args, target_nodes=_node)

            out.append((f"{node.host}:{node.port}", run))
        return out

    async def eviction_policies(self) -> dict[str, str | None]:
        """``maxmemory-policy`` of each primary, by node name; None where this user may not read it."""
        return {name: await _read_eviction_policy(run) for name, run in await self.primaries(self.description)}

    async def _check_eviction_policy(self) -> dict[str, str | None]:
        """Log at error level every primary that may evict budget keys; see the module docstring."""
        try:
            policies = await asyncio.wait_for(self.eviction_policies(), EVICTION_CHECK_TIMEOUT)
        except Exception as exc:  # a diagnostic only: it must never break or delay the Budget
            log.debug("redis.eviction_policy_unknown", redis=self.description, error=f"{type(exc).__name__}: {exc}")
            return {}
        for node, policy in policies.items():
            if policy is not None and policy != SAFE_EVICTION_POLICY:
                log.error(
                    "redis.evicts_budget_keys", redis=self.description, node=node, policy=policy,
                    consequence="under memory pressure Redis may drop limits (tenants refused) or windows "
                    "(spend forgotten, limits exceeded)",
                    fix="CONFIG SET maxmemory-policy noeviction, and the same in redis.conf",
                )  # fmt: skip
        return policies

    async def publish(self, channel: str, message: str) -> int:
        """Publish `message` on `channel` (an event the library makes outside a script); the receivers' count."""
        return int(await self._command("publish", lambda c: c.publish(channel, message)))

    async def get(self, key: str) -> str | None:
        result: str | None = await self._command("get", lambda c: c.get(key))
        return result

    async def set(self, key: str, value: str | int) -> None:
        await self._command("set", lambda c: c.set(key, value))

    async def incrby(self, key: str, amount: int) -> int:
        return int(await self._command("incrby", lambda c: c.incrby(key, amount)))

    # closing -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise BudgetClosed(f"budget {self.description} is closed")

    def begin_close(self) -> None:
        """Refuse every later call (but a waiter's last leave); `aclose` finishes the job."""
        self._closing = True

    async def aclose(self) -> None:
        """Wait for the batches already sent, then close the client's connections."""
        self._closing = True
        if self.eviction_check is not None:
            await cancel_and_wait([self.eviction_check])
        await self._batcher.aclose()
        close = getattr(self.client, "aclose", None)
        if close is not None:
            await close()


async def _read_eviction_policy(run: Callable[..., Awaitable[Any]]) -> str | None:
    """One node's ``maxmemory-policy`` by ``CONFIG GET``, else ``INFO memory``; None when neither may be read."""
    try:
        reply = await run("CONFIG", "GET", "maxmemory-policy")
        pairs = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
        policy = pairs.get("maxmemory-policy", pairs.get(b"maxmemory-policy"))
        if policy is not None:
            return policy.decode() if isinstance(policy, bytes) else str(policy)
    except RedisError:
        pass
    try:
        info = await run("INFO", "memory")
    except RedisError:
        return None
    policy = info.get("maxmemory_policy") if isinstance(info, dict) else None
    return None if policy is None else str(policy)


def _is_cluster(client: Any) -> bool:
    """Whether `client` speaks to a Redis Cluster (redis-py's RedisCluster, or a wrapper of one)."""
    return getattr(client, "get_nodes", None) is not None
