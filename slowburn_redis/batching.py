"""Coalescing concurrent script calls: one tenant's requests into one batch, the tenants' batches into shared calls.

The acquire and settle scripts take any number of requests (their ARGV is the
requests' arguments one after another) and reply with one reply per request,
each request all or nothing on its own. A `Batcher` gathers the requests that
callers submit for the same script and tenant key within one turn of the event
loop into one call (a batch): one script run, and the work every run does
first (the clock, expired leases, the tenant's limits) done once. The batches
of every script and tenant gathered in that turn then travel together, as one
pipeline (`send_many`; at most `max_pipeline` batches each, more pipelines
at once for more, and never two batches of one tenant in one pipeline, so
one tenant's calls go out side by side as before): one round trip for all
of them. In a pipeline, the batches of one script for different tenants
share one call (lib.lua "tenants": at most `max_tenants` tenants and
`max_batch` requests a call; 1 tenant on a Redis Cluster), which pays the
script's start-up once for them all; each tenant is still served on its
own (its clock, its limits, its replies), each request all or nothing.
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
and nothing else: a call serving several tenants that Redis answers with an
error is sent once more as one call per tenant, so each tenant gets its own
outcome (the tenants it served before the error get their first replies
again: every batched script is idempotent under a retry). Each caller then
applies its own retry policy, and a retried request is simply batched again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any

from redis.exceptions import ResponseError

from slowburn_redis.protocol import tenants_args
from slowburn_redis.scripts import Call, Script
from slowburn_redis.tasks import abandon

Send = Callable[[Script, Sequence[str], Sequence[Any]], Awaitable[Any]]
"""Run one script call (its KEYS, its ARGV) and return its reply."""
SendMany = Callable[[list[Call]], Awaitable[list[Any]]]
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

MAX_TENANTS = 8
"""Tenants one script call serves at most (lib.lua "tenants"): the batches of one script ready in one turn for
different tenants travel as one call, up to `max_batch` requests in all.

Every call pays a fixed start-up in Redis (the script library's set-up, before its first tenant), about a
quarter of a one-request call: a call serving eight one-request tenants pays it once. A Redis Cluster
needs the keys of one call in one slot, so there each call serves one tenant (`Batcher(max_tenants=1)`)."""

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
    (see the module docstring). `max_pipeline` (1: no pipelining) and
    `max_tenants` (1: a call per tenant) may be changed at any time; they
    apply from the next turn.
    """

    def __init__(
        self,
        send: Send,
        *,
        send_many: SendMany | None = None,
        max_batch: int = MAX_BATCH,
        max_pipeline: int = MAX_PIPELINE,
        max_tenants: int = MAX_TENANTS,
        gate: asyncio.Semaphore | None = None,
        quiesced: Collection[str] = (),
    ) -> None:
        if not 1 <= max_batch <= BATCH_LIMIT:
            raise ValueError(f"max_batch must be from 1 to {BATCH_LIMIT}")
        self._send = send
        self._send_many = send_many
        self._max_batch = max_batch
        self.max_pipeline = max_pipeline
        self.max_tenants = max_tenants
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
        self._max_pipeline = _positive(size, "max_pipeline (Engine.pipeline_size)")

    @property
    def max_tenants(self) -> int:
        """Tenants one script call serves at most (1: a call per tenant); settable, it applies from the next turn."""
        return self._max_tenants

    @max_tenants.setter
    def max_tenants(self, count: int) -> None:
        self._max_tenants = _positive(count, "max_tenants (Engine.tenants_per_call)")

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
        carried = self._calls_of(live)
        try:
            results = await self._send_calls(carried)
            # A call serving several tenants that failed on its own (a script error of one of them) goes out
            # again as one call per tenant, so each gets its own outcome (every batched script is idempotent).
            kept: list[tuple[list[_Batch], Any]] = []
            apart: list[list[_Batch]] = []
            for batches, result in zip(carried, results, strict=True):
                if len(batches) > 1 and isinstance(result, ResponseError):
                    apart.extend([batch] for batch in batches)
                else:
                    kept.append((batches, result))
            if apart:
                carried = [batches for batches, _ in kept] + apart
                results = [result for _, result in kept] + await self._send_calls(apart)
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
        for batches, replies in zip(carried, results, strict=True):
            _deliver_call(batches, replies)

    def _calls_of(self, batches: list[_Batch]) -> list[list[_Batch]]:
        """The script calls that carry `batches`: the batches of one script for several tenants share a call.

        A call serves at most `max_tenants` tenants and `max_batch` requests in all (a batch alone may hold
        up to `max_batch`): as much work in one script run as one tenant's full batch.
        """
        calls: list[list[_Batch]] = []
        filling: dict[Script, tuple[list[_Batch], int]] = {}
        for batch in batches:
            script, size = batch[0][0], len(batch[1])
            open_call = filling.get(script)
            if open_call is not None:
                carried, requests = open_call
                if len(carried) < self._max_tenants and requests + size <= self._max_batch:
                    carried.append(batch)
                    filling[script] = (carried, requests + size)
                    continue
            calls.append([batch])
            filling[script] = (calls[-1], size)
        return calls

    async def _send_calls(self, carried: list[list[_Batch]]) -> list[Any]:
        """Send one call per entry of `carried` in one round trip: each call's reply, or the error it alone got.

        Raises when the round trip failed as a whole (the connection).
        """
        calls = [_call(batches) for batches in carried]
        if len(calls) > 1 and self._send_many is not None:
            results = await self._send_many(calls)
            if len(results) != len(calls):
                raise RuntimeError(f"{len(calls)} script calls were answered with {len(results)} replies")
            return results
        out: list[Any] = []
        for call in calls:
            try:
                out.append(await self._send(*call))
            except ResponseError as exc:  # the call's own failure, like a pipeline's entry
                out.append(exc)
        return out

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


def _positive(value: int, name: str) -> int:
    """`value` when it is a positive integer; else ValueError naming the setting `name`."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return value


def _call(batches: list[_Batch]) -> Call:
    """The wire call carrying `batches` (of one script): one tenant's KEYS and ARGV, or several (lib.lua "tenants")."""
    script = batches[0][0][0]
    parts = [[arg for args, _ in batch for arg in script.request(args)] for _, batch in batches]
    if len(batches) == 1:
        return script, (batches[0][0][1],), parts[0]
    return script, tuple(key for (_, key), _ in batches), tenants_args(parts)


def _deliver_call(batches: list[_Batch], replies: Any) -> None:
    """Give each batch of a call its own replies: the call's list cut at the batches' lengths, in order."""
    if len(batches) == 1 or isinstance(replies, BaseException):
        for (script, _), batch in batches:
            _deliver(script, batch, replies)
        return
    script = batches[0][0][0]
    if not isinstance(replies, list) or len(replies) != sum(len(batch) for _, batch in batches):
        for _, batch in batches:
            _fail(
                batch,
                RuntimeError(f"script {script.name} answered a call serving {len(batches)} tenants with {replies!r}"),
            )
        return
    start = 0
    for _, batch in batches:
        _deliver(script, batch, replies[start : start + len(batch)])
        start += len(batch)


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
