"""What every command shares: the global options, exit codes, and running a coroutine on a Budget.

Exit codes: 0 ok, 1 operational error (Redis unreachable or refusing, named
by its URL without credentials), 2 bad usage or bad input, 3 not found (a
tenant with nothing stored), 4 ``doctor`` found a problem with the
deployment, 5 ``doctor`` could not make every check (and found nothing).
Every error prints one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import click
from redis.exceptions import RedisError

from slowburn_redis.connection import redact_url
from slowburn_redis.errors import InvalidInput, RedisUnavailable, SlowburnError

if TYPE_CHECKING:
    from slowburn_redis.budget import Budget

T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"


class BadInput(click.ClickException):
    """Bad usage or input: exit 2, nothing in Redis changed."""

    exit_code = 2


class OperationalError(click.ClickException):
    """Redis unreachable or refusing: exit 1."""

    exit_code = 1


class NotFound(click.ClickException):
    """What the command was asked about does not exist (no such tenant): exit 3, nothing changed."""

    exit_code = 3


EXIT_FINDINGS = 4
"""``doctor``'s exit code when it found something to fix."""
EXIT_UNCHECKED = 5
"""``doctor``'s exit code when it found nothing to fix but could not make every check."""


@dataclass(frozen=True)
class CliState:
    """The global options, kept on the click context as ``ctx.obj``."""

    redis_url: str
    prefix: str
    url_given: bool
    """True when a Redis was named, by --redis-url or SLOWBURN_REDIS_URL (the demo then leaves the embedded store)."""

    def open_budget(self) -> Budget:
        """A Budget on --redis-url with --prefix that fails at once when Redis is unreachable (exit 1).

        A malformed URL (a port out of range, a database that is not a number)
        is bad input: BadInput, exit 2, before anything connects.
        """
        from slowburn_redis.budget import Budget

        check_redis_url(self.redis_url)
        try:
            return Budget.from_url(self.redis_url, prefix=self.prefix, on_unavailable="raise")
        except InvalidInput:
            raise
        except ValueError as exc:
            raise BadInput(f"bad Redis URL (--redis-url or SLOWBURN_REDIS_URL): {one_line(exc)}") from None


def check_redis_url(url: str) -> None:
    """Raise BadInput (one line, no credentials) for a URL whose port or database cannot be read."""
    from urllib.parse import urlsplit

    where = "bad Redis URL (--redis-url or SLOWBURN_REDIS_URL)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadInput(f"{where}: {one_line(exc)}") from None
    if port == 0:
        raise BadInput(f"{where}: port 0 is not a port to connect to")
    database = parts.path.strip("/")
    if parts.scheme in ("redis", "rediss") and database and not database.isdigit():
        raise BadInput(f"{where}: the database must be a number such as /0, not {database[:20]!r}")


def quiet_logging(ctx: click.Context) -> None:
    """Silence the library's logs (critical ones only, on stderr) until the command ends.

    Errors reach the operator as the command's own one-line message.

    The previous structlog configuration is restored when the context closes,
    so embedding the CLI (or testing it) leaves logging as it was.
    """
    import structlog

    saved = structlog.get_config()
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    ctx.call_on_close(lambda: structlog.configure(**saved))


def state(ctx: click.Context) -> CliState:
    """The CliState of the running command."""
    obj = ctx.find_object(CliState)
    if obj is None:  # pragma: no cover - every command runs under the group
        raise click.UsageError("slowburn-redis commands run under the slowburn-redis group")
    return obj


def one_line(text: object) -> str:
    """`text` with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def run_async(url: str, coro: Awaitable[T]) -> T:
    """Run `coro`, turning errors into exit codes: InvalidInput -> 2, Redis and other library errors -> 1."""
    try:
        return asyncio.run(_as_coroutine(coro))
    except InvalidInput as exc:
        raise BadInput(one_line(exc)) from None
    except RedisUnavailable as exc:  # its message names the URL, without credentials
        raise OperationalError(one_line(exc)) from None
    except (RedisError, SlowburnError, OSError) as exc:  # PermissionDenied, a script error...
        raise OperationalError(f"Redis at {redact_url(url)} failed: {one_line(exc) or type(exc).__name__}") from None


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def with_budget(ctx: click.Context, action: Callable[[Budget], Awaitable[T]]) -> T:
    """Open a Budget from the global options, run `action` on it, close it; map errors to exit codes."""
    cli_state = state(ctx)

    async def go() -> T:
        budget = cli_state.open_budget()
        try:
            return await action(budget)
        finally:
            # Closing a dead connection may fail too: the error that matters is already raised.
            with contextlib.suppress(RedisError, OSError):
                await budget.aclose()

    return run_async(cli_state.redis_url, go())
