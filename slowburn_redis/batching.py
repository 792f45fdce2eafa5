"""Coalescing concurrent calls of one script on one tenant into one EVALSHA.

The acquire and settle scripts take any number of requests (their ARGV is the
requests' arguments one after another) and reply with one reply per request,
each request all or nothing on its own. A `Batcher` gathers the requests that
callers submit for the same script and tenant key within one turn of the event
loop and sends them as one call: one round trip, one script run, and the work
every run does first (the clock, expired leases, the tenant's limits) done
once. The batch goes out on the next turn of the loop, so no request waits
for a batch to fill. ``Budget(batch_size=1)`` sends every request on its own.

A request whose caller gave up (cancelled, or cut at its deadline) before
its batch was sent is left out, and a batch whose callers have all given up
is not sent at all. "Sent" is the moment the batch gets its slot in `gate`
(the Engine's cap on calls in flight): a batch waiting there for a free
connection is checked again once it has one. A request whose caller gave up
while its batch is on the wire still runs in Redis, so a caller that must
clean up after it first waits for `quiesce`. A batch still on the wire
whose callers have all given up is cancelled (redis-py drops its
connection), so it does not hold a connection, reading, until the socket
timeout: at once, or, for the scripts named `quiesced` (whose callers clean
up after it), once a `quiesce` wait for it runs out.
A failed call fails every request of the batch with the same error; each
caller then applies its own retry policy, and a retried request is simply
batched again (every script is idempotent under a retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from slowburn_redis.scripts import Script
from slowburn_redis.tasks import abandon

Send = Callable[[Script, str, list[Any]], Awaitable[Any]]

MAX_BATCH = 8
"""Requests per call at most by default; a larger burst goes out as several calls at once.

Larger batches cost less per request (one round trip, one script start-up),
but a process that sends a whole burst as one call waits idle while Redis
runs it. With 16 tasks, two calls of 8 keep both busy: in the benchmarks, 8
gives a single process about 1.6 times the throughput of 16, and a 4-process
fleet on 2 cores about 10% less (see bench/ceiling.py)."""

BATCH_LIMIT = 64
"""The largest batch a Budget accepts (`batch_size`)."""


class Batcher:
    """Sends the requests of one script on one key that are ready together as one call of `send`.

    `send(script, key, args)` runs the script with the batch's arguments and
    returns its list of replies. `gate` (None: none) is held for each send;
    a batch whose callers all gave up while it waited for it is dropped
    unsent. `quiesced` names the scripts whose orphaned sends stay on the
    wire until a `quiesce` wait for them runs out (see the module docstring).
    """

    def __init__(
        self,
        send: Send,
        *,
        max_batch: int = MAX_BATCH,
        gate: asyncio.Semaphore | None = None,
        quiesced: Collection[str] = (),
    ) -> None:
        if not 1 <= max_batch <= BATCH_LIMIT:
            raise ValueError(f"max_batch must be from 1 to {BATCH_LIMIT}")
        self._send = send
        self._max_batch = max_batch
        self._gate = gate
        self._quiesced = frozenset(quiesced)
        self._pending: dict[tuple[Script, str], list[tuple[Sequence[Any], asyncio.Future[Any]]]] = {}
        self._sending: dict[asyncio.Task[None], tuple[Script, str]] = {}
        self._in_slot: dict[tuple[Script, str], set[asyncio.Task[None]]] = {}
        self._idle: dict[tuple[Script, str], asyncio.Future[None]] = {}
        """Per slot with sends in flight: resolved once it has none (what every `quiesce` of it waits on)."""
        self._scanning: set[tuple[Script, str]] = set()
        self._callers: dict[asyncio.Task[Any], list[asyncio.Future[Any]]] = {}
        """The callers of the batch each sending task has on the wire now."""

    async def call(self, script: Script, key: str, args: Sequence[Any]) -> Any:
        """Run one request of `script` on `key` (in a batch) and return its own reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        slot = (script, key)
        queue = self._pending.get(slot)
        if queue is None:
            queue = self._pending[slot] = []
            self._track(loop.create_task(self._flush(slot)), slot)  # its first step runs on the next turn
        queue.append((args, future))
        return await future

    def _track(self, task: asyncio.Task[None], slot: tuple[Script, str]) -> None:
        self._sending[task] = slot
        self._in_slot.setdefault(slot, set()).add(task)
        task.add_done_callback(lambda done: self._untrack(done, slot))

    def _untrack(self, task: asyncio.Task[None], slot: tuple[Script, str]) -> None:
        self._sending.pop(task, None)
        tasks = self._in_slot.get(slot)
        if tasks is None:
            return
        tasks.discard(task)
        if not tasks:
            del self._in_slot[slot]
            idle = self._idle.pop(slot, None)
            if idle is not None and not idle.done():
                idle.set_result(None)

    async def quiesce(self, script: Script, key: str, *, timeout: float) -> bool:
        """Wait up to `timeout` s until `script` on `key` has no batch in flight (those gathered so far included).

        A caller cancelled while its request was in flight calls this before
        cleaning up, so its cleanup reaches Redis after the request itself,
        never before (a late acquire would re-queue a waiter that already
        left). True when nothing is in flight any more. When the wait runs
        out, the slot's batches whose callers have all given up are
        abandoned. Every caller waits on one shared future per slot, so
        thousands of callers cleaning up at once cost each O(1), not O(batches).
        """
        slot = (script, key)
        if slot not in self._in_slot:
            return True
        idle = self._idle.get(slot)
        if idle is None:
            idle = self._idle[slot] = asyncio.get_running_loop().create_future()
        done, _ = await asyncio.wait((idle,), timeout=timeout)
        if done:
            return True
        self._scan_soon(slot)
        return False

    def _scan_soon(self, slot: tuple[Script, str]) -> None:
        """Abandon the orphaned batches of `slot` on the next turn: once for all the callers that gave up now."""
        if slot not in self._scanning:
            self._scanning.add(slot)
            asyncio.get_running_loop().call_soon(self._scan, slot)

    def _scan(self, slot: tuple[Script, str]) -> None:
        self._scanning.discard(slot)
        for task in list(self._in_slot.get(slot, ())):
            self._drop_if_orphaned(task)

    def _watch(self, task: asyncio.Task[Any], script: Script, callers: list[asyncio.Future[Any]]) -> None:
        """Record the callers of the batch `task` sends; unless `script` is quiesced, drop it when they all give up."""
        self._callers[task] = callers
        if script.name not in self._quiesced:
            for future in callers:
                future.add_done_callback(lambda _: self._drop_if_orphaned(task))

    def _drop_if_orphaned(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` when the batch it has on the wire has no caller left waiting for its reply."""
        callers = self._callers.get(task)
        if callers and all(future.done() for future in callers):
            abandon(task)

    async def _flush(self, slot: tuple[Script, str]) -> None:
        """Send what the slot gathered since its first request: the first batch from here, any others alongside."""
        queue = self._pending.pop(slot, [])
        batches = [queue[start : start + self._max_batch] for start in range(0, len(queue), self._max_batch)]
        for batch in batches[1:]:
            self._track(asyncio.ensure_future(self._run(*slot, batch)), slot)
        if batches:
            await self._run(*slot, batches[0])

    async def _run(self, script: Script, key: str, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        if self._gate is None:
            await self._run_open(script, key, batch)
            return
        if all(future.done() for _, future in batch):
            return
        async with self._gate:
            await self._run_open(script, key, batch)

    async def _run_open(self, script: Script, key: str, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]]) -> None:
        """Send the requests of `batch` whose callers still wait (nothing when none does); deliver the replies."""
        batch = [(args, future) for args, future in batch if not future.done()]
        if not batch:
            return
        current = asyncio.current_task()
        if current is not None:
            self._watch(current, script, [future for _, future in batch])
        try:
            replies = await self._send(script, key, [arg for args, _ in batch for arg in script.request(args)])
        except BaseException as exc:
            for _, future in batch:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if current is not None:
                self._callers.pop(current, None)
        if not isinstance(replies, list) or len(replies) != len(batch):
            error = RuntimeError(f"script {script.name} answered {len(batch)} requests with {replies!r}")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(reply)

    async def aclose(self) -> None:
        """Wait for the batches already sent."""
        if self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)
