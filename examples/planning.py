"""A planner that quotes its options before spending anything, then runs the one the budget can afford.

    python examples/planning.py                               # embedded store, no Redis needed
    python examples/planning.py --redis-url redis://localhost:6379/0

Two plans answer the same question: a "deep" one (gpt-4o, long answers,
many tool calls) and a "quick" one (gpt-4o-mini, short answers, few tool
calls). The planner asks `BudgetedLLM.aquote` what each call would reserve,
sums each plan, and asks `Budget.quote` (read-only: nothing charged, nothing
queued) whether the plan fits now, which limit would deny it and when it
would fit. It runs the most capable plan that fits now, else the one that
fits soonest. The budget: ``usd 0.05/hour``, ``requests 20/min`` and a custom
dimension, ``tool_calls 4/hour``. The provider is mocked offline (litellm's
``mock_response``, usage counted like the real thing): no key, no network,
no money. Earlier work has spent $0.03 of the hour, so the deep plan does
not fit now (the quote says when it will); the quick one does. The last line
is ``RESULT {...}`` JSON.
"""

from __future__ import annotations

import os

# litellm must not fetch its price map from the internet: set before it is imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import argparse
import asyncio
import json
import secrets
from dataclasses import dataclass

from slowburn_redis import Budget, Quote
from slowburn_redis.llm import BudgetedLLM, CallQuote, mock_reply

TENANT = "planning-demo"
AGENT = "planner"
QUESTION = [
    {"role": "system", "content": "You are a careful analyst."},
    {"role": "user", "content": "Compare three ways to cap LLM spend across a fleet of agents."},
]


@dataclass(frozen=True)
class Plan:
    name: str
    model: str
    calls: int
    max_tokens: int
    tool_calls: int


PLANS = [
    Plan("deep", "gpt-4o", calls=2, max_tokens=1500, tool_calls=3),
    Plan("quick", "gpt-4o-mini", calls=3, max_tokens=400, tool_calls=2),
]


async def quote_plan(budget: Budget, plan: Plan) -> tuple[float, Quote]:
    """The plan's estimated cost and the budget's verdict on all of it at once."""
    llm = BudgetedLLM(budget, TENANT, AGENT, model=plan.model)
    call: CallQuote = await llm.aquote(QUESTION, max_tokens=plan.max_tokens)
    usd = call.usd * plan.calls
    tokens = (call.input_tokens + call.output_tokens) * plan.calls
    verdict = await budget.quote(
        TENANT, AGENT, model=plan.model, usd=usd, tokens=tokens, requests=plan.calls, tool_calls=plan.tool_calls
    )
    return usd, verdict


def choose(quotes: dict[str, tuple[float, Quote]]) -> str | None:
    """The first plan (most capable first) that fits now, else the one that fits soonest; None if none ever fits."""
    for name, (_, verdict) in quotes.items():
        if verdict.admitted:
            return name
    timed = [(verdict.retry_in, name) for name, (_, verdict) in quotes.items() if verdict.retry_in is not None]
    return min(timed)[1] if timed else None


async def run_plan(budget: Budget, plan: Plan) -> None:
    """Make the plan's calls: each reserves its estimate and commits what it cost, tool calls included."""
    llm = BudgetedLLM(budget, TENANT, AGENT, model=plan.model)
    for i in range(plan.calls):
        answer = f"Option {i + 1}: reserve before the call, commit after, wait when the budget is spent."
        tools = plan.tool_calls // plan.calls + (1 if i < plan.tool_calls % plan.calls else 0)
        async with budget.acquire(TENANT, AGENT, tool_calls=tools, requests=0, model=plan.model) as tool_use:
            response = await llm.acompletion(
                QUESTION, max_tokens=plan.max_tokens, mock_response=mock_reply(plan.model, QUESTION, answer)
            )
            await tool_use.commit(tool_calls=tools)
        print(f"  {plan.name} call {i + 1}: {response.usage.total_tokens} tokens, {tools} tool call(s)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("SLOWBURN_REDIS_URL"))
    args = parser.parse_args()
    prefix = "plan" + secrets.token_hex(4)
    budget = Budget.from_url(args.redis_url, prefix=prefix) if args.redis_url else Budget.embedded(prefix=prefix)
    async with budget:
        await budget.set_limits(TENANT, ["usd 0.05/hour", "requests 20/min", "tool_calls 4/hour"])
        earlier = await budget.acquire(TENANT, AGENT, usd=0.03, requests=0)  # earlier work this hour
        await earlier.commit()
        quotes = {plan.name: await quote_plan(budget, plan) for plan in PLANS}
        for name, (usd, verdict) in quotes.items():
            print(f"plan {name}: estimated ${usd:.4f}; {verdict}")
        chosen = choose(quotes)
        print(f"chosen: {chosen}")
        if chosen is not None:
            await run_plan(budget, next(p for p in PLANS if p.name == chosen))
        status = await budget.status(TENANT, agent=AGENT)
        spent = next(s.used for s in status.limits if s.limit.dimension == "usd")
        tools_used = next(s.used for s in status.limits if s.limit.dimension == "tool_calls")
        print(f"spent ${spent:.4f} of usd 0.05/hour; tool calls used: {tools_used:g} of 4")
        result = {
            "chosen": chosen,
            "quotes": {
                name: {"usd": round(usd, 6), "admitted": v.admitted, "reason": v.reason, "limit": v.limit}
                for name, (usd, v) in quotes.items()
            },
            "spent_usd": round(spent, 9),
            "tool_calls_used": tools_used,
        }
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
