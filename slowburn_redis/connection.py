"""Building Redis clients: from a URL (one server or a Redis Cluster), or the embedded fakeredis server.

URL schemes:

- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock``:
  one Redis server.
- ``redis+cluster://[user:password@]host:port``, ``rediss+cluster://...``: a Redis
  Cluster, reached through any of its nodes (the same as ``cluster=True``
  with a ``redis://`` or ``rediss://`` URL).

On a cluster, commands go through redis-py's asyncio ``RedisCluster`` (every
script call lands on the node serving the tenant's hash slot). That client has
no pub/sub, so wake notifications and events are read on a plain connection to
one node: a ``PUBLISH`` reaches every node of a cluster, so any node will do.
Each call of the pub/sub factory picks the next known node, so a subscriber
that lost its node reconnects to another one.

Clients are built with one immediate retry of a failed command (enough for a
pooled connection that went stale when Redis restarted); longer outages are
the business of `slowburn_redis.resilience` and the Budget's
``on_unavailable`` policy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from slowburn_redis.errors import InvalidInput, MissingExtra

_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

ConnectFactory = Callable[[], Any]
PubSubFactory = Callable[[], Any]


def redact_url(url: str) -> str:
    """`url` with any username and password removed, safe to log and print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def split_cluster_url(url: str, cluster: bool = False) -> tuple[str, bool]:
    """``(url with a plain scheme, whether it names a cluster)``: ``redis+cluster://`` becomes ``redis://``."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError as exc:
        raise InvalidInput(f"malformed Redis URL {redact_url(url)!r}") from exc
    plain = _CLUSTER_SCHEMES.get(scheme)
    if plain is not None:
        return plain + url[len(scheme) :], True
    return url, cluster


def connect_url(url: str, *, cluster: bool = False) -> tuple[ConnectFactory, PubSubFactory | None, str]:
    """A factory of asyncio clients for `url`, a pub/sub factory (None: the client's own), and a safe description.

    `cluster` (or a ``redis+cluster://`` / ``rediss+cluster://`` URL) builds
    ``RedisCluster`` clients and a pub/sub factory on plain node connections.
    Raises InvalidInput for a URL of another scheme, or a cluster URL on a
    unix socket.
    """
    if not isinstance(url, str):
        raise InvalidInput(f"Redis URL must be a string, not {type(url).__name__}")
    url, cluster = split_cluster_url(url, cluster)
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise InvalidInput(
            "Redis URL must start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://, "
            f"got {redact_url(url)!r}"
        )
    if not cluster:
        return _connect_single(url), None, redact_url(url)
    if scheme == "unix":
        raise InvalidInput("a Redis Cluster is reached over TCP (redis:// or rediss://), not a unix socket")
    connect, open_pubsub = _connect_cluster(url)
    return connect, open_pubsub, redact_url(url.replace(scheme + "://", scheme + "+cluster://", 1))


def _client_retry() -> Any:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), 1)


MAX_CONNECTIONS = 128
"""Script calls in flight per Budget; more wait in the Budget instead of failing for want of a connection."""


def _connect_single(url: str) -> ConnectFactory:
    import redis.asyncio as aioredis

    def connect() -> Any:
        # Script calls are bounded by the Budget's semaphore (MAX_CONNECTIONS);
        # the rest of the pool serves pub/sub and the few direct reads. A plain
        # pool costs less per call than a blocking one.
        pool = aioredis.ConnectionPool.from_url(
            url, decode_responses=True, retry=_client_retry(), max_connections=MAX_CONNECTIONS * 2
        )
        return aioredis.Redis.from_pool(pool)

    return connect


def node_url(url: str, host: str, port: int) -> str:
    """`url` (credentials, TLS and query kept) pointed at the node `host`:`port`, database 0."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    hostpart = f"[{host}]" if ":" in host else host
    netloc = (userinfo + "@" if userinfo else "") + f"{hostpart}:{port}"
    return urlunsplit((parts.scheme, netloc, "/0", parts.query, ""))


def _cluster_class() -> type[Any]:
    from redis.asyncio.cluster import RedisCluster

    class InitializedRedisCluster(RedisCluster):
        """RedisCluster that finishes discovering the cluster before its first command runs.

        redis-py's asyncio RedisCluster, given several concurrent first
        commands, may break a connection another task is using (measured with
        redis-py 8.1: AttributeError or ConnectionError from one of eight
        concurrent first EVALs). Initializing first, under redis-py's own lock,
        avoids it.
        """

        async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
            if self._initialize:
                await self.initialize()
            return await super().execute_command(*args, **kwargs)

    return InitializedRedisCluster


def _connect_cluster(url: str) -> tuple[ConnectFactory, PubSubFactory]:
    from redis.asyncio import Redis

    cluster_class = _cluster_class()
    parts = urlsplit(url)
    seed = (parts.hostname or "localhost", parts.port or 6379)
    clients: list[Any] = []
    turn = itertools.count()

    def connect() -> Any:
        client = cluster_class.from_url(
            url, decode_responses=True, retry=_client_retry(), max_connections=MAX_CONNECTIONS
        )
        clients[:] = [client]  # the newest client knows the newest node list
        return client

    def known_nodes() -> list[tuple[str, int]]:
        nodes: list[tuple[str, int]] = []
        for client in clients:
            try:
                nodes = [(node.host, int(node.port)) for node in client.get_nodes()]
            except Exception:  # not initialized yet: fall back to the seed node
                nodes = []
        return sorted(set(nodes)) or [seed]

    def open_pubsub() -> Any:
        nodes = known_nodes()
        host, port = nodes[next(turn) % len(nodes)]
        node = Redis.from_url(node_url(url, host, port), decode_responses=True, retry=_client_retry())
        return node.pubsub()

    return connect, open_pubsub


def connect_embedded(server: Any = None) -> Callable[[], Any]:
    """A factory of asyncio fakeredis clients sharing one in-process server (with Lua).

    Raises MissingExtra when the ``[embedded]`` extra (fakeredis with Lua) is not installed.
    """
    try:
        import fakeredis
        import lupa  # noqa: F401  (fakeredis runs scripts only with it)
    except ImportError as exc:
        raise MissingExtra("the embedded store (Budget.embedded)", "embedded") from exc

    shared = server if server is not None else fakeredis.FakeServer(version=(7,))

    def connect() -> Any:
        # In-process connections are cheap: no reason to make callers queue for one.
        return fakeredis.FakeAsyncRedis(server=shared, decode_responses=True, max_connections=100_000)

    return connect
