"""Building Redis clients: from a URL, or the embedded fakeredis server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from slowburn_redis.errors import InvalidInput

_SCHEMES = ("redis", "rediss", "unix")


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


def connect_url(url: str, *, cluster: bool = False) -> tuple[Callable[[], Any], Callable[[], Any] | None, str]:
    """A factory of asyncio clients for `url`, a pub/sub factory (None: the client's), and a safe description."""
    import redis.asyncio as aioredis

    if not isinstance(url, str) or urlsplit(url).scheme not in _SCHEMES:
        raise InvalidInput(f"Redis URL must start with redis://, rediss:// or unix://, got {redact_url(str(url))!r}")

    if cluster:
        raise InvalidInput("Redis Cluster support is not built yet")

    def connect() -> Any:
        return aioredis.Redis.from_url(url, decode_responses=True)

    return connect, None, redact_url(url)


def connect_embedded(server: Any = None) -> Callable[[], Any]:
    """A factory of asyncio fakeredis clients sharing one in-process server (with Lua)."""
    import fakeredis

    shared = server if server is not None else fakeredis.FakeServer(version=7)

    def connect() -> Any:
        return fakeredis.FakeAsyncRedis(server=shared, decode_responses=True)

    return connect
