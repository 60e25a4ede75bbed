"""Sections 1 and 4: latency/throughput of the small JSON POST, and workerd CPU per request.

One set of load runs feeds both (and the steady-state KV count of section 6): for each
repetition and concurrency, every target in turn (rotated start so none always runs first),
workerd's CPU time read from /proc around each run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bench.common import log, median
from bench.context import Bench
from bench.probes import cpu_seconds
from bench.render import fmt, met, table
from bench.sections import Section

CONCURRENCY = (1, 16)


@dataclass
class KvSteady:
    get: int = 0
    put: int = 0
    requests: int = 0
    seconds: float = 0.0  # under load
    span: float = 0.0  # wall clock from the first to the last gateway run


@dataclass
class LoadRuns:
    runs: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    kv: KvSteady = field(default_factory=KvSteady)


def measure(bench: Bench) -> LoadRuns:
    return bench.once("load", lambda: _measure(bench))


def _measure(bench: Bench) -> LoadRuns:
    out = LoadRuns()
    targets = bench.targets
    kv_gw = bench.target("gateway")
    t_first: float | None = None
    for rep in range(bench.profile.reps):
        for conns in CONCURRENCY:
            k = rep % len(targets)
            for t in targets[k:] + targets[:k]:
                if t is kv_gw:
                    assert kv_gw.server is not None
                    kv_gw.server.kv_stats(reset=True)
                    t_first = t_first or time.monotonic()
                c0 = cpu_seconds(t.workerd)
                r = bench.gen.run(t.post_url, conns, bench.profile.load_s, t.auth)
                c1 = cpu_seconds(t.workerd)
                r["cpu_s"] = None if c0 is None or c1 is None else c1 - c0
                if t is kv_gw and t_first is not None:
                    s = kv_gw.server.kv_stats()
                    out.kv.get += s["get"]
                    out.kv.put += s["put"]
                    out.kv.requests += r["requests"]
                    out.kv.seconds += r["duration_us"] / 1e6
                    out.kv.span = time.monotonic() - t_first
                out.runs.setdefault((t.name, conns), []).append(r)
                rps = r["requests"] / (r["duration_us"] / 1e6)
                log(
                    f"load {t.name:>16} c={conns:<2} {rps:8.0f} req/s p50 "
                    f"{r['p50_us'] / 1000:.2f} ms errors {r['socket_errors']}+{r['status_errors']}"
                )
    return out


def stats(rs: list[dict]) -> dict:
    return {
        "p50": median(r["p50_us"] / 1000 for r in rs),
        "p90": median(r["p90_us"] / 1000 for r in rs),
        "p99": median(r["p99_us"] / 1000 for r in rs),
        "rps": median(r["requests"] / (r["duration_us"] / 1e6) for r in rs),
        "errors": sum(r["socket_errors"] + r["status_errors"] for r in rs),
        "cpu_ms": median(
            r["cpu_s"] * 1000 / r["requests"] if r["cpu_s"] is not None and r["requests"] else None
            for r in rs
        ),
    }


def ratios(runs: dict[tuple[str, int], list[dict]], name: str, base: str, conns: int) -> dict:
    """Same-run ratios, taken per repetition, then the median."""
    g, b = runs.get((name, conns), []), runs.get((base, conns), [])
    pairs = list(zip(g, b, strict=False))
    return {
        "p50": median(x["p50_us"] / y["p50_us"] for x, y in pairs if y["p50_us"]),
        "rps": median(
            (x["requests"] / x["duration_us"]) / (y["requests"] / y["duration_us"])
            for x, y in pairs
            if y["requests"]
        ),
    }


def render_latency(lr: LoadRuns, bench: Bench) -> list[str]:
    rows = []
    for conns in CONCURRENCY:
        for n in bench.names:
            if rs := lr.runs.get((n, conns)):
                s = stats(rs)
                rows.append(
                    [
                        n,
                        conns,
                        fmt(s["p50"]),
                        fmt(s["p90"]),
                        fmt(s["p99"]),
                        fmt(s["rps"], 0),
                        s["errors"],
                    ]
                )
    lines = table(
        ["target", "conc", "p50 ms", "p90 ms", "p99 ms", "req/s", "errors"],
        rows,
        {1, 2, 3, 4, 5, 6},
    )
    ratio_rows = []
    for g in [n for n in bench.names if n.startswith("gateway")]:
        for base in ("bare-js", "bare-py"):
            for conns in CONCURRENCY:
                r = ratios(lr.runs, g, base, conns)
                if base == "bare-py":
                    ok = (
                        None
                        if None in (r["p50"], r["rps"])
                        else r["p50"] <= 1.2 and r["rps"] >= 0.8
                    )
                    tgt = "p50 ≤ 1.2x, req/s ≥ 0.8x"
                else:
                    ok, tgt = None, "(floor; no target)"
                ratio_rows.append(
                    [f"{g} / {base}", conns, f"{fmt(r['p50'])}x", f"{fmt(r['rps'])}x", tgt, met(ok)]
                )
    header = ["ratio (same run)", "conc", "p50 latency", "throughput", "target", "met?"]
    return lines + table(header, ratio_rows, {1, 2, 3})


def render_cpu(lr: LoadRuns, bench: Bench) -> list[str]:
    rows = []
    for n in bench.names:
        if n == "direct":
            continue
        c1, c16 = (stats(lr.runs.get((n, c), []))["cpu_ms"] for c in CONCURRENCY)
        if n.startswith("gateway"):
            vals = [x for x in (c1, c16) if x is not None]
            ok = max(vals) <= 2.0 if vals else None
            rows.append([n, fmt(c1, 3), fmt(c16, 3), "≤ 2 ms", met(ok)])
        else:
            rows.append([n, fmt(c1, 3), fmt(c16, 3), "", ""])
    header = ["target", "conc 1 ms CPU/req", "conc 16 ms CPU/req", "target", "met?"]
    return table(header, rows, {1, 2})


LATENCY = Section(
    1,
    "latency",
    "Latency and throughput (small JSON POST)",
    measure,
    lambda r, b: [LATENCY.heading, "", *render_latency(r, b)],
)
CPU = Section(
    4,
    "cpu",
    "CPU per request (workerd process utime+stime from /proc)",
    measure,
    lambda r, b: [CPU.heading, "", *render_cpu(r, b)],
)
