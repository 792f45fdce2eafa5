"""Snapshots of every key under a pattern, to prove a rejected call changed nothing."""

from __future__ import annotations

from typing import Any

Snapshot = dict[str, tuple[str, Any, bool]]


async def snapshot(client: Any, pattern: str) -> Snapshot:
    """Every key matching `pattern` -> (type, value read type by type, has a TTL), via an asyncio client.

    TTL values are left out (they tick); whether a key has one is kept. The
    client must decode responses. Works on redis-py and fakeredis clients.
    """
    out: Snapshot = {}
    async for key in client.scan_iter(match=pattern, count=1000):
        kind = await client.type(key)
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "stream":
            value = await client.xrange(key)
        else:  # pragma: no cover - a key vanished between SCAN and TYPE, or an unknown type
            value = None
        out[key] = (kind, value, await client.pttl(key) > 0)
    return out


def glob_escape(text: str) -> str:
    """`text` with glob characters escaped for SCAN MATCH."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
