"""Two tenants on one Redis, each with its own quota and per-agent sub-limits.

``example-startup`` has a small lifetime budget ($0.004), and its researcher a
sub-limit of its own ($0.0015); ``example-enterprise`` has a roomy one ($1 a
minute, $0.50 for its researcher). Both run a researcher and a writer at once:
the startup runs out and its agents wait (saying so), while the enterprise
keeps going, untouched.

    python examples/multi_tenant.py

It ends once the startup's budget is spent (every one of its agents waits)
and the enterprise has made ``--after`` more calls, or after ``--seconds``.

The example's own tenants' limits are set and their usage reset at the start,
so it can be run again; it never touches any other tenant (such as the README
tour's ``acme``) on a shared Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import time

import structlog

from slowburn_redis import Budget, BudgetTimeout

USD_PER_INPUT_TOKEN = 0.15 / 1_000_000  # gpt-4o-mini prices
USD_PER_OUTPUT_TOKEN = 0.60 / 1_000_000
MAX_OUTPUT_TOKENS = 600

SMALL, ROOMY = "example-startup", "example-enterprise"
"""The example's own tenants: it resets them, so they are not names anyone else uses."""
LIMITS = {
    SMALL: {None: ["usd 0.004", "concurrency 2"], "researcher": ["usd 0.0015"], "*": ["requests 50/min"]},
    ROOMY: {None: ["usd 1/min"], "researcher": ["usd 0.5/min"], "*": ["requests 600/min"]},
}
AGENTS = ("researcher", "writer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SLOWBURN_REDIS_URL", "redis://localhost:6379/0"),
        help="Redis to use (env SLOWBURN_REDIS_URL)",
    )
    parser.add_argument("--prefix", default=os.environ.get("SLOWBURN_PREFIX", "sb"), help="key prefix")
    parser.add_argument("--seconds", type=float, default=60.0, help="the longest the agents run; 0: no limit")
    parser.add_argument(
        "--after", type=int, default=5, help="calls the enterprise makes after the startup is spent, then stop"
    )
    return parser


def spent_limit(exc: BudgetTimeout) -> str:
    """The limit that was spent, in words (``usd 0.0015 (agent researcher)``), from the snapshot the error carries."""
    for row in exc.status.limits if exc.status else []:
        if row.key == exc.limit:
            return f"{row.limit} ({'tenant' if row.agent is None else 'agent ' + row.agent})"
    return "a limit"


class Story:
    """When to stop: the startup is spent (all its agents wait) and the enterprise made `after` calls since."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.waiting: set[str] = set()
        self.calls_since_spent: int | None = None
        self.done = asyncio.Event()

    def admitted(self, tenant: str, name: str) -> None:
        if tenant == SMALL:
            # Not spent after all (a smaller estimate fit, or a refund made room): this call is in
            # flight, so count the enterprise's calls again from the next time every startup agent waits.
            self.waiting.discard(name)
            self.calls_since_spent = None

    def called(self, tenant: str, name: str) -> None:
        if tenant != SMALL and self.calls_since_spent is not None:
            self.calls_since_spent += 1
            if self.calls_since_spent >= self.after:
                self.done.set()

    def spent(self, tenant: str, name: str) -> None:
        if tenant == SMALL:
            self.waiting.add(name)
            if self.waiting >= set(AGENTS) and self.calls_since_spent is None:
                self.calls_since_spent = 0


async def agent(
    budget: Budget, tenant: str, name: str, deadline: float | None, log: list[tuple[float, str, str]], story: Story
) -> None:
    """Call, commit, repeat; when the budget is spent, say so once and keep waiting until the story ends."""
    rng = random.Random()
    waiting = False
    while not story.done.is_set():
        left = 3600.0 if deadline is None else deadline - time.monotonic()
        if left <= 0:
            break
        input_tokens = rng.randint(800, 2500)
        estimate = input_tokens * USD_PER_INPUT_TOKEN + MAX_OUTPUT_TOKENS * USD_PER_OUTPUT_TOKEN
        try:
            reservation = await budget.acquire(
                tenant,
                agent=name,
                usd=estimate,
                input_tokens=input_tokens,
                output_tokens=MAX_OUTPUT_TOKENS,
                timeout=min(left, 0.5),
            )
        except BudgetTimeout as exc:
            if not waiting:
                print(f"{tenant}/{name}: budget spent ({spent_limit(exc)}), waiting", flush=True)
                waiting = True
            story.spent(tenant, name)
            continue
        waiting = False
        story.admitted(tenant, name)
        await asyncio.sleep(rng.uniform(0.05, 0.2))  # the "LLM call"
        output_tokens = rng.randint(100, MAX_OUTPUT_TOKENS)
        cost = input_tokens * USD_PER_INPUT_TOKEN + output_tokens * USD_PER_OUTPUT_TOKEN
        await reservation.commit(usd=cost, input_tokens=input_tokens, output_tokens=output_tokens, model="gpt-4o-mini")
        log.append((time.monotonic(), tenant, name))
        print(f"{tenant}/{name}: call cost ${cost:.5f}", flush=True)
        story.called(tenant, name)


async def main() -> None:
    args = build_parser().parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    async with Budget.from_url(args.redis_url, prefix=args.prefix) as budget:
        for tenant, scopes in LIMITS.items():
            for scope, limits in scopes.items():
                await budget.set_limits(tenant, limits, agent=scope)
            await budget.reset(tenant)
        log: list[tuple[float, str, str]] = []
        deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
        story = Story(args.after)
        await asyncio.gather(*(agent(budget, t, a, deadline, log, story) for t in LIMITS for a in AGENTS))

        print()
        for tenant in LIMITS:
            status = await budget.status(tenant)
            calls = sum(1 for _, t, _ in log if t == tenant)
            print(f"{tenant}: {calls} calls")
            for row in status.limits:
                if row.limit.dimension == "usd":
                    who = "tenant" if row.agent is None else f"agent {row.agent}"
                    print(f"  {who:<17} {row.limit!s:<16} used ${row.used:.4f}  remaining ${row.remaining:.4f}")
        small_last = max((when for when, t, _ in log if t == SMALL), default=None)
        if small_last is not None:
            after = sum(1 for when, t, _ in log if t == ROOMY and when > small_last)
            print(f"{ROOMY} kept going: {after} calls after {SMALL}'s last call")


if __name__ == "__main__":
    asyncio.run(main())
