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

A single server's command client has no retry of its own (`COMMAND_RETRIES`
= 0): `slowburn_redis.resilience` is the one retry loop, bounded by each
call's deadline. A client-level retry would resend a command from wherever
it runs, a batch's send included, which is not bounded by any one caller's
deadline: an acquire cut at its deadline could be resent after the caller got
its error and released its reservation id, and be admitted then. A pooled
connection that went stale when Redis restarted is found by redis-py on
checkout and reconnected. Pub/sub connections keep one immediate retry (a
subscribe is idempotent and bounded by the waiter's own deadline), and so does
the cluster client, whose retry also drives its rediscovery of the nodes after
a failover.

Sockets have explicit timeouts and keepalive (`client_options`); a query
string in the URL (``?socket_timeout=10``) wins over them:

- ``socket_timeout`` = `SOCKET_TIMEOUT` (5 s): the longest one read of a
  command's reply may take. It bounds every attempt of a call that has no
  deadline of its own, and the connection handshake. Scripts answer in well
  under a millisecond; 5 s is Redis's own ``busy-reply-threshold``, past which
  Redis itself answers ``BUSY``. A call with a deadline (an acquire's
  ``timeout``, ``retry_timeout``) is cut at its deadline by
  `slowburn_redis.resilience` whatever this says.
- ``socket_connect_timeout`` = `SOCKET_CONNECT_TIMEOUT` (2 s): a TCP (and TLS)
  connect; room for one lost SYN (retransmitted after 1 s).
- ``socket_keepalive`` with `KEEPALIVE` (idle 10 s, then a probe every 5 s,
  3 probes): an idle connection to a host that vanished without a FIN or RST
  is found dead in about 25 s instead of the kernel's two hours. This matters
  most for the pub/sub connection, which waits for messages with no read
  timeout. Not set on ``unix://`` sockets.
- ``health_check_interval`` = `HEALTH_CHECK_INTERVAL` (30 s): a pooled
  connection idle for longer is checked with a PING before it is used, so a
  connection broken while idle fails there, not in the middle of a script.

Pub/sub connections come from a pool of their own without ``socket_timeout``
(where redis-py would apply it to the blocking read of the next message,
which must wait as long as nothing is published) and without health checks;
keepalive and the connect timeout still apply. A waiter never depends on the
pub/sub connection for its deadline: it sleeps with its own timeout.
"""

from __future__ import annotations

import itertools
import socket
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


SOCKET_TIMEOUT = 5.0
"""Seconds one read of a command's reply may take (redis-py ``socket_timeout``); see the module docstring."""

SOCKET_CONNECT_TIMEOUT = 2.0
"""Seconds a connect may take (redis-py ``socket_connect_timeout``)."""

HEALTH_CHECK_INTERVAL = 30
"""Seconds a pooled command connection may sit idle before it is PINGed on its next use."""

KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}
"""TCP keepalive: idle seconds before the first probe, seconds between probes, probes before the peer is dead."""


def keepalive_options() -> dict[int, int]:
    """`KEEPALIVE` as socket options, keeping those this platform has (macOS names the idle one TCP_KEEPALIVE)."""
    options: dict[int, int] = {}
    for name, value in KEEPALIVE.items():
        option = getattr(socket, name, None)
        if option is None and name == "TCP_KEEPIDLE":
            option = getattr(socket, "TCP_KEEPALIVE", None)
        if option is not None:
            options[int(option)] = value
    return options


def _pubsub_read_timeout() -> float | None:
    """`SOCKET_TIMEOUT` where redis-py keeps it off the blocking pub/sub read (8.1 and later), else None.

    Older redis-py applies ``socket_timeout`` to ``get_message(timeout=None)``,
    which would end every quiet wait with a TimeoutError.
    """
    import redis

    try:
        major, minor = (int(part) for part in str(redis.__version__).split(".")[:2])
    except ValueError:
        return None
    return SOCKET_TIMEOUT if (major, minor) >= (8, 1) else None


def client_options(scheme: str, *, pubsub: bool = False) -> dict[str, Any]:
    """The socket options of a client for a URL of `scheme` (see the module docstring); `pubsub` for a subscriber."""
    options: dict[str, Any] = {
        "socket_timeout": _pubsub_read_timeout() if pubsub else SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT,
    }
    if scheme != "unix":
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = keepalive_options()
    if not pubsub:
        options["health_check_interval"] = HEALTH_CHECK_INTERVAL
    return options


COMMAND_RETRIES = 0
"""Client-level retries of a single server's commands: none (see the module docstring)."""


def _client_retry(retries: int = 1) -> Any:
    """redis-py's Retry: `retries` immediate resends of a command whose connection failed."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Retry(NoBackoff(), retries)


MAX_CONNECTIONS = 128
"""Script calls in flight per Budget; more wait in the Budget instead of failing for want of a connection."""


def _single_class() -> type[Any]:
    import redis.asyncio as aioredis

    class SubscribingRedis(aioredis.Redis):
        """A Redis client whose `pubsub` objects use a pool of their own, built with the pub/sub socket options."""

        _subscriber: Any = None
        pubsub_url = ""
        """The URL its pub/sub pool connects to (set by `_connect_single`)."""

        def pubsub(self, **kwargs: Any) -> Any:
            if self._subscriber is None:
                scheme = urlsplit(self.pubsub_url).scheme
                pool = aioredis.ConnectionPool.from_url(
                    self.pubsub_url,
                    decode_responses=True,
                    retry=_client_retry(),
                    **client_options(scheme, pubsub=True),
                )
                self._subscriber = aioredis.Redis.from_pool(pool)
            return self._subscriber.pubsub(**kwargs)

        async def aclose(self, close_connection_pool: bool | None = None) -> None:
            subscriber, self._subscriber = self._subscriber, None
            try:
                await super().aclose(close_connection_pool)
            finally:
                if subscriber is not None:
                    await subscriber.aclose()

    return SubscribingRedis


def _connect_single(url: str) -> ConnectFactory:
    import redis.asyncio as aioredis

    client_class = _single_class()
    options = client_options(urlsplit(url).scheme)

    def connect() -> Any:
        # Script calls are bounded by the Budget's semaphore (MAX_CONNECTIONS);
        # the rest of the pool serves the few direct reads. A plain pool costs
        # less per call than a blocking one.
        pool = aioredis.ConnectionPool.from_url(
            url,
            decode_responses=True,
            retry=_client_retry(COMMAND_RETRIES),
            max_connections=MAX_CONNECTIONS * 2,
            **options,
        )
        client = client_class.from_pool(pool)
        client.pubsub_url = url
        return client

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
    options = client_options(parts.scheme)
    pubsub_options = client_options(parts.scheme, pubsub=True)
    seed = (parts.hostname or "localhost", parts.port or 6379)
    clients: list[Any] = []
    turn = itertools.count()

    def connect() -> Any:
        client = cluster_class.from_url(
            url, decode_responses=True, retry=_client_retry(), max_connections=MAX_CONNECTIONS, **options
        )
        clients[:] = [client]  # the newest client knows the newest node list
        return client

    def known_nodes() -> list[tuple[str, int]]:
        nodes: list[tuple[str, int]] = []
        for client in clients:
            try:
                # Primaries only: a PUBLISH reaches every node, and a primary is what a failover replaces.
                nodes = [
                    (node.host, int(node.port))
                    for node in client.get_nodes()
                    if getattr(node, "server_type", "primary") == "primary"
                ]
            except Exception:  # not initialized yet: fall back to the seed node
                nodes = []
        return sorted(set(nodes)) or [seed]

    def open_pubsub() -> Any:
        nodes = known_nodes()
        host, port = nodes[next(turn) % len(nodes)]
        node = Redis.from_url(node_url(url, host, port), decode_responses=True, retry=_client_retry(), **pubsub_options)
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
