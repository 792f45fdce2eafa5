"""A research agent on a shared dollar budget: it pauses when the window is spent, and reports what it cost.

    python examples/research_agent.py                       # embedded store, no Redis needed
    python examples/research_agent.py --redis-url redis://localhost:6379/0
    SLOWBURN_REDIS_URL=redis://localhost:6379/0 python examples/research_agent.py --format md

A planner splits a topic into sub-questions, researchers search and take
notes on each (concurrently, sharing the budget), and a writer drafts the
summary. Every call goes through `BudgetedLLM`: estimated, admitted by the
budget (``usd`` over a short window, so the run must pause), made, and
committed to the ledger. The provider is mocked offline (litellm's
``mock_response`` with usage counted like the real thing): no API key, no
network, no money.

It prints each call with its cost, each pause and resume as the budget
publishes them, the cost report, and a final ``RESULT {...}`` JSON line
whose numbers the report must match.
"""

from __future__ import annotations

import os

# litellm must not fetch its price map from the internet: set before it is imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import argparse
import asyncio
import json
import logging
import random
import secrets
import time
from typing import Any

import litellm
import structlog

from slowburn_redis import Budget
from slowburn_redis.limits import to_units
from slowburn_redis.llm import BudgetedLLM, mock_reply

litellm.suppress_debug_info = True
# The library logs through structlog and never configures it; this script shows warnings only.
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

MODEL = "gpt-4o-mini"
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the paper index and return the most relevant abstracts.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["query"],
        },
    },
}
WORDS = [
    "window",
    "budget",
    "token",
    "latency",
    "throughput",
    "fairness",
    "queue",
    "lease",
    "estimate",
    "refund",
    "overrun",
    "bucket",
    "provider",
    "retry",
    "backoff",
    "cost",
    "ledger",
    "tenant",
    "agent",
    "worker",
    "fleet",
    "burst",
    "limit",
    "sliding",
    "fixed",
    "capacity",
    "admission",
    "priority",
    "stream",
    "commit",
    "release",
    "timeout",
    "notification",
    "pubsub",
    "cluster",
    "shard",
    "replica",
]


class Tally:
    """What the agent itself saw: each call's cost as litellm priced the response."""

    def __init__(self) -> None:
        self.calls = 0
        self.usd_nano = 0
        self.per_agent: dict[str, int] = {}
        self.started = time.monotonic()

    def clock(self) -> str:
        return f"[{time.monotonic() - self.started:6.2f}s]"

    def record(self, agent: str, response: Any) -> None:
        cost = to_units("usd", litellm.completion_cost(completion_response=response))
        self.calls += 1
        self.usd_nano += cost
        self.per_agent[agent] = self.per_agent.get(agent, 0) + cost
        usage = response.usage
        print(
            f"{self.clock()} call {self.calls:2d} {agent:<10} in={usage.prompt_tokens:4d} "
            f"out={usage.completion_tokens:4d} usd={cost / 10**9:.9f}",
            flush=True,
        )


def prose(rng: random.Random, words: int) -> str:
    sentences, current = [], []
    for i in range(words):
        current.append(rng.choice(WORDS))
        if len(current) >= rng.randint(6, 14) or i == words - 1:
            sentences.append(" ".join(current).capitalize() + ".")
            current = []
    return " ".join(sentences)


async def ask(llm: BudgetedLLM, tally: Tally, messages: list[dict[str, Any]], reply: Any, **kwargs: Any) -> Any:
    response = await llm.acompletion(messages, mock_response=reply, **kwargs)
    tally.record(llm.agent or "-", response)
    return response


async def research(llm: BudgetedLLM, tally: Tally, question: str, rng: random.Random) -> str:
    """Search, read the results, take notes: two calls."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You research one question. Search first, then write dense notes."},
        {"role": "user", "content": question},
    ]
    call = mock_reply(
        MODEL, messages, tools=[SEARCH_TOOL], tool_calls=[{"name": "search", "arguments": {"query": question}}]
    )
    response = await ask(llm, tally, messages, call, tools=[SEARCH_TOOL], max_tokens=100)
    tool_call = response.choices[0].message.tool_calls[0]
    messages.append(response.choices[0].message.model_dump(exclude_none=True))
    abstracts = prose(rng, rng.randint(80, 200))  # what the (local, free) search tool returned
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": abstracts})
    notes = prose(rng, rng.randint(60, 180))
    response = await ask(
        llm,
        tally,
        messages,
        mock_reply(MODEL, messages, notes, tools=[SEARCH_TOOL]),
        tools=[SEARCH_TOOL],
        max_tokens=300,
    )
    return str(response.choices[0].message.content)


async def watch_events(budget: Budget, tenant: str, tally: Tally, counts: dict[str, int]) -> None:
    """Print the budget's pauses and resumes as they are published."""
    async for event in budget.events(tenant):
        extra = event.model_extra or {}
        if event.type == "waiting":
            counts["pauses"] += 1
            print(f"{tally.clock()} PAUSE  {event.agent or '-':<10} waits on {event.limit}", flush=True)
        elif event.type == "resumed":
            counts["resumes"] += 1
            waited = int(extra.get("waited_ms", 0)) / 1000
            print(f"{tally.clock()} RESUME {event.agent or '-':<10} after {waited:.2f}s", flush=True)
        elif event.type == "threshold" and extra.get("dimension") == "usd":
            print(f"{tally.clock()} budget {event.limit} at {extra.get('level')}%", flush=True)


async def subscribed(budget: Budget, tenant: str) -> None:
    """Wait (bounded) until the event subscription is in place, so no pause goes unseen."""
    channel = budget.key(tenant) + ":events"
    for _ in range(200):
        if await budget.engine.subscribers(channel) > 0:
            return
        await asyncio.sleep(0.01)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.redis_url or os.environ.get("SLOWBURN_REDIS_URL")
    prefix = args.prefix or "research" + secrets.token_hex(3)
    budget = Budget.from_url(url, prefix=prefix) if url else Budget.embedded(prefix=prefix)
    tenant, rng, tally = args.tenant, random.Random(args.seed), Tally()
    limits = [f"usd {args.usd:g}/{args.window:g}s", f"concurrency {args.concurrency}"]
    await budget.set_limits(tenant, limits)
    print(f"budget {budget.description} tenant={tenant} limits={limits} model={MODEL}", flush=True)

    counts = {"pauses": 0, "resumes": 0}
    watcher = asyncio.ensure_future(watch_events(budget, tenant, tally, counts))
    await subscribed(budget, tenant)

    planner = BudgetedLLM(budget, tenant, agent="planner", model=MODEL)
    researcher = planner.for_agent("researcher")
    writer = planner.for_agent("writer")

    topic = args.topic
    questions = [
        f"{topic}: {aspect}?"
        for aspect in (
            "how is the window measured",
            "what happens when the budget is spent",
            "how are waiters ordered",
            "what does an overrun cost",
            "how do leases expire",
            "how are refunds published",
            "how does a cluster change it",
            "what do operators watch",
        )[: args.questions]
    ]
    plan_messages = [
        {"role": "system", "content": "Split the topic into research questions, one per line."},
        {"role": "user", "content": topic},
    ]
    await ask(planner, tally, plan_messages, mock_reply(MODEL, plan_messages, "\n".join(questions)), max_tokens=200)

    notes = await asyncio.gather(*(research(researcher, tally, q, rng) for q in questions))

    draft_messages = [
        {"role": "system", "content": "Write a one-page summary from the notes."},
        {"role": "user", "content": "\n\n".join(notes)},
    ]
    await ask(writer, tally, draft_messages, mock_reply(MODEL, draft_messages, prose(rng, 220)), max_tokens=600)

    await asyncio.sleep(0.2)  # let the last events arrive
    watcher.cancel()
    report = await budget.report(tenant)
    exports = {
        "table": report.to_table,
        "md": report.to_markdown,
        "json": report.to_json,
        "csv": report.to_csv,
        "latex": report.to_latex,
    }
    print(f"\n{tally.clock()} done: {tally.calls} calls, {counts['pauses']} pauses\n", flush=True)
    print(exports[args.format]())

    by_agent = {row.name or "-": row.usd_nano for row in report.agents}
    checks = {
        "report total = sum of calls": report.totals.usd_nano == tally.usd_nano,
        "report calls = calls made": report.entries == tally.calls,
        "agents add up to the total": sum(by_agent.values()) == report.totals.usd_nano,
        "models add up to the total": sum(r.usd_nano for r in report.models) == report.totals.usd_nano,
        "each agent = its calls": by_agent == tally.per_agent,
    }
    for name, ok in checks.items():
        print(f"check {'ok  ' if ok else 'FAIL'} {name}")
    result = {
        "calls": tally.calls,
        "pauses": counts["pauses"],
        "resumes": counts["resumes"],
        "usd_nano": tally.usd_nano,
        "per_agent_usd_nano": tally.per_agent,
        "report_usd_nano": report.totals.usd_nano,
        "report_entries": report.entries,
        "checks_ok": all(checks.values()),
    }
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    await budget.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="Redis URL (default: $SLOWBURN_REDIS_URL, else the embedded store)")
    parser.add_argument("--prefix", help="key prefix (default: a fresh one per run)")
    parser.add_argument("--tenant", default="lab")
    parser.add_argument("--topic", default="Sliding-window budgets for LLM fleets")
    parser.add_argument("--questions", type=int, default=6, choices=range(1, 9))
    parser.add_argument("--usd", type=float, default=0.0006, help="dollars per window")
    parser.add_argument("--window", type=float, default=2.0, help="window in seconds")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--format", choices=("table", "md", "json", "csv", "latex"), default="table")
    result = asyncio.run(run(parser.parse_args()))
    raise SystemExit(0 if result["checks_ok"] else 1)


if __name__ == "__main__":
    main()
