"""Property test: random set_limits/acquire/commit/release/time-advance sequences
against a plain Python reference model, on fakeredis and on a real Redis.

The model mirrors the documented semantics (60 buckets per window, a request
charged to its admission bucket, settlement adjusting that bucket while it is
in the window, usage nobody reserved charged at commit). After every step the
admission decisions and the remaining amounts must match the model exactly;
at the end, no interval of a window's length holds more than the limit.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slowburn_redis import Budget, BudgetExhausted, Limit, LimitsMissing, RequestTooLarge
from slowburn_redis.limits import UNITS
from slowburn_redis.testing import advance_clock, freeze_clock

BUCKETS = 60
TENANT = "acme"
AGENT = "a1"
TENANT_PRESETS = [
    [],
    ["usd 1/10s", "requests 4/10s"],
    ["usd 2/60s"],
    ["tokens 300/10s", "concurrency 3"],
    ["tokens 500"],
]
DEFAULT_PRESETS = [[], ["usd 0.5/10s"], ["requests 2/10s", "tokens 200"]]


@dataclass
class Window:
    dimension: str
    amount: int
    window_ms: int
    generation: int
    total: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)
    admissions: list[tuple[int, list[int]]] = field(default_factory=list)

    def width(self) -> int:
        return math.ceil(self.window_ms / BUCKETS)

    def bucket(self, now: int) -> int:
        return now // self.width() if self.window_ms else 0

    def live(self, idx: int, now: int) -> bool:
        return self.window_ms == 0 or idx >= self.bucket(now) - BUCKETS

    def used(self, now: int) -> tuple[int, int]:
        total = sum(v for i, v in self.total.items() if self.live(i, now))
        reserved = sum(v for i, v in self.reserved.items() if self.live(i, now))
        return total, reserved


@dataclass
class Charge:
    key: str
    generation: int
    idx: int
    amount: int
    record: list[int]


@dataclass
class Held:
    agent: str
    estimate: dict[str, int]
    charges: list[Charge]


class Model:
    """The reference: what the scripts must do, in plain Python."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.config: dict[str, list[Limit]] = {"T": [], "D": []}
        self.windows: dict[str, Window] = {}
        self.retired: list[Window] = []
        self.agents: set[str] = set()
        self.generations = 0
        self.open: dict[str, Held] = {}

    def applicable(self, agent: str) -> list[tuple[str, Limit]]:
        out = [(f"T:{lim.key}", lim) for lim in self.config["T"]]
        if agent:
            out += [(f"A:{agent}:{lim.key}", lim) for lim in self.config["D"]]
        return out

    def set_limits(self, field_name: str, limits: list[Limit]) -> None:
        agents = [""] if field_name == "T" else sorted(self.agents)
        before = {k for a in agents for k, _ in self.applicable(a)}
        self.config[field_name] = limits
        after = {k for a in agents for k, _ in self.applicable(a)}
        for key in before - after:
            if key in self.windows:
                self.retired.append(self.windows.pop(key))

    def window(self, key: str, limit: Limit, agent: str) -> Window:
        if key not in self.windows:
            self.generations += 1
            self.windows[key] = Window(limit.dimension, limit.units, limit.window_ms, self.generations)
            if agent and not key.startswith("T:"):
                self.agents.add(agent)
        window = self.windows[key]
        window.amount = limit.units
        return window

    def acquire(self, rid: str, agent: str, estimate: dict[str, int]) -> str:
        # An empty list clears its scope: with no scope stored, the tenant is refused (absence is not permission).
        if not self.config["T"] and not (agent and self.config["D"]):
            return "missing"
        needed = [(k, lim, estimate.get(lim.dimension, 0)) for k, lim in self.applicable(agent)]
        needed = [(k, lim, amt) for k, lim, amt in needed if amt > 0]
        for _, lim, amt in needed:
            if amt > lim.units:
                return "too_large"
        for key, lim, amt in needed:
            existing = self.windows.get(key)
            total = existing.used(self.now)[0] if existing else 0
            if total + amt > lim.units:
                return "denied"
        charges = []
        for key, lim, amt in needed:
            w = self.window(key, lim, agent)
            idx = w.bucket(self.now)
            w.total[idx] = w.total.get(idx, 0) + amt
            w.reserved[idx] = w.reserved.get(idx, 0) + amt
            record = [amt]
            w.admissions.append((self.now, record))
            charges.append(Charge(key, w.generation, idx, amt, record))
        self.open[rid] = Held(agent, estimate, charges)
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
            dim = charge.key.split(":")[-2]
            if self._adjust(charge, final[dim] - charge.amount, -charge.amount):
                charge.record[0] = final[dim]
        unreserved = any(v > 0 and held.estimate.get(d, 0) == 0 for d, v in final.items())
        if actual is not None and unreserved:
            charged = {c.key for c in held.charges}
            for key, lim in self.applicable(held.agent):
                value = final.get(lim.dimension, 0)
                if key not in charged and value > 0 and lim.dimension != "concurrency":
                    w = self.window(key, lim, held.agent)
                    idx = w.bucket(self.now)
                    w.total[idx] = w.total.get(idx, 0) + value
                    w.admissions.append((self.now, [value]))

    def expected_remaining(self) -> dict[str, int]:
        out = {}
        for agent in ["", *sorted(self.agents)]:
            for key, lim in self.applicable(agent):
                w = self.windows.get(key)
                total = w.used(self.now)[0] if w else 0
                out[key] = max(0, lim.units - total)
        return out


def check_guarantee(window: Window) -> None:
    """No closed interval of the window's length holds more than the limit."""
    if not window.window_ms:
        return
    times = sorted(window.admissions)
    for i, (start, _) in enumerate(times):
        inside = sum(rec[0] for t, rec in times[i:] if t <= start + window.window_ms)
        assert inside <= window.amount, (window, start)


step = st.one_of(
    st.tuples(st.just("limits"), st.sampled_from(["T", "D"]), st.integers(0, 4)),
    st.tuples(st.just("acquire"), st.booleans(), st.integers(0, 120), st.integers(0, 350)),
    st.tuples(st.just("commit"), st.integers(0, 7), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("advance"), st.integers(0, 12_000)),
    # Land near bucket and window edges, where an off-by-one would show.
    st.tuples(st.just("advance"), st.sampled_from([1, 166, 167, 168, 1_000, 9_833, 10_000, 10_167, 10_200, 60_000])),
)


async def run(budget: Budget, steps: list[tuple[object, ...]]) -> None:
    start = await freeze_clock(budget, TENANT, 1_800_000_000_000)
    model = Model(start)
    reservations: dict[str, object] = {}
    for op in steps:
        kind = op[0]
        if kind == "limits":
            field_name, index = str(op[1]), int(op[2])  # type: ignore[call-overload]
            presets = TENANT_PRESETS if field_name == "T" else DEFAULT_PRESETS
            limits = [Limit.parse(text) for text in presets[index % len(presets)]]
            await budget.set_limits(TENANT, limits, agent=None if field_name == "T" else "*")
            model.set_limits(field_name, limits)
        elif kind == "acquire":
            with_agent, cents, tokens = bool(op[1]), int(op[2]), int(op[3])  # type: ignore[call-overload]
            agent = AGENT if with_agent else ""
            estimate = {"usd": cents * UNITS["usd"] // 100, "tokens": tokens, "requests": 1, "concurrency": 1}
            estimate = {d: v for d, v in estimate.items() if v > 0}
            try:
                r = await budget.acquire(
                    TENANT, agent or None, usd=cents / 100, tokens=tokens, mode="reject", lease_ttl=10**6
                )
                outcome = "admitted"
            except BudgetExhausted:
                outcome = "denied"
            except RequestTooLarge:
                outcome = "too_large"
            except LimitsMissing:
                outcome = "missing"
            expected = model.acquire(r.id if outcome == "admitted" else "", agent, estimate)
            assert outcome == expected, (op, model.now)
            if outcome == "admitted":
                reservations[r.id] = r
        elif kind in ("commit", "release") and model.open:
            rid = sorted(model.open)[int(op[1]) % len(model.open)]  # type: ignore[call-overload]
            held, r = model.open[rid], reservations.pop(rid)
            if kind == "release":
                await r.release()  # type: ignore[attr-defined]
                model.settle(rid, None)
            else:
                usd = math.floor(held.estimate.get("usd", 0) * float(op[2]))  # type: ignore[arg-type]
                tokens = math.floor(held.estimate.get("tokens", 0) * float(op[3]))  # type: ignore[arg-type]
                await r.commit(usd=usd / UNITS["usd"], tokens=tokens)  # type: ignore[attr-defined]
                model.settle(rid, {"usd": usd, "tokens": tokens})
        elif kind == "advance":
            model.now = await advance_clock(budget, TENANT, int(op[1]) / 1000)  # type: ignore[call-overload]
        status = await budget.status(TENANT)
        seen = {s.key: round(s.remaining * UNITS[s.limit.dimension]) for s in status.limits}
        assert seen == model.expected_remaining(), (op, model.now)
    for window in [*model.windows.values(), *model.retired]:
        check_guarantee(window)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=5, max_size=40))
def test_budget_matches_reference_model(make_budget: Callable[..., Budget], steps: list[tuple[object, ...]]) -> None:
    async def example() -> None:
        budget = make_budget(test_clock=True, prefix="p" + secrets.token_hex(6))
        try:
            await run(budget, steps)
        finally:
            keys = [k async for k in budget.engine.client.scan_iter(match=budget.prefix + ":*")]
            if keys:
                await budget.engine.client.delete(*keys)
            await budget.aclose()

    asyncio.run(example())
