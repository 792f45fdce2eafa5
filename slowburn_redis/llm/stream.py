"""A streamed completion whose reservation is committed once, when the stream ends.

The commit uses the usage the provider reports in its last chunk, or, when
it reports none, the prompt tokens counted before the call and the tokens
of the text (and tool-call arguments) produced. A stream closed or dropped
midway is committed for what it produced (outcome ``abandoned``); a stream
that fails midway is committed for what it produced with outcome ``error``
(nothing produced: refunded), and a timeout keeps the estimate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Any

from slowburn_redis.llm.bridge import arun_on
from slowburn_redis.llm.estimate import count_text_tokens
from slowburn_redis.llm.metering import MeteredCall, Usage, reported_usage
from slowburn_redis.reservation import Settlement
from slowburn_redis.sync import Portal

_ORPHANS: set[asyncio.Task[Any]] = set()


class BudgetedStream:
    """Async iterator of litellm chunks; also an async context manager (closing commits)."""

    def __init__(self, inner: Any, call: MeteredCall, *, lease_ttl: float) -> None:
        self._inner = inner
        self._iter: AsyncIterator[Any] = inner.__aiter__()
        self.call = call
        self._text: list[str] = []
        self._usage: tuple[int, int] | None = None
        self._ttl = lease_ttl
        self._loop = asyncio.get_running_loop()
        self._next_extend = self._loop.time() + lease_ttl / 3
        self.chunks = 0
        self.settlement: Settlement | None = None

    @property
    def done(self) -> bool:
        return self.settlement is not None

    @property
    def text(self) -> str:
        """The text (and tool-call arguments) produced so far."""
        return "".join(self._text)

    def __aiter__(self) -> BudgetedStream:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        try:
            chunk = await self._iter.__anext__()
        except StopAsyncIteration:
            await self._finish(None)
            raise
        except BaseException as exc:
            await self._finish(exc)
            raise
        self._observe(chunk)
        if self._loop.time() >= self._next_extend:
            self._next_extend = self._loop.time() + self._ttl / 3
            await arun_on(self.call.loop, self.call.reservation.extend(self._ttl))
        return chunk

    def _observe(self, chunk: Any) -> None:
        self.chunks += 1
        usage = reported_usage(getattr(chunk, "usage", None))
        if usage is not None:
            self._usage = usage
        for choice in getattr(chunk, "choices", None) or []:
            delta = getattr(choice, "delta", None)
            if delta is None:
                continue
            for name in ("content", "reasoning_content"):
                piece = getattr(delta, name, None)
                if isinstance(piece, str):
                    self._text.append(piece)
            for tool_call in getattr(delta, "tool_calls", None) or []:
                function = getattr(tool_call, "function", None)
                for name in ("name", "arguments"):
                    piece = getattr(function, name, None) if function is not None else None
                    if isinstance(piece, str):
                        self._text.append(piece)

    def _produced(self) -> Usage | None:
        if self._usage is not None:
            prompt, completion = self._usage
            return Usage(prompt, completion, self.call.price.cost(prompt, completion))
        output = count_text_tokens(self.call.estimate.model, self.text)
        if output == 0 and self.chunks == 0:
            return None
        prompt = self.call.estimate.input_tokens
        return Usage(prompt, output, self.call.price.cost(prompt, output), reported=False)

    async def _finish(self, exc: BaseException | None, *, abandoned: bool = False) -> Settlement:
        if self.settlement is not None:
            return self.settlement
        extra = {"stream": True, "chunks": self.chunks}
        if exc is not None:
            produced = self._produced() if self.chunks else None
            self.settlement = await arun_on(self.call.loop, self.call.fail(exc, produced=produced, extra=extra))
            return self.settlement
        usage = self._produced() or Usage(
            self.call.estimate.input_tokens, 0, self.call.price.cost(self.call.estimate.input_tokens, 0), reported=False
        )
        outcome = "abandoned" if abandoned else None
        self.settlement = await arun_on(self.call.loop, self.call.succeed(usage, outcome=outcome, extra=extra))
        return self.settlement

    async def aclose(self) -> Settlement:
        """Stop reading: commit what was produced so far (idempotent)."""
        if self.settlement is not None:
            return self.settlement
        close = getattr(self._inner, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        return await self._finish(None, abandoned=True)

    async def __aenter__(self) -> BudgetedStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Dropped without being read to the end or closed: commit what it produced.
        if self.settlement is None and not self._loop.is_closed():
            # RuntimeError: the loop is gone; the lease expires and the estimate stays charged.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_close_orphan, self)


def _close_orphan(stream: BudgetedStream) -> None:
    task = asyncio.ensure_future(stream.aclose())
    _ORPHANS.add(task)
    task.add_done_callback(_ORPHANS.discard)


class SyncBudgetedStream:
    """The blocking face of a BudgetedStream, run on the sync twin's portal; a context manager."""

    def __init__(self, portal: Portal, stream: BudgetedStream) -> None:
        self._portal = portal
        self.stream = stream

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return self._portal.call(self.stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    @property
    def settlement(self) -> Settlement | None:
        return self.stream.settlement

    @property
    def text(self) -> str:
        return self.stream.text

    def close(self) -> Settlement:
        """Stop reading: commit what was produced so far (idempotent)."""
        return self._portal.call(self.stream.aclose())

    def __enter__(self) -> SyncBudgetedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
