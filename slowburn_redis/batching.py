"""Coalescing concurrent script calls: one tenant's requests into one EVALSHA, the tenants' calls into one pipeline.

The acquire and settle scripts take any number of requests (their ARGV is the
requests' arguments one after another) and reply with one reply per request,
each request all or nothing on its own. A `Batcher` gathers the requests that
callers submit for the same script and tenant key within one turn of the event
loop into one call (a batch): one script run, and the work every run does
first (the clock, expired leases, the tenant's limits) done once. The batches
of every script and tenant gathered in that turn then travel together, as one
pipeline (`send_many`; at most `max_pipeline` calls each, more pipelines at
once for more, and never two calls of one tenant in one pipeline, so one
tenant's calls go out side by side as before): one round trip for all of
them, each call still its own atomic script run on its own tenant.
Everything goes out on the next turn of the loop, so no request waits for a
batch or a pipeline to fill. A pipeline of one call is sent as a plain call. ``Budget(batch_size=1)`` sends every
request as a call of its own (pipelined with other tenants' calls of its turn).

A request whose caller gave up (cancelled, or cut at its deadline) before
its batch was sent is left out, and a batch whose callers have all given up
is not sent at all. "Sent" is the moment the pipeline carrying the batch
gets its slot in `gate` (the Engine's cap on calls in flight: one slot per
pipeline, or per plain call): a pipeline waiting there for a free connection
is checked again once it has one. A request whose caller gave up while its
batch is on the wire still runs in Redis, so a caller that must clean up
after it first waits for `quiesce`. A pipeline still on the wire whose
callers have all given up is cancelled (redis-py drops its connection), so
it does not hold a connection, reading, until the socket timeout: at once,
or, when it carries a batch of a script named `quiesced` (whose callers
clean up after it), once a `quiesce` wait for each such batch's slot has run
out.

A pipeline that fails as a whole (the connection failed) fails every
request it carries with the same error, and a call that fails on its own
(a script error, a refusal of that call) fails every request of its batch
and nothing else; each caller then applies its own retry policy, and a
retried request is simply batched again (every script is idempotent under a
retry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from slowburn_redis.scripts import Script
from slowburn_redis.tasks import abandon

Send = Callable[[Script, str, list[Any]], Awaitable[Any]]
SendMany = Callable[[list[tuple[Script, str, list[Any]]]], Awaitable[list[Any]]]
"""Run several script calls in one round trip: each call's reply, or the exception it alone failed with, in order."""

MAX_BATCH = 8
"""Requests per call at most by default; a larger burst goes out as several calls at once.

Larger batches cost less per request (one round trip, one script start-up),
but a process that sends a whole burst as one call waits idle while Redis
runs it. With 16 tasks, two calls of 8 keep both busy: in the benchmarks, 8
gives a single process about 1.6 times the throughput of 16, and a 4-process
fleet on 2 cores about 10% less (see bench/ceiling.py)."""

BATCH_LIMIT = 64
"""The largest batch a Budget accepts (`batch_size`)."""

MAX_PIPELINE = 8
"""Script calls per pipeline at most: more ready in one turn go out as several pipelines at once.

For the reason `MAX_BATCH` gives: redis-py hands back a pipeline's replies
together, so one long pipeline leaves the process idle while Redis runs it,
and several shorter ones keep both busy (bench/tenants.py)."""

_Slot = tuple[Script, str]
_Batch = tuple[_Slot, list[tuple[Sequence[Any], asyncio.Future[Any]]]]


class Batcher:
    """Sends the requests that are ready together: one call per script and key, the calls in pipelines.

    `send(script, key, args)` runs one script call with the batch's arguments
    and returns its list of replies; `send_many(calls)` runs several (see
    `SendMany`; None: each call is sent on its own, at once). `gate` (None:
    none) is held for each send; a batch whose callers all gave up while it
    waited for it is dropped unsent. `quiesced` names the scripts whose
    orphaned sends stay on the wire until a `quiesce` wait for them runs out
    (see the module docstring). `max_pipeline` (1: no pipelining) may be
    changed at any time; it applies from the next turn.
    """

    def __init__(
        self,
        send: Send,
        *,
        send_many: SendMany | None = None,
        max_batch: int = MAX_BATCH,
        max_pipeline: int = MAX_PIPELINE,
        gate: asyncio.Semaphore | None = None,
        quiesced: Collection[str] = (),
    ) -> None:
        if not 1 <= max_batch <= BATCH_LIMIT:
            raise ValueError(f"max_batch must be from 1 to {BATCH_LIMIT}")
        self._send = send
        self._send_many = send_many
        self._max_batch = max_batch
        self.max_pipeline = max_pipeline
        self._gate = gate
        self._quiesced = frozenset(quiesced)
        self._pending: dict[_Slot, list[tuple[Sequence[Any], asyncio.Future[Any]]]] = {}
        self._flushing: asyncio.Task[None] | None = None
        """The task that sends what `_pending` gathers this turn (it starts on the next turn)."""
        self._sending: dict[asyncio.Task[None], set[_Slot]] = {}
        self._in_slot: dict[_Slot, set[asyncio.Task[None]]] = {}
        self._idle: dict[_Slot, asyncio.Future[None]] = {}
        """Per slot with sends in flight: resolved once it has none (what every `quiesce` of it waits on)."""
        self._scanning: set[_Slot] = set()
        self._callers: dict[asyncio.Task[Any], list[asyncio.Future[Any]]] = {}
        """The callers of the batches each sending task has on the wire now."""
        self._held: dict[asyncio.Task[Any], set[_Slot]] = {}
        """Per sending task: the slots of its quiesced batches whose `quiesce` wait has not run out yet."""

    @property
    def max_pipeline(self) -> int:
        """Script calls per pipeline at most (1: none); settable, it applies from the next turn."""
        return self._max_pipeline

    @max_pipeline.setter
    def max_pipeline(self, size: int) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"max_pipeline (Engine.pipeline_size) must be a positive integer, not {size!r}")
        self._max_pipeline = size

    async def call(self, script: Script, key: str, args: Sequence[Any]) -> Any:
        """Run one request of `script` on `key` (in a batch) and return its own reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        slot = (script, key)
        queue = self._pending.get(slot)
        if queue is None:
            queue = self._pending[slot] = []
            if self._flushing is None:
                self._flushing = loop.create_task(self._flush())  # its first step runs on the next turn
                self._sending[self._flushing] = set()
                self._flushing.add_done_callback(self._untrack)
            self._track(self._flushing, slot)
        queue.append((args, future))
        return await future

    def _track(self, task: asyncio.Task[None], slot: _Slot) -> None:
        self._sending[task].add(slot)
        self._in_slot.setdefault(slot, set()).add(task)

    def _start(self, task: asyncio.Task[None], slots: set[_Slot]) -> None:
        self._sending[task] = set()
        for slot in slots:
            self._track(task, slot)
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Task[None], slots: Collection[_Slot] | None = None) -> None:
        """Forget `task` as a sender of `slots` (None: of every slot, and entirely: it is done)."""
        carried = self._sending.get(task)
        if carried is None:
            return
        for slot in list(carried) if slots is None else slots:
            carried.discard(slot)
            tasks = self._in_slot.get(slot)
            if tasks is None:
                continue
            tasks.discard(task)
            if not tasks:
                del self._in_slot[slot]
                idle = self._idle.pop(slot, None)
                if idle is not None and not idle.done():
                    idle.set_result(None)
        if slots is None:
            del self._sending[task]

    async def quiesce(self, script: Script, key: str, *, timeout: float) -> bool:
        """Wait up to `timeout` s until `script` on `key` has no batch in flight (those gathered so far included).

        A caller cancelled while its request was in flight calls this before
        cleaning up, so its cleanup reaches Redis after the request itself,
        never before (a late acquire would re-queue a waiter that already
        left). True when nothing is in flight any more. When the wait runs
        out, the pipelines carrying the slot's batches whose callers have all
        given up are abandoned (see the module docstring). Every caller waits
        on one shared future per slot, so thousands of callers cleaning up at
        once cost each O(1), not O(batches).
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

    def _scan_soon(self, slot: _Slot) -> None:
        """Abandon the orphaned sends of `slot` on the next turn: once for all the callers that gave up now."""
        if slot not in self._scanning:
            self._scanning.add(slot)
            asyncio.get_running_loop().call_soon(self._scan, slot)

    def _scan(self, slot: _Slot) -> None:
        self._scanning.discard(slot)
        for task in list(self._in_slot.get(slot, ())):
            held = self._held.get(task)
            if held is not None:
                held.discard(slot)
            self._drop_if_orphaned(task)

    def _watch(self, task: asyncio.Task[Any], batches: list[_Batch]) -> None:
        """Record the callers of the batches `task` sends, and drop it when they all gave up (see the docstring)."""
        callers = [future for _, batch in batches for _, future in batch]
        self._callers[task] = callers
        self._held[task] = {slot for slot, _ in batches if slot[0].name in self._quiesced}
        for (script, _), batch in batches:
            if script.name not in self._quiesced:
                for _, future in batch:
                    future.add_done_callback(lambda _: self._drop_if_orphaned(task))

    def _drop_if_orphaned(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` when what it has on the wire has no caller left waiting and no quiesce holds it."""
        callers = self._callers.get(task)
        if callers and not self._held.get(task) and all(future.done() for future in callers):
            abandon(task)

    async def _flush(self) -> None:
        """Send what was gathered since the turn's first request: the first pipeline from here, others alongside."""
        pending, self._pending = self._pending, {}
        self._flushing = None
        # The k-th call of every key (tenant) in the k-th round: one tenant's calls (a burst's batches, or an
        # acquire and a settle) never share a pipeline, so the process handles one's replies while Redis runs
        # the next (see MAX_BATCH); the rounds are cut into pipelines.
        rounds: list[list[_Batch]] = []
        calls_of: dict[str, int] = {}
        for slot, queue in pending.items():
            for start in range(0, len(queue), self._max_batch):
                k = calls_of.get(slot[1], 0)
                calls_of[slot[1]] = k + 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append((slot, queue[start : start + self._max_batch]))
        size = self.max_pipeline if self._send_many is not None else 1
        groups = [batches[start : start + size] for batches in rounds for start in range(0, len(batches), size)]
        current = asyncio.current_task()
        for group in groups[1:]:
            self._start(asyncio.ensure_future(self._run(group)), {slot for slot, _ in group})
        if current is not None and groups:
            first = {slot for slot, _ in groups[0]}
            self._untrack(current, [slot for slot in pending if slot not in first])  # they travel in the others
        if groups:
            await self._run(groups[0])

    async def _run(self, batches: list[_Batch]) -> None:
        if self._gate is None:
            await self._run_open(batches)
            return
        if all(future.done() for _, batch in batches for _, future in batch):
            return
        async with self._gate:
            await self._run_open(batches)

    async def _run_open(self, batches: list[_Batch]) -> None:
        """Send the requests of `batches` whose callers still wait (nothing when none does); deliver the replies."""
        live: list[_Batch] = []
        for slot, batch in batches:
            waiting = [(args, future) for args, future in batch if not future.done()]
            if waiting:
                live.append((slot, waiting))
        if not live:
            return
        current = asyncio.current_task()
        if current is not None:
            self._watch(current, live)
        calls = [
            (script, key, [arg for args, _ in batch for arg in script.request(args)]) for (script, key), batch in live
        ]
        try:
            if len(calls) == 1 or self._send_many is None:
                results: list[Any] = [await self._send(*calls[0])]
            else:
                results = await self._send_many(calls)
        except BaseException as exc:
            for _, batch in live:
                _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            if current is not None:
                self._callers.pop(current, None)
                self._held.pop(current, None)
        if len(results) != len(live):
            error = RuntimeError(f"{len(live)} script calls were answered with {len(results)} replies")
            for _, batch in live:
                _fail(batch, error)
            return
        for ((script, _), batch), replies in zip(live, results, strict=True):
            _deliver(script, batch, replies)

    async def aclose(self) -> None:
        """Wait for the batches already sent."""
        if self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)


def _fail(batch: list[tuple[Sequence[Any], asyncio.Future[Any]]], exc: BaseException) -> None:
    """Fail every request of `batch` still waiting with `exc` (cancel them for a BaseException such as a cancel)."""
    for _, future in batch:
        if future.done():
            continue
        if isinstance(exc, Exception):
            future.set_exception(exc)
        else:
            future.cancel()


def _deliver(script: Script, batch: list[tuple[Sequence[Any], asyncio.Future[Any]]], replies: Any) -> None:
    """Give each request of `batch` its own reply from the call's `replies` (or the call's error)."""
    if isinstance(replies, BaseException):
        _fail(batch, replies)
        return
    if not isinstance(replies, list) or len(replies) != len(batch):
        _fail(batch, RuntimeError(f"script {script.name} answered {len(batch)} requests with {replies!r}"))
        return
    for (_, future), reply in zip(batch, replies, strict=True):
        if not future.done():
            future.set_result(reply)
