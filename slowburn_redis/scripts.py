"""Loading the Lua scripts and calling them with EVALSHA.

Each script in ``lua/`` is sent as one source: a clock prelude
(``clock/server.lua``, or ``clock/test.lua`` for tests that move time),
``lib.lua``, then the script itself. A NOSCRIPT reply (after ``SCRIPT FLUSH``,
a restart or a failover) loads the source again and retries once.

`run_many` sends several script calls (of any scripts and tenants) as one
pipeline, each still its own EVALSHA: one round trip, each call's reply or
error apart. On a Redis Cluster, redis-py's ClusterPipeline splits the
pipeline by node (one round trip per node, the nodes at once) and follows
MOVED/ASK redirections per call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from redis.exceptions import NoScriptError

Call = tuple["Script", Sequence[str], Sequence[str | int]]
"""One script call: the script, its KEYS and its ARGV.

KEYS is one tenant's base key, or several for a call of a batched script
that serves several tenants (lib.lua "tenants", `protocol.tenants_args`).
"""

SCRIPT_NAMES = (
    "acquire",
    "settle",
    "extend",
    "leave",
    "refresh",
    "set_limits",
    "reset",
    "status",
    "announce",
    "quote",
    "run",
)
BATCHED = frozenset({"acquire", "settle", "leave"})
"""Scripts whose ARGV may hold several requests, answered with a list of replies (see `slowburn_redis.batching`)."""

_JOINED_FIELDS = {"acquire": 10, "settle": 4}
"""How many leading arguments of a request travel as one space-joined string (see each script's header)."""
Clock = Literal["server", "test"]


def lua_dir() -> Traversable:
    """The folder holding the Lua sources: inside the installed package, else the source tree's ``lua/``."""
    packaged = resources.files("slowburn_redis") / "lua"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "lua"


@cache
def script_source(name: str, clock: Clock = "server") -> str:
    """The full source sent to Redis for the script `name`."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no script named {name!r}")
    folder = lua_dir()
    parts = [(folder / "clock" / f"{clock}.lua"), folder / "lib.lua", folder / f"{name}.lua"]
    return "\n".join(part.read_text(encoding="utf-8") for part in parts)


def decode(value: Any) -> Any:
    """Replies with bytes (a client without decode_responses) as str, recursively."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [item if type(item) is str or type(item) is int else decode(item) for item in value]
    return value


class Script:
    """One Lua script, run by SHA and reloaded on NOSCRIPT.

    `batched` scripts take several requests in one call and reply with a list
    holding one reply per request.
    """

    def __init__(self, name: str, clock: Clock = "server") -> None:
        self.name = name
        self.batched = name in BATCHED
        self._joined = _JOINED_FIELDS.get(name, 0)
        self.source = script_source(name, clock)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def request(self, args: Sequence[str | int]) -> list[str | int]:
        """The ARGV of one request of a batched script: its leading fields joined by spaces, as its header says.

        Fewer, longer arguments are cheaper to send (the client's cost is per
        argument) and cost the script one pattern match to read.
        """
        if not self._joined:
            return list(args)
        return [" ".join(map(str, args[: self._joined])), *args[self._joined :]]

    async def __call__(self, client: Any, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run the script on `client` with these KEYS (one tenant's base key, or several: see `Call`)."""
        try:
            reply = await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            reply = await client.evalsha(self.sha, len(keys), *keys, *args)
        return decode(reply)


async def run_many(client: Any, calls: Sequence[Call]) -> list[Any]:
    """Run `calls` in one pipeline; for each, in order, its decoded reply or the exception it failed with.

    A call answered NOSCRIPT has its script loaded and is sent once more
    (those calls only, in a second pipeline), like `Script.__call__` does. A
    failure of the pipeline as a whole (the connection) raises; on a cluster
    a node's connection failing mid-read fails that node's calls only (their
    entries are the error).
    """
    results = await _pipeline(client, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        loaded: set[str] = set()
        for i in missing:
            script = calls[i][0]
            if script.sha not in loaded:
                loaded.add(script.sha)
                await client.script_load(script.source)
        for i, result in zip(missing, await _pipeline(client, [calls[i] for i in missing]), strict=True):
            results[i] = result
    return [result if isinstance(result, BaseException) else decode(result) for result in results]


async def _pipeline(client: Any, calls: Sequence[Call]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for script, keys, args in calls:
        # The raw command: redis-py's ClusterPipeline blocks its evalsha method, yet routes the command by its key.
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
    results = list(await pipe.execute(raise_on_error=False))
    if len(results) != len(calls):
        raise RuntimeError(f"a pipeline of {len(calls)} script calls was answered with {len(results)} replies")
    return results


class Scripts:
    """Every script, built for one clock."""

    def __init__(self, clock: Clock = "server") -> None:
        self.acquire = Script("acquire", clock)
        self.settle = Script("settle", clock)
        self.extend = Script("extend", clock)
        self.leave = Script("leave", clock)
        self.refresh = Script("refresh", clock)
        self.set_limits = Script("set_limits", clock)
        self.reset = Script("reset", clock)
        self.status = Script("status", clock)
        self.announce = Script("announce", clock)
        self.quote = Script("quote", clock)
        self.run = Script("run", clock)
