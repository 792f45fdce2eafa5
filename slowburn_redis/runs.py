"""Run budgets: a short-lived scope of lifetime caps under a tenant (and agent).

``async with budget.run("acme", agent="researcher", caps=["requests 20", "tokens 50k"], max_seconds=600) as run:``
opens a run (run.lua ``open``) and makes it the current run of the context
(a `contextvars.ContextVar`, so asyncio tasks created inside inherit it).
Every acquire of the same tenant made inside, through `Budget.acquire`,
`BudgetedLLM` or an integration, names the run, and acquire.lua charges the
run's caps in the same script call as the tenant's and agent's windows, all
or nothing. A cap never refills: a request that does not fit raises
`RunExhausted` at once (never waits), with a `RunSummary`; so does a request
after ``max_seconds`` (judged on the tenant's clock). Advisory mode charges
the caps and only reports them exceeded (it never refuses), but a run whose
keys expired refuses in every mode.

The run's keys (``<base>:run:<id>`` and its caps' windows) expire
``max_seconds`` + `TTL_MARGIN` after their last use (`IDLE_TTL` without
max_seconds); when the last process inside leaves, `GRACE` after, so a late
commit still lands and a finished run costs Redis nothing soon after.
``budget.run(..., run_id=...)`` joins a run other processes share (or opens
it with that id): its caps are those stored (given ones must match).
"""

from __future__ import annotations

import contextvars
import secrets
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from slowburn_redis import protocol
from slowburn_redis.errors import InvalidInput, RunExhausted
from slowburn_redis.keys import LimitKey, describe_limit_key
from slowburn_redis.limits import Limit, coerce_limits, from_units
from slowburn_redis.names import validate_name
from slowburn_redis.tasks import finish_despite_cancel

if TYPE_CHECKING:
    from slowburn_redis.engine import Engine
    from slowburn_redis.sync import Portal

TTL_MARGIN = 300.0
"""Seconds a run's keys outlive its max_seconds after their last use (a late commit, a slow summary)."""
IDLE_TTL = 3600.0
"""Seconds the keys of a run without max_seconds live after their last use."""
GRACE = 60.0
"""Seconds a run's keys live once the last process inside left it (a late commit still lands)."""

_CURRENT: contextvars.ContextVar[Run | None] = contextvars.ContextVar("slowburn_redis_run", default=None)


def current_run() -> Run | None:
    """The run the calling context is inside (the innermost), or None."""
    return _CURRENT.get()


@dataclass(frozen=True)
class CapUse:
    """One cap of a run: `limit` in words (``tokens 50000``), its `amount` and what is `used` (in-flight included)."""

    limit: str
    dimension: str
    amount: float
    used: float


@dataclass(frozen=True)
class RunSummary:
    """What a run spent: committed amounts per dimension and per model (people's units: usd in dollars),
    steps (admissions), seconds used (tenant clock), and each cap's use."""

    run_id: str
    tenant: str
    agent: str | None
    steps: int
    elapsed: float
    max_seconds: float | None
    spent: dict[str, float] = field(default_factory=dict)
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)
    caps: list[CapUse] = field(default_factory=list)

    def __str__(self) -> str:
        scope = f"tenant {self.tenant!r}" + (f", agent {self.agent}" if self.agent else "")
        time = f"{self.elapsed:.1f}s" + ("" if self.max_seconds is None else f" of {self.max_seconds:g}s")
        parts = [f"run {self.run_id} ({scope}): {self.steps} step(s) in {time}", f"spent {_amounts(self.spent)}"]
        if self.by_model:
            parts.append("by model: " + "; ".join(f"{m} {_amounts(a)}" for m, a in sorted(self.by_model.items())))
        if self.caps:
            parts.append("caps: " + ", ".join(f"{c.dimension} {c.used:g} of {c.amount:g}" for c in self.caps))
        return "; ".join(parts)


def _amounts(amounts: dict[str, float]) -> str:
    return ", ".join(f"{dim} {value:g}" for dim, value in sorted(amounts.items())) or "nothing"


def summary_from(counters: protocol.RunCounters, *, run_id: str, tenant: str) -> RunSummary:
    """A RunSummary from run.lua's ``summary`` reply."""
    fields = counters.fields
    spent: dict[str, float] = {}
    by_model: dict[str, dict[str, float]] = {}
    for name, value in fields.items():
        if name.startswith("d:"):
            spent[name[2:]] = from_units(name[2:], int(value))
        elif name.startswith("m|"):
            model, _, dim = name[2:].rpartition("|")
            by_model.setdefault(model or "(no model)", {})[dim] = from_units(dim, int(value))
    started, deadline = int(fields.get("t0", 0)), int(fields.get("dl", 0))
    caps = []
    for limit_key, amount, used in counters.caps:
        dim = LimitKey.parse(limit_key).dimension
        caps.append(CapUse(f"{dim} {from_units(dim, amount):g}", dim, from_units(dim, amount), from_units(dim, used)))
    return RunSummary(
        run_id=run_id,
        tenant=tenant,
        agent=fields.get("a") or None,
        steps=int(fields.get("n", 0)),
        elapsed=max(0, counters.now_ms - started) / 1000,
        max_seconds=(deadline - started) / 1000 if deadline else None,
        spent=spent,
        by_model=by_model,
        caps=caps,
    )


async def read_summary(engine: Engine, key: str, *, run_id: str, tenant: str) -> RunSummary | None:
    """The summary of run `run_id` of the tenant at base `key`; None when its keys are gone."""
    counters = protocol.decode_run_summary(await engine.run(engine.scripts.run, key, ["summary", run_id]))
    return None if counters is None else summary_from(counters, run_id=run_id, tenant=tenant)


def run_cap_words(reply: protocol.RunSpent, run_id: str) -> str:
    """What of the run refused: ``tokens 5000 (run r-1)``, ``max_seconds 600 (run r-1)`` or ``run r-1``."""
    if reply.reason == "time":
        return f"max_seconds {reply.amount / 1000:g} (run {run_id})"
    if reply.reason == "gone":
        return f"run {run_id}"
    return describe_limit_key(reply.limit_key, reply.amount)


def run_exhausted(
    reply: protocol.RunSpent, summary: RunSummary | None, *, tenant: str, agent: str | None, run_id: str
) -> RunExhausted:
    """The RunExhausted for acquire.lua's ``{-3, ...}`` reply, in words (no internal keys)."""
    cap = run_cap_words(reply, run_id)
    if reply.reason == "time":
        what = f"run {run_id} is out of time: {cap} passed ({reply.used / 1000:.1f}s used)"
    elif reply.reason == "gone":
        what = f"run {run_id} is over: its keys expired (it ended, or stayed idle past its TTL)"
    else:
        dim = LimitKey.parse(reply.limit_key).dimension
        what = (
            f"run {run_id} is spent: {cap} has {from_units(dim, reply.used):g} used "
            f"and this call needs {from_units(dim, reply.requested):g}"
        )
    return RunExhausted(
        what + (f"; {summary}" if summary is not None else ""),
        tenant=tenant,
        agent=agent,
        limit=reply.limit_key,
        run_id=run_id,
        reason=reply.reason,
        cap=cap,
        summary=summary,
    )


def check_caps(caps: Any) -> list[Limit] | None:
    """The caps of a run as Limits (None stays None: take them from Redis); InvalidInput unless each is lifetime."""
    if caps is None:
        return None
    parsed = coerce_limits(caps)
    seen: set[str] = set()
    for cap in parsed:
        if cap.window_ms or cap.period is not None:
            raise InvalidInput(f"a run cap is a lifetime amount with no window ('tokens 50k'), not {cap}")
        if cap.dimension == "concurrency":
            raise InvalidInput("concurrency is not a run cap (it returns when a call ends): set it on the agent")
        if cap.dimension in seen:
            raise InvalidInput(f"two run caps for {cap.dimension}")
        seen.add(cap.dimension)
    return parsed


def check_max_seconds(max_seconds: object) -> float | None:
    if max_seconds is None:
        return None
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
        raise InvalidInput(f"max_seconds must be a positive number of seconds, not {max_seconds!r}")
    return float(max_seconds)


class Run:
    """A run that is open: `id`, its `tenant`, `agent`, `caps` and `max_seconds`; `summary()` at any time."""

    def __init__(
        self,
        engine: Engine,
        key: str,
        *,
        run_id: str,
        tenant: str,
        agent: str | None,
        caps: list[Limit],
        max_seconds: float | None,
    ) -> None:
        self._engine = engine
        self._key = key
        self.id = run_id
        self.tenant = tenant
        self.agent = agent
        self.caps = caps
        self.max_seconds = max_seconds

    async def summary(self) -> RunSummary:
        """What the run spent so far (see `RunSummary`); after its keys expired, an empty summary."""
        found = await read_summary(self._engine, self._key, run_id=self.id, tenant=self.tenant)
        if found is None:
            return RunSummary(self.id, self.tenant, self.agent, 0, 0.0, self.max_seconds)
        return found

    def __repr__(self) -> str:
        caps = ", ".join(str(cap) for cap in self.caps)
        return f"Run({self.id!r}, tenant={self.tenant!r}, agent={self.agent!r}, caps=[{caps}])"


@dataclass(frozen=True)
class RunSpec:
    """A validated ``budget.run(...)``: `caps` None joins a run that must exist (`run_id` given)."""

    tenant: str
    agent: str | None
    caps: list[Limit] | None
    max_seconds: float | None
    run_id: str | None

    def open_args(self, run_id: str) -> list[Any]:
        caps = "" if self.caps is None else protocol.limits_json(self.caps) or protocol.UNLIMITED_JSON
        ttl = IDLE_TTL if self.max_seconds is None else self.max_seconds + TTL_MARGIN
        max_ms = 0 if self.max_seconds is None else round(self.max_seconds * 1000)
        return protocol.run_open_args(
            run_id=run_id, agent=self.agent, caps_json=caps, max_ms=max_ms, ttl_ms=round(ttl * 1000)
        )


def new_run_id() -> str:
    return "r-" + secrets.token_hex(6)


class RunScope:
    """What `Budget.run` returns: ``async with`` it for the `Run`; inside, acquires of its tenant are charged to it."""

    def __init__(self, engine: Engine, key: str, spec: RunSpec) -> None:
        self._engine = engine
        self._key = key
        self._spec = spec
        self._token: contextvars.Token[Run | None] | None = None
        self.run: Run | None = None

    async def open(self) -> Run:
        """Open or join the run in Redis (without entering it)."""
        spec = self._spec
        run_id = spec.run_id or new_run_id()
        reply = await self._engine.run(self._engine.scripts.run, self._key, spec.open_args(run_id))
        opened = protocol.decode_run_open(reply)
        if opened is None:
            raise InvalidInput(
                f"run {run_id} of tenant {spec.tenant!r} does not exist (or expired): give caps to open it"
            )
        stored = protocol.decode_stored_limits(opened.caps_json)
        max_seconds = None if opened.deadline_ms is None else (opened.deadline_ms - opened.started_ms) / 1000
        self.run = Run(
            self._engine,
            self._key,
            run_id=run_id,
            tenant=spec.tenant,
            agent=opened.agent,
            caps=stored,
            max_seconds=max_seconds,
        )
        if spec.caps is not None and not opened.created and _caps_differ(spec.caps, stored):
            await self.close()
            shown = ", ".join(str(cap) for cap in stored) or "none"
            raise InvalidInput(f"run {run_id} exists with other caps ({shown}): join it with the same caps or none")
        return self.run

    async def close(self) -> None:
        """Leave the run; the last process out shortens its keys' TTL to `GRACE`."""
        assert self.run is not None
        args = ["end", self.run.id, round(GRACE * 1000)]
        await finish_despite_cancel(self._engine.run(self._engine.scripts.run, self._key, args))

    def enter(self, run: Run) -> None:
        self._token = _CURRENT.set(run)

    def exit(self) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None

    async def __aenter__(self) -> Run:
        run = await self.open()
        self.enter(run)
        return run

    async def __aexit__(self, *exc: object) -> None:
        self.exit()
        await self.close()


def _caps_differ(given: list[Limit], stored: list[Limit]) -> bool:
    return sorted((c.dimension, c.units) for c in given) != sorted((c.dimension, c.units) for c in stored)


class SyncRun:
    """The blocking face of a `Run`: `id`, `tenant`, `agent`, `caps`, `max_seconds`, and a blocking `summary()`."""

    def __init__(self, portal: Portal, run: Run) -> None:
        self._portal = portal
        self.run = run
        self.id = run.id
        self.tenant = run.tenant
        self.agent = run.agent
        self.caps = run.caps
        self.max_seconds = run.max_seconds

    def summary(self) -> RunSummary:
        return self._portal.call(self.run.summary())


class SyncRunScope:
    """What `SyncBudget.run` returns: ``with`` it for a `SyncRun`; the run is current in the calling thread."""

    def __init__(self, portal: Portal, scope: RunScope) -> None:
        self._portal = portal
        self._scope = scope

    def __enter__(self) -> SyncRun:
        run = self._portal.call(self._scope.open())
        self._scope.enter(run)
        return SyncRun(self._portal, run)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._scope.exit()
        self._portal.call(self._scope.close())


def validated_spec(tenant: str, agent: str | None, caps: Any, max_seconds: object, run_id: str | None) -> RunSpec:
    """A RunSpec with every argument checked (InvalidInput) before Redis is touched."""
    parsed = check_caps(caps)
    if run_id is not None:
        validate_name("run id", run_id)
    elif parsed is None:
        parsed = []
    return RunSpec(tenant, agent, parsed, check_max_seconds(max_seconds), run_id)


__all__ = [
    "CapUse",
    "Run",
    "RunScope",
    "RunSummary",
    "SyncRun",
    "SyncRunScope",
    "current_run",
]
