"""Property test: random set_limits/acquire/commit/release/time-advance sequences
against a plain Python reference model, on fakeredis and on a real Redis.

The model mirrors the documented semantics (60 buckets per window, a request
charged to its admission bucket, settlement adjusting that bucket while it is
in the window, usage nobody reserved charged at commit, a calendar day's usage
starting over at midnight). The limits cover the tenant, the default for every
agent and one model ("m1": its limits apply to every call naming it, with the
tenant's and the agent's, all or nothing, and never stand in for the tenant's),
built-in and custom dimensions (tool_calls, steps), sliding windows, lifetime
caps and a calendar day. Acquires name no model, "m1" or "m2" (which has no
limits of its own) and carry custom amounts; commits may report other custom
amounts than were reserved (a refund, an overrun, usage nobody reserved).
After every step the admission decisions (and quote's verdict) and the
remaining amounts must match the model exactly; at the end, no interval of a
window's length (a lifetime cap: ever; a calendar day: that day) holds more
than the limit, counting each admitted request at most at its reservation.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slowburn_redis import Budget, BudgetExhausted, Limit, LimitsMissing, RequestTooLarge
from slowburn_redis.limits import UNITS, unit_of
from slowburn_redis.testing import advance_clock, freeze_clock

BUCKETS = 60
DAY_MS = 86_400_000
# Ten seconds before a UTC midnight: the calendar day of the model's presets starts over in many examples.
START_MS = (1_800_000_000_000 // DAY_MS + 1) * DAY_MS - 10_000
TENANT = "acme"
AGENT = "a1"
MODEL = "m1"  # has limits of its own; "m2" never does
# Within one scope a limit key (dimension and window) has one amount, so the guarantee checks its limit.
TENANT_PRESETS = [
    [],
    ["usd 1/10s", "requests 4/10s"],
    ["usd 2/60s"],
    ["tokens 300/10s", "concurrency 3"],
    ["tokens 500"],
    ["tool_calls 3/10s", "requests 4/10s"],
    ["steps 5", "usd 1/10s"],
]
DEFAULT_PRESETS = [[], ["usd 0.5/10s"], ["requests 2/10s", "tokens 200"], ["tool_calls 3/10s", "steps 5"]]
MODEL_PRESETS = [
    [],
    ["tokens 200/10s", "requests 2/10s"],
    ["tool_calls 2/10s", "steps 4/calendar day@UTC"],
    ["usd 0.5/60s", "concurrency 1"],
]
PRESETS = {"T": TENANT_PRESETS, "D": DEFAULT_PRESETS, f"M:{MODEL}": MODEL_PRESETS}


@dataclass
class Window:
    dimension: str
    amount: int
    window_ms: int
    generation: int
    period: str | None = None  # "day" (UTC) for a calendar limit
    total: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)
    # (time, [amount as settled], amount reserved: 0 for usage charged at commit that nobody reserved)
    admissions: list[tuple[int, list[int], int]] = field(default_factory=list)

    def width(self) -> int:
        return math.ceil(self.window_ms / BUCKETS)

    def bucket(self, now: int) -> int:
        """A sliding window's bucket; a calendar day's start; 0 for a lifetime cap."""
        if self.period:
            return now - now % DAY_MS
        return now // self.width() if self.window_ms else 0

    def live(self, idx: int, now: int) -> bool:
        if self.period:
            return idx == self.bucket(now)  # the current day only: a new day starts over
        return self.window_ms == 0 or idx >= self.bucket(now) - BUCKETS

    def used(self, now: int) -> tuple[int, int]:
        total = sum(v for i, v in self.total.items() if self.live(i, now))
        reserved = sum(v for i, v in self.reserved.items() if self.live(i, now))
        return total, reserved


@dataclass
class Charge:
    key: str
    dimension: str
    generation: int
    idx: int
    amount: int
    record: list[int]


@dataclass
class Held:
    agent: str
    model: str | None
    estimate: dict[str, int]
    charges: list[Charge]


class Model:
    """The reference: what the scripts must do, in plain Python."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.config: dict[str, list[Limit]] = {"T": [], "D": [], f"M:{MODEL}": []}
        self.windows: dict[str, Window] = {}
        self.retired: list[Window] = []
        self.agents: set[str] = set()
        self.generations = 0
        self.open: dict[str, Held] = {}

    def applicable(self, agent: str, model: str | None = None) -> list[tuple[str, Limit]]:
        """The tenant's limits, the default agent's (for an agent), the model's (for a model with limits)."""
        out = [(f"T:{lim.key}", lim) for lim in self.config["T"]]
        if agent:
            out += [(f"A:{agent}:{lim.key}", lim) for lim in self.config["D"]]
        if model:
            out += [(f"M:{model}:{lim.key}", lim) for lim in self.config.get(f"M:{model}", [])]
        return out

    def limited_models(self) -> list[str]:
        return sorted(f[2:] for f, limits in self.config.items() if f.startswith("M:") and limits)

    def set_limits(self, field_name: str, limits: list[Limit]) -> None:
        if field_name == "T":
            scopes: list[tuple[str, str | None]] = [("", None)]
        elif field_name == "D":
            scopes = [(a, None) for a in sorted(self.agents)]
        else:
            scopes = [("", field_name[2:])]
        before = {k for a, m in scopes for k, _ in self.applicable(a, m)}
        self.config[field_name] = limits
        after = {k for a, m in scopes for k, _ in self.applicable(a, m)}
        for key in before - after:
            if key in self.windows:
                self.retired.append(self.windows.pop(key))

    def window(self, key: str, limit: Limit, agent: str) -> Window:
        if key not in self.windows:
            self.generations += 1
            assert limit.period in (None, "day") and limit.tz in (None, "UTC"), limit  # what the model knows
            self.windows[key] = Window(limit.dimension, limit.units, limit.window_ms, self.generations, limit.period)
            if agent and not key.startswith("T:"):
                self.agents.add(agent)
        window = self.windows[key]
        window.amount = limit.units
        return window

    def verdict(self, agent: str, model: str | None, estimate: dict[str, int]) -> str:
        """What an acquire in reject mode gets now, charging nothing."""
        # An empty list clears its scope: with no scope stored, the tenant is refused (absence is not
        # permission); a model's limits never stand in for the tenant's.
        if not self.config["T"] and not (agent and self.config["D"]):
            return "missing"
        needed = [(k, lim, estimate.get(lim.dimension, 0)) for k, lim in self.applicable(agent, model)]
        needed = [(k, lim, amt) for k, lim, amt in needed if amt > 0]
        for _, lim, amt in needed:
            if amt > lim.units:
                return "too_large"
        for key, lim, amt in needed:
            existing = self.windows.get(key)
            total = existing.used(self.now)[0] if existing else 0
            if total + amt > lim.units:
                return "denied"
        return "admitted"

    def acquire(self, rid: str, agent: str, model: str | None, estimate: dict[str, int]) -> str:
        outcome = self.verdict(agent, model, estimate)
        if outcome != "admitted":
            return outcome
        charges = []
        for key, lim in self.applicable(agent, model):
            amt = estimate.get(lim.dimension, 0)
            if amt <= 0:
                continue
            w = self.window(key, lim, agent)
            idx = w.bucket(self.now)
            w.total[idx] = w.total.get(idx, 0) + amt
            w.reserved[idx] = w.reserved.get(idx, 0) + amt
            record = [amt]
            w.admissions.append((self.now, record, amt))
            charges.append(Charge(key, lim.dimension, w.generation, idx, amt, record))
        self.open[rid] = Held(agent, model, estimate, charges)
        return "admitted"

    def _adjust(self, charge: Charge, dt: int, dr: int) -> bool:
        w = self.windows.get(charge.key)
        if w is None or w.generation != charge.generation or not w.live(charge.idx, self.now):
            return False
        w.total[charge.idx] = w.total.get(charge.idx, 0) + dt
        w.reserved[charge.idx] = w.reserved.get(charge.idx, 0) + dr
        return True

    def settle(self, rid: str, actual: dict[str, int] | None) -> None:
        held = self.open.pop(rid)
        final: dict[str, int] = {}
        for dim, est in held.estimate.items():
            if actual is None or dim == "concurrency":
                final[dim] = 0
            else:
                final[dim] = actual.get(dim, est)
        for dim, value in (actual or {}).items():
            final.setdefault(dim, value)
        for charge in held.charges:
            final_amount = final[charge.dimension]
            if self._adjust(charge, final_amount - charge.amount, -charge.amount):
                charge.record[0] = final_amount
        unreserved = any(v > 0 and held.estimate.get(d, 0) == 0 for d, v in final.items())
        if actual is not None and unreserved:
            # Charged now to every limit of the reservation's scopes (as they are now) it was not charged on.
            charged = {c.key for c in held.charges}
            for key, lim in self.applicable(held.agent, held.model):
                value = final.get(lim.dimension, 0)
                if key not in charged and value > 0 and lim.dimension != "concurrency":
                    w = self.window(key, lim, held.agent)
                    idx = w.bucket(self.now)
                    w.total[idx] = w.total.get(idx, 0) + value
                    w.admissions.append((self.now, [value], 0))

    def expected_remaining(self) -> dict[str, int]:
        """Status' rows: the tenant's, every agent's with a window of its own, every model's with limits."""
        scopes: list[tuple[str, str | None]] = [(a, None) for a in ["", *sorted(self.agents)]]
        scopes += [("", m) for m in self.limited_models()]
        out = {}
        for agent, model in scopes:
            for key, lim in self.applicable(agent, model):
                w = self.windows.get(key)
                total = w.used(self.now)[0] if w else 0
                out[key] = max(0, lim.units - total)
        return out


def check_guarantee(window: Window) -> None:
    """No closed interval of the window's length holds more than the limit; a lifetime cap never does, a
    calendar day within the day. Each admission counts as settled, at most at what it reserved: usage
    beyond the reservations (overruns, usage nobody reserved) is charged, and only makes admissions stricter."""
    held = sorted((t, min(rec[0], cap)) for t, rec, cap in window.admissions)
    if window.period:
        days: dict[int, int] = {}
        for t, amount in held:
            days[window.bucket(t)] = days.get(window.bucket(t), 0) + amount
        assert all(v <= window.amount for v in days.values()), (window, days)
    elif not window.window_ms:
        assert sum(amount for _, amount in held) <= window.amount, window
    else:
        for i, (start, _) in enumerate(held):
            inside = sum(amount for t, amount in held[i:] if t <= start + window.window_ms)
            assert inside <= window.amount, (window, start)


custom_actual = st.one_of(st.none(), st.integers(0, 4))  # None: keep the estimate
acquire_op = st.tuples(
    st.just("acquire"),
    st.booleans(),
    st.integers(0, 120),
    st.integers(0, 350),
    st.sampled_from([None, MODEL, "m2"]),
    st.integers(0, 3),  # tool_calls
    st.integers(0, 2),  # steps
)
step = st.one_of(
    st.tuples(st.just("limits"), st.sampled_from(sorted(PRESETS)), st.integers(0, 6)),
    acquire_op,
    acquire_op,  # twice as often as the other kinds: most steps then meet limits
    st.tuples(st.just("commit"), st.integers(0, 7), st.floats(0, 1), st.floats(0, 1), custom_actual, custom_actual),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("advance"), st.integers(0, 12_000)),
    # Land near bucket and window edges, where an off-by-one would show.
    st.tuples(st.just("advance"), st.sampled_from([1, 166, 167, 168, 1_000, 9_833, 10_000, 10_167, 10_200, 60_000])),
)
# The limits each example starts with (an index into each scope's presets; index 0 stores none).
initial = st.tuples(*(st.integers(0, len(PRESETS[f]) - 1) for f in sorted(PRESETS)))


async def outcome_of(call: Awaitable[Any]) -> tuple[str, Any]:
    """An acquire's outcome in the model's words, and what it returned."""
    try:
        return "admitted", await call
    except BudgetExhausted:
        return "denied", None
    except RequestTooLarge:
        return "too_large", None
    except LimitsMissing:
        return "missing", None


async def quoted(budget: Budget, agent: str | None, **request: Any) -> str:
    """quote's verdict in the model's words."""
    try:
        quote = await budget.quote(TENANT, agent, **request)
    except LimitsMissing:
        return "missing"
    if quote.admitted:
        return "admitted"
    return "too_large" if quote.reason == "too_large" else "denied"


async def acquire_step(budget: Budget, model: Model, op: tuple[Any, ...], reservations: dict[str, Any]) -> None:
    with_agent, cents, tokens, model_name, tool_calls, steps = op[1:]
    agent = AGENT if with_agent else ""
    estimate = {
        "usd": cents * UNITS["usd"] // 100,
        "tokens": tokens,
        "requests": 1,
        "concurrency": 1,
        "tool_calls": tool_calls,
        "steps": steps,
    }
    estimate = {d: v for d, v in estimate.items() if v > 0}
    request = {"usd": cents / 100, "tokens": tokens, "model": model_name, "tool_calls": tool_calls, "steps": steps}
    expected = model.verdict(agent, model_name, estimate)
    assert await quoted(budget, agent or None, **request) == expected, ("quote", op, model.now)
    outcome, r = await outcome_of(budget.acquire(TENANT, agent or None, mode="reject", lease_ttl=10**6, **request))
    assert outcome == model.acquire(r.id if r else "", agent, model_name, estimate) == expected, (op, model.now)
    if r is not None:
        reservations[r.id] = r


async def settle_step(model: Model, op: tuple[Any, ...], reservations: dict[str, Any]) -> None:
    rid = sorted(model.open)[int(op[1]) % len(model.open)]
    held, r = model.open[rid], reservations.pop(rid)
    if op[0] == "release":
        await r.release()
        model.settle(rid, None)
        return
    usd = math.floor(held.estimate.get("usd", 0) * float(op[2]))
    tokens = math.floor(held.estimate.get("tokens", 0) * float(op[3]))
    # A custom amount other than the estimate: less is refunded, more is charged (an overrun, or usage nobody
    # reserved); None keeps the estimate.
    custom = {dim: value for dim, value in (("tool_calls", op[4]), ("steps", op[5])) if value is not None}
    await r.commit(usd=usd / UNITS["usd"], tokens=tokens, **custom)
    model.settle(rid, {"usd": usd, "tokens": tokens, **custom})


async def run(budget: Budget, first: tuple[int, ...], steps: list[tuple[Any, ...]]) -> None:
    start = await freeze_clock(budget, TENANT, START_MS)
    model = Model(start)
    reservations: dict[str, Any] = {}
    setup = [("limits", field_name, index) for field_name, index in zip(sorted(PRESETS), first, strict=True) if index]
    for op in [*setup, *steps]:
        kind = op[0]
        if kind == "limits":
            field_name, index = str(op[1]), int(op[2])
            presets = PRESETS[field_name]
            limits = [Limit.parse(text) for text in presets[index % len(presets)]]
            if field_name.startswith("M:"):
                await budget.set_limits(TENANT, limits, model=field_name[2:])
            else:
                await budget.set_limits(TENANT, limits, agent=None if field_name == "T" else "*")
            model.set_limits(field_name, limits)
        elif kind == "acquire":
            await acquire_step(budget, model, op, reservations)
        elif kind in ("commit", "release") and model.open:
            await settle_step(model, op, reservations)
        elif kind == "advance":
            model.now = await advance_clock(budget, TENANT, int(op[1]) / 1000)
        status = await budget.status(TENANT)
        seen = {s.key: round(s.remaining * unit_of(s.limit.dimension)) for s in status.limits}
        assert seen == model.expected_remaining(), (op, model.now)
    for window in [*model.windows.values(), *model.retired]:
        check_guarantee(window)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=initial, steps=st.lists(step, min_size=5, max_size=40))
def test_budget_matches_reference_model(
    make_budget: Callable[..., Budget], first: tuple[int, ...], steps: list[tuple[Any, ...]]
) -> None:
    async def example() -> None:
        budget = make_budget(test_clock=True, prefix="p" + secrets.token_hex(6))
        try:
            await run(budget, first, steps)
        finally:
            keys = [k async for k in budget.engine.client.scan_iter(match=budget.prefix + ":*")]
            if keys:
                await budget.engine.client.delete(*keys)
            await budget.aclose()

    asyncio.run(example())
