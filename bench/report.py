#!/usr/bin/env python3
"""The benchmark's Markdown tables and the targets of issue 4, from a results file of bench/run.py.

    .venv/bin/python bench/report.py [bench/results/latest.json]    # print a results file's report again

Only the standard library: a results file can be rendered anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The runner's scenarios and apps, in the order of the tables.
SCENARIOS = ["list", "get", "create", "update", "toggle", "delete", "mix"]
APPS = ["service", "floor"]

# Targets of issue 4.
RPS_RATIO_MIN, RPS_RATIO_AIM = 0.75, 0.90
P99_RATIO_MAX = 2.0
PROXY_P50_RATIO_MAX = 1.2
SCALE_P50_RATIO_MAX = 1.2
BIG_LIST_RATIO_MAX = 10.0
RSS_MAX_MB = 60.0
RSS_GROWTH_TOLERANCE_MB = 1.0  # "no growth": at most this much between the 50,000th and 100,000th request
LIMIT_RSS_RETURN_MB = 10.0  # after the longest list, a worker is back within this much of its RSS before it
STALL_SECONDS = 1.0

Target = dict[str, Any]  # {"target": name, "met": bool, "detail": the numbers}
Section = tuple[list[str], list[Target]]  # the lines of a section and the targets it judges


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 2 decimals; None when either is missing or b is 0."""
    if a is None or not b:
        return None
    return round(a / b, 2)


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: '-' for None, a float to `digits` decimals, anything else as str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned, padded to their widths."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        + " |"
        for r in cells
    ]
    return "\n".join([line, sep, *body])


def target(name: str, met: bool, detail: str) -> Target:
    """One target's entry: its name, whether it was met, and the numbers behind the verdict."""
    return {"target": name, "met": bool(met), "detail": detail}


def settings(results: dict[str, Any]) -> dict[str, Any]:
    """The run's command-line settings, as bench/run.py stored them in the results."""
    stored: dict[str, Any] = results["meta"]["settings"]
    return stored


def header(results: dict[str, Any]) -> list[str]:
    """The machine, versions and commit, and the gunicorn settings both apps ran with."""
    meta = results["meta"]
    g = meta["gunicorn"]
    return [
        f"{meta['date']}; {meta['nproc']} cores ({meta['cpu']}); PostgreSQL {meta['postgresql']}; "
        f"Python {meta['python']}; {meta['wrk']} -t1; commit {meta.get('git', '?')}",
        f"gunicorn (both apps): {g.get('worker_class')}, {g.get('workers')} workers x {g.get('threads')} "
        f"threads; service pool {g.get('DB_POOL_SIZE')} + overflow {g.get('DB_MAX_OVERFLOW')}",
    ]


def counts_load_section(results: dict[str, Any]) -> Section:
    """The service vs floor table at the main concurrency (target 2), and statements per request (target 1)."""
    out: list[str] = []
    targets: list[Target] = []
    args = settings(results)
    counts = results.get("counts", {})
    main = results.get("load", {}).get(str(args["connections"]), {})

    def spr(scenario: str, kind: str) -> str:
        """Steady statements per request of one scenario and app, or '-' without a count."""
        entry = counts.get(scenario, {}).get(kind) if isinstance(counts.get(scenario), dict) else None
        return f"{entry['steady_statements_per_request']:.2f}" if entry else "-"

    if main:
        rows = []
        for scenario in SCENARIOS:
            s, f = main[scenario]["service"], main[scenario]["floor"]
            rows.append(
                [
                    scenario,
                    s["rps"],
                    f["rps"],
                    ratio(s["rps"], f["rps"]),
                    s["p50_ms"],
                    f["p50_ms"],
                    s["p99_ms"],
                    f["p99_ms"],
                    ratio(s["p99_ms"], f["p99_ms"]),
                    f"{s['errors']}/{f['errors']}",
                    f"{spr(scenario, 'service')}/{spr(scenario, 'floor')}",
                    f"{fmt(s.get('cpu_ms_per_request'), 2)}/{fmt(f.get('cpu_ms_per_request'), 2)}",
                ]
            )
        rounds = main["list"]["service"].get("rounds", 1)
        out.append(
            f"\n### Service vs floor at {args['connections']} connections\n\n"
            f"{args['duration']:g} s per scenario and app ({rounds} alternating round(s)); latency in ms; "
            "errors, statements per request (at the server, separate count pass) and the app's CPU ms per "
            "request (all its processes, from /proc) as service/floor.\n"
        )
        headers = ["scenario", "svc req/s", "floor req/s", "ratio", "svc p50", "floor p50", "svc p99"]
        headers += ["floor p99", "p99 ratio", "errors", "stmts/req", "CPU ms/req"]
        cells = [
            [r[0], f"{r[1]:.0f}", f"{r[2]:.0f}", fmt(r[3], 2), f"{r[4]:.2f}", f"{r[5]:.2f}", f"{r[6]:.2f}"]
            + [f"{r[7]:.2f}", fmt(r[8], 2), r[9], r[10], r[11]]
            for r in rows
        ]
        out.append(table(headers, cells))
        worst = min(rows, key=lambda r: r[3] or 0)
        targets.append(
            target(
                "2. req/s >= 0.75x the floor at 32 connections, every scenario (aim 0.9x)",
                all((r[3] or 0) >= RPS_RATIO_MIN for r in rows),
                f"lowest {worst[3]}x ({worst[0]}); >= 0.75x in {sum((r[3] or 0) >= RPS_RATIO_MIN for r in rows)}/7, "
                f">= 0.9x in {sum((r[3] or 0) >= RPS_RATIO_AIM for r in rows)}/7",
            )
        )
    if "list" in counts:
        steady = {s: counts[s]["service"]["steady_statements_per_request"] for s in SCENARIOS}
        raw = {s: counts[s]["service"]["statements_per_request"] for s in SCENARIOS}
        registrations = sum(counts[s]["service"]["registrations"] for s in SCENARIOS)
        kinds = {s: counts[s]["service"]["statement_kinds"] for s in SCENARIOS}
        exempt = (
            f"; plus {registrations} first-write user registrations (exempt; raw "
            + ", ".join(f"{s} {v:g}" for s, v in raw.items() if v != steady[s])
            + ")"
            if registrations
            else ""
        )
        targets.append(
            target(
                "1. exactly 1 statement per request at the server (BEGIN/COMMIT/ROLLBACK/pings included)",
                all(v == 1.0 for v in steady.values()),
                ", ".join(f"{s} {v:g}" for s, v in steady.items())
                + exempt
                + "; kinds seen: "
                + ", ".join(sorted({k for v in kinds.values() for k in v})),
            )
        )
    return out, targets


def tail_section(results: dict[str, Any]) -> Section:
    """p99, errors and the longest gap at every level (targets 3a and 3b)."""
    load = results.get("load", {})
    if not load:
        return [], []
    args = settings(results)
    rows = []
    p99_ok, clean = True, True
    for level in sorted(load, key=int):
        for scenario in [name for name in SCENARIOS if name in load[level]]:
            s, f = load[level][scenario]["service"], load[level][scenario]["floor"]
            r = ratio(s["p99_ms"], f["p99_ms"])
            if int(level) >= args["connections"] and (r or 0) > P99_RATIO_MAX:
                p99_ok = False
            if s["errors"] or s["max_gap_s"] >= STALL_SECONDS:
                clean = False
            rows.append(
                [level, scenario, f"{s['rps']:.0f}", f"{f['rps']:.0f}", f"{s['p99_ms']:.2f}", f"{f['p99_ms']:.2f}"]
                + [fmt(r, 2), f"{s['errors']}/{f['errors']}", f"{s['max_gap_s']:.2f}/{f['max_gap_s']:.2f}"]
            )
    out = [
        f"\n### Tail latency, errors, stalls\n\n{args['check_duration']:g} s per scenario and app at the "
        "other levels; max gap = longest time without a response (s), service/floor.\n",
        table(
            ["conns", "scenario", "svc req/s", "floor req/s", "svc p99", "floor p99", "p99 ratio", "errors", "max gap"],
            rows,
        ),
    ]
    judged = [r for r in rows if int(r[0]) >= args["connections"]]
    worst = max(judged, key=lambda r: float(r[6]) if r[6] != "-" else 0)
    levels = sorted(load, key=int)
    errors = sum(load[level][s]["service"]["errors"] for level in levels for s in load[level])
    gap = max(load[level][s]["service"]["max_gap_s"] for level in levels for s in load[level])
    targets = [
        target(
            "3a. p99 at 32 and 128 connections <= 2x the floor's",
            p99_ok,
            f"worst {worst[6]}x ({worst[1]} at {worst[0]}); over 2x in "
            f"{sum(float(r[6]) > P99_RATIO_MAX for r in judged if r[6] != '-')}/{len(judged)}",
        ),
        target(
            f"3b. zero errors and no stall (>= {STALL_SECONDS:g} s without a response) at "
            + ", ".join(levels)
            + " connections",
            clean,
            f"service errors {errors}, longest gap {gap:.2f} s",
        ),
    ]
    return out, targets


def proxy_section(results: dict[str, Any]) -> Section:
    """p50 of both apps behind the delay proxy (target 4)."""
    proxy = results.get("proxy")
    if not proxy:
        return [], []
    rtt = proxy["select1_round_trip"]
    out = [
        f"\n### Behind the delay proxy\n\n{proxy['delay_ms_each_way']:g} ms each way "
        f"(SELECT 1 round trip p50: {rtt['direct_ms']:.2f} ms direct, {rtt['proxied_ms']:.2f} ms "
        f"through the proxy); p50 in ms.\n"
    ]
    rows, ratios = [], []
    for level, runs in proxy["runs"].items():
        for scenario in SCENARIOS:
            s, f = runs[scenario]["service"], runs[scenario]["floor"]
            r = ratio(s["p50_ms"], f["p50_ms"])
            ratios.append((r or 99, scenario, level))
            rows.append(
                [level, scenario, f"{s['p50_ms']:.2f}", f"{f['p50_ms']:.2f}", fmt(r, 2)]
                + [f"{s['rps']:.0f}", f"{f['rps']:.0f}", f"{s['errors']}/{f['errors']}"]
            )
    out.append(
        table(["conns", "scenario", "svc p50", "floor p50", "p50 ratio", "svc req/s", "floor req/s", "errors"], rows)
    )
    worst = max(ratios)
    within = sum(r <= PROXY_P50_RATIO_MAX for r, _, _ in ratios)
    targets = [
        target(
            "4. behind the 1 ms proxy, p50 <= 1.2x the floor's, every scenario",
            all(r <= PROXY_P50_RATIO_MAX for r, _, _ in ratios),
            f"worst {worst[0]}x ({worst[1]} at {worst[2]} conn.); within 1.2x: {within}/{len(ratios)}",
        )
    ]
    return out, targets


def scale_section(results: dict[str, Any]) -> Section:
    """Lists on a near-empty vs a loaded table, their plans, and the whole big list (targets 5a, 5b, 5c)."""
    scale = results.get("scale")
    if not scale:
        return [], []
    rows = []
    for name, entry in scale["lists"].items():
        plan = scale["plans"].get(name)
        rows.append(
            [name, f"{entry['near_empty']['p50_ms']:.2f}", f"{entry['loaded']['p50_ms']:.2f}", fmt(entry["ratio"], 2)]
            + ["-" if not plan else ("yes" if plan["index_scan"] else "NO")]
        )
    big = scale["big_list"]
    out = [
        f"\n### Scale\n\nA user's list (limit=20) for each status and sort, p50 in ms at 1 connection: "
        f"near-empty table ({scale['near_empty_tasks']} tasks) vs {scale['tasks']:,} tasks of "
        f"{scale['other_users']:,} other users (bulk-inserted in {scale['insert_seconds']} s), "
        "alternating rounds; index scan = EXPLAIN ANALYZE of the service's own statement.\n",
        table(["status/sort", "near-empty p50", "loaded p50", "ratio", "index scan"], rows),
        f"\nWhole list of {big['tasks']} tasks vs {big['small_tasks']} tasks (p50 at 1 connection): "
        + "; ".join(
            f"{kind} {big[kind]['list_big']['p50_ms']:.2f} vs "
            f"{big[kind]['list_small']['p50_ms']:.2f} ms ({big[kind]['ratio']}x)"
            for kind in APPS
            if kind in big
        ),
    ]
    worst = max(rows, key=lambda r: float(r[3]) if r[3] != "-" else 0)
    within = sum(r[3] != "-" and float(r[3]) <= SCALE_P50_RATIO_MAX for r in rows)
    plans = scale["plans"]
    targets = [
        target(
            "5a. list p50 with the big table <= 1.2x near-empty, each status and sort",
            all(r[3] != "-" and float(r[3]) <= SCALE_P50_RATIO_MAX for r in rows),
            f"worst {worst[3]}x ({worst[0]}); within 1.2x: {within}/{len(rows)}",
        ),
        target(
            "5b. EXPLAIN shows an index scan (the service's own statements)",
            len(plans) == len(scale["lists"]) + 1 and all(p["index_scan"] for p in plans.values()),
            f"{sum(p['index_scan'] for p in plans.values())}/{len(plans)} plans captured and index-scanned",
        ),
        target(
            f"5c. whole list of {big['tasks']} tasks < 10x a {big['small_tasks']}-task list",
            (big["service"]["ratio"] or 99) < BIG_LIST_RATIO_MAX,
            f"service {big['service']['ratio']}x, floor {big['floor']['ratio']}x",
        ),
    ]
    return out, targets


def memory_section(results: dict[str, Any]) -> Section:
    """Each service worker's RSS at 0, N/2 and N requests (target 6)."""
    memory = results.get("memory")
    if not memory:
        return [], []
    snaps = memory["snapshots"]
    workers = max(len(s["workers"]) for s in snaps)
    rows = [
        [str(s["requests"])]
        + [f"{w.get('rss_mb', 0):.1f}" for w in s["workers"].values()]
        + [""] * (workers - len(s["workers"]))
        for s in snaps
    ]
    floor_rss = [w.get("rss_mb", 0) for w in memory["floor_workers_now"].values()]
    out = [
        f"\n### Memory\n\nRSS (MB) of each service worker of a fresh service under the mix at 32 "
        f"connections (the floor's workers, for scale: "
        f"{', '.join(f'{r:.1f}' for r in floor_rss)} MB).\n",
        table(["requests"] + [f"worker {i + 1}" for i in range(workers)], rows),
    ]
    targets = [
        target(
            f"6. worker RSS <= {RSS_MAX_MB:g} MB after {snaps[-1]['requests']:,} requests, no growth "
            f"(<= {RSS_GROWTH_TOLERANCE_MB:g} MB) over the second half",
            memory["max_rss_mb"] <= RSS_MAX_MB
            and memory["max_growth_mb"] <= RSS_GROWTH_TOLERANCE_MB
            and memory["same_workers"],
            f"max RSS {memory['max_rss_mb']} MB; max growth {memory['max_growth_mb']} MB",
        )
    ]
    return out, targets


def limit_section(results: dict[str, Any]) -> Section:
    """The worst case a user can make: whole lists at the per-user limit and the worker's RSS (target 10.2)."""
    limit = results.get("limit")
    if not limit:
        return [], []
    rows = [
        [str(i + 1), str(entry["status"]), f"{entry['mb']:.1f}", f"{entry['ms']:.0f}"]
        + [fmt(entry.get("rss_mb")), fmt(entry.get("peak_rss_mb"))]
        for i, entry in enumerate(limit["lists"])
    ]
    out = [
        f"\n### The worst case a user can make\n\nOne user at the limit, {limit['tasks']:,} tasks, every "
        f"field at its longest in 4-byte characters (bulk-inserted in {limit['insert_seconds']} s), on a "
        f"service with one worker. The whole list, one request after another; the worker's RSS (MB) "
        f"after each and its peak so far. Before: {limit['rss_before_mb']} MB; 0.5 s after the last: "
        f"{limit['rss_after_mb']} MB. At the limit, p50: a 20-task page {limit['page_p50_ms']} ms, a "
        f"create {limit['create_at_limit_p50_ms']} ms, the refused create past it "
        f"{limit['refused_p50_ms']} ms ({'/'.join(map(str, limit['refused_statuses']))}).\n",
        table(["list", "status", "MB", "ms", "RSS after", "peak RSS"], rows),
    ]
    targets = [
        target(
            f"10.2 the longest list is bounded: the worker back within {LIMIT_RSS_RETURN_MB:g} MB of its RSS, "
            "a create past the limit refused",
            limit["rss_after_mb"] - limit["rss_before_mb"] <= LIMIT_RSS_RETURN_MB
            and limit["refused_statuses"] == [409]
            and all(e["status"] == 200 for e in limit["lists"]),
            f"RSS {limit['rss_before_mb']} -> peak {limit['peak_rss_mb']} -> {limit['rss_after_mb']} MB; "
            f"list {max(e['ms'] for e in limit['lists']):.0f} ms at most",
        )
    ]
    return out, targets


def targets_section(targets: list[Target]) -> list[str]:
    """Every target judged in this run, met or MISSED, with its numbers."""
    if not targets:
        return []
    rows = [[t["target"], "met" if t["met"] else "MISSED", t["detail"]] for t in targets]
    return ["\n### Targets\n", table(["target", "met", "numbers"], rows)]


def report(results: dict[str, Any]) -> tuple[str, list[Target]]:
    """The Markdown report of a run's results (the phases it ran) and its targets, met or missed."""
    out = header(results)
    targets: list[Target] = []
    for section in (counts_load_section, tail_section, proxy_section, scale_section, memory_section, limit_section):
        lines, judged = section(results)
        out += lines
        targets += judged
    out += targets_section(targets)
    return "\n".join(out), targets


def sweep_report(results: dict[str, Any]) -> str:
    """The Markdown table of a sweep: one row per gunicorn configuration, medians of its rounds."""
    rows = results["sweep"]
    scenarios = list(rows[0]["scenarios"]) if rows else []
    meta = results["meta"]
    head = (
        f"{meta['date']}; {meta['nproc']} cores ({meta['cpu']}); service only"
        + (
            f", behind the delay proxy ({meta['behind_proxy_ms_each_way']:g} ms each way)"
            if meta.get("behind_proxy_ms_each_way")
            else ""
        )
        + f"; medians of {meta['rounds']} interleaved rounds of {meta['seconds_per_run']:g} s; "
        "CPU = the service's CPU ms per request\n\n"
    )
    headers = ["config", "pool"] + [f"{s} req/s" for s in scenarios] + [f"{s} p99 ms" for s in scenarios]
    headers += [f"{s} CPU" for s in scenarios] + ["errors", "RSS MB", "USS MB"]
    body = []
    for row in rows:
        runs = row["scenarios"]
        body.append(
            [row["config"], str(row["pool"])]
            + [f"{runs[s]['rps_median']:.0f}" for s in scenarios]
            + [f"{runs[s]['p99_ms_median']:.0f}" for s in scenarios]
            + [f"{runs[s]['cpu_ms_per_request_median']:.2f}" for s in scenarios]
            + [str(sum(r["errors"] for r in runs.values())), f"{row['rss_mb']:.1f}", f"{row['uss_mb']:.1f}"]
        )
    return head + table(headers, body)


def render(results: dict[str, Any]) -> str:
    """The report of a results file, a sweep's or a run's."""
    return sweep_report(results) if "sweep" in results else report(results)[0]


def main(argv: list[str]) -> int:
    """Print the report of a results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent / "results" / "latest.json"
    parser.add_argument("results", type=Path, nargs="?", default=default, help="a results file of bench/run.py")
    args = parser.parse_args(argv)
    print(render(json.loads(args.results.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
