"""Redis ACL rules for one tenant: a worker user and an admin user.

`acl_rules` returns ``ACL SETUSER`` lines (what ``slowburn-redis acl TENANT``
prints) to paste into ``redis-cli`` or pipe to it. Both users may run the
scripts (EVALSHA, and SCRIPT LOAD to reload them after a restart), the
commands those scripts call (Redis checks every ``redis.call`` of a script
against the calling user), the commands redis-py sends on connect, and
SUBSCRIBE; their keys and channels are the tenant's alone.

ACL cannot tell one script from another, so the difference between the two
users lies in their keys:

- the worker may read and write the tenant's windows, queue, reservations,
  ledger, event trail (``<base>:trail``: every script that announces an event
  appends to it) and clock (``<base>:clock``, the high-water mark every script
  keeps), may only *read* ``<base>:limits``, and has no access at all to
  ``<base>:admin``;
- the admin may use every key of the tenant.

``reset.lua`` and ``set_limits.lua`` write ``<base>:admin`` (the last admin
action) before anything else, so a worker's attempt fails with NOPERM before
any state changes.

The lines reset each user's keys, channels, commands and selectors but not
its passwords, so running them again after a change of rules keeps the
passwords: set those separately with ``ACL SETUSER <user> >password``. A user
with no password and no ``nopass`` cannot log in.

What ACL cannot stop: a worker holding its tenant's credentials can run its
own scripts (SCRIPT LOAD) and so can rewrite its own tenant's usage counters.
It cannot change limits, reset through the library, or touch another tenant.
"""

from __future__ import annotations

import re

from redis.exceptions import NoPermissionError

from slowburn_redis.errors import InvalidInput, PermissionDenied
from slowburn_redis.keys import base_key
from slowburn_redis.names import validate_name

SCRIPT_COMMANDS: tuple[str, ...] = (
    "time",
    "get",
    "del",
    "exists",
    "set",
    "incr",
    "pexpire",
    "hget",
    "hmget",
    "hset",
    "hsetnx",
    "hdel",
    "hexists",
    "hkeys",
    "hincrby",
    "hgetall",
    "sadd",
    "smembers",
    "zadd",
    "zrem",
    "zcard",
    "zcount",
    "zrange",
    "zrangebyscore",
    "zscore",
    "xadd",
    "publish",
)
"""Every command the Lua scripts call (tests check this against ``lua/``)."""

CLIENT_COMMANDS: tuple[str, ...] = (
    "evalsha",
    "script|load",
    "script|exists",
    "ping",
    "hello",
    "auth",
    "select",
    "client|setname",
    "client|id",
    "subscribe",
    "unsubscribe",
    "xrange",
    "xrevrange",
    "xlen",
    "readonly",
    "cluster|slots",
    "cluster|shards",
    "cluster|nodes",
    "command",
)
"""Commands the library sends itself: scripts, connection setup, pub/sub, ledger reads, cluster discovery."""

WORKER_WRITE_KEYS: tuple[str, ...] = (
    "w:*",
    "b:*",
    "q",
    "qexp",
    "seq",
    "r:*",
    "s:*",
    "run:*",
    "leases",
    "ledger",
    "trail",
    "agents",
    "clock",
)
"""Keys under the tenant's base a worker reads and writes."""

WORKER_READ_KEYS: tuple[str, ...] = ("limits", "testclock")
"""Keys under the tenant's base a worker may only read."""

ADMIN_KEY = "admin"
"""The key under the tenant's base only an admin may write: reset and set_limits write it first."""

_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """`text` with Redis glob characters escaped, so it matches only itself in a pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def _user(kind: str, name: str | None, default: str) -> str:
    user = default if name is None else name
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise InvalidInput(
            f"{kind} user name {user!r} may hold only letters, digits and _ . @ - (at most 128 characters)"
        )
    return user


def acl_rules(
    tenant: str, *, prefix: str = "sb", worker_user: str | None = None, admin_user: str | None = None
) -> list[str]:
    """``ACL SETUSER`` lines for `tenant`: first the worker user, then the admin user.

    The default user names are ``<prefix>-worker-<tenant>`` and
    ``<prefix>-admin-<tenant>``. Raises InvalidInput for a bad tenant, prefix or
    user name. The lines set no password (see the module docstring).
    """
    validate_name("prefix", prefix)
    base = glob_escape(base_key(prefix, tenant))
    worker = _user("worker", worker_user, f"{prefix}-worker-{tenant}")
    admin = _user("admin", admin_user, f"{prefix}-admin-{tenant}")
    if worker == admin:
        raise InvalidInput("the worker and the admin must be different users")
    commands = " ".join(f"+{command}" for command in (*CLIENT_COMMANDS, *SCRIPT_COMMANDS))
    channels = f"&{base}:*"
    reset = "on resetkeys resetchannels clearselectors -@all"
    worker_keys = " ".join(
        [f"~{base}"]
        + [f"~{base}:{key}" for key in WORKER_WRITE_KEYS]
        + [f"%R~{base}:{key}" for key in WORKER_READ_KEYS]
    )
    return [
        f"ACL SETUSER {worker} {reset} {commands} {worker_keys} {channels}",
        f"ACL SETUSER {admin} {reset} {commands} ~{base} ~{base}:* {channels}",
    ]


_SCRIPT_NOPERM = "The user executing the script can't"
"""How Redis 7.0 words an ACL refusal inside a script (an ERR reply, not NOPERM)."""


def permission_error(exc: BaseException) -> PermissionDenied | None:
    """The PermissionDenied to raise for a Redis ACL refusal, else None.

    Redis refuses with a NOPERM reply at the top level (redis-py raises
    NoPermissionError) and, inside a script, with an ERR reply saying "The
    user executing the script can't ...". Meant for the one place the Budget
    talks to Redis: ``except RedisError as exc: raise permission_error(exc) or
    exc``. The message keeps Redis's own words, which name neither password
    nor URL.
    """
    if isinstance(exc, PermissionDenied):
        return exc
    text = str(exc)
    if not (isinstance(exc, NoPermissionError) or text.startswith("NOPERM") or _SCRIPT_NOPERM in text):
        return None
    detail = text.splitlines()[0].split(" script: ")[0].removeprefix("NOPERM ") if text else "NOPERM"
    error = PermissionDenied(
        f"Redis refused this operation for the connected user: {detail} "
        "(check the user's ACL: `slowburn-redis acl TENANT`)"
    )
    error.__cause__ = exc
    return error
