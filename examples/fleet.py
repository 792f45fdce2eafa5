"""A fleet of worker processes sharing one budget on one Redis.

Each process is a plain blocking worker (think Celery, RQ or a Kubernetes
pod) using the sync API: reserve an estimate, make a (simulated) LLM call,
commit the actual cost. When the shared dollar window is spent, a worker
does not fail: it waits until the window refills, then goes on.

    python examples/fleet.py --processes 4 --seconds 20
    python examples/fleet.py --redis-url redis://localhost:6379/0 --prefix sb --processes 1 --seconds 0   # forever
    python examples/fleet.py --processes 2 --calls 5 --seconds 0     # 5 calls per process, however long they wait

Limits are set by every process at start (the same limits: setting them
twice changes nothing). Output: one line per call, then a summary line from
the parent: ``fleet: <processes> processes, <calls> calls, $<usd> spent``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import random
import time

import structlog

from slowburn_redis import Budget, BudgetTimeout

USD_PER_INPUT_TOKEN = 0.15 / 1_000_000  # gpt-4o-mini prices
USD_PER_OUTPUT_TOKEN = 0.60 / 1_000_000
MAX_OUTPUT_TOKENS = 600


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("SLOWBURN_REDIS_URL", "redis://localhost:6379/0"),
        help="Redis to share (env SLOWBURN_REDIS_URL)",
    )
    parser.add_argument("--prefix", default=os.environ.get("SLOWBURN_PREFIX", "sb"), help="key prefix")
    parser.add_argument("--tenant", default="fleet")
    parser.add_argument("--processes", type=int, default=4, help="worker processes to start")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to run; 0 runs forever")
    parser.add_argument("--calls", type=int, default=0, help="stop each process after this many calls; 0: no limit")
    parser.add_argument("--usd", type=float, default=0.01, help="dollars the fleet may spend per window")
    parser.add_argument("--window", default="10s", help="the window: 10s, 1m, 1h...")
    return parser


def worker(args: argparse.Namespace, number: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """One process: call, commit, repeat; wait (not fail) whenever the fleet's budget is spent."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    budget = Budget.from_url(args.redis_url, prefix=args.prefix).sync()
    budget.set_limits(args.tenant, [f"usd {args.usd}/{args.window}"])
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
    rng = random.Random()
    name, calls, spent = f"worker-{number}-{os.getpid()}", 0, 0.0
    try:
        while (deadline is None or time.monotonic() < deadline) and (args.calls <= 0 or calls < args.calls):
            input_tokens = rng.randint(800, 2500)
            estimate = input_tokens * USD_PER_INPUT_TOKEN + MAX_OUTPUT_TOKENS * USD_PER_OUTPUT_TOKEN
            started = time.monotonic()
            timeout = None if deadline is None else max(0.0, deadline - started)
            try:
                reservation = budget.acquire(args.tenant, agent=name, usd=estimate, timeout=timeout)
            except BudgetTimeout:
                break  # the run ended while this worker waited for budget
            waited = time.monotonic() - started
            time.sleep(rng.uniform(0.1, 0.4))  # the "LLM call"
            output_tokens = rng.randint(100, MAX_OUTPUT_TOKENS)
            cost = input_tokens * USD_PER_INPUT_TOKEN + output_tokens * USD_PER_OUTPUT_TOKEN
            reservation.commit(usd=cost, model="gpt-4o-mini")
            calls, spent = calls + 1, spent + cost
            note = f" after waiting {waited:.1f}s for budget" if waited > 0.05 else ""
            print(f"{name}: call {calls} cost ${cost:.5f}{note}", flush=True)
    finally:
        results.put((name, calls, spent))
        budget.close()


def main() -> None:
    args = build_parser().parse_args()
    results: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    processes = [
        multiprocessing.Process(target=worker, args=(args, number, results)) for number in range(1, args.processes + 1)
    ]
    for process in processes:
        process.start()
    totals = [results.get() for _ in processes]
    for process in processes:
        process.join()
    calls = sum(c for _, c, _ in totals)
    spent = sum(s for _, _, s in totals)
    print(f"fleet: {len(processes)} processes, {calls} calls, ${spent:.4f} spent under usd {args.usd}/{args.window}")


if __name__ == "__main__":
    main()
