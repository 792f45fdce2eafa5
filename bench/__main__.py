"""``python -m bench``: start a private redis-server, run the sections, print and save the results."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ceiling, cluster, memory, peers, report, sync_twin, tenants, waiting
from bench.helpers import Fleet, RedisServer, Settings, machine, redis_version

SECTIONS: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "ceiling": ceiling.run,
    "peers": peers.run,
    "waiting": waiting.run,
    "memory": memory.run,
    "tenants": tenants.run,
    "sync": sync_twin.run,
    "cluster": cluster.run,
}
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run: one repetition, short runs")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SECTIONS),
        metavar="SECTION",
        help=f"run only these sections ({', '.join(SECTIONS)}); default: all",
    )
    parser.add_argument("--skip", nargs="+", choices=list(SECTIONS), metavar="SECTION", default=[])
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3, 1 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds per throughput run (default 3, 1 with --quick)")
    parser.add_argument("--json", type=Path, default=HERE / "results.json", help="where to write the raw results")
    parser.add_argument(
        "--markdown", type=Path, default=HERE / "RESULTS.md", help="where to write the table ('-' for none)"
    )
    parser.add_argument("--note", default="", help="a line printed under the table (e.g. 'development run')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [name for name in (args.only or list(SECTIONS)) if name not in args.skip]
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (1.0 if args.quick else 3.0)
    command = "python -m bench " + " ".join(sys.argv[1:]) if argv is None else "python -m bench " + " ".join(argv)
    results: dict[str, Any] = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command.strip(),
        "quick": args.quick,
        "reps": reps,
        "duration_s": duration,
        "note": args.note,
        "machine": machine(),
        "sections": {},
        "timings_s": {},
    }
    t_start = time.monotonic()
    with RedisServer() as server, Fleet(4) as fleet:
        results["redis_version"] = redis_version(server.url)
        settings = Settings(url=server.url, fleet=fleet, quick=args.quick, reps=reps, duration=duration)
        for name in chosen:
            t0 = time.monotonic()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                results["sections"][name] = SECTIONS[name](settings)
            except Exception as exc:  # one broken section must not lose the others
                import traceback

                traceback.print_exc()
                last = str(exc).strip().splitlines()[-1:] or [""]
                results["sections"][name] = {"error": f"{type(exc).__name__}: {last[0]}"}
            results["timings_s"][name] = round(time.monotonic() - t0, 1)
            print(f"[bench] {name} done in {results['timings_s'][name]}s", file=sys.stderr, flush=True)
    results["total_s"] = round(time.monotonic() - t_start, 1)
    table = report.markdown(results)
    print(table)
    report.write_json(results, args.json)
    if str(args.markdown) != "-":
        args.markdown.write_text(table)
    print(f"[bench] total {results['total_s']}s; raw results in {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
