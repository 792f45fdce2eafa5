"""The asyncio client: the facade over the engine, the acquire protocol and the waiting machinery.

`Budget` validates arguments, then hands each operation to the module that
owns it: `slowburn_redis.acquiring` runs an acquire (attempt, wait, clean
up), `slowburn_redis.reservation` settles, `slowburn_redis.engine` is the one
path to Redis (batching, retries, closing), `slowburn_redis.protocol` builds
every script's arguments and decodes its reply, `slowburn_redis.keys` names
every key. The blocking twin (`Budget.sync`) runs this same code on a private
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import structlog

from slowburn_redis import protocol
from slowburn_redis.acquiring import AcquireCall, AcquireRequest
from slowburn_redis.amounts import amounts_to_units
from slowburn_redis.batching import BATCH_LIMIT, MAX_BATCH
from slowburn_redis.desired import LimitsFile, desired_limits
from slowburn_redis.engine import Engine
from slowburn_redis.errors import InvalidInput, LimitsMissing
from slowburn_redis.events import Event
from slowburn_redis.keys import TenantKeys, scope_field
from slowburn_redis.limits import Limit, coerce_limits, validate_dimension
from slowburn_redis.names import EVERY_AGENT, validate_agent, validate_model, validate_name
from slowburn_redis.quote import Quote, quote_from_reply
from slowburn_redis.reseeding import Reseeder
from slowburn_redis.reservation import Reservation, Settler, check_lease_ttl
from slowburn_redis.resilience import Backoff, OnUnavailable
from slowburn_redis.runs import RunScope, current_run, validated_spec
from slowburn_redis.status import Status
from slowburn_redis.waiting import WakeHub

if TYPE_CHECKING:
    from slowburn_redis.report import Report
    from slowburn_redis.sync import SyncBudget
    from slowburn_redis.trail import Since

log = structlog.get_logger("slowburn_redis")

Mode = Literal["wait", "reject", "advisory"]
MODES = ("wait", "reject", "advisory")


@dataclass(frozen=True)
class _Given:
    """Everything a Budget was built with but its client: the twin (`Budget.sync`) is built from exactly this."""

    connect: Callable[[], Any] | None
    open_pubsub: Callable[[], Any] | None
    prefix: str
    lease_ttl: float
    heartbeat: float
    ledger_maxlen: int
    test_clock: bool
    description: str
    on_unavailable: OnUnavailable
    retry_timeout: float | None
    backoff: Backoff | None
    batch_size: int
    desired_limits: LimitsFile | None

    def check(self) -> None:
        """InvalidInput for an option no Budget accepts (the policy options are checked by the engine)."""
        validate_name("prefix", self.prefix)
        if not self.lease_ttl > 0 or not self.heartbeat > 0:
            raise InvalidInput("lease_ttl and heartbeat must be positive")
        if self.ledger_maxlen < 0:
            raise InvalidInput("ledger_maxlen must not be negative")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= BATCH_LIMIT:
            raise InvalidInput(f"batch_size must be an integer from 1 to {BATCH_LIMIT}, not {size!r}")


class Budget:
    """A fleet-wide budget on one Redis: build it with `from_url` or `embedded`.

    `prefix` starts every key. `lease_ttl` (seconds) is how long a reservation
    holds its concurrency slot without a commit, release or `extend`.
    `heartbeat` sets the pace of a waiting process's upkeep: each beat it
    refreshes the queue places no attempt refreshed for 1.5 heartbeats (so
    about one refresh per tenant every two beats), and a place expires after
    three heartbeats without one. `ledger_maxlen` bounds each tenant's
    ledger stream (approximately). `test_clock` loads scripts whose clock can
    be moved forward (see `slowburn_redis.testing`); never use it in production.

    `desired_limits` (a `slowburn_redis.desired.LimitsFile`, or a mapping
    such as ``{"acme": ["usd 5/day"]}``) is the declared state to re-seed
    from: an acquire of a declared tenant whose limits Redis has lost writes
    the missing scopes back, logs ``limits.reseeded`` at error level, publishes
    a ``limits_reseeded`` event (both say whether the spend history was lost)
    and is tried again (see `slowburn_redis.reseeding`; needs an admin user).
    Without it such an acquire raises LimitsMissing.

    `on_unavailable` says what happens when Redis cannot be reached (see
    `slowburn_redis.resilience`): ``"wait"`` retries with `backoff` until the
    acquire's timeout (other operations: `retry_timeout`, None for no bound)
    and then raises RedisUnavailable; ``"raise"`` raises RedisUnavailable at
    once; ``"allow"`` fails open (the acquire is admitted unchecked, its
    Reservation has ``backed == False``, logged at error level).

    `batch_size` is the most requests of one tenant sent as one script call
    (`slowburn_redis.batching`); 1 sends each request on its own.
    """

    def __init__(
        self,
        client: Any,
        *,
        connect: Callable[[], Any] | None = None,
        open_pubsub: Callable[[], Any] | None = None,
        prefix: str = "sb",
        lease_ttl: float = 60.0,
        heartbeat: float = 5.0,
        ledger_maxlen: int = 100_000,
        test_clock: bool = False,
        description: str = "redis",
        on_unavailable: OnUnavailable = "wait",
        retry_timeout: float | None = None,
        backoff: Backoff | None = None,
        batch_size: int = MAX_BATCH,
        desired_limits: LimitsFile | Mapping[str, Any] | None = None,
    ) -> None:
        self._given = _Given(
            connect=connect,
            open_pubsub=open_pubsub,
            prefix=prefix,
            lease_ttl=lease_ttl,
            heartbeat=heartbeat,
            ledger_maxlen=ledger_maxlen,
            test_clock=test_clock,
            description=description,
            on_unavailable=on_unavailable,
            retry_timeout=retry_timeout,
            backoff=backoff,
            batch_size=batch_size,
            desired_limits=None if desired_limits is None else _desired(desired_limits),
        )
        self._given.check()
        self.prefix = prefix
        self.lease_ttl = float(lease_ttl)
        self.heartbeat = float(heartbeat)
        self.ledger_maxlen = int(ledger_maxlen)
        self.description = description
        self.engine = Engine(
            client,
            connect=connect,
            open_pubsub=open_pubsub,
            description=description,
            clock="test" if test_clock else "server",
            on_unavailable=on_unavailable,
            retry_timeout=retry_timeout,
            backoff=backoff,
            batch_size=batch_size,
        )
        """The one path to Redis (see `slowburn_redis.engine`)."""
        self._seen_limits: set[str] = set()
        self._reseeder = self._make_reseeder(self._given.desired_limits)
        self._hub = WakeHub(
            self.engine.open_pubsub,
            self._refresh,
            channel=lambda tenant: self.keys(tenant).wake_channel,
            heartbeat=self.heartbeat,
        )

    # construction ------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **options: Any) -> Budget:
        """A Budget on the Redis at `url` (``redis://``, ``rediss://``, ``unix://``).

        With ``cluster=True``, or a ``redis+cluster://`` / ``rediss+cluster://``
        URL, the URL names any node of a Redis Cluster. `options` are those of
        `Budget` (prefix, lease_ttl, on_unavailable...). Nothing is sent to
        Redis here: an unreachable server shows at the first call.
        """
        from slowburn_redis.connection import connect_url

        connect, open_pubsub, description = connect_url(url, cluster=cluster)
        return cls(connect(), connect=connect, open_pubsub=open_pubsub, description=description, **options)

    @classmethod
    def embedded(cls, server: Any = None, **options: Any) -> Budget:
        """A Budget on an in-process fakeredis server (no Redis needed); `server` shares one."""
        from slowburn_redis.connection import connect_embedded

        connect = connect_embedded(server)
        return cls(connect(), connect=connect, description="embedded", **options)

    def sync(self) -> SyncBudget:
        """A blocking twin with the same methods, on its own connection and event loop (same options, same pub/sub)."""
        from slowburn_redis.sync import SyncBudget

        given = self._given
        connect = given.connect
        if connect is None:
            raise InvalidInput("sync() needs a Budget built by from_url() or embedded(), or with connect=")
        return SyncBudget(lambda: Budget(connect(), **vars(given)))

    async def aclose(self) -> None:
        """End every wait of this Budget, stop its waiting machinery and close its connection pool.

        Acquires still waiting raise BudgetClosed once they have given up their
        queue place (one attempt each); any later call, and any retry of a call
        in progress, raises BudgetClosed without sending anything.
        """
        self.engine.begin_close()
        await self._hub.aclose()
        await self.engine.aclose()

    async def __aenter__(self) -> Budget:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def key(self, tenant: str) -> str:
        """The base key of `tenant`; every key of the tenant starts with it."""
        return self.keys(tenant).base

    def keys(self, tenant: str) -> TenantKeys:
        """Every key and channel of `tenant` (validates the name)."""
        return TenantKeys.of(self.prefix, tenant)

    def _settler(self, tenant: str) -> Settler:
        return Settler(self.engine, self.key(tenant), self.ledger_maxlen, self.lease_ttl)

    async def _run(self, script_name: str, tenant: str, args: list[Any]) -> Any:
        script = getattr(self.engine.scripts, script_name)
        return await self.engine.run(script, self.key(tenant), args)

    # limits ------------------------------------------------------------------

    async def set_limits(
        self,
        tenant: str,
        limits: Iterable[Limit | str] | str,
        *,
        agent: str | None = None,
        model: str | None = None,
    ) -> None:
        """Replace the limits of a scope: the tenant (agent=None), one agent, every agent (``agent="*"``) or one model.

        A model's limits (``model="gpt-4o"``) apply to every call of the
        tenant that names that model (`acquire(..., model=)`, `BudgetedLLM`
        and the integrations do), checked with the tenant's and the agent's,
        all or nothing; they come on top of those and never replace them (a
        tenant with only per-model limits is still refused, LimitsMissing).
        An empty list clears the scope. Every worker sees the change at once;
        waiters are woken to try again.
        """
        key = self.key(tenant)
        field = scope_field(agent, model)
        parsed = coerce_limits(limits)
        await self.engine.run(self.engine.scripts.set_limits, key, [field, protocol.limits_json(parsed)])
        log.info("limits.set", tenant=tenant, agent=agent, model=model, limits=[str(lim) for lim in parsed])

    async def clear_limits(self, tenant: str, *, agent: str | None = None, model: str | None = None) -> None:
        """Remove every limit of a scope. A tenant left with no scope stored is refused (LimitsMissing)."""
        await self.set_limits(tenant, [], agent=agent, model=model)

    async def set_unlimited(self, tenant: str, *, agent: str | None = None) -> None:
        """Store the deliberate choice that a scope has no limit (absent limits are refused, never unlimited).

        The scope's limits are replaced by none; `get_limits` then returns [] and
        an acquire under that scope is admitted with nothing to check.
        """
        key = self.key(tenant)
        await self.engine.run(self.engine.scripts.set_limits, key, [scope_field(agent), protocol.UNLIMITED_JSON])
        log.warning("limits.unlimited", tenant=tenant, agent=agent)

    async def get_limits(self, tenant: str, *, agent: str | None = None, model: str | None = None) -> list[Limit]:
        """The limits set on exactly this scope (not the ones inherited from the tenant or the default)."""
        keys, field = self.keys(tenant), scope_field(agent, model)
        return protocol.decode_stored_limits(await self.engine.hget(keys.limits, field))

    # acquire -----------------------------------------------------------------

    def acquire(
        self,
        tenant: str,
        agent: str | None = None,
        *,
        usd: float | str | None = None,
        tokens: int | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        requests: int = 1,
        timeout: float | None = None,
        priority: int = 0,
        mode: Mode = "wait",
        lease_ttl: float | None = None,
        model: str | None = None,
        **custom: int,
    ) -> _Acquire:
        """Reserve an estimate against every limit that applies, all or nothing.

        `model` names the model to be called: its per-model limits apply too
        (see `set_limits`), and the ledger entry names it. `custom` holds
        amounts of custom dimensions (``tool_calls=1``, ``steps=1``), whole
        units, checked against limits such as ``tool_calls 100/hour``.

        Await it for a `Reservation`, or use it as ``async with``. In ``wait``
        mode a denied request sleeps (FIFO within `priority`, higher first)
        until capacity returns or `timeout` seconds pass (BudgetTimeout). In
        ``reject`` mode it raises BudgetExhausted at once; ``advisory`` admits
        whatever the limits say. A request larger than a limit itself raises
        RequestTooLarge at once. All arguments are checked before Redis is
        touched (InvalidInput).

        Inside ``budget.run(...)`` (see `run`) of the same tenant, the run's
        caps are charged too; a spent cap raises RunExhausted at once.
        """
        tenant = validate_name("tenant", tenant)
        run = current_run()  # read here, in the caller's context (the sync twin's thread included)
        request = AcquireRequest(
            tenant=tenant,
            agent=_acquiring_agent(agent),
            estimate=_estimate(usd, tokens, input_tokens, output_tokens, requests, custom),
            mode=_mode(mode),
            timeout=_timeout(timeout),
            priority=_priority(priority),
            lease_ttl=check_lease_ttl(self.lease_ttl if lease_ttl is None else lease_ttl),
            model=None if model is None else validate_model(model),
            run_id=run.id if run is not None and run.tenant == tenant else None,
        )
        return _Acquire(self._acquiring(request))

    def _acquire_call(self, request: AcquireRequest) -> AcquireCall:
        return AcquireCall(
            request,
            settler=self._settler(request.tenant),
            hub=self._hub,
            queue_ttl_ms=round(self.heartbeat * 3000),
            snapshot=lambda tenant, agent: self.status(tenant, agent=agent),
            seen=self._seen_limits,
        )

    async def _acquiring(self, request: AcquireRequest) -> Reservation:
        """Run the acquire; when its tenant's limits are missing and declared, re-seed them and try once more."""
        started = asyncio.get_running_loop().time()
        try:
            return await self._acquire_call(request).run()
        except LimitsMissing:
            if self._reseeder is None or not await self._reseeder.reseed(request.tenant):
                raise
        if request.timeout is not None:  # the same deadline as the first try
            spent = asyncio.get_running_loop().time() - started
            request = replace(request, timeout=max(0.0, request.timeout - spent))
        return await self._acquire_call(request).run()

    def _make_reseeder(self, desired: LimitsFile | None) -> Reseeder | None:
        if desired is None:
            return None
        return Reseeder(desired, engine=self.engine, keys=self.keys, write=self._reseed_scope)

    async def _reseed_scope(self, tenant: str, agent: str | None, limits: list[Limit]) -> None:
        await self.set_limits(tenant, limits, agent=agent)

    async def _refresh(self, tenant: str, tickets: list[str]) -> tuple[list[str], list[str]]:
        reply = await self._run("refresh", tenant, [round(self.heartbeat * 3000), *tickets])
        return protocol.decode_refresh(reply)

    def quote(
        self,
        tenant: str,
        agent: str | None = None,
        *,
        model: str | None = None,
        priority: int = 0,
        usd: float | str | None = None,
        tokens: int | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        requests: int = 1,
        **custom: int,
    ) -> Coroutine[Any, Any, Quote]:
        """Would `acquire` with these arguments be admitted now? Read-only: nothing is charged or queued.

        The answer (`slowburn_redis.quote.Quote`) is the verdict an acquire in
        ``wait`` mode sent at the same instant would get: admitted now or not,
        the limit that would deny it (in words) and why, and in how many
        seconds the spent limits will have room. The arguments are those of
        `acquire` and are checked the same way (InvalidInput); a tenant with
        no limits raises LimitsMissing. Inside a `run`, its caps are judged
        too (reason ``run`` when the run cannot take it).
        """
        tenant = validate_name("tenant", tenant)
        agent = _acquiring_agent(agent)
        model = None if model is None else validate_model(model)
        estimate = _estimate(usd, tokens, input_tokens, output_tokens, requests, custom)
        run = current_run()  # read here, in the caller's context (the sync twin's thread too): a run's caps count
        run_id = run.id if run is not None and run.tenant == tenant else None
        args = protocol.quote_args(
            agent=agent, model=model, priority=_priority(priority), estimate=estimate, run_id=run_id
        )
        return self._quoting(tenant, args, agent=agent, model=model, estimate=estimate, run_id=run_id)

    async def _quoting(
        self,
        tenant: str,
        args: list[Any],
        *,
        agent: str | None,
        model: str | None,
        estimate: dict[str, int],
        run_id: str | None,
    ) -> Quote:
        reply = await self._run("quote", tenant, args)
        return quote_from_reply(reply, tenant=tenant, agent=agent, model=model, estimate=estimate, run_id=run_id)

    # runs --------------------------------------------------------------------

    def run(
        self,
        tenant: str,
        agent: str | None = None,
        *,
        caps: Iterable[Limit | str] | str | None = None,
        max_seconds: float | None = None,
        run_id: str | None = None,
    ) -> RunScope:
        """A run: ``async with budget.run("acme", agent="researcher", caps=["tokens 50k"], max_seconds=600) as run:``.

        Inside, every acquire of `tenant` (through `acquire`, `BudgetedLLM`
        and the integrations, in this task and the tasks it creates) is
        charged to the run's `caps` (lifetime amounts: ``requests 20``,
        ``tokens 50k``, ``usd 0.50``, custom dimensions) as well as to the
        tenant's and agent's limits, all or nothing. A cap never refills: a
        call that does not fit, or one made after `max_seconds` (the tenant's
        clock), raises RunExhausted at once, in wait mode too, with the run's
        summary. ``run.id`` names the run; ``await run.summary()`` gives what
        it spent. `run_id` joins a run other processes share, or opens it
        under that id (given caps must match the stored ones; none: take
        them). The run's keys expire after it (`slowburn_redis.runs`).
        """
        tenant = validate_name("tenant", tenant)
        spec = validated_spec(tenant, _acquiring_agent(agent), caps, max_seconds, run_id)
        return RunScope(self.engine, self.key(tenant), spec)

    # inspecting and resetting -------------------------------------------------

    async def status(self, tenant: str, *, agent: str | None = None) -> Status:
        """Every limit that applies, with used, reserved, remaining, refill time and waiters.

        Without an agent: the tenant's own limits and those of every agent that used a window.
        """
        agent = validate_agent(agent)
        reply = protocol.decode_status(await self._run("status", tenant, [agent or ""]))
        return Status.from_reply(tenant, agent, reply)

    async def reset(self, tenant: str, *, agent: str | None = None, dimension: str | None = None) -> int:
        """Forget used amounts and wake every waiter; returns how many windows were reset.

        Without an agent, the tenant's windows and every agent's; `dimension`
        narrows it to one (concurrency is reset only when named).
        """
        agent = validate_agent(agent)
        if agent == EVERY_AGENT:
            raise InvalidInput("reset takes one agent or none, not '*'")
        if dimension is not None:
            validate_dimension(dimension)
        count = int(await self._run("reset", tenant, [agent or "", dimension or ""]))
        log.info("budget.reset", tenant=tenant, agent=agent, dimension=dimension, windows=count)
        return count

    async def report(self, tenant: str, *, since: float | str | None = None) -> Report:
        """Cost attributed per agent and per model from the tenant's ledger.

        `since` is a duration back from now ("1h", "30m", seconds) or None for
        the whole ledger.
        """
        from slowburn_redis.report import build_report

        return await build_report(self.engine, self.keys(tenant), tenant, since=since)

    async def events(self, tenant: str, since: Since = None) -> AsyncIterator[Event]:
        """Events of `tenant` (thresholds, waiting, resumed, reset...): from its durable trail, then live.

        `since` None: live only, from the call on. A duration (``"1h"``, or
        seconds), a datetime with a time zone, or a stream id (entries after
        it; ``"0-0"`` for the whole trail): the trail from there, then live,
        with no gap and no duplicate at the seam nor across a reconnect. Time
        is the Redis server's (the stream ids), not the events' ``ts``; see
        `slowburn_redis.trail`. A bad `since` raises InvalidInput. The
        iterator never ends by itself: close it (or break) to unsubscribe.
        """
        from slowburn_redis.trail import follow

        async for event in follow(self.engine, self.keys(tenant), tenant, since):
            yield event


# argument checks ------------------------------------------------------------------


def _desired(value: object) -> LimitsFile:
    if not isinstance(value, (LimitsFile, Mapping)):
        raise InvalidInput(
            f"desired_limits must be a LimitsFile or a mapping of tenant to limits, not {type(value).__name__}"
        )
    return desired_limits(value)


def _acquiring_agent(agent: str | None) -> str | None:
    agent = validate_agent(agent)
    if agent == EVERY_AGENT:
        raise InvalidInput("acquire needs a real agent name, not '*'")
    return agent


def _mode(mode: object) -> str:
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    return str(mode)


def _priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100:
        raise InvalidInput(f"priority must be an integer from -100 to 100, not {priority!r}")
    return priority


def _timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout >= 0):
        raise InvalidInput(f"timeout must be a non-negative number of seconds, not {timeout!r}")
    return float(timeout)


def _estimate(
    usd: object,
    tokens: object,
    input_tokens: object,
    output_tokens: object,
    requests: object,
    custom: Mapping[str, object] | None = None,
) -> dict[str, int]:
    """The amounts to reserve, in units, rounded up; one concurrency slot always."""
    units = amounts_to_units(
        usd=usd,
        tokens=tokens,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        requests=requests,
        custom=custom,
        round_up=True,
    )
    units["concurrency"] = 1
    return {dim: value for dim, value in units.items() if value > 0}


class _Acquire(Coroutine[Any, Any, Reservation]):
    """What `Budget.acquire` returns: a coroutine (await it, or hand it to
    `asyncio.create_task`) for a Reservation, and an async context manager that
    settles the reservation on exit."""

    def __init__(self, coro: Coroutine[Any, Any, Reservation]) -> None:
        self._coro = coro
        self._started = False
        self._reservation: Reservation | None = None

    def __await__(self) -> Generator[Any, None, Reservation]:
        self._started = True
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        self._started = True
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        self._started = True
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    async def __aenter__(self) -> Reservation:
        self._started = True
        self._reservation = await self._coro
        return self._reservation

    async def __aexit__(self, *exc_info: Any) -> None:
        assert self._reservation is not None
        await self._reservation.__aexit__(*exc_info)

    def __del__(self) -> None:
        # Never awaited (e.g. bad usage): close the coroutine quietly.
        if not self._started:
            self._coro.close()
