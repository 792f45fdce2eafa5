"""The results as a Markdown table (README / RESULTS.md) and as raw JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")


def num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if digits == 0:
            return f"{round(value):,}"
        return f"{value:,.{digits}f}"
    return str(value)


def goal(ok: Any) -> str:
    return "met" if ok else "**not met**"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        "# slowburn-redis benchmark results",
        "",
        f"`{results['command']}`, {results['started']}, {results['total_s']} s in all."
        + (f" **{results['note']}**" if results.get("note") else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Redis {results.get('redis_version', '?')} "
        f"(own server, loopback, no persistence), load average at start {m['load_avg_at_start']}. "
        f"Every figure is the median of {results['reps']} repetition(s) of {results['duration_s']:g} s runs; "
        "ratios are taken within the same run on the same server.",
        "",
    ]
    sections = results["sections"]
    for name, render in (
        ("ceiling", ceiling),
        ("peers", peers),
        ("waiting", waiting),
        ("memory", memory),
        ("tenants", tenants),
        ("sync", sync_twin),
        ("cluster", cluster),
    ):
        if name in sections:
            data = sections[name]
            if "error" in data:
                out += [f"## {name}", "", f"failed: `{data['error']}`", ""]
            else:
                out += render(data)
    return "\n".join(out).rstrip() + "\n"


def ceiling(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    rows = []
    for label, procs in (("1p", "1 process"), ("fleet", "4 processes")):
        for kind, what in (
            ("trivial", "trivial EVALSHA (1 HINCRBY)"),
            ("trivial_batched", "trivial, batched like slowburn"),
            ("acquire", "acquire"),
            ("acquire_commit", "acquire+commit"),
            ("acquire_commit_alt", f"acquire+commit, batch_size={d.get('alt_batch_size', 16)}"),
        ):
            if kind not in s[label]:
                continue
            x = s[label][kind]
            rows.append(
                [
                    procs,
                    what,
                    num(x["per_s"]),
                    num(x["p50_ms"], 2),
                    num(x["p99_ms"], 2),
                    "1.00" if kind == "trivial" else num(x.get("cost_x_trivial"), 2),
                    "1.00" if kind == "trivial" else num(x.get("p50_x_trivial"), 2),
                    "" if kind.startswith("trivial") else num(x.get("cost_x_trivial_batched"), 2),
                    num(x.get("requests_per_script"), 1),
                    num(x.get("server_us_per_request", x["server_us_per_script"]), 1),
                ]
            )
    ac1, acf = s["1p"]["acquire_commit"], s["fleet"]["acquire_commit"]
    return [
        "## 1. Ceiling: against one trivial round trip",
        "",
        f"redis.asyncio, {d['tasks_per_process']} concurrent tasks per process; slowburn checks "
        + ", ".join(d["limits"])
        + ". Cost = trivial calls/s over these calls/s. slowburn sends the requests of one tenant that are"
        f" ready together as one script call (at most {d.get('batch_size', 8)} per call by default, "
        f"{d.get('alt_batch_size', 16)} in the last rows); the goals are"
        " stated against the trivial script sent one call per request, as a plain client does; the 'batched"
        " trivial' column compares with the same trivial script batched the same way.",
        "",
        *table(
            [
                "processes",
                "call",
                "calls/s",
                "p50 ms",
                "p99 ms",
                "cost (x trivial)",
                "p50 (x trivial)",
                "cost (x batched trivial)",
                "requests/call",
                "server µs/request",
            ],
            rows,
        ),
        f"- Goal acquire+commit <= 2.5x one trivial round trip (1 process): {num(ac1['cost_x_trivial'], 2)}x, "
        f"{goal(d['goals']['acquire_commit_at_most_2.5x_trivial'])}.",
        f"- Goal 4-process fleet >= 40% of the trivial script's throughput: "
        f"{num(100 * acf['throughput_share_of_trivial'], 0)}%, {goal(d['goals']['fleet_at_least_40pct_of_trivial'])}.",
        "",
    ]


def peers(d: dict[str, Any]) -> list[str]:
    tp = d["throughput"]
    acc = d["accuracy"]
    rows = []
    for name, s in tp["summary"].items():
        a = acc["summary"].get(name)
        rows.append(
            [
                name,
                d["peers"][name]["algorithm"],
                num(s["per_s"]),
                num(s["p50_ms"], 2),
                num(s["p99_ms"], 2),
                num(s["x_fastest_peer"], 2),
                num(a["admitted_over_limit_median"], 2) if a else "",
                num(a["admitted_over_limit_max"], 2) if a else "",
            ]
        )
    v = d["versions"]
    return [
        "## 2. Peers on the same Redis",
        "",
        f"Throughput: 1 process, {tp['tasks']} tasks, cost 1; slowburn checks 3 limits + concurrency, each peer one "
        f"limit ({tp['peer_limit']}); slowburn batches the requests of the tenant that are ready together (default "
        "batch_size 8), the peers send one call per admission. "
        f"Accuracy: {acc['processes']} processes x {acc['tasks_per_process']} tasks, "
        f"{acc['limit']}, {acc['costs']}, every limiter in the same {acc['span_s']:g} s run, which straddles a "
        "multiple of 10 s of the clock (where fixed-window counters reset). Versions: "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "",
        *table(
            ["limiter", "algorithm", "admissions/s", "p50 ms", "p99 ms", "x fastest peer", "admitted/limit", "max"],
            rows,
        ),
        "- Goal slowburn admits exactly the limit, never above: "
        f"{goal(acc['goal_slowburn_exactly_1.00_never_above'])}.",
        f"- Goal slowburn within 1.5x of the fastest peer ({tp['fastest_peer']}): acquire "
        f"{goal(tp['goal_slowburn_acquire_within_1.5x_of_fastest_peer'])}, acquire+commit "
        f"{goal(tp['goal_slowburn_acquire_commit_within_1.5x_of_fastest_peer'])} (with batch_size=16: "
        f"{'within' if tp.get('slowburn_b16_acquire_commit_within_1.5x_of_fastest_peer') else 'not within'}).",
        "",
    ]


def waiting(d: dict[str, Any]) -> list[str]:
    r, e, idle = d["refund"], d["expiry"], d["idle"]
    rows = [
        [
            "slowburn",
            f"p50 {num(r['p50_ms'], 2)} / p99 {num(r['p99_ms'], 2)} ms ({r['wakes']} wakes)",
            f"p50 {num(e['slowburn']['late_vs_ideal_p50_ms'], 1)} / "
            f"p99 {num(e['slowburn']['late_vs_ideal_p99_ms'], 1)} ms "
            f"(vs bucket expiry: p50 {num(e['slowburn'].get('late_vs_bucket_expiry_p50_ms'), 1)}, max "
            f"{num(e['slowburn'].get('late_vs_bucket_expiry_max_ms'), 1)} ms)",
            num(e["slowburn"]["requests_per_wait"], 1),
            f"{num(idle['slowburn']['commands_per_s'], 2)} ({idle['slowburn']['waiters']} waiters, "
            f"{idle['slowburn']['processes']} processes)",
        ]
    ]
    for peer in ("pyrate", "throttled"):
        pe, pi = e[peer], idle[peer]
        failed = f", {pi['failed_waits']} waits failed: {pi['first_failure']}" if pi.get("failed_waits") else ""
        rows.append(
            [
                peer,
                "no wake on refund",
                f"p50 {num(pe['late_vs_ideal_p50_ms'], 1)} / p99 {num(pe['late_vs_ideal_p99_ms'], 1)} ms",
                num(pe["requests_per_wait"], 1),
                f"{num(pi['commands_per_s'], 2)} ({pi['waiters']} waiters, 1 process{failed})",
            ]
        )
    rows.append(["limits", "no blocking wait", "caller polls", "", ""])
    s = idle["slowburn"]
    return [
        "## 3. Waiting",
        "",
        f"Refund wake: a holder in one process commits an actual cost of 0; the waiter in another process is "
        f"admitted ({r['measured_from']}). Expiry wake: a {e['window_s']} s window (slowburn bucket "
        f"{num(e['slowburn_bucket_ms'], 0)} ms = window/60) is spent, a waiter asks for all of it; lateness is its "
        "admission minus the moment an exact sliding log would free it (server clock for slowburn). Idle: Redis "
        "commands per second (INFO commandstats, commands run inside scripts included) while waiters sit on a spent "
        "budget.",
        "",
        *table(
            ["limiter", "wake after refund", "wake after expiry (late)", "requests per wait", "idle commands/s"], rows
        ),
        f"- Goal refund wake p99 < 5 ms: {num(r['p99_ms'], 2)} ms, {goal(r['goal_p99_under_5ms'])}.",
        *waiting_floor(r),
        f"- Goal < 10 commands/s with 1,000 waiters: {num(s['commands_per_s'], 2)}/s over {s['hold_s']} s "
        f"({s['commands'] or 'none'}), {goal(s['goal_under_10_per_s'])}.",
        f"- Queue places left behind after cancelling the 1,000 waiters at once: {s['queue_places_left_after_cancel']} "
        "(they expire after 3 heartbeats).",
        f"- Goal < 5 commands/s with 1,000 waiters: {goal(s.get('goal_under_5_per_s'))}.",
        "",
        *waiting_crowds(d.get("crowds")),
    ]


def waiting_floor(r: dict[str, Any]) -> list[str]:
    """The refund wake against the raw PUBLISH-to-subscriber hop measured in the same run."""
    hop = r.get("raw_publish_hop")
    if not hop:
        return []
    return [
        f"- Raw PUBLISH to a redis-py subscriber in another process ({hop['hops']} hops): p50 "
        f"{num(hop['p50_ms'], 2)} / p99 {num(hop['p99_ms'], 2)} ms. Refund wake p99 is "
        f"{num(r.get('p99_vs_raw_hop'), 1)}x that: goal within 5x {goal(r.get('goal_p99_within_5x_of_raw_hop'))}; "
        f"goal p99 < 3 ms {goal(r.get('goal_p99_under_3ms'))}.",
    ]


def waiting_crowds(c: dict[str, Any] | None) -> list[str]:
    """Redis commands per admission for crowds of waiters (no stampede), and their deadlines."""
    if not c:
        return []
    rows = []
    for key in ("window_10_per_tenant", "window_60_per_tenant", "saturated_2000"):
        e = c[key]
        top = ", ".join(f"{name} {n:g}" for name, n in list(e["top_commands_per_admission"].items())[:5])
        late = (
            f"{e['timeouts']} timeouts (timeout={e['timeout_s']:g} s), past the timeout p50 "
            f"{num(e['p50_late_past_timeout_ms'], 0)} / max {num(e['max_late_past_timeout_ms'], 0)} ms"
            if e["timeouts"]
            else "no timeouts"
        )
        rows.append(
            [
                f"{e['tenants']} tenants x {e['waiters_per_tenant']} waiters, {' + '.join(e['limits'])}",
                num(e["commands_per_admission"], 1),
                num(e["admissions_per_s"], 0),
                top,
                late,
            ]
        )
    return [
        "Crowds: waiters spread over the fleet's processes acquire (and, on the saturated budget, hold 0.8 s), "
        "commit and queue again. Redis commands per admission from INFO commandstats (commands run inside "
        "scripts included), median of consecutive intervals.",
        "",
        *table(["crowd", "commands per admission", "admissions/s", "top commands per admission", "deadlines"], rows),
        f"- Goal <= 60 per admission on the refilling window, flat (60 vs 10 per tenant "
        f"{num(c['flat_ratio_60_vs_10'], 2)}x, goal <= 1.5x): {goal(c['goal_window_at_most_60_and_flat'])}.",
        f"- Goal <= 60 per admission with 2,000 waiters on usd + concurrency: {goal(c['goal_saturated_at_most_60'])}.",
        "",
    ]


def memory(d: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("slowburn", "limits-moving-window", "pyrate-limiter-redis"):
        for row in d[name]["rows"]:
            rows.append(
                [
                    name,
                    num(row["admissions"])
                    + (f" ({row['failed_calls']} calls failed)" if row.get("failed_calls") else ""),
                    num(row["bytes_per_limit"]),
                    num(row["used_memory_growth_per_admission"]),
                ]
            )
    return [
        "## 4. Memory",
        "",
        "Bytes per limit: MEMORY USAGE (all elements) of the window keys, divided by the number of limits "
        "(slowburn: 3 windowed limits, concurrency excluded). used_memory growth per admission includes "
        "slowburn's tombstones of settled reservations (kept 10 min) and ledger entries.",
        "",
        *table(["limiter", "admissions", "bytes per limit", "used_memory growth / admission"], rows),
        f"- Goal slowburn flat (bounded whatever the admissions: at most 61 buckets, under "
        f"{num(d.get('bound_bytes_per_limit', 2048))} bytes per limit): {goal(d['goal_slowburn_flat'])}; "
        f"x{num(d['slowburn']['growth'], 2)} from {num(d['checkpoints'][0])} to {num(d['checkpoints'][-1])} "
        f"admissions as more buckets of each window come into use (sliding logs: "
        f"x{num(d['limits-moving-window']['growth'], 1)} and x{num(d['pyrate-limiter-redis']['growth'], 1)}).",
        "",
        *memory_per_admission(d),
    ]


def memory_per_admission(d: dict[str, Any]) -> list[str]:
    """The steady-state bytes a settled admission leaves, and one tenant's bytes by key kind."""
    out: list[str] = []
    steady = d.get("steady_state")
    if steady:
        left = ", ".join(f"{k} {num(v)}" for k, v in steady["keys_left_by_kind"].items())
        out += [
            f"- Redis bytes per admission in steady state, beyond the ledger (used_memory growth minus the ledger's "
            f"growth, over {num(steady['admissions'])} admissions all settled): "
            f"{num(steady['bytes_per_admission_beyond_ledger'])} bytes, goal at most {num(steady['goal_bytes'])}: "
            f"{goal(steady['goal_met'])}. Each leaves its tombstone, kept 10 minutes: "
            f"{num(steady['at_1000_per_s_mb'])} MB at 1,000 admissions/s. Keys left by kind: {left}.",
        ]
    tenant = d.get("per_tenant")
    if tenant:
        for label, what in (("default", "Redis's default"), ("small_stream_node", "")):
            row = tenant[label]
            kinds = ", ".join(f"{k} {num(v)}" for k, v in row["by_kind"].items())
            node = f"stream-node-max-bytes {num(row['stream_node_max_bytes'])}" + (f" ({what})" if what else "")
            out.append(
                f"- One tenant ({', '.join(tenant['limits'])}) after one settled call, {node}: "
                f"{num(row['total'])} bytes (MEMORY USAGE by key kind: {kinds})."
            )
    return [*out, ""] if out else []


def tenants(d: dict[str, Any]) -> list[str]:
    s = d["summary"]
    rows = []
    for label, procs in (("1p", "1 process"), ("fleet", "4 processes")):
        x = s[label]
        us = x.get("server_us_per_request", {})
        for mode, suffix in (
            ("calls shared by tenants", ""),
            ("a call per tenant, pipelined", "_call_per_tenant"),
            ("a call per tenant, not pipelined", "_unpipelined"),
        ):
            if f"all_tenants{suffix}_per_s" not in x:
                continue
            rows.append(
                [
                    procs,
                    mode,
                    num(x["one_tenant_per_s"]),
                    num(x[f"all_tenants{suffix}_per_s"]),
                    num(x[f"all_over_one{suffix}"], 2),
                    num(x[f"all_tenants{suffix}_p99_ms"], 2),
                    num(us.get("one_tenant"), 1),
                    num(us.get(f"all_tenants{suffix}"), 1),
                ]
            )
    kinds = ", ".join(f"{k} {num(v)}" for k, v in d["key_bytes_median_by_kind"].items())
    lines = [
        "## 5. Scale of tenants",
        "",
        f"{num(d['tenants'])} tenants, each with {', '.join(d['limits'])}; acquire+commit on a random tenant per "
        "call, against the same three limits on one tenant, in the same run: the default (the requests of the "
        "tenants ready in one loop turn share script calls, up to 8 tenants and 8 requests a call), one call per "
        "tenant in one pipeline (`Engine.tenants_per_call = 1`, as on a Redis Cluster), and one round trip per "
        "call (`Engine.pipeline_size = 1` too); one tenant's calls go out the same either way. "
        "Server µs: Redis's time in scripts (INFO commandstats) per "
        "request (an acquire or a commit).",
        "",
        *table(
            [
                "processes",
                "tenants' calls",
                "one tenant calls/s",
                "random tenant calls/s",
                "ratio",
                "p99 ms (random)",
                "server µs/request (one)",
                "server µs/request (random)",
            ],
            rows,
        ),
    ]
    per_script = s.get("per_script_1p")
    if per_script:
        lines += [
            "",
            "Per script, from 1 process (acquires for up to 1 s, then their commits; a random tenant has one "
            "request in a call):",
            "",
            *table(
                ["load", "acquire µs/request", "requests/acquire call", "commit µs/request", "requests/commit call"],
                [
                    [
                        kind.replace("_", " "),
                        num(v["acquire_us_per_request"], 1),
                        num(v["acquire_requests_per_call"], 1),
                        num(v["commit_us_per_request"], 1),
                        num(v["commit_requests_per_call"], 1),
                    ]
                    for kind, v in per_script.items()
                ],
            ),
        ]
    one, fleet = s["1p"], s["fleet"]
    lines += [
        "",
        f"- Goal random tenant >= 0.8x one tenant: {num(one['all_over_one'], 2)}x (1 process), "
        f"{num(fleet['all_over_one'], 2)}x (4 processes), "
        f"{goal(one['all_over_one'] >= 0.8 and fleet['all_over_one'] >= 0.8)}.",
        f"- Memory: {num(d['window_bytes_per_tenant_median'])} bytes of windows per tenant "
        f"({num(d['window_bytes_per_limit_median'])} per limit); "
        f"limits config {num(d['limits_config_bytes_per_tenant'])} "
        f"bytes per tenant; used_memory after one call per tenant {num(d['used_memory_per_tenant_after_one_call'])} "
        f"bytes per tenant. Median bytes by key kind: {kinds}.",
        "",
    ]
    return lines


def sync_twin(d: dict[str, Any]) -> list[str]:
    s, x = d["summary"], d["ratios"]
    names = {"async": "async Budget", "sync": "sync twin", "sync_baseline": "sync twin, baseline portal (before)"}
    rows = []
    for kind, what in names.items():
        wide, one = s["wide"][kind], s["one"][kind]
        rows.append(
            [
                what,
                num(wide["per_s"]),
                num(wide["p50_ms"], 2),
                "1.00" if kind == "async" else num(x[f"{kind}_threads_share_of_tasks"], 2),
                num(one["p50_ms"], 3),
                "1.00" if kind == "async" else num(x[f"{kind}_p50_x_async"], 2),
            ]
        )
    g = d["goals"]
    return [
        "## Sync twin: threads against tasks",
        "",
        f"acquire+commit in a closed loop on one tenant ({', '.join(d['limits'])}, never reached), in one process: "
        f"{d['wide']} asyncio tasks on the async Budget against {d['wide']} threads on `budget.sync()`, then 1 "
        "task against 1 thread for the latency; the baseline row is the hand-off before issue 16 (a private loop "
        "per twin, `run_coroutine_threadsafe` per call), run interleaved in the same repetitions. Ratios are "
        "medians of per-repetition ratios.",
        "",
        *table(
            [
                "caller",
                f"calls/s ({d['wide']} wide)",
                "p50 ms (wide)",
                "throughput (x async)",
                "p50 ms (1 wide)",
                "p50 (x async)",
            ],
            rows,
        ),
        f"- Goal sync twin p50 within 1.25x of async: {num(x['sync_p50_x_async'], 2)}x, "
        f"{goal(g['p50_within_1.25x_of_async'])} (before: {num(x['sync_baseline_p50_x_async'], 2)}x).",
        f"- Goal {d['wide']} threads >= 80% of {d['wide']} tasks' throughput: "
        f"{num(100 * x['sync_threads_share_of_tasks'], 0)}%, {goal(g['threads_at_least_80pct_of_tasks'])} "
        f"(before: {num(100 * x['sync_baseline_threads_share_of_tasks'], 0)}%).",
        "",
    ]


def cluster(d: dict[str, Any]) -> list[str]:
    s, m = d["summary"], d["model"]
    rows = [
        [
            label,
            num(s[key]["per_s"]),
            num(s[key]["cpu_us_per_admission"], 1),
            num(100 * s[key]["busiest_node_share"]) + " %",
            num(s[key]["p99_ms"], 2),
        ]
        for key, label in (("spread", "spread over the nodes"), ("one_node", "all on one node"))
    ]
    model_rows = [[f"{n} nodes", num(c["admissions_per_s"]), num(c["tenants"])] for n, c in m["clusters"].items()]
    gib = m["memory_per_node_bytes"] / 2**30
    return [
        "## 6. Past one node: a 3-node Redis Cluster, and the capacity model",
        "",
        f"{d['nodes']} primaries on this machine; {num(d['tenants_per_set'])} tenants per set, each with "
        f"{', '.join(d['limits'])}; acquire+commit on a random tenant per call, 4 processes x 16 tasks. The "
        "load generator shares the cores with the servers, so calls/s is bound by the clients here; server CPU "
        "(INFO cpu, user+sys, every node) per admission is what the model scales.",
        "",
        *table(["tenants", "calls/s", "server CPU µs/admission", "busiest node's share", "p99 ms"], rows),
        f"- Shape check: the busiest node took {num(100 * s['spread']['busiest_node_share'])} % of the admissions "
        f"(a third is even); CPU per admission spread / one node = "
        f"{num(d['spread_over_one_node_cpu_per_admission'], 2)} (a client's pipeline splits by node, so each node "
        "reads shorter pipelines; the model uses the spread figure); throughput spread / one node = "
        f"{num(d['spread_over_one_node_throughput'], 2)} (client-bound here).",
        f"- Bytes per tenant (limits, windows, clock, ledger and trail after one call): "
        f"{num(d['bytes_per_tenant']['one_node'])}.",
        f"- Model: one node at {num(100 * m['utilisation'])} % of a core admits "
        f"{num(m['admissions_per_s_per_node'])}/s; balance (mean / busiest node's share) {num(m['balance'], 2)}; "
        f"{num(m['tenants_per_node'])} tenants per node of {gib:g} GiB filled to {num(100 * m['memory_headroom'])} %.",
        "",
        *table(["cluster", "admissions/s", "tenants"], model_rows),
        f"- {num(m['target']['tenants'])} tenants at {num(m['target']['admissions_per_s'])} admissions/s: "
        f"{m['nodes_for_rate']} nodes for the rate, {m['nodes_for_tenants']} for the tenants: "
        f"**{m['nodes_for_target']} primaries** (each with a replica for failover).",
        "",
    ]
